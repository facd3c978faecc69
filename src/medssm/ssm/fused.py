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
import sys
import tempfile
from contextlib import contextmanager

import numba
import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .scan import register_backend

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
_THRESHOLD = np.float32(20.0)  # softplus(x) = x above this, as in torch
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


def _softplus(x):
    """softplus(x) = log(1 + e^x), x itself above 20 (torch's threshold)."""
    raise NotImplementedError


def _softplus_grad(x):
    """d softplus / dx = sigmoid(x), 1 above the threshold."""
    raise NotImplementedError


def _sigmoid(x):
    raise NotImplementedError


@overload(_softplus)
def _softplus_overload(x):
    if x == types.float32:
        # max(x, 0) + log1p(e^-|x|); log1p(y) = 2 atanh(y / (2 + y)), a series in s = y/(2+y) <= 1/3
        # that keeps full relative accuracy for tiny y. Branch-free, so loops over L vectorise.
        k3, k5, k7, k9, k11, k13 = (np.float32(1.0 / k) for k in (3, 5, 7, 9, 11, 13))

        def softplus32(x):
            y = _exp(-abs(x))
            s = y / (np.float32(2.0) + y)
            s2 = s * s
            log1p = np.float32(2.0) * s * (np.float32(1.0) + s2 * (k3 + s2 * (k5 + s2 * (k7 + s2 * (
                k9 + s2 * (k11 + s2 * k13))))))
            return x if x > _THRESHOLD else max(x, np.float32(0.0)) + log1p

        return softplus32
    return lambda x: x if x > 20.0 else math.log1p(math.exp(x))  # torch's own float64 formula


@overload(_softplus_grad)
def _softplus_grad_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) if x > _THRESHOLD else np.float32(1.0) / (np.float32(1.0) + _exp(-x))

    def softplus_grad64(x):
        e = math.exp(x)
        return 1.0 if x > 20.0 else e / (e + 1.0)

    return softplus_grad64


