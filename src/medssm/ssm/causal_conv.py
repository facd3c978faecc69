"""Mamba's causal depthwise convolution on (B, C, L) rows: a numba kernel on the CPU (forward and
backward, one pass over each row), PyTorch's ``conv1d`` elsewhere (GPU, export, profilers)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .backends import is_exporting

try:  # one serial pass per row for the causal depthwise conv; torch's own ops below without numba
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None

if njit is not None:
    @njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False)
    def _conv_forward_kernel(x, w, b, y):
        """x, y: (B, D, L); w: (D, K); b: (D,). y[t] = b + sum_k w[k] x[t - (K-1) + k], x[<0] = 0."""
        batch, dim, length = x.shape
        k_size = w.shape[1]
        for n in range(batch):
            for d in range(dim):
                xr, yr = x[n, d], y[n, d]
                yr[:] = b[d]
                for k in range(k_size):
                    shift = k_size - 1 - k  # y[t] += w[k] x[t - shift]
                    wk = w[d, k]
                    for t in range(shift, length):
                        yr[t] += wk * xr[t - shift]

    @njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False)
    def _conv_backward_kernel(x, w, g, gx, gw):
        """gx[s] = sum_k w[k] g[s + (K-1) - k] (g[>=L] = 0); gw[d, k] = sum_{batch, t} g[t] x[t - (K-1) + k]."""
        batch, dim, length = x.shape
        k_size = w.shape[1]
        gw[:, :] = 0
        for n in range(batch):
            for d in range(dim):
                xr, gr, gxr = x[n, d], g[n, d], gx[n, d]
                gxr[:] = 0
                for k in range(k_size):
                    shift = k_size - 1 - k
                    wk = w[d, k]
                    acc = gr[0] * 0
                    for s in range(length - shift):
                        gxr[s] += wk * gr[s + shift]
                        acc += gr[s + shift] * xr[s]
                    gw[d, k] += acc


class _CausalDepthwiseConv1d(torch.autograd.Function):
    """``conv1d(x, weight, bias, padding=K-1, groups=C)[..., :L]`` on (B, C, L) CPU tensors in one
    pass over each row (numba). oneDNN's depthwise conv1d is 5-20x slower per element on long rows
    (64 x 16384: ~15 ms forward, against ~2 ms at 128 x 4096), and its backward too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dim, k = weight.shape[0], weight.shape[-1]
        x = x.contiguous()
        w = weight.detach().reshape(dim, k).contiguous()  # (D, 1, K) -> (D, K)
        b = bias.detach() if bias is not None else weight.new_zeros(dim)
        y = torch.empty_like(x)
        _conv_forward_kernel(x.detach().numpy(), w.numpy(), b.contiguous().numpy(), y.numpy())
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dim, k = weight.shape[0], weight.shape[-1]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        grad_w = weight.new_empty(dim, k)
        _conv_backward_kernel(x.detach().numpy(), weight.detach().reshape(dim, k).contiguous().numpy(),
                              grad.numpy(), grad_x.numpy(), grad_w.numpy())
        grad_b = grad.sum((0, 2)) if ctx.has_bias else None
        return grad_x, grad_w.view_as(weight), grad_b


def causal_conv1d(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Mamba's causal depthwise conv (``conv`` built with ``padding=K-1, groups=C``) on (B, C, L):
    the first L outputs, computed with ``conv``'s weight and bias."""
    length = x.shape[-1]
    if (njit is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or conv.weight.dtype != x.dtype or is_exporting()
            or is_in_torch_dispatch_mode()):  # counters and profilers (medssm info) see only aten ops
        return conv(x)[..., :length]
    return _CausalDepthwiseConv1d.apply(x, conv.weight, conv.bias)
