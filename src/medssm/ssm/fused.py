"""The ``fused`` CPU scan: one numba pass over L for the forward, one for the backward.

Each (batch, channel) row is scanned by one thread with its N states in registers, so no
(batch, dim, L, N) tensor is ever built. The forward keeps the state at the start of every
``CHECKPOINT``-step chunk; the backward walks the chunks last to first, recomputes each chunk's
states and decays from its checkpoint into a small buffer and runs the adjoint recurrence back
through it. ``B``/``C`` gradients are summed per worker thread, then over workers, so the result
does not depend on thread timing.

The exp in the inner loop over N must vectorise: in float32 it is a polynomial with the ``2^k``
scaling built from the exponent bits (relative error ~2e-7, below float32 rounding of the scan);
in float64 it is libm's ``exp`` (exact to the last bit, for float64 parity with ``reference``).
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .scan import finish_output, prepare_delta, register_backend

# Numba's default OpenMP layer leaves its threads spinning after each call, starving torch's own
# threads (a whole LightM-UNet step ran 5-10x slower on 2 cores); workqueue threads sleep.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

CHECKPOINT = 64
# Reassociation lets LLVM vectorise the sums over N; no "nnan"/"ninf", so inf and NaN propagate.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # exactly representable: k * _LN2_HI has no rounding error
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.0)  # below this e^x is under float32's smallest normal: return 0
_EXP_HI = np.float32(88.5)
_HALF = np.float32(0.5)
_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(7))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 bits of the integer ``bits`` (LLVM ``bitcast``)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


def _exp(x):
    """e^x inside the kernels (dispatched on the dtype by the overload below)."""
    raise NotImplementedError


def _zero(array):
    """A zero of ``array``'s dtype, for accumulators."""
    raise NotImplementedError


@overload(_exp)
def _exp_overload(x):
    if x == types.float32:
        c0, c1, c2, c3, c4, c5, c6 = _TAYLOR

        def exp32(x):
            clamped = min(max(x, _EXP_LO), _EXP_HI)
            k = np.floor(clamped * _LOG2E + _HALF)
            r = (clamped - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2
            p = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * c6)))))
            scale = _float32_from_bits((np.int32(k) + 127) << 23)  # 2^k
            return p * scale if x > _EXP_LO else np.float32(0.0)

        return exp32
    return lambda x: math.exp(x)