@overload(_sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + _exp(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@njit(inline="always")
def _prepare_delta(delta, bias, softplus, b, d, dt, dt_grad):
    """dt[t] = softplus(delta + bias) (or without softplus) for one row; dt_grad[t] its derivative."""
    bias_d = bias[d]
    if softplus:
        for t in range(dt.shape[0]):
            v = delta[b, d, t] + bias_d
            dt[t] = _softplus(v)
        if dt_grad.shape[0] > 0:
            for t in range(dt.shape[0]):
                dt_grad[t] = _softplus_grad(delta[b, d, t] + bias_d)
    else:
        for t in range(dt.shape[0]):
            dt[t] = delta[b, d, t] + bias_d
        for t in range(dt_grad.shape[0]):
            dt_grad[t] = 1.0


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, out, checkpoints, last):
    """u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, G, L, N); bias, D: (dim,);
    checkpoints: (batch, dim, chunks, N). out = (C.h + D u) * silu(z) (no gate unless ``gate``)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    per_group = dim // B.shape[1]
    for row in prange(batch * dim):
        b, d = row // dim, row % dim
        g = d // per_group
        dt = np.empty(length, dtype=u.dtype)
        _prepare_delta(delta, bias, softplus, b, d, dt, dt[:0])
        D_d = D[d]
        h = np.zeros(n_state, dtype=u.dtype)
        for t in range(length):
            if t % CHECKPOINT == 0:
                checkpoints[b, d, t // CHECKPOINT] = h
            dt_t = dt[t]
            u_t = u[b, d, t]
            x_t = dt_t * u_t
            acc = _zero(out)
            for n in range(n_state):  # full indices, no row views: a view costs a refcount per step
                h_n = _exp(dt_t * A[d, n]) * h[n] + x_t * B[b, g, t, n]
                h[n] = h_n
                acc += h_n * C[b, g, t, n]
            out[b, d, t] = acc + D_d * u_t
        if gate:
            for t in range(length):
                z_t = z[b, d, t]
                out[b, d, t] = out[b, d, t] * (z_t * _sigmoid(z_t))
        last[b, d] = h


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, checkpoints, dout, dlast,
                     du, ddelta, dz, dA_parts, dB_parts, dC_parts, dD_parts, dbias_parts):
    """Gradients w.r.t. u, delta, z (full) and A, B, C, D, bias (one partial sum per worker).

    Every inner loop over N writes one array only: with several written arrays LLVM cannot rule
    out aliasing cheaply and leaves the loop scalar."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    per_group = dim // B.shape[1]
    workers = dA_parts.shape[0]
    rows_per_worker = -(-batch * dim // workers)
    for w in prange(workers):
        states = np.empty((CHECKPOINT + 1, n_state), dtype=u.dtype)  # h_{t-1} for the chunk's steps
        decays = np.empty((CHECKPOINT + 1, n_state), dtype=u.dtype)
        grads = np.empty((CHECKPOINT + 1, n_state), dtype=u.dtype)  # dLoss/dh_t
        carry = np.empty(n_state, dtype=u.dtype)  # dLoss/dh at the chunk's end from later steps
        dA_row = np.empty(n_state, dtype=u.dtype)
        dt = np.empty(length, dtype=u.dtype)
        dt_grad = np.empty(length, dtype=u.dtype)
        dy = np.empty(length, dtype=u.dtype)  # dLoss/dy before the gate
        for row in range(w * rows_per_worker, min((w + 1) * rows_per_worker, batch * dim)):
            b, d = row // dim, row % dim
            g = d // per_group
            _prepare_delta(delta, bias, softplus, b, d, dt, dt_grad)
            if gate:
                for t in range(length):
                    z_t, go = z[b, d, t], dout[b, d, t]
                    s = _sigmoid(z_t)
                    dy[t] = go * (z_t * s)
                    dz[b, d, t] = go * (s * (1.0 + z_t * (1.0 - s)))  # times y_t, below
            else:
                for t in range(length):
                    dy[t] = dout[b, d, t]
            D_d = D[d]
            dD_acc = _zero(u)
            dbias_acc = _zero(u)
            for n in range(n_state):
                carry[n] = dlast[b, d, n]
                dA_row[n] = 0.0
            for chunk in range((length - 1) // CHECKPOINT, -1, -1):
                start = chunk * CHECKPOINT
                steps = min(start + CHECKPOINT, length) - start
                for n in range(n_state):
                    states[0, n] = checkpoints[b, d, chunk, n]
                for j in range(steps):
                    t = start + j
                    dt_t = dt[t]
                    x_t = dt_t * u[b, d, t]
                    for n in range(n_state):
                        decays[j, n] = _exp(dt_t * A[d, n])
                    for n in range(n_state):
                        states[j + 1, n] = decays[j, n] * states[j, n] + x_t * B[b, g, t, n]
                    if gate:
                        y_t = _zero(u)
                        for n in range(n_state):
                            y_t += states[j + 1, n] * C[b, g, t, n]
                        dz[b, d, t] *= y_t + D_d * u[b, d, t]
                for n in range(n_state):
                    grads[steps, n] = carry[n]
                    decays[steps, n] = 1.0
                for j in range(steps - 1, -1, -1):
                    t = start + j
                    dy_t = dy[t]
                    for n in range(n_state):
                        grads[j, n] = grads[j + 1, n] * decays[j + 1, n] + dy_t * C[b, g, t, n]
                for n in range(n_state):
                    carry[n] = grads[0, n] * decays[0, n]
                for j in range(steps):
                    t = start + j
                    dt_t, u_t, dy_t = dt[t], u[b, d, t], dy[t]
                    x_t = dt_t * u_t
                    grad_b_sum = _zero(u)
                    grad_a_sum = _zero(u)
                    for n in range(n_state):
                        grad_h = grads[j, n]
                        grad_log_decay = grad_h * decays[j, n] * states[j, n]  # dLoss/d(dt_t * A_n)
                        grad_b_sum += grad_h * B[b, g, t, n]
                        grad_a_sum += grad_log_decay * A[d, n]
                        dA_row[n] += grad_log_decay * dt_t
                    for n in range(n_state):
                        dB_parts[w, b, g, t, n] += grads[j, n] * x_t
                    for n in range(n_state):
                        dC_parts[w, b, g, t, n] += dy_t * states[j + 1, n]
                    du[b, d, t] = grad_b_sum * dt_t + dy_t * D_d
                    grad_delta = (grad_a_sum + grad_b_sum * u_t) * dt_grad[t]
                    ddelta[b, d, t] = grad_delta
                    dbias_acc += grad_delta
                    dD_acc += dy_t * u_t
            for n in range(n_state):
                dA_parts[w, d, n] += dA_row[n]
            dD_parts[w, d] += dD_acc
            dbias_parts[w, d] += dbias_acc


# LLVM's cost model vectorises the loops over N 8 wide and interleaves 4 times: 32 states per
# iteration, so at Mamba's N = 16 the vector body never runs and every state goes through the
# scalar remainder (the backward ran at ~2.7 ns per element). One 16-wide vector per iteration
# makes the forward 1.25x and the backward 1.4x faster. These are process-wide LLVM options, so
# they are set only while the kernels compile (first call per dtype; a cache load does not
# compile) and reset to their defaults (0: cost model decides) right after.
_VECTOR_OPTIONS = ("-force-vector-width=16", "-force-vector-interleave=1")
_compiled: set[tuple[str, torch.dtype]] = set()


@contextmanager
def _compiling(kernel: str, dtype: torch.dtype):
    if (kernel, dtype) in _compiled:
        yield
        return
    # With a forced width LLVM prints a "remark: loop not vectorized" line to stderr (fd 2) for
    # every loop it leaves scalar; they are held back and any other output is passed on.
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        for option in _VECTOR_OPTIONS:
            llvm.set_option("", option)
        try:
            yield
        finally:
            for option in _VECTOR_OPTIONS:
                llvm.set_option("", option.split("=")[0] + "=0")
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            captured.seek(0)
            other = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                     if not line.startswith("remark: ")]
            if other:
                sys.stderr.write("".join(other))
        _compiled.add((kernel, dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class FusedScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias) -> (out, last_state); B, C grouped (batch, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        batch, dim, length = u.shape
        zeros = u.new_zeros(dim)
        D_ = zeros if D is None else D
        bias = zeros if delta_bias is None else delta_bias
        z_ = u.new_empty(1, 1, 1) if z is None else z
        B_rows = B.transpose(-1, -2).contiguous()  # (batch, G, L, N): one state vector per step
        C_rows = C.transpose(-1, -2).contiguous()
        out = u.new_empty(batch, dim, length)
        checkpoints = u.new_empty(batch, dim, -(-length // CHECKPOINT), A.shape[1])
        last = u.new_empty(batch, dim, A.shape[1])
        with _compiling("forward", u.dtype):
            _forward_kernel(_np(u), _np(delta), _np(bias), bool(softplus), _np(A), _np(B_rows), _np(C_rows),
                            _np(D_), _np(z_), z is not None, out.numpy(), checkpoints.numpy(), last.numpy())
        ctx.save_for_backward(u, delta, A, B_rows, C_rows, D_, z_, bias, checkpoints)
        ctx.flags = (bool(softplus), D is not None, z is not None, delta_bias is not None)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B_rows, C_rows, D_, z_, bias, checkpoints = ctx.saved_tensors
        softplus, has_D, gate, has_bias = ctx.flags
        workers = numba.get_num_threads()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if gate else u.new_empty(1, 1, 1)
        dA_parts = A.new_zeros(workers, *A.shape)
        dB_parts = B_rows.new_zeros(workers, *B_rows.shape)
        dC_parts = C_rows.new_zeros(workers, *C_rows.shape)
        dD_parts = u.new_zeros(workers, u.shape[1])
        dbias_parts = u.new_zeros(workers, u.shape[1])
        with _compiling("backward", u.dtype):
            _backward_kernel(_np(u), _np(delta), _np(bias), softplus, _np(A), _np(B_rows), _np(C_rows),
                             _np(D_), _np(z_), gate, _np(checkpoints), _np(dout), _np(dlast),
                             du.numpy(), ddelta.numpy(), dz.numpy(), dA_parts.numpy(), dB_parts.numpy(),
                             dC_parts.numpy(), dD_parts.numpy(), dbias_parts.numpy())
        total = lambda parts: parts[0] if workers == 1 else parts.sum(0)  # noqa: E731
        return (du, ddelta, total(dA_parts), total(dB_parts).transpose(-1, -2),
                total(dC_parts).transpose(-1, -2), total(dD_parts) if has_D else None,
                dz if gate else None, total(dbias_parts) if has_bias else None, None)


@register_backend("fused")
def fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """CPU scan compiled with numba: delta's bias/softplus, D and the z gate inside the kernels."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'fused' scan runs on CPU tensors, got {u.device}; use 'chunked' or 'cuda'")
    out, last = FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
