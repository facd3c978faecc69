"""The ``fused`` CPU scan: one numba pass over L for the forward, one for the backward.

A worker takes a block of up to 64 consecutive channels of one batch element and one group (they
share their B and C rows) and keeps the block's state as an (N, channels) array, channels
innermost: each step is, per state n, one 16-wide loop over the block's channels with B[t, n] and
C[t, n] broadcast, and y accumulates per channel (no horizontal sums over N). No
(batch, dim, L, N) tensor is ever built. Inputs are read row by row, 64 steps at a time, and
transposed to (step, channel); outputs go back the same way. The forward keeps the state at the
start of every ``CHECKPOINT``-step chunk; the backward walks the chunks last to first, recomputes
each chunk's states and decays from its checkpoint into a small buffer and runs the adjoint
recurrence back through it. ``A``/``B``/``C``/``D``/bias gradients are summed per worker thread,
then over workers, so the result does not depend on thread timing.

The exp in the inner loops must vectorise: in float32 it is a polynomial with the ``2^k``
scaling built from the exponent bits (relative error ~2e-7, below float32 rounding of the scan);
in float64 it is libm's ``exp`` (exact to the last bit, for float64 parity with ``reference``).
See docs/explanation/selective-scan.md for what was measured and what was tried and dropped.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
from contextlib import contextmanager

import numba
import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .backends import register_backend

# Numba's default OpenMP layer leaves its threads spinning after each call, starving torch's own
# threads (a whole LightM-UNet step ran 5-10x slower on 2 cores); workqueue threads sleep.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

CHECKPOINT = 64
BLOCKS = (64, 32, 16)  # channels per block, largest first (see _block_width)
BLOCK = BLOCKS[0]  # the buffers' row length: a constant stride lets LLVM tell rows apart
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


def _softplus_and_grad(x):
    """(softplus(x), sigmoid(x)): in float32 from one exp."""
    raise NotImplementedError


_ATANH = tuple(np.float32(1.0 / k) for k in (3, 5, 7, 9, 11, 13))


@njit(inline="always", fastmath=_FASTMATH)
def _log1p_small32(y):
    """log1p(y) for float32 0 <= y <= 1: 2 atanh(s), s = y / (2 + y) <= 1/3, as a short series that
    keeps full relative accuracy for tiny y. Branch-free, so loops over L vectorise."""
    k3, k5, k7, k9, k11, k13 = _ATANH
    s = y / (np.float32(2.0) + y)
    s2 = s * s
    return np.float32(2.0) * s * (np.float32(1.0) + s2 * (k3 + s2 * (k5 + s2 * (k7 + s2 * (
        k9 + s2 * (k11 + s2 * k13))))))


@overload(_softplus)
def _softplus_overload(x):
    if x == types.float32:
        # max(x, 0) + log1p(e^-|x|)
        return lambda x: x if x > _THRESHOLD else max(x, np.float32(0.0)) + _log1p_small32(_exp(-abs(x)))
    return lambda x: x if x > 20.0 else math.log1p(math.exp(x))  # torch's own float64 formula


@overload(_softplus_grad)
def _softplus_grad_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) if x > _THRESHOLD else np.float32(1.0) / (np.float32(1.0) + _exp(-x))

    def softplus_grad64(x):
        e = math.exp(x)
        return 1.0 if x > 20.0 else e / (e + 1.0)

    return softplus_grad64


@overload(_softplus_and_grad)
def _softplus_and_grad_overload(x):
    if x == types.float32:

        def both32(x):
            one = np.float32(1.0)
            y = _exp(-abs(x))
            above = x > _THRESHOLD
            value = x if above else max(x, np.float32(0.0)) + _log1p_small32(y)
            grad = one if above else (one if x >= np.float32(0.0) else y) / (one + y)
            return value, grad

        return both32
    return lambda x: (_softplus(x), _softplus_grad(x))


@overload(_sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + _exp(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def _one(array):
    """A one of ``array``'s dtype (a Python ``1.0`` would make float32 arithmetic float64)."""
    raise NotImplementedError


