"""The reference scan against an independent closed form, and the front end's contract."""

import pytest
import torch
import torch.nn.functional as F

from medssm.ssm import selective_scan

from .scan_cases import make_inputs


def closed_form(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y_t = sum_{s<=t} C_t . exp(A * sum_{r=s+1..t} delta_r) * delta_s B_s u_s  (+ D u, * silu z)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    B = B.repeat_interleave(dim // B.shape[1], 1)
    C = C.repeat_interleave(dim // C.shape[1], 1)
    cum = torch.cumsum(delta, -1)  # (b, d, L)
    y = torch.zeros_like(u)
    for t in range(length):
        for s in range(t + 1):
            decay = torch.exp(A[None] * (cum[..., t] - cum[..., s])[..., None])  # (b, d, N)
            y[..., t] += (C[..., t] * decay * B[..., s]).sum(-1) * delta[..., s] * u[..., s]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("length", [1, 6])
@pytest.mark.parametrize("softplus", [False, True])
def test_reference_matches_closed_form(groups, length, softplus):
    kw = make_inputs(length=length, groups=groups)
    out = selective_scan(**kw, delta_softplus=softplus, backend="reference")
    torch.testing.assert_close(out, closed_form(**kw, delta_softplus=softplus), rtol=1e-10, atol=1e-12)


def test_last_state_continues_the_scan():
    kw = make_inputs(length=9, with_D=False, with_z=False)
    full = selective_scan(**kw, backend="reference")
    first = {k: (v[..., :4] if k in ("u", "delta", "B", "C") else v) for k, v in kw.items()}
    _, h = selective_scan(**first, return_last_state=True, backend="reference")
    # y_4 from the carried state: C_4 . (exp(delta_4 A) h + delta_4 B_4 u_4)
    d4 = kw["delta"][..., 4] + kw["delta_bias"][:, None].T
    h5 = torch.exp(d4[..., None] * kw["A"]) * h + (d4 * kw["u"][..., 4])[..., None] * kw["B"][:, None, :, 4]
    torch.testing.assert_close((h5 * kw["C"][:, None, :, 4]).sum(-1), full[..., 4])


def test_float32_under_autocast_and_dtype_preserved():
    kw = {k: (v.to(torch.bfloat16) if v is not None else None) for k, v in make_inputs(dtype=torch.float32).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**kw, backend="reference")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_shapes_are_named():
    kw = make_inputs()
    kw["B"] = kw["B"][..., :-1]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**kw)
    with pytest.raises(ValueError, match="unknown or unavailable scan backend"):
        selective_scan(**make_inputs(), backend="nope")


def test_scan_flops_are_counted_analytically():
    from medssm.ssm import count_scan_flops

    kw = make_inputs(batch=2, dim=4, length=7, n=3)
    with count_scan_flops() as calls:
        selective_scan(**kw, backend="reference")
        selective_scan(**kw, backend="reference")
    assert calls == [9 * 2 * 4 * 7 * 3] * 2
    selective_scan(**kw, backend="reference")
    assert len(calls) == 2


def test_counting_without_computing_gives_zeros_of_the_right_shapes():
    from medssm.ssm import count_scan_flops

    kw = make_inputs(batch=2, dim=4, length=7, n=3)
    with count_scan_flops(compute=False) as calls:
        out, last = selective_scan(**kw, return_last_state=True, backend="reference")
    assert calls == [9 * 2 * 4 * 7 * 3]
    assert out.shape == (2, 4, 7) and last.shape == (2, 4, 3) and not out.any() and not last.any()
    assert selective_scan(**kw, backend="reference").any()  # outside the block: computed again
