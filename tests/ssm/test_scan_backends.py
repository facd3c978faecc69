"""Every CPU backend against ``reference`` in float64: outputs, last state and all gradients."""

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medssm.ssm import backends, selective_scan, use_backend

from .scan_cases import make_inputs

BACKENDS = ["chunked", "fused"]


def assert_relative(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected| (exact zeros must stay zero)."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def check_against_reference(backend, kw, softplus, last_state, seed):
    """Forward and the gradient of a random linear loss of (out, last state) w.r.t. every input."""
    g = torch.Generator().manual_seed(seed)
    inputs = {k: v for k, v in kw.items() if v is not None}
    results = {}
    for name in ("reference", backend):
        result = selective_scan(**kw, delta_softplus=softplus, return_last_state=last_state, backend=name)
        results[name] = result if last_state else (result,)
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in results["reference"]]
    grads = {}
    for name, result in results.items():
        loss = sum((r * w).sum() for r, w in zip(result, weights))
        grads[name] = torch.autograd.grad(loss, list(inputs.values()))
    outputs = range(len(weights))
    for i in outputs:
        assert_relative(results[backend][i], results["reference"][i], 1e-10, ("out", "last state")[i])
    for key, got, want in zip(inputs, grads[backend], grads["reference"]):
        assert_relative(got, want, 1e-8, f"grad {key}")


CASES = [  # batch, dim, L, N, groups, D, z, delta_bias, softplus, last state
    (1, 3, 1, 4, None, True, True, True, True, True),
    (2, 4, 77, 3, None, False, False, False, False, False),
    (3, 6, 130, 5, 3, True, False, True, True, True),
    (2, 8, 200, 16, 2, False, True, False, True, True),
    (1, 2, 64, 2, 1, True, True, False, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}g{}".format(*c[:5]))
def test_matches_reference_float64(backend, case):
    batch, dim, length, n, groups, with_D, with_z, with_bias, softplus, last = case
    kw = make_inputs(batch, dim, length, n, groups, with_D, with_z, with_bias, requires_grad=True,
                     generator=torch.Generator().manual_seed(length), step_sizes=not softplus)
    check_against_reference(backend, kw, softplus, last, seed=length)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), per_group=st.integers(1, 3), groups=st.sampled_from([None, 1, 2]),
       length=st.integers(1, 150), n=st.integers(1, 9), flags=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference_float64(batch, per_group, groups, length, n, flags, seed):
    with_D, with_z, with_bias, softplus, last = flags
    dim = per_group * (groups or 1)
    kw = make_inputs(batch, dim, length, n, groups, with_D, with_z, with_bias, requires_grad=True,
                     generator=torch.Generator().manual_seed(seed), step_sizes=not softplus)
    for backend in BACKENDS:
        check_against_reference(backend, kw, softplus, last, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_close_to_float64_reference(backend):
    kw = make_inputs(2, 8, 300, 16, generator=torch.Generator().manual_seed(1))
    want = selective_scan(**kw, delta_softplus=True, backend="reference")
    got = selective_scan(**{k: None if v is None else v.float() for k, v in kw.items()},
                         delta_softplus=True, backend=backend)
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_under_autocast_computes_in_float32(backend):
    kw = make_inputs(dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    want = selective_scan(**kw, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan(**kw, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_uses_fused_on_cpu():
    """numba is a dependency: the fused scan must load, not be skipped."""
    assert "fused" in backends.available_backends()
    assert backends.resolve_backend("auto", torch.zeros(1)) == "fused"


def test_use_backend_selects_the_backend_of_every_scan_in_the_block(monkeypatch):
    calls = []
    for name in ("reference", "chunked"):
        original = backends.get_backend(name)
        monkeypatch.setitem(backends._BACKENDS, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    kw = make_inputs(dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    with use_backend("chunked"):
        selective_scan(**kw)
        with use_backend("reference"):
            selective_scan(**kw)
        selective_scan(**kw)
        selective_scan(**kw, backend="reference")  # an explicit backend wins
    assert calls == ["chunked", "reference", "chunked", "reference"]
    assert backends.current_backend() == "auto"
    with pytest.raises(ValueError, match="no_such_scan"):
        with use_backend("no_such_scan"):
            pass


def test_auto_falls_back_to_chunked_with_one_warning(monkeypatch):
    available = {k: v for k, v in backends._backends().items() if k != "fused"}
    monkeypatch.setattr(backends, "_BACKENDS", available)
    monkeypatch.setattr(backends, "_warned_fallback", False)
    kw = make_inputs(generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = selective_scan(**kw)
        second = selective_scan(**kw)
    assert [w.category for w in caught] == [RuntimeWarning] and "chunked" in str(caught[0].message)
    assert backends.resolve_backend("auto", kw["u"]) == "chunked"
    torch.testing.assert_close(first, selective_scan(**kw, backend="reference"))
    torch.testing.assert_close(first, second)


def test_chunked_exports_to_onnx_and_matches():
    ort = pytest.importorskip("onnxruntime")

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, z, delta_bias):
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    kw = make_inputs(2, 4, 21, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    args = tuple(kw.values())
    buffer = io.BytesIO()
    torch.onnx.export(Scan(), args, buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    (got,) = session.run(None, feeds)
    want = selective_scan(**kw, delta_softplus=True, backend="reference")
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
