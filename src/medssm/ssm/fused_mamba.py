"""The Mamba layer on the CPU as one autograd Function (the ``mamba_inner_fn`` of mamba_ssm, for a
CPU), and the channels-first 2-D GEMMs it and the networks use.

:class:`FusedMamba` computes what :meth:`medssm.ssm.Mamba.forward_reference` computes. Channels-first
``(B, C, L)`` throughout: every projection is one plain 2-D GEMM per batch element on the weight as
stored (no expanded weights, no transposing copies); the causal conv and SiLU are one numba pass
(:mod:`medssm.ssm.causal_conv`), whose output is not kept (the backward recomputes it); dt_proj's
output goes straight into the scan, which adds the dt bias, applies softplus, adds ``D u`` and gates
with ``silu(z)`` itself. Its backward runs the scan's own backward and then the projections' and the
conv's, accumulating into the buffers it already has (``du += x_proj^T d(dt, B, C)`` in place).
Under CPU autocast to bfloat16 the projections run as bf16 GEMMs and the rest in float32.

Inside a region whose saved tensors are intercepted (``torch.utils.checkpoint``, which
:func:`medssm.nets.set_checkpointing` uses, ``torch.autograd.graph.save_on_cpu``, or a measurement
with ``saved_tensors_hooks``), everything the backward needs goes through ``save_for_backward``, so
that the hooks see it (checkpointing then frees it and recomputes it); the scan's own graph is then
rebuilt in the backward by running the scan's forward once more.

docs/explanation/selective-scan.md ("The Mamba layer around the scan") has the measurements.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scan as scan_module
from .backends import is_exporting
from .orders import from_order, to_order
from .scan import selective_scan

_conv_kernels = None
_saving_for_recompute = contextvars.ContextVar("medssm_saving_for_recompute", default=False)


@contextlib.contextmanager
def saving_for_recompute() -> Iterator[None]:
    """Inside the block, :class:`FusedMamba` keeps what its backward needs through
    ``save_for_backward`` only (for checkpointing regions; see :func:`saved_tensors_intercepted`)."""
    token = _saving_for_recompute.set(True)
    try:
        yield
    finally:
        _saving_for_recompute.reset(token)


def saved_tensors_intercepted() -> bool:
    """Whether tensors saved for backward here go through hooks (``torch.utils.checkpoint``,
    ``saved_tensors_hooks``) or a :func:`saving_for_recompute` block: then the fused layer must not
    keep tensors outside ``save_for_backward``, or checkpointing would not free them."""
    if _saving_for_recompute.get():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


def fused_kernels():
    """:mod:`medssm.ssm.causal_conv` (numba kernels), or None where numba cannot be loaded."""
    global _conv_kernels
    if _conv_kernels is None:
        try:
            from . import causal_conv
            _conv_kernels = causal_conv
        except (ImportError, OSError):
            _conv_kernels = False
    return _conv_kernels or None


def fused_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused CPU path runs its GEMMs in for input ``x``: bfloat16 under CPU autocast to
    bfloat16 (the conv and the scan stay float32), else ``x``'s own float32 or float64. None where
    the fused path does not run: off the CPU, while exporting or tracing, while FLOP counters run
    (they see only the reference path's modules), without numba, or for other dtypes."""
    if (x.device.type != "cpu" or is_exporting() or scan_module._flop_counters or torch.compiler.is_compiling()
            or fused_kernels() is None):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if bf16 else None
    return x.dtype if x.dtype in (torch.float32, torch.float64) else None