@overload(_one)
def _one_overload(array):
    if array.dtype == types.float32:
        return lambda array: np.float32(1.0)
    return lambda array: np.float64(1.0)


@njit(inline="always")
def _block_of(blk, groups, per_block, per_group, lanes):
    """(batch index, group, first channel, channels) of block ``blk``: up to ``lanes`` consecutive
    channels of one batch element and one group, so they share their B and C rows."""
    b = blk // (groups * per_block)
    g = (blk // per_block) % groups
    first = g * per_group + (blk % per_block) * lanes
    return b, g, first, min(lanes, (g + 1) * per_group - first)


@njit(inline="always")
def _to_steps(rows, steps, lanes, out):
    """out[j, c] = rows[c, j]: a chunk of per-channel rows to the time-major layout of the scan."""
    for j in range(steps):
        for c in range(lanes):
            out[j, c] = rows[c, j]


@njit(inline="always")
def _load_steps(delta, bias, softplus, u, b, first, width, lanes, start, steps, rows, grad_rows, dt, dt_grad,
                ub):
    """Steps ``start .. start + steps`` of the block's channels, time-major ``(step, channel)``:
    dt = softplus(delta + bias) (or without softplus), its derivative (when ``dt_grad`` has rows)
    and u. Each is computed row by row (contiguous, vectorised over steps) into ``rows``, then
    transposed; rows past ``width`` stay 0, so padding channels keep h = 0 and add nothing to the
    B, C gradients. (Gathering across channels directly left the loops scalar: LLVM cannot bound
    a clamped index for its alias checks.)"""
    one = _one(u)
    with_grad = dt_grad.shape[0] > 0
    for c in range(width):
        ch = first + c
        bias_c = bias[ch]
        src, dst, dst_grad = delta[b, ch, start:start + steps], rows[c], grad_rows[c]  # views: affine indexing
        if softplus and with_grad:
            for j in range(steps):
                dst[j], dst_grad[j] = _softplus_and_grad(src[j] + bias_c)
        elif softplus:
            for j in range(steps):
                dst[j] = _softplus(src[j] + bias_c)
        else:
            for j in range(steps):
                dst[j] = src[j] + bias_c
            if with_grad:
                for j in range(steps):
                    dst_grad[j] = one
    _to_steps(rows, steps, lanes, dt)
    if with_grad:
        _to_steps(grad_rows, steps, lanes, dt_grad)
    for c in range(width):
        ch = first + c
        src, dst = u[b, ch, start:start + steps], rows[c]
        for j in range(steps):
            dst[j] = src[j]
    _to_steps(rows, steps, lanes, ub)


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _forward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, out, checkpoints, last):
    """u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, G, L, N); bias, D: (dim,);
    checkpoints: (blocks, chunks, N, lanes);
    last: (batch, dim, N). out = (C.h + D u) * silu(z) (no gate unless ``gate``)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    lanes = checkpoints.shape[3]  # channels per block (a run-time trip count: a constant is unrolled)
    per_block = -(-per_group // lanes)
    for blk in prange(batch * groups * per_block):
        b, g, first, width = _block_of(blk, groups, per_block, per_group, lanes)
        h = np.zeros((n_state, BLOCK), dtype=u.dtype)  # channels innermost: one vector per state
        A_blk = np.zeros((n_state, BLOCK), dtype=u.dtype)
        D_blk = np.zeros(BLOCK, dtype=u.dtype)
        for c in range(width):
            D_blk[c] = D[first + c]
            for n in range(n_state):
                A_blk[n, c] = A[first + c, n]
        rows = np.zeros((BLOCK, CHECKPOINT), dtype=u.dtype)  # rows past width: padding, 0
        dt = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        ub = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        x = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        y = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        for chunk in range(-(-length // CHECKPOINT)):
            start = chunk * CHECKPOINT
            steps = min(CHECKPOINT, length - start)
            for n in range(n_state):
                for c in range(lanes):
                    checkpoints[blk, chunk, n, c] = h[n, c]
            _load_steps(delta, bias, softplus, u, b, first, width, lanes, start, steps, rows, rows, dt, dt[:0],
                        ub)
            for j in range(steps):
                for c in range(lanes):
                    x[j, c] = dt[j, c] * ub[j, c]
            for j in range(steps):
                for c in range(lanes):
                    y[j, c] = D_blk[c] * ub[j, c]
            for j in range(steps):
                t = start + j
                for n in range(n_state):  # B[t, n], C[t, n]: one scalar for all the block's channels
                    B_tn, C_tn = B[b, g, t, n], C[b, g, t, n]
                    for c in range(lanes):
                        h_n = _exp(dt[j, c] * A_blk[n, c]) * h[n, c] + x[j, c] * B_tn
                        h[n, c] = h_n
                        y[j, c] += h_n * C_tn
            for c in range(width):  # back to (batch, dim, L): contiguous over steps
                ch = first + c
                dst = out[b, ch, start:start + steps]
                if gate:
                    z_row = z[b, ch, start:start + steps]
                    for j in range(steps):
                        z_t = z_row[j]
                        dst[j] = y[j, c] * (z_t * _sigmoid(z_t))
                else:
                    for j in range(steps):
                        dst[j] = y[j, c]
        for c in range(width):
            for n in range(n_state):
                last[b, first + c, n] = h[n, c]


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _backward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, checkpoints, dout, dlast,
                     du, ddelta, dz, dA_parts, dB_parts, dC_parts, dD_parts, dbias_parts):
    """Gradients w.r.t. u, delta, z (full) and A, B, C, D, bias (one partial sum per worker: the
    batch elements of a channel, and the channels of a group, span several blocks)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    lanes = checkpoints.shape[3]
    per_block = -(-per_group // lanes)
    n_blocks = batch * groups * per_block
    workers = dB_parts.shape[0]
    blocks_per_worker = -(-n_blocks // workers)
    for w in prange(workers):
        zero, one = _zero(u), _one(u)
        states = np.empty((CHECKPOINT + 1, n_state, BLOCK), dtype=u.dtype)  # h_{t-1} for the chunk's steps
        decays = np.empty((CHECKPOINT + 1, n_state, BLOCK), dtype=u.dtype)
        grad = np.empty((n_state, BLOCK), dtype=u.dtype)  # dLoss/dh_t
        A_blk = np.empty((n_state, BLOCK), dtype=u.dtype)
        dA_blk = np.empty((n_state, BLOCK), dtype=u.dtype)
        D_blk = np.empty(BLOCK, dtype=u.dtype)
        rows = np.empty((BLOCK, CHECKPOINT), dtype=u.dtype)
        gate_rows = np.empty((BLOCK, CHECKPOINT), dtype=u.dtype)  # softplus', then dout * silu'(z)
        dt = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        dt_grad = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        ub = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        x = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)
        dy = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)  # dLoss/dy before the gate
        y = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)  # y before the gate (for dz)
        sum_a = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)  # sum_n dLoss/d(dt A_n) A_n
        sum_b = np.empty((CHECKPOINT, BLOCK), dtype=u.dtype)  # sum_n dLoss/dh_n B_n
        dD_blk = np.empty(BLOCK, dtype=u.dtype)
        dbias_blk = np.empty(BLOCK, dtype=u.dtype)
        for blk in range(w * blocks_per_worker, min((w + 1) * blocks_per_worker, n_blocks)):
            b, g, first, width = _block_of(blk, groups, per_block, per_group, lanes)
            for n in range(n_state):
                for c in range(lanes):
                    A_blk[n, c] = zero
                    dA_blk[n, c] = zero
                    grad[n, c] = zero
            for c in range(width):
                for n in range(n_state):
                    A_blk[n, c] = A[first + c, n]
                    grad[n, c] = dlast[b, first + c, n]
            for c in range(lanes):
                D_blk[c] = D[first + c] if c < width else zero
                dD_blk[c] = zero
                dbias_blk[c] = zero
            for c in range(width, lanes):
                for j in range(CHECKPOINT):
                    rows[c, j] = zero
                    gate_rows[c, j] = zero
            for chunk in range((length - 1) // CHECKPOINT, -1, -1):
                start = chunk * CHECKPOINT
                steps = min(start + CHECKPOINT, length) - start
                _load_steps(delta, bias, softplus, u, b, first, width, lanes, start, steps, rows, gate_rows, dt,
                            dt_grad, ub)
                for j in range(steps):
                    for c in range(lanes):
                        x[j, c] = dt[j, c] * ub[j, c]
                for c in range(width):
                    ch = first + c
                    go, dst, dst_gate = dout[b, ch, start:start + steps], rows[c], gate_rows[c]
                    if gate:  # dy = dout * silu(z); gate_rows: dout * silu'(z), times y below for dz
                        z_row = z[b, ch, start:start + steps]
                        for j in range(steps):
                            z_t = z_row[j]
                            s = _sigmoid(z_t)
                            dst[j] = go[j] * (z_t * s)
                            dst_gate[j] = go[j] * (s * (one + z_t * (one - s)))
                    else:
                        for j in range(steps):
                            dst[j] = go[j]
                _to_steps(rows, steps, lanes, dy)
                for n in range(n_state):
                    for c in range(lanes):
                        states[0, n, c] = checkpoints[blk, chunk, n, c]
                for j in range(steps):  # recompute the chunk's decays, states and y
                    t = start + j
                    for c in range(lanes):
                        y[j, c] = D_blk[c] * ub[j, c]
                    for n in range(n_state):
                        B_tn, C_tn = B[b, g, t, n], C[b, g, t, n]
                        for c in range(lanes):
                            decay = _exp(dt[j, c] * A_blk[n, c])
                            decays[j, n, c] = decay
                            h_n = decay * states[j, n, c] + x[j, c] * B_tn
                            states[j + 1, n, c] = h_n
                            y[j, c] += h_n * C_tn
                if gate:  # dz = dLoss/dout * silu'(z) * y
                    for c in range(width):
                        dst, factor = dz[b, first + c, start:start + steps], gate_rows[c]
                        for j in range(steps):
                            dst[j] = factor[j] * y[j, c]
                for n in range(n_state):
                    for c in range(lanes):
                        decays[steps, n, c] = one
                for j in range(steps - 1, -1, -1):  # the adjoint recurrence, back through the chunk
                    t = start + j
                    for c in range(lanes):
                        sum_a[j, c] = zero
                        sum_b[j, c] = zero
                    for n in range(n_state):
                        B_tn, C_tn = B[b, g, t, n], C[b, g, t, n]
                        for c in range(lanes):
                            grad_h = grad[n, c] * decays[j + 1, n, c] + dy[j, c] * C_tn
                            grad[n, c] = grad_h
                            grad_log = grad_h * decays[j, n, c] * states[j, n, c]  # dLoss/d(dt A_n)
                            dA_blk[n, c] += grad_log * dt[j, c]
                            sum_a[j, c] += grad_log * A_blk[n, c]
                            sum_b[j, c] += grad_h * B_tn
                    for n in range(n_state):  # sums over the block's channels: one per (t, n)
                        acc = zero
                        for c in range(lanes):
                            acc += grad[n, c] * x[j, c]
                        dB_parts[w, b, g, t, n] += acc
                    for n in range(n_state):
                        acc = zero
                        for c in range(lanes):
                            acc += dy[j, c] * states[j + 1, n, c]
                        dC_parts[w, b, g, t, n] += acc
                for n in range(n_state):
                    for c in range(lanes):
                        grad[n, c] = grad[n, c] * decays[0, n, c]  # carried into the chunk before
                for j in range(steps):
                    for c in range(lanes):
                        dD_blk[c] += dy[j, c] * ub[j, c]
                for j in range(steps):
                    for c in range(lanes):
                        sum_a[j, c] = (sum_a[j, c] + sum_b[j, c] * ub[j, c]) * dt_grad[j, c]  # ddelta
                for j in range(steps):
                    for c in range(lanes):
                        dbias_blk[c] += sum_a[j, c]
                for c in range(width):
                    dst = ddelta[b, first + c, start:start + steps]
                    for j in range(steps):
                        dst[j] = sum_a[j, c]
                for c in range(width):
                    dst = du[b, first + c, start:start + steps]
                    for j in range(steps):
                        dst[j] = sum_b[j, c] * dt[j, c] + dy[j, c] * D_blk[c]
            for c in range(width):
                dD_parts[w, first + c] += dD_blk[c]
                dbias_parts[w, first + c] += dbias_blk[c]
                for n in range(n_state):
                    dA_parts[w, first + c, n] += dA_blk[n, c]


# LLVM's cost model vectorises short loops 8 wide and interleaves them 4 times: 32 lanes per
# iteration, so a 16-lane loop never reaches its vector body. One 16-wide vector per iteration
# instead; and loops that write several arrays need more runtime alias checks than LLVM allows by
# default (128). These are process-wide LLVM options, so they are set only while the kernels
# compile (first call per dtype; a cache load does not compile) and reset right after.
_VECTOR_OPTIONS = ("-force-vector-width=16", "-force-vector-interleave=1", "-vectorize-memory-check-threshold=1000")
_OPTION_DEFAULTS = {"-vectorize-memory-check-threshold": "128"}  # the others' default is 0
_compiled: set[tuple[str, torch.dtype]] = set()
# numba's workqueue layer aborts the process when two Python threads run parallel kernels at once;
# calls (and compilations, which set process-wide LLVM options) take turns instead.
_KERNEL_LOCK = threading.Lock()


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
                name = option.split("=")[0]
                llvm.set_option("", f"{name}={_OPTION_DEFAULTS.get(name, '0')}")
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            captured.seek(0)
            other = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                     if not line.startswith("remark: ")]
            if other:
                sys.stderr.write("".join(other))
        _compiled.add((kernel, dtype))


