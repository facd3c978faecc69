"""The CPU depthwise convolution kernels (numba) against PyTorch's Conv2d/Conv3d, in float64."""

import pytest
import torch
import torch.nn as nn

from medssm.nets.depthwise import depthwise_conv

CASES = [  # spatial shape (B, C, *S), kernel, bias
    ((2, 3, 5, 6, 7), 3, True),
    ((1, 4, 3, 1, 9), (3, 1, 3), False),  # a depth-1 axis inside a 3-D map, anisotropic kernel
    ((2, 4, 9, 8), 3, False),
    ((1, 1, 7, 5), 5, True),  # one channel (LightM-UNet's first conv), kernel wider than a side
    ((1, 2, 4, 4, 4), 1, True),  # 1x1x1: a per-channel scale and bias
]


@pytest.mark.parametrize("shape, kernel, bias", CASES, ids=[f"{'x'.join(map(str, c[0]))}-k{c[1]}" for c in CASES])
def test_depthwise_matches_torch(shape, kernel, bias):
    generator = torch.Generator().manual_seed(sum(shape))
    channels, dims = shape[1], len(shape) - 2
    size = (kernel,) * dims if isinstance(kernel, int) else kernel
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(channels, channels, size, padding=tuple(k // 2 for k in size),
                                                   groups=channels, bias=bias).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    params = [x, *conv.parameters()]
    want = conv(x)
    grad = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, params, grad)
    got = depthwise_conv(conv, x)
    assert got.grad_fn.name().startswith("DepthwiseConv")
    for g, w in zip([got, *torch.autograd.grad(got, params, grad)], [want, *want_grads]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_other_convolutions_run_as_torch_does():
    """Strided, dilated, grouped (not depthwise) or channel-changing convs go to the module itself."""
    x = torch.randn(1, 4, 8, 8)
    for conv in (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
                 nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 8, 3, padding=1, groups=4)):
        out = depthwise_conv(conv, x)
        assert not out.grad_fn.name().startswith("DepthwiseConv")
        torch.testing.assert_close(out, conv(x))


def test_float32_and_bf16_autocast():
    conv = nn.Conv3d(3, 3, 3, padding=1, groups=3)
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(depthwise_conv(conv, x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv(conv, x)  # computed in float32 (the conv is memory-bound)
    assert out.dtype == torch.float32 and out.grad_fn.name().startswith("DepthwiseConv")
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
