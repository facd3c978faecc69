"""The ``fused`` CPU scan: numba kernels written on explicit 512-bit vectors, one pass over L each way.

A block is one vector's worth of consecutive channels (16 in float32, 8 in float64) of one batch
element and one group, so they share their B and C rows: every step is, per state n, one vector
operation with ``B[n, t]``, ``C[n, t]`` broadcast, and y, du and dΔ accumulate per channel (no sums
across lanes). The inputs are read ``CHUNK`` steps at a time, row by row, and turned to
(step, channel) tiles by in-register transposes; outputs go back the same way, so B and C are
read where they lie and no (batch, dim, L, N) tensor is ever built.

The forward keeps the state entering every chunk. The backward walks the chunks last to first:
it recomputes the chunk's decays and states from that checkpoint (one exp per element, as the
forward), runs the adjoint back through them, and sums the B and C gradients over each block's
channels by transposing reductions (16 steps' sums in one vector). The backward's work is cut
into fixed, balanced shares of contiguous blocks; a share whose first group began in the share
before adds that group's B, C gradients into a buffer of its own, added in order afterwards, so
results do not depend on thread timing.

The kernels run on torch's own OpenMP threads, as many as ``torch.get_num_threads()`` (see
"Threads" below); where torch has no OpenMP runtime, on the calling thread.

float32 exponentials are a polynomial (relative error ~2.4e-7, below float32 rounding of the
scan), float64 ones libm's, so float64 results match ``reference`` to rounding.
See docs/explanation/selective-scan.md for what was measured and what was tried and dropped.
"""

from __future__ import annotations

import array
import ctypes
import glob
import math
import operator
import os

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from .backends import register_backend

CHUNK = 128  # steps per checkpoint and per input tile: a multiple of the lanes (16 float32, 8 float64)
# Reassociation and contraction for the scalar float64 loops; no "nnan"/"ninf": inf and NaN propagate.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_LOG2E = 1.4426950408889634
_THRESHOLD = 20.0  # softplus(x) = x above this, as in torch
# 2^r on |r| <= 1/2, degree 5, fitted for the least maximum relative error (2.4e-7 in float32)
_EXP2 = (1.0, 0.6931469670394641, 0.24022119725584123, 0.05550713314443557, 0.009675541279148242,
         0.0013276458893999865)
_ATANH = tuple(1.0 / k for k in (3, 5, 7, 9, 11, 13))


# ---------------------------------------------------------------------------------------------
# Vectors: one LLVM <lanes x float> value per variable, so the kernels say which operations run
# on whole registers (LLVM's loop vectoriser, behind runtime alias checks, did not for short loops).


class Vector(types.Type):
    """A 512-bit SIMD vector of ``dtype``: 16 float32 or 8 float64 lanes."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = 512 // dtype.bitwidth
        super().__init__(name=f"Vector({dtype} x {self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


_VECTOR_FLAGS = ("contract", "nsz", "arcp")  # no reassociation: every vector op rounds as written


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _suffix(vector: Vector) -> str:
    return f"v{vector.lanes}f{vector.dtype.bitwidth}"


def _address(context, builder, array_type, array, index, vector_type):
    """Pointer to ``array``'s flat element ``index`` (C order), as a vector pointer."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index], inbounds=True), vector_type.as_pointer())


def _splat(builder, vector_type, value):
    lanes = vector_type.count
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _constant(vector_type, value):
    return ir.Constant(vector_type, [float(value)] * vector_type.count)


@intrinsic
def vload(typingctx, array, index):
    """The lanes at ``array``'s flat (C order) elements ``index ... index + lanes - 1``."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        return builder.load(_address(context, builder, signature.args[0], args[0], args[1], vector_type), align=4)

    return vector(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, value):
    """Write ``value``'s lanes to ``array``'s flat elements ``index ...``."""
    if not isinstance(array, types.Array) or not isinstance(value, Vector) or value.dtype != array.dtype:
        return None

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(signature.args[2])
        builder.store(args[2], _address(context, builder, signature.args[0], args[0], args[1], vector_type), align=4)
        return context.get_dummy_value()

    return types.none(array, index, value), codegen


@intrinsic
def vfill(typingctx, like, value):
    """A vector of ``like``'s type (a Vector, or an array's dtype) with ``value`` in every lane."""
    dtype = like.dtype
    if not isinstance(like, (Vector, types.Array)) or not isinstance(value, (types.Float, types.Integer)):
        return None
    vector = Vector(dtype)

    def codegen(context, builder, signature, args):
        scalar = context.cast(builder, args[1], signature.args[1], dtype)
        return _splat(builder, context.get_value_type(vector), scalar)

    return vector(like, value), codegen


def _binary(operation):
    @intrinsic
    def apply(typingctx, a, b):
        if not isinstance(a, Vector) or a != b:
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, operation)(args[0], args[1], flags=_VECTOR_FLAGS)

        return a(a, b), codegen

    return apply


def _overload_operator(python_operator, apply):
    @overload(python_operator)
    def vector_operator(a, b):
        scalar = (types.Float, types.Integer)
        if isinstance(a, Vector) and isinstance(b, Vector):
            return lambda a, b: apply(a, b)
        if isinstance(a, Vector) and isinstance(b, scalar):
            return lambda a, b: apply(a, vfill(a, b))
        if isinstance(a, scalar) and isinstance(b, Vector):
            return lambda a, b: apply(vfill(b, a), b)
        return None


for _operator, _instruction in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                                (operator.truediv, "fdiv")):
    _overload_operator(_operator, _binary(_instruction))


def _llvm_intrinsic(name, arity):
    """A vector function from LLVM's ``llvm.<name>.<vector type>`` intrinsic of ``arity`` vectors."""

    def typer(args):
        if not isinstance(args[0], Vector) or any(a != args[0] for a in args):
            return None

        def codegen(context, builder, signature, values):
            vector_type = values[0].type
            fn = _declare(builder, f"llvm.{name}.{_suffix(args[0])}", vector_type, [vector_type] * arity)
            return builder.call(fn, list(values))

        return args[0](*args), codegen

    if arity == 1:
        return intrinsic(lambda typingctx, a: typer((a,)))
    if arity == 2:
        return intrinsic(lambda typingctx, a, b: typer((a, b)))
    return intrinsic(lambda typingctx, a, b, c: typer((a, b, c)))


