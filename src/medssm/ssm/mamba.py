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

from .causal_conv import causal_conv1d
from .orders import from_order, to_order
from .scan import selective_scan

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


def linear_channels_first(x: torch.Tensor, linear: nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    """Output channels ``rows`` of ``linear`` applied to channels-first (B, C_in, L) ``x``:
    (B, C_out, L), contiguous. ``bmm`` rather than ``matmul``, which would fold the batch into
    rows and copy both ``x`` and the result to transpose them."""
    weight = linear.weight[rows].expand(x.shape[0], -1, -1)
    if linear.bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(linear.bias[rows, None], weight, x)


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
        out_norm: a LayerNorm (``out_norm``) on each direction's scan output before the SiLU(z) gate,
            as the VSS module is drawn in the LightM-UNet paper; off in the released models.

    Example:
        >>> layer = Mamba(d_model=64, orders=("raster", "reversed", "slice"))
        >>> y = layer(torch.randn(2, 8 * 8 * 8, 64), spatial_shape=(8, 8, 8))  # (2, 512, 64)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", orders: Sequence[str] = ("raster",),
                 bias: bool = False, conv_bias: bool = True, out_norm: bool = False):
        super().__init__()
        unknown = [o for o in orders if o not in ORDER_SUFFIX]
        if unknown or len(set(orders)) != len(orders) or not orders:
            raise ValueError(f"orders must be distinct names from {tuple(ORDER_SUFFIX)}, got {tuple(orders)}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = tuple(orders)

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
        x = linear_channels_first(hidden, self.in_proj, slice(None, self.d_inner))  # (B, d_inner, L)
        z = linear_channels_first(hidden, self.in_proj, slice(self.d_inner, None))
        y = sum(from_order(self._scan_direction(to_order(x, shape, order), to_order(z, shape, order), order),
                           shape, order)
                for order in self.orders)  # (B, d_inner, L), raster order
        return linear_channels_first(y, self.out_proj).transpose(1, 2)  # (B, L, d_model), a channels-first view

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, order: str) -> torch.Tensor:
        """One direction on x, z (B, d_inner, L) already in ``order``: gated scan output (B, d_inner, L)."""
        s = ORDER_SUFFIX[order]
        conv, x_proj, dt_proj = getattr(self, f"conv1d{s}"), getattr(self, f"x_proj{s}"), getattr(self, f"dt_proj{s}")
        A = -torch.exp(getattr(self, f"A{s}_log").float())  # (d_inner, N)
        x = F.silu(causal_conv1d(x, conv))
        x_dbl = linear_channels_first(x, x_proj)  # (B, dt_rank + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = torch.bmm(dt_proj.weight.expand(dt.shape[0], -1, -1), dt)  # (B, d_inner, L); bias added in the scan
        gate_in_scan = self.out_norm is None
        y = selective_scan(x, dt, A, B, C, getattr(self, f"D{s}").float(),
                           z=z if gate_in_scan else None, delta_bias=dt_proj.bias.float(), delta_softplus=True)
        if gate_in_scan:
            return y
        return self.out_norm(y.transpose(1, 2)).transpose(1, 2) * F.silu(z)  # normalised per token, then gated
