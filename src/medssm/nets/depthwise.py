"""Depthwise convolution (groups = channels, stride 1, "same" zero padding, odd kernel) in 2D and 3D on
the CPU: numba kernels, forward and backward, for LightM-UNet's depthwise-separable blocks.

PyTorch's CPU depthwise Conv3d is slow, its backward most of all: at (1, 32, 64³) with a 3x3x3 kernel,
forward 91 ms and forward + backward 444 ms on 2 threads of the project's VM (oneDNN on NCDHW;
channels-last 20 ms and 211 ms) for 0.23 G multiply-adds each way, while these kernels take a few ms
(``benchmarks/models.py --depthwise``). Each channel is copied into a zero-padded buffer, flattened;
every output plane is then the bias plus one multiply-add per tap over a contiguous stretch of it,
vectorised (the pad columns inside the stretch are computed and dropped). The backward pads the
output gradient the same way: the input gradient is its correlation with the taps reversed, and each
tap's weight gradient one dot product of it with the shifted input. A 2-D map is a 3-D one of depth 1. Threads: as many as torch's, one channel each at a
time; each channel's weight gradient is summed by one thread, so results do not depend on the count.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ssm.backends import is_exporting

try:
    import numpy as np
    from numba import njit, prange

    from ..ssm.numba_threads import KERNEL_LOCK, use_torch_threads
except (ImportError, OSError):  # pragma: no cover - without numba, PyTorch's own convolution
    njit = None

__all__ = ["depthwise_conv"]

if njit is not None:
    _FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

    @njit(inline="always")
    def _pad_into(volume, padded, pd, ph, pw):
        """Copy (D, H, W) ``volume`` into the interior of the flat zero-padded ``padded`` buffer."""
        depth, height, width = volume.shape
        ph_, pw_ = height + 2 * ph, width + 2 * pw
        for i in range(padded.shape[0]):
            padded[i] = 0
        for z in range(depth):
            for r in range(height):
                start = ((z + pd) * ph_ + r + ph) * pw_ + pw
                dst, src = padded[start:start + width], volume[z, r]
                for i in range(width):
                    dst[i] = src[i]

    @njit(inline="always")
    def _span(z, height, width, pd, ph, pw):
        """(first flat padded position of output plane z's interior, length covering its H rows)."""
        ph_, pw_ = height + 2 * ph, width + 2 * pw
        return ((z + pd) * ph_ + ph) * pw_ + pw, (height - 1) * pw_ + width

    @njit(inline="always")
    def _offset(a, e, f, kd, kh, kw, height, width):
        """Flat offset in the padded volume of tap (a, e, f) from the position it writes."""
        ph_, pw_ = height + 2 * (kh // 2), width + 2 * (kw // 2)
        return ((a - kd // 2) * ph_ + e - kh // 2) * pw_ + f - kw // 2

    @njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _forward_kernel(x, w, b, y):
        """x, y: (B, C, D, H, W); w: (C, kd, kh, kw); b: (C,). y = b + sum_taps w x[shifted], zero padded.
        Each channel is copied into a zero-padded buffer; each output plane is then one multiply-add per
        tap over a contiguous stretch of it (the pad columns inside the stretch are computed and dropped)."""
        batch, channels, depth, height, width = x.shape
        kd, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        pd, ph, pw = kd // 2, kh // 2, kw // 2
        size = (depth + 2 * pd) * (height + 2 * ph) * (width + 2 * pw)
        pw_ = width + 2 * pw
        for c in prange(channels):
            padded = np.empty(size, dtype=x.dtype)
            tmp = np.empty((height - 1) * pw_ + width, dtype=x.dtype)
            for n in range(batch):
                _pad_into(x[n, c], padded, pd, ph, pw)
                for z in range(depth):
                    start, length = _span(z, height, width, pd, ph, pw)
                    for j in range(length):
                        tmp[j] = b[c]
                    for a in range(kd):
                        for e in range(kh):
                            for f in range(kw):
                                wt = w[c, a, e, f]
                                first = start + _offset(a, e, f, kd, kh, kw, height, width)
                                src = padded[first:first + length]
                                for j in range(length):
                                    tmp[j] += wt * src[j]
                    for r in range(height):
                        dst, part = y[n, c, z, r], tmp[r * pw_:r * pw_ + width]
                        for i in range(width):
                            dst[i] = part[i]

    @njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _backward_kernel(x, w, g, dx, dw, db):
        """Gradients of sum(g * y): dx like x, dw like w, db (C,). dx is the correlation of the padded g
        with the taps reversed; dw[tap] = sum of g times x shifted by the tap (g is 0 on the pad columns)."""
        batch, channels, depth, height, width = x.shape
        kd, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        pd, ph, pw = kd // 2, kh // 2, kw // 2
        size = (depth + 2 * pd) * (height + 2 * ph) * (width + 2 * pw)
        pw_ = width + 2 * pw
        for c in prange(channels):
            padded_x = np.empty(size, dtype=x.dtype)
            padded_g = np.empty(size, dtype=x.dtype)
            tmp = np.empty((height - 1) * pw_ + width, dtype=x.dtype)
            bias_sum = x.dtype.type(0.0)
            for a in range(kd):
                for e in range(kh):
                    for f in range(kw):
                        dw[c, a, e, f] = 0
            for n in range(batch):
                _pad_into(x[n, c], padded_x, pd, ph, pw)
                _pad_into(g[n, c], padded_g, pd, ph, pw)
                for z in range(depth):
                    start, length = _span(z, height, width, pd, ph, pw)
                    grad = padded_g[start:start + length]
                    for j in range(length):
                        bias_sum += grad[j]
                        tmp[j] = 0
                    for a in range(kd):
                        for e in range(kh):
                            for f in range(kw):
                                wt = w[c, a, e, f]
                                offset = _offset(a, e, f, kd, kh, kw, height, width)
                                back = padded_g[start - offset:start - offset + length]
                                ahead = padded_x[start + offset:start + offset + length]
                                acc = x.dtype.type(0.0)
                                for j in range(length):
                                    tmp[j] += wt * back[j]
                                    acc += grad[j] * ahead[j]
                                dw[c, a, e, f] += acc
                    for r in range(height):
                        dst, part = dx[n, c, z, r], tmp[r * pw_:r * pw_ + width]
                        for i in range(width):
                            dst[i] = part[i]
            db[c] = bias_sum


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, H, W) view; 3-D maps as they are."""
    return t.unsqueeze(2) if t.dim() == 4 else t


class DepthwiseConv(torch.autograd.Function):
    """``conv(x)`` for a depthwise, stride-1, "same"-padded 2-D or 3-D ``conv``, with numba kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()
        x3, w3 = _as_3d(x), _as_3d(weight.detach()).reshape(weight.shape[0], *_as_3d(weight).shape[2:]).contiguous()
        b = bias.detach().contiguous() if bias is not None else x.new_zeros(weight.shape[0])
        y = torch.empty_like(x)
        with KERNEL_LOCK:
            use_torch_threads()
            _forward_kernel(x3.detach().numpy(), w3.numpy(), b.numpy(), _as_3d(y).numpy())
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        w3 = _as_3d(weight.detach()).reshape(weight.shape[0], *_as_3d(weight).shape[2:]).contiguous()
        grad = grad.contiguous()
        dx, dw, db = torch.empty_like(x), torch.empty_like(w3), x.new_empty(weight.shape[0])
        with KERNEL_LOCK:
            use_torch_threads()
            _backward_kernel(_as_3d(x).numpy(), w3.numpy(), _as_3d(grad).numpy(), _as_3d(dx).numpy(), dw.numpy(),
                             db.numpy())
        return dx, dw.view_as(weight), db if ctx.has_bias else None


def _takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernels compute ``conv`` on ``x``: a depthwise, stride-1, "same" 2-D/3-D conv on a
    float32/float64 CPU tensor, outside export and tracing."""
    k = conv.kernel_size
    return (njit is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and conv.weight.dtype == x.dtype and isinstance(conv, (nn.Conv2d, nn.Conv3d))
            and conv.groups == conv.in_channels == conv.out_channels and all(s == 1 for s in conv.stride)
            and all(d == 1 for d in conv.dilation) and conv.padding_mode == "zeros"
            and all(n % 2 == 1 and p == n // 2 for n, p in zip(k, conv.padding))
            and not is_exporting() and not torch.compiler.is_compiling()
            and not torch.utils._python_dispatch.is_in_torch_dispatch_mode())  # FLOP counters see aten's conv


def depthwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, through the numba kernels where they apply (a depthwise conv, one channel included;
    under CPU autocast in float32: it is bound by memory, not arithmetic), else through ``conv`` itself."""
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            x32 = x.float()
            if _takes(conv, x32):
                return DepthwiseConv.apply(x32, conv.weight, conv.bias)
        return conv(x)
    if _takes(conv, x):
        return DepthwiseConv.apply(x, conv.weight, conv.bias)
    return conv(x)