vfma = _llvm_intrinsic("fma", 3)  # a * b + c, rounded once
vmax = _llvm_intrinsic("maxnum", 2)
vmin = _llvm_intrinsic("minnum", 2)
_vrint = _llvm_intrinsic("rint", 1)
_vexp2_libm = _llvm_intrinsic("exp2", 1)


@intrinsic
def vwhere_greater(typingctx, a, b, then, otherwise):
    """Lane by lane: ``then`` where a > b, else ``otherwise``."""
    if not isinstance(a, Vector) or not all(v == a for v in (b, then, otherwise)):
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[2], args[3])

    return a(a, b, then, otherwise), codegen


@intrinsic
def _scale_by_power_of_2(typingctx, p, k):
    """p * 2^k for float32 lanes 2^-1/2 <= p <= 2^1/2 and integral -125 <= k <= 127: k added to the
    exponent bits (an integer add: the multiply units stay free for the polynomials)."""
    if not isinstance(p, Vector) or p != k or p.dtype != types.float32:
        return None

    def codegen(context, builder, signature, args):
        int_type = ir.VectorType(ir.IntType(32), p.lanes)
        shift = builder.shl(builder.fptosi(args[1], int_type), ir.Constant(int_type, [23] * p.lanes))
        return builder.bitcast(builder.add(builder.bitcast(args[0], int_type), shift), args[0].type)

    return p(p, k), codegen


def vexp2(t):
    """2^t lane by lane: float32 by a degree-5 polynomial on the fraction (2.4e-7 relative), 0 below
    2^-125 and at most 2^127.5 (no overflow to inf); float64 by libm."""
    raise NotImplementedError


@overload(vexp2)
def _vexp2_overload(t):
    if not isinstance(t, Vector):
        return None
    if t.dtype != types.float32:
        return lambda t: _vexp2_libm(t)
    c0, c1, c2, c3, c4, c5 = (np.float32(c) for c in _EXP2)
    low, high = np.float32(-125.0), np.float32(127.0)

    def exp2_float32(t):
        clamped = vmin(vmax(t, vfill(t, low)), vfill(t, high))
        k = _vrint(clamped)
        r = clamped - k  # |r| <= 1/2, exact
        p = vfma(vfma(vfma(vfma(vfma(vfill(t, c5), r, vfill(t, c4)), r, vfill(t, c3)), r, vfill(t, c2)), r,
                      vfill(t, c1)), r, vfill(t, c0))
        return vwhere_greater(t, vfill(t, low), _scale_by_power_of_2(p, k), vfill(t, 0.0))  # NaN -> 0

    return exp2_float32


def _lanes_of(array):
    """Lanes of a vector of ``array``'s dtype (a compile-time constant)."""
    raise NotImplementedError


@overload(_lanes_of)
def _lanes_of_overload(array):
    lanes = Vector(array.dtype).lanes
    return lambda array: lanes


def _transposed(builder, rows):
    """The rows of the transpose of the square tile whose rows are the vectors ``rows``: log2(lanes)
    rounds of two-input shuffles; round d swaps the elements whose row and lane differ in bit d."""
    lanes = len(rows)
    mask_type = ir.VectorType(ir.IntType(32), lanes)
    distance = 1
    while distance < lanes:
        low = [c if not c & distance else lanes + c - distance for c in range(lanes)]
        high = [c + distance if not c & distance else lanes + c for c in range(lanes)]
        swapped = list(rows)
        for r in range(lanes):
            if not r & distance:
                swapped[r] = builder.shuffle_vector(rows[r], rows[r + distance], ir.Constant(mask_type, low))
                swapped[r + distance] = builder.shuffle_vector(rows[r], rows[r + distance],
                                                               ir.Constant(mask_type, high))
        rows = swapped
        distance *= 2
    return rows


@intrinsic
def vtranspose(typingctx, source, source_start, source_stride, target, target_start, target_stride):
    """target row i, lane j = source row j, lane i, for a lanes x lanes tile whose rows start at
    ``start + i * stride`` (flat indices)."""
    if not isinstance(source, types.Array) or source.dtype != getattr(target, "dtype", None):
        return None
    vector = Vector(source.dtype)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        lanes = vector.lanes
        src, src_start, src_stride, dst, dst_start, dst_stride = args

        def row_address(array_type, array, start, stride, i):
            index = builder.add(start, builder.mul(stride, ir.Constant(stride.type, i)))
            return _address(context, builder, array_type, array, index, vector_type)

        rows = _transposed(builder, [builder.load(row_address(signature.args[0], src, src_start, src_stride, i),
                                                  align=4) for i in range(lanes)])
        for i in range(lanes):
            builder.store(rows[i], row_address(signature.args[3], dst, dst_start, dst_stride, i), align=4)
        return context.get_dummy_value()

    return types.none(source, source_start, source_stride, target, target_start, target_stride), codegen


