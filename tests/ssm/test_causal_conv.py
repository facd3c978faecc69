"""The CPU causal depthwise conv (numba) against PyTorch's conv1d module."""

import pytest
import torch

from medssm.ssm.causal_conv import _CausalDepthwiseConv1d, causal_conv1d


@pytest.mark.parametrize("bias", [True, False])
def test_long_sequence_conv_matches_conv1d_module(bias):
    """The one-pass (numba) causal depthwise conv equals the module's conv1d, values and gradients,
    short rows and long; gradcheck in float64."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias)
    for length in (2, 3, 11, 5000):
        _check_conv_against_module(conv, torch.randn(2, 6, length, requires_grad=True), causal_conv1d)
    small = conv.double()
    args = (torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True), small.weight, small.bias)
    assert torch.autograd.gradcheck(_CausalDepthwiseConv1d.apply, args)


def _check_conv_against_module(conv, x, causal_conv1d):
    params = [x, *conv.parameters()]
    ref = conv(x)[..., : x.shape[-1]]
    ref_grads = torch.autograd.grad((ref * ref.detach().cos()).sum(), params)
    out = causal_conv1d(x, conv)
    assert out.grad_fn.name().startswith("_CausalDepthwiseConv1d")
    grads = torch.autograd.grad((out * ref.detach().cos()).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