def _block_width(batch: int, groups: int, per_group: int) -> int:
    """Channels per block: the widest of BLOCKS that divides a group's channels and still leaves
    every numba thread a block (wider blocks amortise each inner loop's set-up and the sums over
    channels of the B and C gradients); 16 otherwise, padding the last block of each group."""
    threads = numba.get_num_threads()
    for lanes in BLOCKS:
        if per_group % lanes == 0 and batch * groups * (per_group // lanes) >= threads:
            return lanes
    return BLOCKS[-1]


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
        groups = B.shape[1]
        lanes = _block_width(batch, groups, dim // groups)
        blocks = batch * groups * -(-(dim // groups) // lanes)
        checkpoints = u.new_empty(blocks, -(-length // CHECKPOINT), B_rows.shape[-1], lanes)
        last = u.new_empty(batch, dim, A.shape[1])
        with _KERNEL_LOCK, _compiling("forward", u.dtype):
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
        dD_parts = u.new_zeros(workers, u.shape[1])
        dbias_parts = u.new_zeros(workers, u.shape[1])
        dB_parts = B_rows.new_zeros(workers, *B_rows.shape)
        dC_parts = C_rows.new_zeros(workers, *C_rows.shape)
        with _KERNEL_LOCK, _compiling("backward", u.dtype):
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
