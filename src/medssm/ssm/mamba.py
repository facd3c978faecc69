"""The Mamba-1 layer (``mamba_ssm.Mamba``), with optional extra scan directions.

Parameter names and initialisation follow the authors' code, so their checkpoints load:
``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``. Each extra direction gets its own
``conv1d, x_proj, dt_proj, A_log, D`` with the authors' suffix (``_b`` for the reversed scan, ``_s``
for SegMamba's inter-slice scan: ``conv1d_b``, ``A_b_log``, ``D_s`` ...) and shares ``in_proj`` and
``out_proj``; the gated outputs of all directions are summed before ``out_proj``.

:meth:`Mamba.forward_reference` is the layer as the paper writes it, one step a line, in plain
PyTorch: it runs on GPUs, while exporting or counting FLOPs, with ``out_norm``, and it is what the
tests hold the fast path to. On the CPU the same computation runs as one autograd Function
(:mod:`medssm.ssm.fused_mamba`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_mamba import FusedMamba, fused_dtype
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

    def direction_parameters(self, order: str) -> tuple:
        """(conv weight, conv bias, x_proj weight, dt_proj weight, dt_proj bias, A_log, D) of ``order``."""
        s = ORDER_SUFFIX[order]
        conv, dt_proj = getattr(self, f"conv1d{s}"), getattr(self, f"dt_proj{s}")
        return (conv.weight, conv.bias, getattr(self, f"x_proj{s}").weight, dt_proj.weight, dt_proj.bias,
                getattr(self, f"A{s}_log"), getattr(self, f"D{s}"))

    def forward(self, hidden: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model), a view of a channels-first (B, d_model, L) tensor.
        ``spatial_shape`` (whose product is L) places the tokens, given in raster order, on the grid
        the ``"slice"`` order needs."""
        length = hidden.shape[1]
        shape = tuple(spatial_shape) if spatial_shape is not None else (length,)
        if math.prod(shape) != length:
            raise ValueError(f"spatial_shape {shape} does not hold L={length} tokens")
        dtype = fused_dtype(hidden)
        if self.out_norm is None and dtype is not None:
            return FusedMamba.run(self, hidden, shape, dtype)
        return self.forward_reference(hidden, shape)

    def forward_reference(self, hidden: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The layer in plain PyTorch, step by step (Gu & Dao 2023, Algorithm 2, and Fig. 3)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, L, d_inner) each
        x, z = x.transpose(1, 2), z.transpose(1, 2)  # (B, d_inner, L)
        y = sum(from_order(self._direction_reference(to_order(x, shape, o), to_order(z, shape, o), o), shape, o)
                for o in self.orders)  # (B, d_inner, L), raster order
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)

    def _direction_reference(self, x: torch.Tensor, z: torch.Tensor, order: str) -> torch.Tensor:
        """One direction on x, z (B, d_inner, L) already in ``order``: gated scan output (B, d_inner, L)."""
        s = ORDER_SUFFIX[order]
        conv, x_proj, dt_proj = getattr(self, f"conv1d{s}"), getattr(self, f"x_proj{s}"), getattr(self, f"dt_proj{s}")
        A = -torch.exp(getattr(self, f"A{s}_log").float())  # (d_inner, N)
        x = F.silu(conv(x)[..., :x.shape[-1]])  # causal depthwise conv: the first L outputs
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt_proj.weight @ dt.transpose(1, 2)  # (B, d_inner, L); its bias is added in the scan
        gate_in_scan = self.out_norm is None
        y = selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), getattr(self, f"D{s}").float(),
                           z=z if gate_in_scan else None, delta_bias=dt_proj.bias.float(), delta_softplus=True)
        if gate_in_scan:
            return y
        return self.out_norm(y.transpose(1, 2)).transpose(1, 2) * F.silu(z)  # normalised per token, then gated
