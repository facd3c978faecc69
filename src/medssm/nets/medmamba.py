"""MedMamba (Yue & Li, arXiv 2403.03849): a VMamba-style classifier of SS-Conv-SSM blocks, in 2D and 3D.

Module and parameter names follow the authors' ``MedMamba.py`` (``patch_embed``, ``layers.i.blocks.j``
with ``ln_1``, ``self_attention`` and ``conv33conv33conv11``, ``layers.i.downsample``, ``head``), so
their state dicts load with ``strict=True``. Feature maps are channels-last inside the stages:
``(B, H, W, C)`` in 2D, ``(B, D, H, W, C)`` in 3D. Sizes that do not divide by the downsampling are
padded with zeros at the end of each spatial axis (the patch embedding pads to a multiple of the
patch size, each merging pads odd sizes by one).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.fused_mamba import fused_dtype, rows_linear
from ..ssm.mamba import init_A_log, init_dt_bias
from ..ssm.orders import CROSS_SCAN_2D, CROSS_SCAN_3D, cross_merge, cross_scan, from_order, to_order
from ..ssm import selective_scan
from .blocks import NoMixer
from .cards import CLASSIFIER_DEFAULT
from .checkpointing import checkpointed
from .registry import register_model

__all__ = ["MedMamba", "SS2D", "SSConvSSM", "PatchEmbed", "PatchMerging", "DropPath"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class DropPath(nn.Module):
    """Stochastic depth: zero the whole input of a random subset of samples, rescale the rest."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Conv(k=s=patch_size) then LayerNorm; (B, C_in, *S) -> (B, *S/patch, C), input padded to fit."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4, spatial_dims: int = 2):
        super().__init__()
        self.patch_size = patch_size
        self.proj = _CONV[spatial_dims](in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = []
        for size in reversed(x.shape[2:]):
            pad += [0, -size % self.patch_size]
        if any(pad):
            x = F.pad(x, pad)
        return self.norm(self.proj(x).movedim(1, -1))  # (B, *S', C)


def gather_cells(x: torch.Tensor) -> torch.Tensor:
    """(B, *S, C) with even S -> (B, *S/2, 2^n C): each 2x..x2 cell's tokens concatenated, the first
    spatial axis's offset varying fastest (the authors' 2D order x[0::2,0::2], x[1::2,0::2],
    x[0::2,1::2], x[1::2,1::2])."""
    n = x.dim() - 2
    parts = [x[(slice(None), *(slice(o, None, 2) for o in offsets[::-1]))]
             for offsets in itertools.product((0, 1), repeat=n)]  # offsets[::-1]: first axis fastest
    return torch.cat(parts, dim=-1)  # (B, *S/2, 2^n C)


class PatchMerging(nn.Module):
    """Halve every spatial size and double the channels: concat each 2x2 (2x2x2) cell, LayerNorm,
    Linear(2^n C -> 2C, no bias). Odd sizes are padded with zeros by one."""

    def __init__(self, dim: int, spatial_dims: int = 2):
        super().__init__()
        cells = 2 ** spatial_dims
        self.reduction = nn.Linear(cells * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(cells * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = [0, 0]  # channel axis
        for size in reversed(x.shape[1:-1]):
            pad += [0, size % 2]
        if any(pad):
            x = F.pad(x, pad)
        return self.reduction(self.norm(gather_cells(x)))  # (B, *S/2, 2C)


class SS2D(nn.Module):
    """Selective scan over a feature map in every cross-scan direction (4 in 2D, 6 in 3D).

    in_proj -> (x, z); x -> depthwise conv (k=3) -> SiLU -> one scan per direction, each with its own
    ``x_proj``/``dt_proj``/``A``/``D`` (stacked on a leading axis of K, the authors' names) -> outputs
    restored to raster order and summed -> LayerNorm -> * SiLU(z) -> out_proj. Works on
    channels-last maps (B, *S, d_model).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_rank: int | str = "auto", spatial_dims: int = 2):
        super().__init__()
        _check_spatial_dims(spatial_dims)
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = CROSS_SCAN_2D if spatial_dims == 2 else CROSS_SCAN_3D
        k, d, r = len(self.orders), self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        # The authors' name; a Conv3d when spatial_dims=3.
        self.conv2d = _CONV[spatial_dims](d, d, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d, bias=True)
        self.act = nn.SiLU()
        bound = d ** -0.5  # nn.Linear's default init for each direction's x_proj
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, d).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-r ** -0.5, r ** -0.5))
        self.dt_projs_bias = nn.Parameter(torch.stack([init_dt_bias(d) for _ in range(k)]))  # (K, d_inner)
        self.A_logs = nn.Parameter(init_A_log(d, d_state).repeat(k, 1))  # (K*d_inner, N), k-major
        self.Ds = nn.Parameter(torch.ones(k * d))
        self.A_logs._no_weight_decay = self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)

    @checkpointed("mamba")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, *S, d_inner) each
        x = self.act(self.conv2d(x.movedim(-1, 1)))  # (B, d_inner, *S)
        y = self._scan_all(x)  # (B, d_inner, L), raster order
        y = y.transpose(1, 2).reshape(z.shape)  # (B, *S, d_inner)
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def _scan_all(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_inner, *S) -> (B, d_inner, L): every direction scanned, restored to raster order, summed."""
        if fused_dtype(x) in (torch.float32, torch.float64):  # under bf16 autocast the grouped form is faster
            return self._scan_each(x)
        return self._scan_grouped(x)

    def _scan_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' form: all directions stacked (cross-scan), projected by einsum, one grouped scan."""
        b, spatial = x.shape[0], x.shape[2:]
        k, length = len(self.orders), math.prod(spatial)
        xs = cross_scan(x, self.orders)  # (B, K, d_inner, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, r + 2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, d_inner, L)
        ys = selective_scan(
            xs.reshape(b, k * self.d_inner, length), dts.reshape(b, k * self.d_inner, length),
            -torch.exp(self.A_logs), Bs, Cs, self.Ds, delta_bias=self.dt_projs_bias.reshape(-1),
            delta_softplus=True,
        )  # (B, K*d_inner, L), computed in float32 or float64; group k of B/C serves direction k
        return cross_merge(ys.view(b, k, self.d_inner, length), spatial, self.orders)

    def _scan_each(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU form of :meth:`_scan_grouped`: one direction at a time, each projection a plain 2-D
        GEMM per batch element on its own weight (no stacked copy of the map, no einsum permutes)."""
        spatial, d, r, n = x.shape[2:], self.d_inner, self.dt_rank, self.d_state
        seq = x.flatten(2)  # (B, d_inner, L), raster order
        A = -torch.exp(self.A_logs)
        merged = None
        for k, order in enumerate(self.orders):
            u = to_order(seq, spatial, order).contiguous()  # (B, d_inner, L) in this direction
            x_dbl = rows_linear(self.x_proj_weight[k], u)  # (B, r + 2N, L)
            delta = rows_linear(self.dt_projs_weight[k], x_dbl[:, :r])  # (B, d_inner, L)
            y = selective_scan(u, delta, A[k * d:(k + 1) * d], x_dbl[:, r:r + n], x_dbl[:, r + n:],
                               self.Ds[k * d:(k + 1) * d], delta_bias=self.dt_projs_bias[k], delta_softplus=True)
            y = from_order(y, spatial, order)
            merged = y if merged is None else merged.add_(y)
        return merged


class SSConvSSM(nn.Module):
    """SS-Conv-SSM block on (B, *S, C): the first half of the channels through three convolutions,
    the second half through DropPath(SS2D(LayerNorm)), interleaved (output channel 2i is conv
    channel i, 2i+1 is SSM channel i), plus the input. ``no_mamba`` makes SS2D the identity."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, spatial_dims: int = 2,
                 no_mamba: bool = False):
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"SS-Conv-SSM splits channels in half; hidden_dim must be even, got {hidden_dim}")
        half, conv, bn = hidden_dim // 2, _CONV[spatial_dims], _BATCHNORM[spatial_dims]
        self.ln_1 = nn.LayerNorm(half)
        self.self_attention = NoMixer() if no_mamba else SS2D(half, d_state=d_state, spatial_dims=spatial_dims)
        self.drop_path = DropPath(drop_path)
        self.conv33conv33conv11 = nn.Sequential(
            bn(half), conv(half, half, 3, padding=1), bn(half), nn.ReLU(),
            conv(half, half, 3, padding=1), bn(half), nn.ReLU(),
            conv(half, half, 1), nn.ReLU(),
        )

    @checkpointed("encoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=-1)  # (B, *S, C/2) each
        right = self.drop_path(self.self_attention(self.ln_1(right)))
        left = self.conv33conv33conv11(left.movedim(-1, 1)).movedim(1, -1)  # (B, *S, C/2)
        shuffled = torch.stack((left, right), dim=-1).flatten(-2)  # (B, *S, C): conv, ssm, conv, ssm ...
        return shuffled + x


class MedMambaStage(nn.Module):
    """``depth`` SS-Conv-SSM blocks, then an optional patch merging (the authors' ``VSSLayer``)."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], downsample: bool, d_state: int = 16,
                 spatial_dims: int = 2, no_mamba: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            SSConvSSM(dim, drop_path[i], d_state, spatial_dims, no_mamba) for i in range(depth))
        self.downsample = PatchMerging(dim, spatial_dims) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class MedMamba(nn.Module):
    """MedMamba classifier for images (``spatial_dims=2``) or volumes (``spatial_dims=3``).

    Patch embedding (4x4 or 4x4x4) -> stages of SS-Conv-SSM blocks with patch merging between
    them -> global average pool -> Linear head (logits; no norm before the head, as released).
    In 3D the merging concatenates the 8 tokens of each 2x2x2 cell and SS2D scans six directions
    (each spatial axis fastest, forward and reversed).

    Args:
        in_chans: input channels.
        num_classes: classes; 0 leaves the head out (``forward`` returns pooled features).
        depths: blocks per stage.
        dims: channels per stage (each even; ``dims[i+1]`` must be ``2*dims[i]``).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        drop_rate: dropout after the patch embedding (the authors' ``pos_drop``).
        d_state: SSM state size.
        patch_size: patch embedding kernel and stride.
        spatial_dims: 2 or 3.
        no_mamba: replace every SS2D mixer by the identity, all else unchanged (the No-Mamba ablation).

    Examples:
        >>> model = MedMamba(in_chans=1, num_classes=2, depths=(2, 2, 4, 2), dims=(96, 192, 384, 768))
        >>> model(torch.randn(4, 1, 28, 28)).shape  # 28x28 MedMNIST works: padded, not rejected
        torch.Size([4, 2])
        >>> volume_model = MedMamba(in_chans=1, num_classes=3, dims=(16, 32, 64, 128), spatial_dims=3).eval()
        >>> volume_model(torch.randn(1, 1, 40, 32, 24)).shape  # one volume: eval mode (BatchNorm at 1x1x1)
        torch.Size([1, 3])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 4, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 d_state: int = 16, patch_size: int = 4, spatial_dims: int = 2, no_mamba: bool = False):
        super().__init__()
        _check_spatial_dims(spatial_dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths and dims need one entry per stage, got {len(depths)} and {len(dims)}")
        if any(b != 2 * a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"patch merging doubles the channels: dims[i+1] must be 2*dims[i], got {tuple(dims)}")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.num_features = dims[-1]

        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size, spatial_dims)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            MedMambaStage(dims[i], depths[i], dpr[starts[i]: starts[i] + depths[i]], i < len(depths) - 1,
                          d_state, spatial_dims, no_mamba)
            for i in range(len(depths)))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, *S) -> channels-last features of the last stage (B, *S/2^(stages+1), C)."""
        if x.dim() != self.spatial_dims + 2:
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(f"MedMamba(spatial_dims={self.spatial_dims}) takes (B, C, {axes}) inputs, "
                             f"got shape {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of channels-last features, then the head (unless ``pre_logits``)."""
        x = x.flatten(1, -2).mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (timm's API)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    """The authors' initialisation: truncated-normal Linear weights (std 0.02, zero bias), unit
    LayerNorms, Kaiming-normal (fan-out) convolution weights; SSM parameters keep their own init."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# Any size works: the patch embedding pads to a multiple of 4 and each merging pads odd sizes. At
# side 35 every one of them pads (9, 5, 3 tokens after the embedding and the three mergings).
CARD = dict(task="classification", spatial_dims=(2, 3), size_divisor=1, input_size=(224, 224), in_channels=3,
            trace_size=35, recipe=CLASSIFIER_DEFAULT,
            reference="Yue & Li 2024, MedMamba, arXiv 2403.03849; code: github.com/YubiaoYue/MedMamba")


@register_model(**CARD)
def medmamba_tiny(**kwargs) -> MedMamba:
    """A small MedMamba for tests and quick experiments (depths 1,1,1,1, dims 16..128)."""
    return MedMamba(**{"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), **kwargs})


@register_model(**CARD)
def medmamba_t(**kwargs) -> MedMamba:
    """MedMamba-T: depths 2,2,4,2, dims 96..768 (14,457,222 parameters with 6 classes)."""
    return MedMamba(**{"depths": (2, 2, 4, 2), "dims": (96, 192, 384, 768), **kwargs})


@register_model(**CARD, ablation_of="medmamba_t")
def medmamba_t_nomamba(**kwargs) -> MedMamba:
    """MedMamba-T with every SS2D mixer replaced by the identity (No-Mamba ablation)."""
    return MedMamba(**{"depths": (2, 2, 4, 2), "dims": (96, 192, 384, 768), **kwargs, "no_mamba": True})


@register_model(**CARD)
def medmamba_s(**kwargs) -> MedMamba:
    """MedMamba-S: depths 2,2,8,2, dims 96..768 (18,625,158 parameters with 6 classes)."""
    return MedMamba(**{"depths": (2, 2, 8, 2), "dims": (96, 192, 384, 768), **kwargs})


@register_model(**CARD)
def medmamba_b(**kwargs) -> MedMamba:
    """MedMamba-B: depths 2,2,12,2, dims 128..1024 (39,864,838 parameters with 6 classes)."""
    return MedMamba(**{"depths": (2, 2, 12, 2), "dims": (128, 256, 512, 1024), **kwargs})