@intrinsic
def vrow_dots(typingctx, a, a_start, a_stride, b, b_start, b_stride):
    """Lane i = sum over lanes of (a row i * b row i), rows at ``start + i * stride``: ``lanes``
    dot products in one vector, by a tree of shuffles and adds (2 shuffles and 1 add per row)."""
    if not isinstance(a, types.Array) or a.dtype != getattr(b, "dtype", None):
        return None
    vector = Vector(a.dtype)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        lanes = vector.lanes
        mask_type = ir.VectorType(ir.IntType(32), lanes)

        def row(k, i):
            array, start, stride = args[3 * k:3 * k + 3]
            index = builder.add(start, builder.mul(stride, ir.Constant(stride.type, i)))
            address = _address(context, builder, signature.args[3 * k], array, index, vector_type)
            return builder.load(address, align=4)

        # (vector, label of each lane group); each group holds partial sums of one row
        level = [(builder.fmul(row(0, i), row(1, i), flags=_VECTOR_FLAGS), [i]) for i in range(lanes)]
        group = lanes
        while group > 1:
            half = group // 2
            merged = []
            for (left, left_labels), (right, right_labels) in zip(level[0::2], level[1::2]):
                low, high, labels = [], [], []
                for q in range(lanes // group):
                    low += [q * group + c for c in range(half)] + [lanes + q * group + c for c in range(half)]
                    high += [q * group + half + c for c in range(half)] + [
                        lanes + q * group + half + c for c in range(half)]
                    labels += [left_labels[q], right_labels[q]]
                total = builder.fadd(builder.shuffle_vector(left, right, ir.Constant(mask_type, low)),
                                     builder.shuffle_vector(left, right, ir.Constant(mask_type, high)),
                                     flags=_VECTOR_FLAGS)
                merged.append((total, labels))
            level, group = merged, half
        (sums, labels), = level
        order = [labels.index(i) for i in range(lanes)]
        return builder.shuffle_vector(sums, sums, ir.Constant(mask_type, order))

    return vector(a, a_start, a_stride, b, b_start, b_stride), codegen


@intrinsic
def _claim(typingctx, counter):
    """Atomically add 1 to ``counter[0]`` (an int64 array) and return its previous value."""
    if not isinstance(counter, types.Array) or counter.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return types.int64(counter), codegen


# ---------------------------------------------------------------------------------------------
# Tiles: CHUNK steps of a block's channels, (step, channel) = one vector per step. Step sizes
# (softplus) and the z gate act lane by lane on tiles: float32 on vectors with the polynomial exp,
# float64 with libm, as torch computes.


@njit(inline="always", fastmath=_FASTMATH)
def _vlog1p_small(y):
    """log1p(y) for float32 lanes 0 <= y <= 1: 2 atanh(s), s = y / (2 + y) <= 1/3, as a short series
    that keeps full relative accuracy for tiny y."""
    k3, k5, k7, k9, k11, k13 = _ATANH
    s = y / (y + 2.0)
    s2 = s * s
    series = vfma(vfma(vfma(vfma(vfma(vfma(vfill(s2, k13), s2, vfill(s2, k11)), s2, vfill(s2, k9)), s2,
                                  vfill(s2, k7)), s2, vfill(s2, k5)), s2, vfill(s2, k3)), s2, vfill(s2, 1.0))
    return (s + s) * series


@njit(inline="always", fastmath=_FASTMATH)
def _vsigmoid(x):
    return 1.0 / (vexp2(x * -_LOG2E) + 1.0)


@njit(inline="always", fastmath=_FASTMATH)
def _softplus64(x):
    return x if x > _THRESHOLD else math.log1p(math.exp(x))  # torch's own formula


@njit(inline="always", fastmath=_FASTMATH)
def _sigmoid64(x):
    return 1.0 / (1.0 + math.exp(-x))


def _step_sizes(tile, grad_tile, bias_lanes, softplus, with_grad):
    """In place: dt = softplus(delta + bias) (or delta + bias); its derivative to ``grad_tile`` when
    ``with_grad``."""
    raise NotImplementedError


@overload(_step_sizes)
def _step_sizes_overload(tile, grad_tile, bias_lanes, softplus, with_grad):
    if tile.dtype == types.float32:

        def step_sizes32(tile, grad_tile, bias_lanes, softplus, with_grad):
            bias = vload(bias_lanes, 0)
            zero, one, threshold = vfill(bias, 0.0), vfill(bias, 1.0), vfill(bias, _THRESHOLD)
            for i in range(0, tile.size, _lanes_of(tile)):
                x = vload(tile, i) + bias
                if softplus:
                    e = vexp2(vmin(x, zero - x) * _LOG2E)  # e^-|x|
                    vstore(tile, i, vwhere_greater(x, threshold, x, vmax(x, zero) + _vlog1p_small(e)))
                    if with_grad:  # sigmoid(x) from the same exp
                        vstore(grad_tile, i, vwhere_greater(x, threshold, one,
                                                            vwhere_greater(zero, x, e, one) / (one + e)))
                else:
                    vstore(tile, i, x)
                    if with_grad:
                        vstore(grad_tile, i, one)

        return step_sizes32

    def step_sizes64(tile, grad_tile, bias_lanes, softplus, with_grad):
        lanes = bias_lanes.size
        for i in range(tile.size):
            x = tile[i] + bias_lanes[i % lanes]
            tile[i] = _softplus64(x) if softplus else x
            if with_grad:
                grad_tile[i] = (1.0 if x > _THRESHOLD else _sigmoid64(x)) if softplus else 1.0

    return step_sizes64


def _gate(y_tile, z_tile):
    """In place: y * silu(z)."""
    raise NotImplementedError


@overload(_gate)
def _gate_overload(y_tile, z_tile):
    if y_tile.dtype == types.float32:

        def gate32(y_tile, z_tile):
            for i in range(0, y_tile.size, _lanes_of(y_tile)):
                z = vload(z_tile, i)
                vstore(y_tile, i, vload(y_tile, i) * (z * _vsigmoid(z)))

        return gate32

    def gate64(y_tile, z_tile):
        for i in range(y_tile.size):
            z = z_tile[i]
            y_tile[i] *= z * _sigmoid64(z)

    return gate64


def _gate_backward(dout_tile, z_tile):
    """In place: dout -> dLoss/dy = dout * silu(z); z -> dout * silu'(z), the factor of dz = factor * y."""
    raise NotImplementedError


@overload(_gate_backward)
def _gate_backward_overload(dout_tile, z_tile):
    if dout_tile.dtype == types.float32:

        def gate_backward32(dout_tile, z_tile):
            for i in range(0, dout_tile.size, _lanes_of(dout_tile)):
                z, dout = vload(z_tile, i), vload(dout_tile, i)
                s = _vsigmoid(z)
                vstore(dout_tile, i, dout * (z * s))
                vstore(z_tile, i, dout * (s * vfma(z, 1.0 - s, vfill(s, 1.0))))

        return gate_backward32

    def gate_backward64(dout_tile, z_tile):
        for i in range(dout_tile.size):
            z, dout = z_tile[i], dout_tile[i]
            s = _sigmoid64(z)
            dout_tile[i] = dout * (z * s)
            z_tile[i] = dout * (s * (1.0 + z * (1.0 - s)))

    return gate_backward64


@njit(inline="always")
def _load_tile(source, b, first, width, start, steps, tile):
    """tile[j, c] = source[b, first + c, start + j] for the chunk's steps; padding channels 0.
    Whole lanes x lanes squares of a full block are transposed in registers straight from the
    (batch, dim, L) rows; the rest goes element by element."""
    lanes = _lanes_of(tile)
    dim, length = source.shape[1], source.shape[2]
    whole = steps - steps % lanes if width == lanes else 0
    base = (b * dim + first) * length + start
    for k in range(0, whole, lanes):
        vtranspose(source, base + k, length, tile, k * lanes, lanes)
    for j in range(whole, steps):
        for c in range(lanes):
            tile[j * lanes + c] = source[b, first + c, start + j] if c < width else 0


@njit(inline="always")
def _store_tile(tile, b, first, width, start, steps, target):
    """target[b, first + c, start + j] = tile[j, c] for the block's channels and the chunk's steps."""
    lanes = _lanes_of(tile)
    dim, length = target.shape[1], target.shape[2]
    whole = steps - steps % lanes if width == lanes else 0
    base = (b * dim + first) * length + start
    for k in range(0, whole, lanes):
        vtranspose(tile, k * lanes, lanes, target, base + k, length)
    for c in range(width):
        for j in range(whole, steps):
            target[b, first + c, start + j] = tile[j * lanes + c]


@njit(inline="always")
def _load_chunk(source, first, rows, start, steps, chunk):
    """chunk[r, :steps] = the chunk's steps of ``source``'s rows first ... first + rows - 1 (source
    flattened to rows of L; chunk: (rows, CHUNK), flat)."""
    lanes = _lanes_of(source)
    length = source.shape[-1]
    for r in range(rows):
        base = (first + r) * length + start
        if steps == CHUNK:
            for k in range(0, CHUNK, lanes):
                vstore(chunk, r * CHUNK + k, vload(source, base + k))
        else:
            for j in range(steps):
                chunk[r * CHUNK + j] = source.flat[base + j]


@njit(inline="always")
def _block_of(blk, groups, per_block, per_group, lanes):
    """(batch index, group, first channel, channels) of block ``blk``: up to ``lanes`` consecutive
    channels of one batch element and one group, so they share their B and C rows."""
    b = blk // (groups * per_block)
    g = (blk // per_block) % groups
    first = g * per_group + (blk % per_block) * lanes
    return b, g, first, min(lanes, (g + 1) * per_group - first)


@njit(inline="always")
def _block_parameters(A, D, bias, first, width, lanes, rate, A_lanes, D_lanes, bias_lanes):
    """The block's A * log2(e) (decay = 2^(dt * rate)), A, D and delta_bias, channels in lanes;
    padding lanes 0."""
    n_state = A.shape[1]
    rate[:] = 0
    A_lanes[:] = 0
    D_lanes[:] = 0
    bias_lanes[:] = 0
    for c in range(width):
        D_lanes[c] = D[first + c]
        bias_lanes[c] = bias[first + c]
        for n in range(n_state):
            A_lanes[n * lanes + c] = A[first + c, n]
            rate[n * lanes + c] = A[first + c, n] * _LOG2E


# ---------------------------------------------------------------------------------------------
# The kernels


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _forward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, out, checkpoints, last, next_block):
    """u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L); bias, D: (dim,);
    checkpoints: (blocks, chunks, N, lanes); last: (batch, dim, N). out = (C.h + D u) * silu(z)
    (no gate unless ``gate``). Runs the blocks it claims from ``next_block`` (each thread of a call
    runs this, so a thread that starts late takes fewer blocks)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    lanes = _lanes_of(u)
    per_block = -(-per_group // lanes)
    chunks = -(-length // CHUNK)
    row = n_state * lanes  # one step's states: (N, lanes)
    n_blocks = batch * groups * per_block
    rate, A_lanes = np.empty(row, u.dtype), np.empty(row, u.dtype)
    D_lanes, bias_lanes = np.empty(lanes, u.dtype), np.empty(lanes, u.dtype)
    state = np.empty(row, u.dtype)
    dt = np.zeros(CHUNK * lanes, u.dtype)  # tiles: (step, channel)
    ub = np.zeros(CHUNK * lanes, u.dtype)
    yb = np.zeros(CHUNK * lanes, u.dtype)
    zb = np.zeros(CHUNK * lanes, u.dtype)
    B_chunk, C_chunk = np.zeros(n_state * CHUNK, u.dtype), np.zeros(n_state * CHUNK, u.dtype)  # (N, step)
    while True:
        blk = _claim(next_block)
        if blk >= n_blocks:
            break
        b, g, first, width = _block_of(blk, groups, per_block, per_group, lanes)
        _block_parameters(A, D, bias, first, width, lanes, rate, A_lanes, D_lanes, bias_lanes)
        skip = vload(D_lanes, 0)
        state[:] = 0
        group_rows = (b * groups + g) * n_state  # B, C as rows of L
        for chunk in range(chunks):
            start = chunk * CHUNK
            steps = min(CHUNK, length - start)
            _load_chunk(B, group_rows, n_state, start, steps, B_chunk)
            _load_chunk(C, group_rows, n_state, start, steps, C_chunk)
            saved = (blk * chunks + chunk) * row
            for i in range(0, row, lanes):
                vstore(checkpoints, saved + i, vload(state, i))
            _load_tile(delta, b, first, width, start, steps, dt)
            _step_sizes(dt, dt, bias_lanes, softplus, False)
            _load_tile(u, b, first, width, start, steps, ub)
            for j in range(steps):
                dt_j, u_j = vload(dt, j * lanes), vload(ub, j * lanes)
                x_j = dt_j * u_j
                y_j, y_other = skip * u_j, vfill(skip, 0.0)  # two sums over n, taking turns: half the latency
                for n in range(n_state):
                    i = n * lanes
                    h = vfma(vexp2(dt_j * vload(rate, i)), vload(state, i), x_j * B_chunk[n * CHUNK + j])
                    vstore(state, i, h)
                    y_j, y_other = y_other, vfma(h, vfill(h, C_chunk[n * CHUNK + j]), y_j)
                vstore(yb, j * lanes, y_j + y_other)
            if gate:
                _load_tile(z, b, first, width, start, steps, zb)
                _gate(yb, zb)
            _store_tile(yb, b, first, width, start, steps, out)
        for c in range(width):
            for n in range(n_state):
                last[b, first + c, n] = state[n * lanes + c]


@njit(inline="always")
def _add_sums(target, index, sums, count, overwrite, spare):
    """target's flat elements index ... index + count - 1 (+)= the first ``count`` lanes of ``sums``."""
    lanes = _lanes_of(target)
    if count == lanes:
        vstore(target, index, sums if overwrite else vload(target, index) + sums)
    else:
        vstore(spare, 0, sums)
        for i in range(count):
            target.flat[index + i] = spare[i] if overwrite else target.flat[index + i] + spare[i]


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _backward_share(u, delta, bias, softplus, A, B, C, D, z, gate, checkpoints, dout, dlast,
                    du, ddelta, dz, dB, dC, dB_spill, dC_spill, dA_parts, dD_parts, dbias_parts, w):
    """Worker w's share of the gradients w.r.t. u, delta, z (full), B, C (dB, dC: (batch, G, N, L))
    and A, D, bias (one partial sum per worker: a channel's batch elements may fall to several
    workers). Worker w takes blocks lo ... hi - 1, a fixed share, so every sum is taken in the same
    order whatever the timing; if its first group began on an earlier worker, that group's B, C
    gradients go to dB_spill[w], dC_spill[w] (added to dB, dC afterwards, in order)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    lanes = _lanes_of(u)
    per_block = -(-per_group // lanes)
    n_blocks = batch * groups * per_block
    chunks = -(-length // CHUNK)
    workers = dA_parts.shape[0]
    row = n_state * lanes
    lo, hi = w * n_blocks // workers, (w + 1) * n_blocks // workers
    rate, A_lanes = np.empty(row, u.dtype), np.empty(row, u.dtype)
    D_lanes, bias_lanes = np.empty(lanes, u.dtype), np.empty(lanes, u.dtype)
    dt, dt_grad = np.zeros(CHUNK * lanes, u.dtype), np.zeros(CHUNK * lanes, u.dtype)  # (step, channel)
    ub, xb = np.zeros(CHUNK * lanes, u.dtype), np.zeros(CHUNK * lanes, u.dtype)
    dy, yb = np.zeros(CHUNK * lanes, u.dtype), np.zeros(CHUNK * lanes, u.dtype)
    gate_factor = np.zeros(CHUNK * lanes, u.dtype)  # z, then dout * silu'(z)
    d_dt, d_u = np.zeros(CHUNK * lanes, u.dtype), np.zeros(CHUNK * lanes, u.dtype)
    states = np.zeros((CHUNK + 1) * row, u.dtype)  # row 0: the entering state; row j + 1: h_j
    decays = np.zeros((CHUNK + 1) * row, u.dtype)  # row j: decay of step j, then dLoss/dh_{j-1}
    grad = np.zeros(row, u.dtype)  # dLoss/dh, carried back through the chunks
    dA_lanes = np.zeros(row, u.dtype)
    spare = np.zeros(lanes, u.dtype)
    B_chunk, C_chunk = np.zeros(n_state * CHUNK, u.dtype), np.zeros(n_state * CHUNK, u.dtype)  # (N, step)
    for blk in range(lo, hi):
        b, g, first, width = _block_of(blk, groups, per_block, per_group, lanes)
        _block_parameters(A, D, bias, first, width, lanes, rate, A_lanes, D_lanes, bias_lanes)
        skip = vload(D_lanes, 0)
        grad[:] = 0
        dA_lanes[:] = 0
        for c in range(width):
            for n in range(n_state):
                grad[n * lanes + c] = dlast[b, first + c, n]
        spilled = blk - blk % per_block < lo
        overwrite = blk == lo or blk % per_block == 0  # this worker's first block of the group
        target_B = dB_spill[w] if spilled else dB[b, g]  # (N, L)
        target_C = dC_spill[w] if spilled else dC[b, g]
        dD_sum, dbias_sum = vfill(skip, 0.0), vfill(skip, 0.0)
        group_rows = (b * groups + g) * n_state  # B, C as rows of L
        for chunk in range(chunks - 1, -1, -1):
            start = chunk * CHUNK
            steps = min(CHUNK, length - start)
            _load_chunk(B, group_rows, n_state, start, steps, B_chunk)
            _load_chunk(C, group_rows, n_state, start, steps, C_chunk)
            _load_tile(delta, b, first, width, start, steps, dt)
            _step_sizes(dt, dt_grad, bias_lanes, softplus, True)
            _load_tile(u, b, first, width, start, steps, ub)
            _load_tile(dout, b, first, width, start, steps, dy)
            if gate:
                _load_tile(z, b, first, width, start, steps, gate_factor)
                _gate_backward(dy, gate_factor)
            saved = (blk * chunks + chunk) * row
            for i in range(0, row, lanes):
                vstore(states, i, vload(checkpoints, saved + i))
            for j in range(steps):  # the chunk's decays, states and y again
                dt_j, u_j = vload(dt, j * lanes), vload(ub, j * lanes)
                x_j = dt_j * u_j
                vstore(xb, j * lanes, x_j)
                y_j, y_other = skip * u_j, vfill(skip, 0.0)
                for n in range(n_state):
                    i = n * lanes
                    decay = vexp2(dt_j * vload(rate, i))
                    h = vfma(decay, vload(states, j * row + i), x_j * B_chunk[n * CHUNK + j])
                    vstore(decays, j * row + i, decay)
                    vstore(states, (j + 1) * row + i, h)
                    y_j, y_other = y_other, vfma(h, vfill(h, C_chunk[n * CHUNK + j]), y_j)
                vstore(yb, j * lanes, y_j + y_other)
            for i in range(0, row, lanes):
                vstore(decays, steps * row + i, vfill(skip, 1.0))
            for j in range(steps - 1, -1, -1):  # the adjoint, back through the chunk
                dt_j, u_j, dy_j = vload(dt, j * lanes), vload(ub, j * lanes), vload(dy, j * lanes)
                # sum_n dLoss/d(dt A_n) A_n and sum_n dLoss/dh_n B_n, each in two sums taking turns
                sum_a, sum_b = vfill(skip, 0.0), vfill(skip, 0.0)
                other_a, other_b = vfill(skip, 0.0), vfill(skip, 0.0)
                for n in range(n_state):
                    i = n * lanes
                    g_n = vfma(vload(grad, i), vload(decays, (j + 1) * row + i), dy_j * C_chunk[n * CHUNK + j])
                    vstore(grad, i, g_n)
                    vstore(decays, (j + 1) * row + i, g_n)  # that decay is spent: keep dLoss/dh_j for dB
                    g_log = g_n * (vload(decays, j * row + i) * vload(states, j * row + i))  # dLoss/d(dt A_n)
                    vstore(dA_lanes, i, vfma(g_log, dt_j, vload(dA_lanes, i)))
                    sum_a, other_a = other_a, vfma(g_log, vload(A_lanes, i), sum_a)
                    sum_b, other_b = other_b, vfma(g_n, vfill(g_n, B_chunk[n * CHUNK + j]), sum_b)
                sum_a, sum_b = sum_a + other_a, sum_b + other_b
                d_dt_j = (sum_a + sum_b * u_j) * vload(dt_grad, j * lanes)
                vstore(d_dt, j * lanes, d_dt_j)
                vstore(d_u, j * lanes, vfma(sum_b, dt_j, dy_j * skip))
                dD_sum = vfma(dy_j, u_j, dD_sum)
                dbias_sum = dbias_sum + d_dt_j
            for i in range(0, row, lanes):  # carried into the chunk before
                vstore(grad, i, vload(grad, i) * vload(decays, i))
            for k in range(0, steps, lanes):  # dB = sum_c dLoss/dh x, dC = sum_c dy h, per step
                count = min(lanes, steps - k)
                for n in range(n_state):
                    i = n * lanes
                    index = n * length + start + k
                    _add_sums(target_B, index, vrow_dots(decays, (k + 1) * row + i, row, xb, k * lanes, lanes),
                              count, overwrite, spare)
                    _add_sums(target_C, index, vrow_dots(states, (k + 1) * row + i, row, dy, k * lanes, lanes),
                              count, overwrite, spare)
            _store_tile(d_dt, b, first, width, start, steps, ddelta)
            _store_tile(d_u, b, first, width, start, steps, du)
            if gate:
                for i in range(0, CHUNK * lanes, lanes):
                    vstore(yb, i, vload(yb, i) * vload(gate_factor, i))
                _store_tile(yb, b, first, width, start, steps, dz)
        vstore(spare, 0, dD_sum)
        for c in range(width):
            dD_parts[w, first + c] += spare[c]
        vstore(spare, 0, dbias_sum)
        for c in range(width):
            dbias_parts[w, first + c] += spare[c]
            for n in range(n_state):
                dA_parts[w, first + c, n] += dA_lanes[n * lanes + c]


@njit(nogil=True, cache=True)
def _backward_kernel(u, delta, bias, softplus, A, B, C, D, z, gate, checkpoints, dout, dlast,
                     du, ddelta, dz, dB, dC, dB_spill, dC_spill, dA_parts, dD_parts, dbias_parts, next_share):
    """Runs the backward shares it claims from ``next_share`` (each thread of a call runs this)."""
    while True:
        w = _claim(next_share)
        if w >= dA_parts.shape[0]:
            break
        _backward_share(u, delta, bias, softplus, A, B, C, D, z, gate, checkpoints, dout, dlast, du, ddelta, dz,
                        dB, dC, dB_spill, dC_spill, dA_parts, dD_parts, dbias_parts, w)


# ---------------------------------------------------------------------------------------------
# Threads: the kernels run on torch's own OpenMP team. A C entry point (numba cfunc) reads the
# call's arguments from a block of int64 slots (address and shape of each array, flags) and runs
# the kernel; ``GOMP_parallel`` of torch's OpenMP runtime runs it on torch.get_num_threads()
# threads. The threads claim blocks (forward) or fixed shares (backward) from counters, so a team
# of any size does all the work. numba's own thread pools did worse: the workqueue layer wakes its
# threads twice a call (~0.1 ms on a 2-vCPU VM), and a second thread waited, often for the whole
# call, while torch's OpenMP thread spun on the other core after torch's last parallel op; the
# OpenMP layer (another runtime) spins between calls and starves torch's threads.

_SLOT = 5  # an argument's slots: its address (or a flag's value) and up to 4 dimensions
_FLOAT32, _FLOAT64, _INT64 = np.zeros(0, np.float32), np.zeros(0, np.float64), np.zeros(0, np.int64)


@intrinsic
def _pointer(typingctx, address, like):
    """``address`` (an int or void*) as a pointer to elements of ``like``'s dtype."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        target = context.get_value_type(pointer)
        if isinstance(signature.args[0], types.Integer):
            return builder.inttoptr(args[0], target)
        return builder.bitcast(args[0], target)

    return pointer(address, like), codegen


@njit(inline="always")
def _slots(data):
    return carray(_pointer(data, _INT64), 32 * _SLOT)


@njit(inline="always")
def _view1(slots, k, like):
    return carray(_pointer(slots[k * _SLOT], like), (slots[k * _SLOT + 1],))


@njit(inline="always")
def _view2(slots, k, like):
    i = k * _SLOT
    return carray(_pointer(slots[i], like), (slots[i + 1], slots[i + 2]))


@njit(inline="always")
def _view3(slots, k, like):
    i = k * _SLOT
    return carray(_pointer(slots[i], like), (slots[i + 1], slots[i + 2], slots[i + 3]))


@njit(inline="always")
def _view4(slots, k, like):
    i = k * _SLOT
    return carray(_pointer(slots[i], like), (slots[i + 1], slots[i + 2], slots[i + 3], slots[i + 4]))


@njit(inline="always")
def _forward_from_slots(data, like):
    a = _slots(data)
    _forward_kernel(_view3(a, 0, like), _view3(a, 1, like), _view1(a, 2, like), a[3 * _SLOT] != 0,
                    _view2(a, 4, like), _view4(a, 5, like), _view4(a, 6, like), _view1(a, 7, like),
                    _view3(a, 8, like), a[9 * _SLOT] != 0, _view3(a, 10, like), _view4(a, 11, like),
                    _view3(a, 12, like), _view1(a, 13, _INT64))


@njit(inline="always")
def _backward_from_slots(data, like):
    a = _slots(data)
    _backward_kernel(_view3(a, 0, like), _view3(a, 1, like), _view1(a, 2, like), a[3 * _SLOT] != 0,
                     _view2(a, 4, like), _view4(a, 5, like), _view4(a, 6, like), _view1(a, 7, like),
                     _view3(a, 8, like), a[9 * _SLOT] != 0, _view4(a, 10, like), _view3(a, 11, like),
                     _view3(a, 12, like), _view3(a, 13, like), _view3(a, 14, like), _view3(a, 15, like),
                     _view4(a, 16, like), _view4(a, 17, like), _view3(a, 18, like), _view3(a, 19, like),
                     _view3(a, 20, like), _view2(a, 21, like), _view2(a, 22, like), _view1(a, 23, _INT64))


def _forward_entry32(data):
    _forward_from_slots(data, _FLOAT32)


def _forward_entry64(data):
    _forward_from_slots(data, _FLOAT64)


def _backward_entry32(data):
    _backward_from_slots(data, _FLOAT32)


def _backward_entry64(data):
    _backward_from_slots(data, _FLOAT64)


_ENTRIES = {("forward", torch.float32): _forward_entry32, ("forward", torch.float64): _forward_entry64,
            ("backward", torch.float32): _backward_entry32, ("backward", torch.float64): _backward_entry64}
_compiled_entries: dict = {}


def _entry_address(kernel: str, dtype: torch.dtype) -> int:
    """Address of the C entry point of ``kernel`` for ``dtype`` (compiled, or loaded from numba's
    cache, on first use)."""
    key = (kernel, dtype)
    if key not in _compiled_entries:
        _compiled_entries[key] = cfunc(types.void(types.voidptr), cache=True)(_ENTRIES[key])
    return _compiled_entries[key].address


def _openmp_parallel():
    """``GOMP_parallel`` of the OpenMP runtime torch runs its threads on, or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*"))):
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel  # the library torch has loaded: same handle
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        return parallel
    return None


_GOMP_PARALLEL = _openmp_parallel()
_CALL_ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _run(kernel: str, arguments: tuple, threads: int) -> None:
    """Run ``kernel`` on ``threads`` of torch's OpenMP threads (the calling thread alone where torch
    has no OpenMP runtime). ``arguments``: C-contiguous tensors and flags, in the kernel's order."""
    slots = [0] * (32 * _SLOT)
    for k, value in enumerate(arguments):
        if isinstance(value, torch.Tensor):
            slots[k * _SLOT] = value.data_ptr()
            slots[k * _SLOT + 1:k * _SLOT + 1 + value.dim()] = value.shape
        else:
            slots[k * _SLOT] = int(value)
    block = array.array("q", slots)
    address = block.buffer_info()[0]
    entry = _entry_address(kernel, arguments[0].dtype)
    if _GOMP_PARALLEL is None or threads == 1:
        _CALL_ENTRY(entry)(address)
    else:
        _GOMP_PARALLEL(entry, address, threads, 0)


