"""Mamba's causal depthwise convolution and the SiLU after it, ``u = silu(conv(x))``, on (B, C, L) rows:
numba kernels for the fused CPU Mamba path (:mod:`medssm.ssm.mamba`), one pass over each row each way.

``conv(x)[t] = b + sum_k w[k] x[t - (K-1) + k]`` (x before the start is 0): ``nn.Conv1d(C, C, K,
groups=C, padding=K-1)`` cut to its first L outputs. The backward recomputes ``conv(x)`` row by row
(it is not kept) for SiLU's derivative, then gives dx, dw and db. numba runs as many threads as torch
(``torch.get_num_threads()``), each on whole channels; the sums for dw and db stay within a channel,
so results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .numba_threads import KERNEL_LOCK, use_torch_threads

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # no "nnan"/"ninf": inf and NaN propagate
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # exactly representable: k * _LN2_HI has no rounding error
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)  # e^x stays a normal float32 in between
_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(7))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


def _sigmoid(v):
    """1 / (1 + e^-v), dispatched on the dtype by the overload below."""
    raise NotImplementedError


@overload(_sigmoid)
def _sigmoid_overload(v):
    if v == types.float32:
        c0, c1, c2, c3, c4, c5, c6 = _TAYLOR

        def sigmoid32(v):  # e^-v branch-free, so that the loops over a row vectorise (numba has no vector exp)
            x = min(max(-v, _EXP_LO), _EXP_HI)
            k = np.floor(x * _LOG2E + np.float32(0.5))
            r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2
            p = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * c6)))))
            return np.float32(1.0) / (np.float32(1.0) + p * _float32_from_bits((np.int32(k) + 127) << 23))

        return sigmoid32
    return lambda v: 1.0 / (1.0 + math.exp(-v))  # float64: libm, exact to the last bits


@njit(inline="always", fastmath=_FASTMATH)
def _conv_row(xr, w, d, bias, out):
    """out = conv(xr) for channel d: its bias, then one shifted pass per tap. Loops index slices from
    0 (an index like ``t - shift`` is not provably >= 0 to numba, which then cannot vectorise)."""
    length, k_size = xr.shape[0], w.shape[1]
    for t in range(length):
        out[t] = bias
    for k in range(k_size):
        shift = k_size - 1 - k  # out[t] += w[k] x[t - shift]
        if shift >= length:
            continue
        wk = w[d, k]
        src, dst = xr[:length - shift], out[shift:]
        for t in range(length - shift):
            dst[t] += wk * src[t]


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _forward_kernel(x, w, b, u):
    """x, u: (B, D, L); w: (D, K); b: (D,). u = silu(conv(x))."""
    batch, dim, _ = x.shape
    for d in prange(dim):
        for n in range(batch):
            ur = u[n, d]
            _conv_row(x[n, d], w, d, b[d], ur)
            for t in range(ur.shape[0]):
                v = ur[t]
                ur[t] = v * _sigmoid(v)


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _backward_kernel(x, w, b, du, dx, dw, db):
    """Gradients of sum(du * silu(conv(x))): dx (B, D, L), dw (D, K), db (D,)."""
    batch, dim, length = x.shape
    k_size = w.shape[1]
    for d in prange(dim):
        dv = np.empty(length, dtype=x.dtype)  # d loss / d conv(x), one row at a time
        one = x.dtype.type(1.0)
        bias_sum = x.dtype.type(0.0)
        for k in range(k_size):
            dw[d, k] = 0
        for n in range(batch):
            xr, dur, dxr = x[n, d], du[n, d], dx[n, d]
            _conv_row(xr, w, d, b[d], dv)
            for t in range(length):
                v = dv[t]
                s = _sigmoid(v)
                g = dur[t] * (s * (one + v * (one - s)))  # silu'(v) = s (1 + v (1 - s))
                dv[t] = g
                bias_sum += g
            for shift in range(min(k_size, length)):  # x[s] reached out[s + shift] through w[K-1-shift]
                k = k_size - 1 - shift
                wk = w[d, k]
                grad, xs, dxs = dv[shift:], xr[:length - shift], dxr[:length - shift]
                acc = x.dtype.type(0.0)
                if shift == 0:  # the first tap covers every s: it writes dx, the others add to it
                    for s_ in range(length):
                        dxs[s_] = wk * grad[s_]
                        acc += grad[s_] * xs[s_]
                else:
                    for s_ in range(length - shift):
                        dxs[s_] += wk * grad[s_]
                        acc += grad[s_] * xs[s_]
                dw[d, k] += acc
        db[d] = bias_sum


def _taps(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    dim = weight.shape[0]
    w = weight.detach().reshape(dim, -1).contiguous()  # (D, 1, K) -> (D, K)
    b = bias.detach().contiguous() if bias is not None else weight.new_zeros(dim)
    return w.numpy(), b.numpy()


def conv_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(conv1d(x, weight, bias, padding=K-1, groups=C)[..., :L])`` for contiguous (B, C, L)
    float32/float64 CPU ``x``; ``weight`` (C, 1, K), ``bias`` (C,) or None. No autograd."""
    u = torch.empty_like(x)
    w, b = _taps(weight, bias)
    with KERNEL_LOCK:
        use_torch_threads()
        _forward_kernel(x.detach().numpy(), w, b, u.numpy())
    return u


def conv_silu_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       grad_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) of :func:`conv_silu_forward` for the output gradient ``grad_u``
    (contiguous, x's shape); dbias is None without a bias."""
    dim = weight.shape[0]
    dx = torch.empty_like(x)
    dw = weight.new_empty(dim, weight.shape[-1])
    db = weight.new_empty(dim)
    w, b = _taps(weight, bias)
    with KERNEL_LOCK:
        use_torch_threads()
        _backward_kernel(x.detach().numpy(), w, b, grad_u.detach().numpy(), dx.numpy(), dw.numpy(), db.numpy())
    return dx, dw.view_as(weight), db if bias is not None else None