def to_gemm(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` in the GEMMs' dtype (a no-op outside autocast; autograd casts their gradients back)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def project_rows(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x[b] (+ bias)`` for each b: (M, K) on (B, K, L) -> (B, M, L), contiguous; one 2-D GEMM
    per batch element, ``x[b]`` read in whatever layout it has (a transposed view is not copied).
    ``x`` is cast to the weight's dtype first if it differs."""
    x = x.to(weight.dtype)
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2])
    for b in range(x.shape[0]):
        if bias is None:
            torch.mm(weight, x[b], out=out[b])
        else:
            torch.addmm(bias[:, None], weight, x[b], out=out[b])
    return out


def add_product(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``target += a @ b`` in place: one ``addmm_`` when the dtypes agree, else the product in ``a``'s
    dtype (bf16 under autocast) cast and added."""
    if a.dtype == target.dtype:
        target.addmm_(a, b.to(a.dtype))
    else:
        target.add_(a @ b.to(a.dtype))


def weight_grad(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """sum_b grad_rows[b] @ x_rows[b]^T: (B, M, L), (B, K, L) -> (M, K), the gradient of the weight of
    :func:`project_rows` (``x_rows`` cast to the gradient's dtype)."""
    x_rows = x_rows.to(grad_rows.dtype)
    total = grad_rows[0] @ x_rows[0].transpose(0, 1)
    for b in range(1, grad_rows.shape[0]):
        total.addmm_(grad_rows[b], x_rows[b].transpose(0, 1))
    return total


class RowsLinear(torch.autograd.Function):
    """``weight @ x[b] (+ bias)`` for every b with autograd: (M, K) on rows (B, K, L) -> (B, M, L),
    contiguous, by plain 2-D GEMMs both ways (:func:`project_rows`, :func:`weight_grad`). ``x`` may
    be channels-first or a transposed view of token-major (B, L, K) data; its gradient comes back in
    the same layout."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, weight, x, bias):
        ctx.save_for_backward(weight, x)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):  # the operands come in the GEMMs' dtype
            return project_rows(weight, x, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors  # once: checkpointing lets saved tensors be unpacked only once
        with torch.autocast("cpu", enabled=False):
            return RowsLinear._backward(ctx, weight, x, grad.to(weight.dtype))

    @staticmethod
    def _backward(ctx, weight, x, grad):
        if x.stride(-2) == 1:  # token-major data: its gradient token-major too
            grad_tokens = x.new_empty(x.shape[0], x.shape[2], x.shape[1])  # (B, L, K)
            for b in range(x.shape[0]):
                torch.mm(grad[b].t(), weight, out=grad_tokens[b])
            grad_x = grad_tokens.transpose(1, 2)
        else:
            grad_x = project_rows(weight.t(), grad)
        return weight_grad(grad, x), grad_x, grad.sum((0, 2)) if ctx.has_bias else None


def rows_linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x[b] (+ bias)`` on rows (B, K, L) -> (B, M, L): 2-D GEMMs (:class:`RowsLinear`, in
    bfloat16 under CPU autocast) where the fused CPU path runs, else ``F.linear`` on the tokens (a
    channels-first view back)."""
    dtype = fused_dtype(x)
    if dtype is not None:
        return RowsLinear.apply(*to_gemm(dtype, weight, x, bias))
    return F.linear(x.transpose(1, 2), weight, bias).transpose(1, 2)


def linear_channels_first(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` on token-major (B, L, C_in) ``x``, returned channels-first (B, C_out, L)."""
    return rows_linear(linear.weight, x.transpose(1, 2), linear.bias)


PER_DIRECTION = 7  # tensors per direction given to FusedMamba (see Mamba.direction_parameters)
GEMM_WEIGHTS = (2,)  # of those, the projection weights run in bf16 under autocast: x_proj only (dt_proj's
# K is dt_rank, 2-16: its GEMM is bound by writing delta, which the scan needs in float32 anyway)


class FusedMamba(torch.autograd.Function):
    """The whole Mamba layer on the CPU as one autograd Function (see the module docstring).

    Kept for the backward: the input, the sum of the directions' outputs (out_proj's input), and per
    direction the conv's input, its SiLU output u, x_proj's output and the scan's own saved state (z
    among its inputs); the conv output before SiLU is recomputed. The scan runs through :func:`medssm.ssm.selective_scan` on detached
    inputs with its own autograd graph, which the backward asks for the scan's gradients. Where saved
    tensors are intercepted (:func:`saved_tensors_intercepted`: checkpointing), the same tensors go
    through ``save_for_backward`` instead, the scan runs without a graph, and the backward rebuilds
    the scan's graph from its saved inputs (one more scan forward).

    Under CPU autocast to bfloat16 the input and the weights of in_proj, x_proj and out_proj come in
    bfloat16 (cast by autograd ops outside, which cast their gradients back): those GEMMs run in
    bfloat16 while dt_proj (K = dt_rank, bound by writing delta), the conv, the scan and the sums over
    directions stay in float32 (the conv's parameters, ``A_log``, ``D`` and dt_proj are never cast).
    """

    @staticmethod
    def run(layer, hidden: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        params = []
        for order in layer.orders:
            direction = list(layer.direction_parameters(order))
            for i in GEMM_WEIGHTS:
                direction[i] = to_gemm(dtype, direction[i])[0]
            params += direction
        spec = (layer.orders, shape, layer.dt_rank, layer.d_state)
        shared = to_gemm(dtype, hidden, layer.in_proj.weight, layer.in_proj.bias, layer.out_proj.weight,
                         layer.out_proj.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*shared, *params)):
            return FusedMamba.apply(spec, *shared, *params)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return _fused_forward(spec, *shared, params, keep=None)

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, spec, hidden, in_w, in_b, out_w, out_b, *params):
        ctx.spec = spec
        graph = not saved_tensors_intercepted()
        keep = []
        with torch.autocast("cpu", enabled=False):  # the dtypes are set: bf16 GEMM operands, float32 elsewhere
            out = _fused_forward(spec, hidden, in_w, in_b, out_w, out_b, params, keep=keep, graph=graph)
        if graph:
            ctx.keep = keep
            ctx.save_for_backward(hidden, in_w, out_w, *params)
        else:  # all through save_for_backward: y_sum, then (x_o, u, x_dbl, delta, z_o) per direction
            ctx.keep = None
            ctx.save_for_backward(hidden, in_w, out_w, *params, keep[0], *[t for kept in keep[1:] for t in kept])
        ctx.has_bias = (in_b is not None, out_b is not None)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast("cpu", enabled=False):
            grads = _fused_backward(ctx, grad_out)
        ctx.keep = None
        return (None, *grads)


def _scan(u, delta, B, C, z, A_log, D, dt_b) -> torch.Tensor:
    """One direction's gated scan (B, d_inner, L), in u's dtype."""
    return selective_scan(u, delta, -torch.exp(A_log.float()), B, C, D.float(), z=z, delta_bias=dt_b.float(),
                          delta_softplus=True)


def _scan_graph(inputs: tuple) -> tuple[torch.Tensor, tuple]:
    """The scan on detached copies of ``inputs`` that require grad: (output with its own graph, leaves)."""
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    with torch.enable_grad():
        return _scan(*leaves), leaves


def _fused_forward(spec, hidden, in_w, in_b, out_w, out_b, params, keep: list | None,
                   graph: bool = True) -> torch.Tensor:
    """The fused layer's forward; with ``keep`` (a list) it appends what the backward needs: y_sum,
    then per direction (x_o, u, x_dbl, scan output, scan leaves) with ``graph``, or (x_o, u, x_dbl,
    delta, z_o) without (the scan's graph is then rebuilt by the backward)."""
    orders, shape, rank, n_state = spec
    kernels = fused_kernels()
    d = in_w.shape[0] // 2
    xz = project_rows(in_w, hidden.transpose(1, 2), in_b)  # (B, 2 d_inner, L): x rows, then z rows
    x, z = xz[:, :d], xz[:, d:]
    y_sum = None
    kept = []
    for i, order in enumerate(orders):
        conv_w, conv_b, x_w, dt_w, dt_b, A_log, D = params[PER_DIRECTION * i: PER_DIRECTION * (i + 1)]
        x_o = to_order(x, shape, order).to(conv_w.dtype).contiguous()  # (B, d_inner, L) in the scan's order
        z_o = to_order(z, shape, order)
        u = kernels.conv_silu_forward(x_o, conv_w, conv_b)  # silu(causal conv), one pass
        x_dbl = project_rows(x_w, u)  # (B, rank + 2N, L): dt (low rank), B, C
        delta = project_rows(dt_w, x_dbl[:, :rank])  # (B, d_inner, L): dt_proj without its bias
        inputs = (u, delta, x_dbl[:, rank:rank + n_state], x_dbl[:, rank + n_state:], z_o, A_log, D, dt_b)
        if keep is not None and graph:  # the scan's own graph, on detached inputs: its backward gives their gradients
            y, leaves = _scan_graph(inputs)  # (B, d_inner, L), gated, in u's dtype
            kept.append((x_o, u, x_dbl, y, leaves))
            y = y.detach()
        else:
            with torch.no_grad():
                y = _scan(*inputs)
            if keep is not None:
                kept.append((x_o, u, x_dbl, delta, z_o))
        y = from_order(y, shape, order)
        y_sum = y if y_sum is None else y_sum.add_(y)  # the first y is the scan's output: its backward keeps no output
    out = project_rows(out_w, y_sum, out_b)  # (B, d_model, L)
    if keep is not None:
        keep += [y_sum, *kept]
    return out.transpose(1, 2)


def _fused_backward(ctx, grad_out: torch.Tensor) -> list:
    """Gradients of every input of :meth:`FusedMamba.forward` after ``spec``."""
    orders, shape, rank, n_state = ctx.spec
    hidden, in_w, out_w, *params = ctx.saved_tensors
    if ctx.keep is not None:
        y_sum, directions = ctx.keep[0], ctx.keep[1:]
    else:  # everything came through save_for_backward: rebuild each direction's scan graph
        count = PER_DIRECTION * len(orders)
        params, y_sum, rest = params[:count], params[count], params[count + 1:]
        directions = []
        for i in range(len(orders)):
            x_o, u, x_dbl, delta, z_o = rest[5 * i: 5 * (i + 1)]
            _, _, _, _, dt_b, A_log, D = params[PER_DIRECTION * i: PER_DIRECTION * (i + 1)]
            y, leaves = _scan_graph((u, delta, x_dbl[:, rank:rank + n_state], x_dbl[:, rank + n_state:], z_o,
                                     A_log, D, dt_b))
            directions.append((x_o, u, x_dbl, y, leaves))
    d = in_w.shape[0] // 2
    grad_rows = grad_out.transpose(1, 2).to(out_w.dtype)  # (B, d_model, L)
    dy = project_rows(out_w.t(), grad_rows)  # (B, d_inner, L)
    grad_out_w = weight_grad(grad_rows, y_sum)
    grad_out_b = grad_rows.sum((0, 2)) if ctx.has_bias[1] else None
    dx = dz = None
    direction_grads = []
    for i, (order, kept) in enumerate(zip(orders, directions)):
        conv_w, conv_b, x_w, dt_w, dt_b, A_log, D = params[PER_DIRECTION * i: PER_DIRECTION * (i + 1)]
        x_o, u, x_dbl, scan_out, leaves = kept
        du, d_delta, dB, dC, dz_o, dA_log, dD, d_dt_b = torch.autograd.grad(
            scan_out, leaves, to_order(dy, shape, order).to(scan_out.dtype).contiguous())
        grad_dt_w = weight_grad(d_delta, x_dbl[:, :rank])
        d_low = project_rows(dt_w.t(), d_delta)  # (B, rank, L): delta = dt_w @ x_dbl[:rank]
        x_rows = (slice(None, rank), slice(rank, rank + n_state), slice(rank + n_state, None))
        for b in range(du.shape[0]):  # x_dbl = x_w @ u, in its three row blocks (no (B, rank + 2N, L) gradient)
            for rows, grad in zip(x_rows, (d_low, dB, dC)):
                add_product(du[b], x_w[rows].t(), grad[b])
        grad_x_w = torch.cat([weight_grad(grad, u).to(x_w.dtype) for grad in (d_low, dB, dC)])
        dx_o, grad_conv_w, grad_conv_b = fused_kernels().conv_silu_backward(x_o, conv_w, conv_b, du)
        dx_o, dz_o = from_order(dx_o, shape, order), from_order(dz_o, shape, order)
        dx = dx_o if dx is None else dx.add_(dx_o)
        dz = dz_o if dz is None else dz.add_(dz_o)
        direction_grads += [grad_conv_w, grad_conv_b, grad_x_w, grad_dt_w, d_dt_b, dA_log, dD]
    # in_proj: x = in_w[:d] @ h^T, z = in_w[d:] @ h^T
    dx, dz = dx.to(in_w.dtype), dz.to(in_w.dtype)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)  # (B, L, d_model)
    for b in range(hidden.shape[0]):
        torch.mm(dx[b].t(), in_w[:d], out=grad_hidden[b])
        grad_hidden[b].addmm_(dz[b].t(), in_w[d:])
    h_rows = hidden.transpose(1, 2)
    grad_in_w = torch.cat((weight_grad(dx, h_rows), weight_grad(dz, h_rows)))
    grad_in_b = torch.cat((dx.sum((0, 2)), dz.sum((0, 2)))) if ctx.has_bias[0] else None
    return [grad_hidden, grad_in_w, grad_in_b, grad_out_w, grad_out_b, *direction_grads]
