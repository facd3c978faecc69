"""SegMamba's convolutions and instance norm on the CPU's fast paths (nets/cpu_conv.py) compute what
torch's own modules compute: outputs and gradients against nn.Conv3d / nn.InstanceNorm3d."""

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import medssm
from medssm.nets.cpu_conv import Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d, InstanceNorm, conv_forward

CASES = [  # (B, C_in, *S), C_out, kernel, stride, padding, bias
    ((2, 6, 5, 4, 3), 8, 1, 1, 0, True),  # 1x1: a batched GEMM
    ((1, 6, 5, 4, 3), 4, 1, 1, 0, False),
    ((1, 8, 4, 4, 4), 6, 3, 1, 1, True),  # a batch of one on a small map: oneDNN through two groups
    ((1, 8, 4, 6, 4), 4, 2, 2, 0, True),  # SegMamba's down-sampling
    ((1, 4, 8, 8, 8), 6, 7, 2, 3, True),  # its stem (kernel 7: oneDNN already)
    ((2, 3, 6, 5), 4, 3, 1, 1, False),  # 2D
    ((1, 5, 6, 5), 4, 1, 1, 0, True),
]
IDS = [f"{'x'.join(map(str, c[0]))}-k{c[2]}s{c[3]}" for c in CASES]


def pair(shape, out_channels, kernel, stride, padding, bias, dtype):
    """A torch convolution and the medssm one with the same weights."""
    torch.manual_seed(sum(shape))
    cls, fast = (nn.Conv3d, Conv3d) if len(shape) == 5 else (nn.Conv2d, Conv2d)
    plain = cls(shape[1], out_channels, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    ours = fast(shape[1], out_channels, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    ours.load_state_dict(plain.state_dict(), strict=True)  # the same parameter names
    return plain, ours


def compare(plain, ours, x, rtol, atol):
    grad = torch.randn(plain(x).shape, dtype=x.dtype)
    results = []
    for module in (plain, ours):
        x_ = x.detach().clone().requires_grad_()
        out = module(x_)
        out.backward(grad)
        results.append([out, x_.grad, *(p.grad for p in module.parameters())])
        module.zero_grad()
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, bias", CASES, ids=IDS)
def test_conv_matches_torch(shape, out_channels, kernel, stride, padding, bias):
    plain, ours = pair(shape, out_channels, kernel, stride, padding, bias, torch.float64)
    compare(plain, ours, torch.randn(*shape, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    plain, ours = pair(shape, out_channels, kernel, stride, padding, bias, torch.float32)
    compare(plain, ours, torch.randn(*shape), rtol=1e-5, atol=1e-5)


def test_small_float32_maps_run_on_onednn():
    """Where PyTorch would take slow_conv3d (batch 1, N*C*D*H <= 20480, kernel 3), oneDNN runs."""
    plain, ours = pair((1, 8, 4, 4, 4), 6, 3, 1, 1, True, torch.float32)
    x = torch.randn(1, 8, 4, 4, 4)
    for module, kernel in ((plain, "aten::slow_conv3d_forward"), (ours, "aten::mkldnn_convolution")):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x).sum().backward()
        assert kernel in {e.name for e in prof.events()}


@pytest.mark.parametrize("shape", [(1, 12, 3, 3, 3), (2, 6, 3, 4, 2), (1, 6, 3, 4)])
def test_transposed_conv_matches_torch(shape):
    """SegMamba's up-sampling (k=2, s=2): on oneDNN through two groups at small maps, as torch's."""
    torch.manual_seed(sum(shape))
    cls, fast = (nn.ConvTranspose3d, ConvTranspose3d) if len(shape) == 5 else (nn.ConvTranspose2d, ConvTranspose2d)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        plain = cls(shape[1], 8, 2, stride=2, bias=False).to(dtype)
        ours = fast(shape[1], 8, 2, stride=2, bias=False).to(dtype)
        ours.load_state_dict(plain.state_dict(), strict=True)
        compare(plain, ours, torch.randn(*shape, dtype=dtype), rtol=tol, atol=tol)


def test_segmamba_step_takes_no_slow_kernel():
    """A float32 training step of a batch of one: no convolution on PyTorch's own kernels."""
    model = medssm.create_model("segmamba_tiny", in_channels=4, out_channels=3).train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(1, 4, 32, 32, 32)).square().mean().backward()
    names = {e.name for e in prof.events()}
    assert not {n for n in names if "slow_conv" in n or "thnn_conv" in n}, names


def test_segmamba_bf16_step(fill_freed_memory):
    """Under bf16 autocast: convolutions and projections in bfloat16, gradients float32 and finite,
    the output close to float32's."""
    model = medssm.create_model("segmamba_tiny", in_channels=2, out_channels=3).train()
    x = torch.randn(2, 2, 32, 32, 16)  # 2 deep at 1/16: the deepest convolutions are shallower than their kernel
    want = model(x)
    fill_freed_memory(float("nan"))  # what an uninitialised read would see (one did, in CI)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()


def test_bf16_autocast():
    plain, ours = pair((1, 8, 6, 6, 6), 8, 3, 1, 1, True, torch.float32)
    point = pair((1, 8, 6, 6, 6), 4, 1, 1, 0, True, torch.float32)
    x = torch.randn(1, 8, 6, 6, 6)
    for a, b in ((plain, ours), point):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = b(x), a(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_plain_convolution_while_exporting(monkeypatch):
    plain, ours = pair((1, 6, 5, 4, 3), 4, 1, 1, 0, True, torch.float32)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv_forward(ours, torch.randn(1, 6, 5, 4, 3))
    assert "aten::convolution" in {e.name for e in prof.events()}


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 4, 7, 5)])
def test_instance_norm_matches_torch(shape):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    plain = (nn.InstanceNorm3d if len(shape) == 5 else nn.InstanceNorm2d)(shape[1])
    compare(plain, InstanceNorm(shape[1]), x, rtol=1e-12, atol=1e-12)
    compare(plain, InstanceNorm(shape[1]), x.float(), rtol=1e-5, atol=1e-5)
    assert not list(InstanceNorm(shape[1]).state_dict())  # no parameters or statistics, as MONAI's
