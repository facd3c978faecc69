"""The CPU causal depthwise conv + SiLU kernels (numba) against PyTorch's conv1d and silu."""

import pytest
import torch
import torch.nn.functional as F

from medssm.ssm.causal_conv import conv_silu_backward, conv_silu_forward


def reference(x, weight, bias):
    length = x.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :length])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, k", [((2, 6, 11), 4), ((1, 5, 2), 4), ((3, 4, 1), 4), ((1, 3, 5000), 3)])
def test_conv_silu_matches_conv1d_then_silu(shape, k, bias, dtype, tol):
    """Output and the gradients of x, weight and bias, rows shorter than the kernel and long ones."""
    g = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
    weight = torch.randn(shape[1], 1, k, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], generator=g, dtype=dtype, requires_grad=True) if bias else None
    ref = reference(x, weight, b)
    grad_u = torch.randn(ref.shape, generator=g, dtype=dtype)
    params = [x, weight] + ([b] if bias else [])
    ref_grads = torch.autograd.grad(ref, params, grad_u)
    out = conv_silu_forward(x.detach(), weight, b)
    dx, dw, db = conv_silu_backward(x.detach(), weight, b, grad_u)
    assert (db is None) == (not bias)
    for got, want in zip([out, dx, dw, db][: 3 + bias], [ref, *ref_grads]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_conv_silu_saturates_without_overflow():
    """Large |conv(x)|: SiLU is x above ~+88 and 0 below ~-88 in float32, with no inf or NaN."""
    x = torch.tensor([[[-1e4, -100.0, -50.0, 0.0, 50.0, 100.0, 1e4]]])
    weight = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])  # the identity: u = silu(x)
    out = conv_silu_forward(x, weight, None)
    torch.testing.assert_close(out, F.silu(x), rtol=1e-6, atol=1e-30)
    dx, _, _ = conv_silu_backward(x, weight, None, torch.ones_like(x))
    assert torch.isfinite(dx).all()