@overload(_zero)
def _zero_overload(array):
    if array.dtype == types.float32:
        return lambda array: np.float32(0.0)
    return lambda array: np.float64(0.0)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(u, dt, A, B, C, y, checkpoints, last):
    """u, dt, y: (batch, dim, L); A: (dim, N); B, C: (batch, G, L, N); checkpoints: (batch, dim, chunks, N)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    per_group = dim // B.shape[1]
    for row in prange(batch * dim):
        b, d = row // dim, row % dim
        g = d // per_group
        h = np.zeros(n_state, dtype=u.dtype)
        for t in range(length):
            if t % CHECKPOINT == 0:
                checkpoints[b, d, t // CHECKPOINT] = h
            dt_t = dt[b, d, t]
            x_t = dt_t * u[b, d, t]
            acc = _zero(y)
            for n in range(n_state):  # full indices, no row views: a view costs a refcount per step
                h_n = _exp(dt_t * A[d, n]) * h[n] + x_t * B[b, g, t, n]
                h[n] = h_n
                acc += h_n * C[b, g, t, n]
            y[b, d, t] = acc
        last[b, d] = h


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_kernel(u, dt, A, B, C, checkpoints, dy, dlast, du, ddt, dA_parts, dB_parts, dC_parts):
    """Gradients of y and last state w.r.t. u, dt (full) and A, B, C (one partial sum per worker)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    per_group = dim // B.shape[1]
    workers = dA_parts.shape[0]
    rows_per_worker = -(-batch * dim // workers)
    for w in prange(workers):
        states = np.empty((CHECKPOINT + 1, n_state), dtype=u.dtype)  # h_{t-1} for the chunk's steps
        decays = np.empty((CHECKPOINT, n_state), dtype=u.dtype)
        adjoint = np.empty(n_state, dtype=u.dtype)  # dLoss/dh_t from the steps after t
        for row in range(w * rows_per_worker, min((w + 1) * rows_per_worker, batch * dim)):
            b, d = row // dim, row % dim
            g = d // per_group
            adjoint[:] = dlast[b, d]
            for chunk in range((length - 1) // CHECKPOINT, -1, -1):
                start = chunk * CHECKPOINT
                stop = min(start + CHECKPOINT, length)
                states[0] = checkpoints[b, d, chunk]
                for t in range(start, stop):
                    j = t - start
                    dt_t = dt[b, d, t]
                    x_t = dt_t * u[b, d, t]
                    for n in range(n_state):
                        decay = _exp(dt_t * A[d, n])
                        decays[j, n] = decay
                        states[j + 1, n] = decay * states[j, n] + x_t * B[b, g, t, n]
                for t in range(stop - 1, start - 1, -1):
                    j = t - start
                    dt_t, u_t, dy_t = dt[b, d, t], u[b, d, t], dy[b, d, t]
                    x_t = dt_t * u_t
                    grad_b_sum = _zero(u)
                    grad_a_sum = _zero(u)
                    for n in range(n_state):
                        grad_h = adjoint[n] + dy_t * C[b, g, t, n]  # dLoss/dh_t
                        grad_log_decay = grad_h * decays[j, n] * states[j, n]  # dLoss/d(dt_t * A_n)
                        grad_b_sum += grad_h * B[b, g, t, n]
                        grad_a_sum += grad_log_decay * A[d, n]
                        dA_parts[w, d, n] += grad_log_decay * dt_t
                        dB_parts[w, b, g, t, n] += grad_h * x_t
                        dC_parts[w, b, g, t, n] += dy_t * states[j + 1, n]
                        adjoint[n] = grad_h * decays[j, n]
                    du[b, d, t] = grad_b_sum * dt_t
                    ddt[b, d, t] = grad_a_sum + grad_b_sum * u_t


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class FusedScan(torch.autograd.Function):
    """(u, dt, A, B, C) -> (y, last_state) with B, C grouped (batch, G, N, L); dt already final."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        batch, dim, length = u.shape
        B_rows = B.transpose(-1, -2).contiguous()  # (batch, G, L, N): one state vector per step
        C_rows = C.transpose(-1, -2).contiguous()
        y = u.new_empty(batch, dim, length)
        checkpoints = u.new_empty(batch, dim, -(-length // CHECKPOINT), A.shape[1])
        last = u.new_empty(batch, dim, A.shape[1])
        _forward_kernel(_np(u), _np(dt), _np(A), _np(B_rows), _np(C_rows),
                        y.numpy(), checkpoints.numpy(), last.numpy())
        ctx.save_for_backward(u, dt, A, B_rows, C_rows, checkpoints)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, dt, A, B_rows, C_rows, checkpoints = ctx.saved_tensors
        workers = numba.get_num_threads()
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dA_parts = A.new_zeros(workers, *A.shape)
        dB_parts = B_rows.new_zeros(workers, *B_rows.shape)
        dC_parts = C_rows.new_zeros(workers, *C_rows.shape)
        _backward_kernel(_np(u), _np(dt), _np(A), _np(B_rows), _np(C_rows), _np(checkpoints),
                         _np(dy), _np(dlast), du.numpy(), ddt.numpy(), dA_parts.numpy(),
                         dB_parts.numpy(), dC_parts.numpy())
        return du, ddt, dA_parts.sum(0), dB_parts.sum(0).transpose(-1, -2), dC_parts.sum(0).transpose(-1, -2)


@register_backend("fused")
def fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """CPU scan compiled with numba; ``delta``'s bias/softplus and the ``D``/``z`` terms stay in torch."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'fused' scan runs on CPU tensors, got {u.device}; use 'chunked' or 'cuda'")
    y, last = FusedScan.apply(u, prepare_delta(delta, delta_bias, delta_softplus), A, B, C)
    out = finish_output(y, u, D, z)
    return (out, last) if return_last_state else out
