"""The Mamba-1 layer (``mamba_ssm.Mamba``), with optional extra scan directions.

Parameter names and initialisation follow the authors' code, so their checkpoints load:
``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``. Each extra direction gets its own
``conv1d, x_proj, dt_proj, A_log, D`` with the authors' suffix (``_b`` for the reversed scan, ``_s``
for SegMamba's inter-slice scan: ``conv1d_b``, ``A_b_log``, ``D_s`` ...) and shares ``in_proj`` and
``out_proj``; the gated outputs of all directions are summed before ``out_proj``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .orders import from_order, to_order
from .scan import is_exporting, selective_scan

# The authors' parameter suffix for each token order (SegMamba / Vim naming).
ORDER_SUFFIX = {"raster": "", "reversed": "_b", "slice": "_s"}


def init_dt_bias(d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt bias: softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], clamped >= dt_floor."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def init_A_log(d_inner: int, d_state: int) -> torch.Tensor:
    """log(1..d_state) for every channel (S4D-real), shape (d_inner, d_state)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


def _linear_cf(x: torch.Tensor, linear: nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    """Output channels ``rows`` of ``linear`` applied to channels-first (B, C_in, L) ``x``:
    (B, C_out, L), contiguous. ``bmm`` rather than ``matmul``, which would fold the batch into
    rows and copy both ``x`` and the result to transpose them."""
    weight = linear.weight[rows].expand(x.shape[0], -1, -1)
    if linear.bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(linear.bias[rows, None], weight, x)


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


class Mamba(nn.Module):
    """Mamba-1 layer on ``(B, L, d_model)`` tokens.

    Args:
        d_model: token width.
        d_state: SSM state size N.
        d_conv: width of the causal depthwise convolution.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
        orders: token orders scanned (see :mod:`medssm.ssm.orders`), each with its own scan
            parameters; ``("raster",)`` is plain Mamba, ``("raster", "reversed", "slice")`` is
            SegMamba's tri-orientated layer. Orders other than raster/reversed need ``spatial_shape``
            in ``forward``.
        scan_backend: see :func:`medssm.ssm.selective_scan`.
        out_norm: a LayerNorm (``out_norm``) on each direction's scan output before the SiLU(z) gate,
            as the VSS module is drawn in the LightM-UNet paper; off in the released models.

    Example:
        >>> layer = Mamba(d_model=64, orders=("raster", "reversed", "slice"))
        >>> y = layer(torch.randn(2, 8 * 8 * 8, 64), spatial_shape=(8, 8, 8))  # (2, 512, 64)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", orders: Sequence[str] = ("raster",),
                 scan_backend: str = "auto", bias: bool = False, conv_bias: bool = True, out_norm: bool = False):
        super().__init__()
        unknown = [o for o in orders if o not in ORDER_SUFFIX]
        if unknown or len(set(orders)) != len(orders) or not orders:
            raise ValueError(f"orders must be distinct names from {tuple(ORDER_SUFFIX)}, got {tuple(orders)}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = tuple(orders)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for order in self.orders:
            s = ORDER_SUFFIX[order]
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                             padding=d_conv - 1, bias=conv_bias)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            with torch.no_grad():
                dt_proj.bias.copy_(init_dt_bias(self.d_inner))
            A_log = nn.Parameter(init_A_log(self.d_inner, d_state))
            D = nn.Parameter(torch.ones(self.d_inner))
            A_log._no_weight_decay = D._no_weight_decay = True
            setattr(self, f"conv1d{s}", conv)
            setattr(self, f"x_proj{s}", x_proj)
            setattr(self, f"dt_proj{s}", dt_proj)
            setattr(self, f"A{s}_log", A_log)
            setattr(self, f"D{s}", D)
        self.out_norm = nn.LayerNorm(self.d_inner) if out_norm else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model). ``spatial_shape`` (whose product is L) places the
        tokens, given in raster order, on the grid the ``"slice"`` order needs."""
        length = hidden.shape[1]
        shape = tuple(spatial_shape) if spatial_shape is not None else (length,)
        if math.prod(shape) != length:
            raise ValueError(f"spatial_shape {shape} does not hold L={length} tokens")
        # Channels-first (B, C, L) throughout, straight out of the matmuls: the conv, the projections
        # and the scan then read contiguous rows and their gradients come back contiguous, with no
        # transposing copies (the weights are used as the Linear modules store them).
        hidden = hidden.transpose(1, 2)  # (B, d_model, L)
        # x and z from separate halves of in_proj: their gradients then need no concatenation
        x = _linear_cf(hidden, self.in_proj, slice(None, self.d_inner))  # (B, d_inner, L)
        z = _linear_cf(hidden, self.in_proj, slice(self.d_inner, None))
        y = sum(from_order(self._scan_direction(to_order(x, shape, order), to_order(z, shape, order), order),
                           shape, order)
                for order in self.orders)  # (B, d_inner, L), raster order
        return _linear_cf(y, self.out_proj).transpose(1, 2)  # (B, L, d_model), a channels-first view

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, order: str) -> torch.Tensor:
        """One direction on x, z (B, d_inner, L) already in ``order``: gated scan output (B, d_inner, L)."""
        s = ORDER_SUFFIX[order]
        conv, x_proj, dt_proj = getattr(self, f"conv1d{s}"), getattr(self, f"x_proj{s}"), getattr(self, f"dt_proj{s}")
        A = -torch.exp(getattr(self, f"A{s}_log").float())  # (d_inner, N)
        x = F.silu(causal_conv1d(x, conv))
        x_dbl = _linear_cf(x, x_proj)  # (B, dt_rank + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = torch.bmm(dt_proj.weight.expand(dt.shape[0], -1, -1), dt)  # (B, d_inner, L); bias added in the scan
        gate_in_scan = self.out_norm is None
        y = selective_scan(x, dt, A, B, C, getattr(self, f"D{s}").float(),
                           z=z if gate_in_scan else None, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                           backend=self.scan_backend)
        if gate_in_scan:
            return y
        return self.out_norm(y.transpose(1, 2)).transpose(1, 2) * F.silu(z)  # normalised per token, then gated
