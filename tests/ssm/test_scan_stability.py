"""float32 stability of the fast backends: huge step sizes and a very long sequence."""

import pytest
import torch

from medssm.ssm import selective_scan

BACKENDS = ["chunked", "fused"]


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def mamba_inputs(batch, dim, length, n, generator, bias_high=0.0):
    """float64 inputs as the Mamba layer makes them: A = -(1..N), delta_bias up to ``bias_high``."""
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=generator)  # noqa: E731
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length),
                A=-torch.arange(1, n + 1, dtype=torch.float64).repeat(dim, 1),
                B=r(batch, n, length), C=r(batch, n, length), D=r(dim), z=r(batch, dim, length),
                delta_bias=torch.rand(dim, dtype=torch.float64, generator=generator) * bias_high - 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_bias_up_to_20_with_softplus(backend):
    """Steps up to ~20 (log-decays down to -320 per step): finite and within 1e-4 of float64."""
    kw = mamba_inputs(2, 16, 333, 16, torch.Generator().manual_seed(0), bias_high=24.0)
    want = selective_scan(**kw, delta_softplus=True, backend="reference")
    got = selective_scan(**{k: v.float() for k, v in kw.items()}, delta_softplus=True, backend=backend)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) <= 1e-4


@pytest.fixture(scope="module")
def long_case():
    """L = 262,144, dim 16, N = 16, and its float64 output from ``fused``.

    The float64 oracle is ``fused`` rather than the (slow) sequential ``reference``: the two agree to
    1e-10 in float64, outputs and gradients (test_scan_backends.py).
    """
    kw = mamba_inputs(1, 16, 262_144, 16, torch.Generator().manual_seed(1))
    return kw, selective_scan(**kw, delta_softplus=True, backend="fused")


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_262144_float32(backend, long_case):
    kw, want = long_case
    got = selective_scan(**{k: v.float() for k, v in kw.items()}, delta_softplus=True, backend=backend)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) <= 1e-4
