"""LightM-UNet (Liao et al., arXiv 2403.05246): a UNet of Residual Vision Mamba layers, 2D and 3D.

Module and parameter names follow the authors' ``LightMUNet`` (their ``nnunetv2/nets/LightMUNet.py``,
itself derived from MONAI's SegResNet): ``convInit``, ``down_layers``, ``up_layers``, ``up_samples``,
``conv_final``; in every Mamba layer ``norm``, ``mamba``, ``proj``, ``skip_scale``; convolutions sit
at ``.conv`` as in MONAI's ``Convolution``. Their checkpoints therefore load with ``strict=True``
and no renaming. Only torch is needed (no MONAI, no CUDA extension).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from medssm.ssm import Mamba, image_to_tokens
from medssm.ssm.fused_mamba import linear_channels_first

from .blocks import NoMixer
from .cards import Recipe
from .checkpointing import checkpointed, runs_last
from .depthwise import depthwise_conv
from .registry import register_model

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
UPSAMPLE_MODE = {2: "bilinear", 3: "trilinear"}


class Conv(nn.Sequential):
    """One convolution stored at ``.conv`` ("same" padding), the key layout of MONAI's
    ``Convolution(conv_only=True)`` that the authors' checkpoints use. A depthwise one runs through
    :func:`~medssm.nets.depthwise.depthwise_conv` (numba kernels on the CPU)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__()
        self.conv = CONV[spatial_dims](in_channels, out_channels, kernel_size, stride=stride,
                                       padding=(kernel_size - 1) // 2, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(self.conv, x)  # the conv itself unless depthwise (groups = channels)


def dw_conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
            bias: bool = False) -> nn.Sequential:
    """Depthwise ``kernel_size`` conv (groups = in_channels) then pointwise 1x1 conv to ``out_channels``."""
    return nn.Sequential(
        Conv(spatial_dims, in_channels, in_channels, kernel_size, groups=in_channels, bias=bias),
        Conv(spatial_dims, in_channels, out_channels, 1, bias=bias),
    )


class RVMLayer(nn.Module):
    """Residual Vision Mamba layer (the authors' ``MambaLayer``) on a (B, C_in, *S) feature map.

    Tokens ``t`` in C order; ``y = proj(norm(mamba(norm(t)) + skip_scale * t))``: one LayerNorm module
    applied twice, a scalar skip scale, a Linear to ``out_channels``. fp16 input is computed in fp32.
    ``orders`` are the token orders the Mamba scans (``("raster",)``: the released single causal scan;
    ``("raster", "reversed")``: both ways, summed, see :class:`~medssm.ssm.Mamba`).
    ``no_mamba`` makes ``mamba`` the identity (the No-Mamba ablation).
    """

    def __init__(self, in_channels: int, out_channels: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, ssm_norm: bool = False, no_mamba: bool = False,
                 orders: Sequence[str] = ("raster",)):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.mamba = NoMixer() if no_mamba else Mamba(in_channels, d_state=d_state, d_conv=d_conv, expand=expand,
                                                      orders=tuple(orders), out_norm=ssm_norm)
        self.proj = nn.Linear(in_channels, out_channels)
        self.skip_scale = nn.Parameter(torch.ones(1))

    @checkpointed("mamba")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            x = x.float()
        tokens = image_to_tokens(x)  # (B, L, C_in), a view of the channels-first map
        y = self.mamba(self.norm(tokens), x.shape[2:]) + self.skip_scale * tokens  # Mamba returns a channels-first view too
        y = linear_channels_first(self.norm(y), self.proj)  # (B, C_out, L), contiguous: no copy back
        return y.reshape(*y.shape[:2], *x.shape[2:])  # (B, C_out, *S)