def _lanes(dtype: torch.dtype) -> int:
    return 512 // (torch.finfo(dtype).bits)


class FusedScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias) -> (out, last_state); B, C grouped (batch, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        batch, dim, length = u.shape
        n_state, groups = A.shape[1], B.shape[1]
        zeros = u.new_zeros(dim)
        D_ = zeros if D is None else D
        bias = zeros if delta_bias is None else delta_bias
        z_ = u.new_empty(1, 1, 1) if z is None else z
        lanes = _lanes(u.dtype)
        blocks = batch * groups * -(-(dim // groups) // lanes)
        checkpoints = u.new_empty(blocks, -(-length // CHUNK), n_state, lanes)
        out = u.new_empty(batch, dim, length)
        last = u.new_empty(batch, dim, n_state)
        inputs = [t.detach().contiguous() for t in (u, delta, bias, A, B, C, D_, z_)]
        _run("forward", (*inputs[:3], softplus, *inputs[3:], z is not None, out, checkpoints, last,
                         torch.zeros(1, dtype=torch.int64)), min(torch.get_num_threads(), blocks))
        ctx.save_for_backward(u, delta, A, B, C, D_, z_, bias, checkpoints)
        ctx.flags = (bool(softplus), D is not None, z is not None, delta_bias is not None)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D_, z_, bias, checkpoints = ctx.saved_tensors
        softplus, has_D, gate, has_bias = ctx.flags
        batch, dim, length = u.shape
        n_state, groups = A.shape[1], B.shape[1]
        per_block = -(-(dim // groups) // _lanes(u.dtype))
        blocks = batch * groups * per_block
        du, ddelta = u.new_empty(u.shape), u.new_empty(u.shape)  # C-contiguous, whatever u's strides
        dz = u.new_empty(u.shape) if gate else u.new_empty(1, 1, 1)
        dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
        workers = min(torch.get_num_threads(), blocks)
        firsts = [w * blocks // workers for w in range(workers)]
        spilled = [w for w, lo in enumerate(firsts) if lo % per_block]  # first group began on w - 1
        spill_shape = (workers, n_state, length) if spilled else (workers, 0, 0)
        dB_spill, dC_spill = u.new_empty(spill_shape), u.new_empty(spill_shape)
        dA_parts, dD_parts, dbias_parts = A.new_zeros(workers, *A.shape), u.new_zeros(workers, dim), u.new_zeros(
            workers, dim)
        inputs = [t.detach().contiguous() for t in (u, delta, bias, A, B, C, D_, z_, checkpoints, dout, dlast)]
        _run("backward", (*inputs[:3], softplus, *inputs[3:8], gate, *inputs[8:], du, ddelta, dz, dB, dC, dB_spill,
                          dC_spill, dA_parts, dD_parts, dbias_parts, torch.zeros(1, dtype=torch.int64)), workers)
        for w in spilled:  # in worker order: the same sums whatever the timing
            b, g = divmod(firsts[w] // per_block, groups)
            dB[b, g] += dB_spill[w]
            dC[b, g] += dC_spill[w]
        total = lambda parts: parts[0] if workers == 1 else parts.sum(0)  # noqa: E731
        return (du, ddelta, total(dA_parts), dB, dC, total(dD_parts) if has_D else None,
                dz if gate else None, total(dbias_parts) if has_bias else None, None)


@register_backend("fused")
def fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """CPU scan compiled with numba: delta's bias/softplus, D and the z gate inside the kernels."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'fused' scan runs on CPU tensors, got {u.device}; use 'chunked' or 'cuda'")
    out, last = FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