class ResMambaBlock(nn.Module):
    """Encoder block: ``x + RVM2(ReLU(GN2(RVM1(ReLU(GN1(x))))))``."""

    def __init__(self, spatial_dims: int, channels: int, norm_groups: int = 8, **mamba_kwargs):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, channels)
        self.norm2 = nn.GroupNorm(norm_groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv1 = RVMLayer(channels, channels, **mamba_kwargs)
        self.conv2 = RVMLayer(channels, channels, **mamba_kwargs)

    @checkpointed("encoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class ResUpBlock(nn.Module):
    """Decoder block: ``h = DWConv3(ReLU(GN1(x))) + skip_scale * x; ReLU(GN2(h))``."""

    def __init__(self, spatial_dims: int, channels: int, norm_groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, channels)
        self.norm2 = nn.GroupNorm(norm_groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv = dw_conv(spatial_dims, channels, channels, kernel_size=3)
        self.skip_scale = nn.Parameter(torch.ones(1))

    @checkpointed("decoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.act(self.norm1(x))) + self.skip_scale * x
        return self.act(self.norm2(h))


class LightMUNet(nn.Module):
    """LightM-UNet, as released by its authors, for 2D or 3D images.

    Encoder of Residual Vision Mamba blocks (one Mamba scan over all tokens of a level, raster
    order), max-pool down-sampling after a channel-doubling Mamba layer, a light decoder of 1x1 convs,
    bi/trilinear up-sampling, additive skips and depthwise-separable residual blocks. Returns logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        init_filters: channels of the first level; level i has ``init_filters * 2**i``.
        blocks_down: ResMambaBlocks per encoder level; spatial sizes must be divisible by
            ``2 ** (len(blocks_down) - 1)`` (8 by default).
        blocks_up: ResUpBlocks per decoder level; ``len(blocks_down) - 1`` entries.
        norm_groups: groups of every GroupNorm.
        d_state, d_conv, expand: Mamba layer sizes.
        ssm_norm: the paper's variant: LayerNorm on the SSM output before the gate (adds parameters
            ``mamba.out_norm.*``; not in the released code or its checkpoints).
        orders: the token orders every Mamba layer scans (:mod:`medssm.ssm.orders`), each with its own
            scan parameters, their outputs summed. ``("raster",)``, the default, is the released model:
            one causal scan, so a token sees only the tokens before it in C order.
            ``("raster", "reversed")`` scans both ways (as Vim and SegMamba do), so every token sees
            the whole level; it adds ``conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b`` to each layer
            (not in the authors' checkpoints, which load into the default).
        no_mamba: replace every Mamba mixer by the identity, all else unchanged (the No-Mamba ablation).

    Examples:
        >>> net = LightMUNet(spatial_dims=2, in_channels=3, out_channels=2)  # 5,011,765 parameters
        >>> net(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
        >>> net3d = LightMUNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8)
        >>> net3d(torch.randn(1, 1, 16, 16, 16)).shape
        torch.Size([1, 3, 16, 16, 16])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_filters: int = 32,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
                 norm_groups: int = 8, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 ssm_norm: bool = False, no_mamba: bool = False, orders: Sequence[str] = ("raster",)):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"blocks_up needs len(blocks_down) - 1 = {len(blocks_down) - 1} entries, got {tuple(blocks_up)}")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** (len(blocks_down) - 1)
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, ssm_norm=ssm_norm, no_mamba=no_mamba,
                            orders=tuple(orders))

        self.convInit = dw_conv(spatial_dims, in_channels, init_filters, kernel_size=3)
        self.down_layers = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_down):
            c = init_filters * 2**i
            down = (nn.Sequential(RVMLayer(c // 2, c, **mamba_kwargs), MAXPOOL[spatial_dims](2))
                    if i > 0 else nn.Identity())
            self.down_layers.append(nn.Sequential(
                down, *[ResMambaBlock(spatial_dims, c, norm_groups, **mamba_kwargs) for _ in range(n_blocks)]))
        self.up_layers, self.up_samples = nn.ModuleList(), nn.ModuleList()
        for i, n_blocks in enumerate(blocks_up):
            c = init_filters * 2 ** (len(blocks_up) - i)
            self.up_layers.append(nn.Sequential(*[ResUpBlock(spatial_dims, c // 2, norm_groups) for _ in range(n_blocks)]))
            self.up_samples.append(nn.Sequential(
                Conv(spatial_dims, c, c // 2, 1),
                nn.Upsample(scale_factor=2, mode=UPSAMPLE_MODE[spatial_dims], align_corners=False),
            ))
        if blocks_up and blocks_up[-1]:  # the backward starts there: checkpointing it would save nothing
            runs_last(self.up_layers[-1][-1])
        self.conv_final = nn.Sequential(
            nn.GroupNorm(norm_groups, init_filters),
            nn.ReLU(inplace=True),
            dw_conv(spatial_dims, init_filters, out_channels, kernel_size=1, bias=True),
        )

    def check_input_size(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the sizes that work if ``shape`` (B, C, *S) cannot be taken."""
        if len(shape) != self.spatial_dims + 2:
            raise ValueError(f"LightMUNet(spatial_dims={self.spatial_dims}) takes (B, C, {', '.join('HWD'[:self.spatial_dims])}) "
                             f"input, got shape {tuple(shape)}")
        f = self.size_divisor
        bad = [s for s in shape[2:] if s % f]
        if bad:
            options = ", ".join(f"{s} -> {s // f * f} or {s // f * f + f}" if s > f else f"{s} -> {f}" for s in bad)
            raise ValueError(f"LightMUNet needs spatial sizes divisible by {f} (one factor 2 per down-sampling); "
                             f"got {tuple(shape[2:])}; sizes that work: {options}; or pad the input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape)
        x = self.convInit(x)
        skips = []
        for down in self.down_layers:
            x = down(x)
            skips.append(x)
        skips = skips[-2::-1]  # the levels above the bottom, deepest first
        for up, layer, skip in zip(self.up_samples, self.up_layers, skips):
            x = layer(up(x) + skip)
        return self.conv_final(x)


RECIPE = Recipe("adam", 1e-4, 1e-5, source="LightM-UNet's nnU-Net trainer: Adam 1e-4, wd 1e-5, poly 0.9, "
                                         "Dice+CE, clip 12, 100 x 250 iterations, no mirror TTA")
CARD = dict(task="segmentation", size_divisor=8, recipe=RECIPE,
            reference="Liao et al. 2024, LightM-UNet, arXiv 2403.05246; code: github.com/MrBlankness/LightM-UNet")
CARD_2D = dict(spatial_dims=(2,), input_size=(256, 256), **CARD)
CARD_3D = dict(spatial_dims=(3,), input_size=(128, 128, 128), **CARD)


@register_model(**CARD_2D)
def lightm_unet_2d(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """LightM-UNet 2D at the released size (5,011,765 parameters for 3 inputs, 2 classes)."""
    return LightMUNet(2, in_channels, out_channels, **kwargs)


@register_model(**CARD_3D)
def lightm_unet_3d(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """LightM-UNet 3D at the released size (5,015,766 parameters for 1 input, 3 classes)."""
    return LightMUNet(3, in_channels, out_channels, **kwargs)


@register_model(**CARD_2D, ablation_of="lightm_unet_2d")
def lightm_unet_2d_nomamba(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """LightM-UNet 2D with every Mamba mixer replaced by the identity (No-Mamba ablation)."""
    return LightMUNet(2, in_channels, out_channels, **{**kwargs, "no_mamba": True})


@register_model(**CARD_3D, ablation_of="lightm_unet_3d")
def lightm_unet_3d_nomamba(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """LightM-UNet 3D with every Mamba mixer replaced by the identity (No-Mamba ablation)."""
    return LightMUNet(3, in_channels, out_channels, **{**kwargs, "no_mamba": True})


@register_model(**{**CARD_2D, "input_size": (64, 64)})
def lightm_unet_2d_tiny(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """A tiny 2D LightM-UNet for tests and demos (8 filters, one block per level)."""
    return LightMUNet(2, in_channels, out_channels, **{"init_filters": 8, "blocks_down": (1, 1, 1, 1), **kwargs})


@register_model(**{**CARD_3D, "input_size": (32, 32, 32)})
def lightm_unet_3d_tiny(in_channels: int = 1, out_channels: int = 2, **kwargs) -> LightMUNet:
    """A tiny 3D LightM-UNet for tests and demos (8 filters, one block per level)."""
    return LightMUNet(3, in_channels, out_channels, **{"init_filters": 8, "blocks_down": (1, 1, 1, 1), **kwargs})
