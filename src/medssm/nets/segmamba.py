"""SegMamba (Xing et al., arXiv 2401.13560): a tri-orientated Mamba encoder and a residual CNN decoder.

Module and parameter names follow the authors' release (``vit.downsample_layers``, ``vit.gscs``,
``vit.stages.i.j.mamba.conv1d_b``, ``encoder1.layer.conv1.conv``, ``decoder5.transp_conv.conv``,
``out.conv.conv`` ...), so their checkpoints load with ``strict=True``. The decoder blocks are
written here with the names of MONAI's ``UnetResBlock``, ``UnetrBasicBlock``, ``UnetrUpBlock`` and
``UnetOutBlock`` (which the authors used), so this module needs only torch.

Unlike the release, the inter-slice scan order is derived from each feature map's actual shape (any
patch size divisible by 16 works, anisotropic too) and ``spatial_dims=2`` gives a 2D form whose
third scan is column-major.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from ..ssm.mamba import Mamba
from ..ssm.orders import image_to_tokens, tokens_to_image
from .blocks import NoMixer
from .cards import Recipe
from .checkpointing import checkpointed, runs_last
from .cpu_conv import Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d, InstanceNorm
from .registry import register_model

__all__ = ["SegMamba", "GSC", "MambaLayer", "UnetResBlock", "UnetrBasicBlock", "UnetrUpBlock", "UnetOutBlock"]

TRI_ORIENTATED = ("raster", "reversed", "slice")


def _conv(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if transposed:
        return ConvTranspose2d if spatial_dims == 2 else ConvTranspose3d
    return Conv2d if spatial_dims == 2 else Conv3d  # torch's, on the CPU's fast paths (nets/cpu_conv.py)


def _instance_norm(spatial_dims: int, channels: int) -> nn.Module:
    """InstanceNorm without affine parameters or running statistics (MONAI's and the authors' default)."""
    return InstanceNorm(channels)


def _monai_conv(layer: nn.Module) -> nn.Sequential:
    """Hold ``layer`` under the name ``conv``, as MONAI's ``Convolution`` does (keys ``....conv.weight``)."""
    return nn.Sequential(OrderedDict(conv=layer))


# --- decoder blocks, named as MONAI's (the res_block=True, kernel 3, stride 1 variants SegMamba uses) ---


class UnetResBlock(nn.Module):
    """conv3 → IN → LeakyReLU → conv3 → IN, plus the input (through 1×1 conv + IN when channels
    change), then LeakyReLU(0.01), in place as in MONAI (it keeps one tensor less for the backward).
    Convolutions have no bias."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.conv1 = _monai_conv(conv(in_channels, out_channels, 3, padding=1, bias=False))
        self.conv2 = _monai_conv(conv(out_channels, out_channels, 3, padding=1, bias=False))
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = _instance_norm(spatial_dims, out_channels)
        self.norm2 = _instance_norm(spatial_dims, out_channels)
        self.downsample = in_channels != out_channels
        if self.downsample:
            self.conv3 = _monai_conv(conv(in_channels, out_channels, 1, bias=False))
            self.norm3 = _instance_norm(spatial_dims, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        return self.lrelu(out + residual)


class UnetrBasicBlock(nn.Module):
    """A :class:`UnetResBlock` held under ``layer``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.layer = UnetResBlock(spatial_dims, in_channels, out_channels)

    @checkpointed("decoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """Transposed conv (k=2, s=2, no bias), concatenate (upsampled, skip), :class:`UnetResBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.transp_conv = _monai_conv(_conv(spatial_dims, transposed=True)(in_channels, out_channels, 2, stride=2, bias=False))
        self.conv_block = UnetResBlock(spatial_dims, 2 * out_channels, out_channels)

    @checkpointed("decoder")
    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """1×1 convolution with bias: features to logits."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _monai_conv(_conv(spatial_dims)(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# --- encoder ---


class GSC(nn.Module):
    """Gated spatial convolution: ``a = ReLU(IN(conv3(ReLU(IN(conv3(x))))))``, ``b = ReLU(IN(conv1(x)))``,
    ``out = ReLU(IN(conv1(a ∘ b))) + x`` with ``∘`` the sum (``gate="sum"``, the released code) or
    the product (``gate="product"``, the paper's figure)."""

    def __init__(self, spatial_dims: int, channels: int, gate: str = "sum"):
        super().__init__()
        if gate not in ("sum", "product"):
            raise ValueError(f"gate must be 'sum' or 'product', got {gate!r}")
        conv = _conv(spatial_dims)
        self.gate = gate
        self.proj = conv(channels, channels, 3, padding=1)
        self.norm = _instance_norm(spatial_dims, channels)
        self.proj2 = conv(channels, channels, 3, padding=1)
        self.norm2 = _instance_norm(spatial_dims, channels)
        self.proj3 = conv(channels, channels, 1)
        self.norm3 = _instance_norm(spatial_dims, channels)
        self.proj4 = conv(channels, channels, 1)
        self.norm4 = _instance_norm(spatial_dims, channels)
        self.act = nn.ReLU(inplace=True)  # on the norms' outputs, which their backward does not need

    @checkpointed("encoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.norm2(self.proj2(self.act(self.norm(self.proj(x))))))
        b = self.act(self.norm3(self.proj3(x)))
        gated = a + b if self.gate == "sum" else a * b
        return self.act(self.norm4(self.proj4(gated))) + x


class MambaLayer(nn.Module):
    """``x + ToM(LayerNorm(tokens(x)))``: the tri-orientated Mamba (forward, reversed, inter-slice)
    on the raster-ordered tokens of a ``(B, C, *S)`` map, the slice order taken from ``S``;
    ``no_mamba`` makes ToM the identity (the No-Mamba ablation)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, no_mamba: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = NoMixer() if no_mamba else Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand,
                                                      orders=TRI_ORIENTATED)

    @checkpointed("mamba")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        tokens = image_to_tokens(x)  # (B, L, C), raster order
        return x + tokens_to_image(self.mamba(self.norm(tokens), spatial), spatial)  # (B, C, *S)


class MlpChannel(nn.Module):
    """1×1 conv (C→hidden) → GELU → 1×1 conv (hidden→C)."""

    def __init__(self, spatial_dims: int, channels: int, hidden: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.fc1 = conv(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = conv(hidden, channels, 1)

    @checkpointed("encoder")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MambaEncoder(nn.Module):
    """Four stages of (down-sampling, GSC, Mamba layers); returns ``MLP(IN(x))`` of each stage,
    while the main path continues with the un-normalised ``x``."""

    def __init__(self, spatial_dims: int, in_channels: int, depths: Sequence[int], dims: Sequence[int],
                 gsc_gate: str = "sum", **mamba_kwargs):
        super().__init__()
        conv = _conv(spatial_dims)
        self.downsample_layers = nn.ModuleList([nn.Sequential(conv(in_channels, dims[0], 7, stride=2, padding=3))])
        self.downsample_layers.extend(
            nn.Sequential(_instance_norm(spatial_dims, dims[i]), conv(dims[i], dims[i + 1], 2, stride=2))
            for i in range(len(dims) - 1))
        self.gscs = nn.ModuleList(GSC(spatial_dims, d, gsc_gate) for d in dims)
        self.stages = nn.ModuleList(nn.Sequential(*(MambaLayer(d, **mamba_kwargs) for _ in range(n)))
                                    for d, n in zip(dims, depths))
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", _instance_norm(spatial_dims, d))
        self.mlps = nn.ModuleList(MlpChannel(spatial_dims, d, 2 * d) for d in dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skips = []
        for i, (down, gsc, stage, mlp) in enumerate(zip(self.downsample_layers, self.gscs, self.stages, self.mlps)):
            x = stage(gsc(down(x)))
            skips.append(mlp(getattr(self, f"norm{i}")(x)))
        return tuple(skips)


class SegMamba(nn.Module):
    """SegMamba: Mamba encoder (stem, gated spatial convolution, tri-orientated Mamba) with a
    UNETR-style residual decoder. Returns logits at the input resolution.

    Every spatial size must be divisible by 16, and at least one must be 32 or more (instance
    normalisation needs more than one voxel at 1/16 resolution); anisotropic sizes work.

    Args:
        spatial_dims: 3 for volumes, 2 for images (the third scan is then column-major).
        in_channels: input channels (the authors' ``in_chans``).
        out_channels: classes (the authors' ``out_chans``).
        depths: Mamba layers in each of the four encoder stages.
        feature_size: channels of the four encoder stages (the authors' ``feat_size``).
        hidden_size: channels of the bottleneck block ``encoder5``.
        gsc_gate: how GSC merges its two branches: ``"sum"`` (released code, default) or
            ``"product"`` (the paper's figure).
        d_state, d_conv, expand: Mamba layer sizes (see :class:`medssm.ssm.Mamba`).
        no_mamba: replace every Mamba mixer by the identity, all else unchanged (the No-Mamba ablation).

    Examples::

        # BraTS: 4 MRI sequences in, 4 classes out, 128³ patches
        >>> net = SegMamba(spatial_dims=3, in_channels=4, out_channels=4)
        >>> net(torch.randn(1, 4, 128, 128, 128)).shape
        torch.Size([1, 4, 128, 128, 128])

        # 2D form on a 1-channel image
        >>> net = SegMamba(spatial_dims=2, in_channels=1, out_channels=2, feature_size=(16, 32, 64, 128), hidden_size=256)
        >>> net(torch.randn(2, 1, 96, 64)).shape
        torch.Size([2, 2, 96, 64])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 4, out_channels: int = 4,
                 depths: Sequence[int] = (2, 2, 2, 2), feature_size: Sequence[int] = (48, 96, 192, 384),
                 hidden_size: int = 768, gsc_gate: str = "sum", d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, no_mamba: bool = False):
        super().__init__()
        if len(depths) != 4 or len(feature_size) != 4:
            raise ValueError(f"depths and feature_size need 4 entries each, got {tuple(depths)} and {tuple(feature_size)}")
        _conv(spatial_dims)  # validates spatial_dims
        self.spatial_dims = spatial_dims
        f = tuple(feature_size)
        self.vit = MambaEncoder(spatial_dims, in_channels, depths, f, gsc_gate, d_state=d_state, d_conv=d_conv,
                                expand=expand, no_mamba=no_mamba)
        self.encoder1 = UnetrBasicBlock(spatial_dims, in_channels, f[0])
        self.encoder2 = UnetrBasicBlock(spatial_dims, f[0], f[1])
        self.encoder3 = UnetrBasicBlock(spatial_dims, f[1], f[2])
        self.encoder4 = UnetrBasicBlock(spatial_dims, f[2], f[3])
        self.encoder5 = UnetrBasicBlock(spatial_dims, f[3], hidden_size)
        self.decoder5 = UnetrUpBlock(spatial_dims, hidden_size, f[3])
        self.decoder4 = UnetrUpBlock(spatial_dims, f[3], f[2])
        self.decoder3 = UnetrUpBlock(spatial_dims, f[2], f[1])
        self.decoder2 = UnetrUpBlock(spatial_dims, f[1], f[0])
        self.decoder1 = runs_last(UnetrBasicBlock(spatial_dims, f[0], f[0]))  # never checkpointed
        self.out = UnetOutBlock(spatial_dims, f[0], out_channels)

    def check_input_size(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless a ``(B, C, *S)`` input of ``shape`` fits the network."""
        spatial = tuple(shape[2:])
        if len(shape) != self.spatial_dims + 2:
            raise ValueError(f"SegMamba(spatial_dims={self.spatial_dims}) takes (B, C, "
                             f"{'D, H, W' if self.spatial_dims == 3 else 'H, W'}) inputs, got shape {tuple(shape)}")
        if any(s % 16 for s in spatial) or math.prod(s // 16 for s in spatial) < 2:
            fit = tuple(max(16, math.ceil(s / 16) * 16) for s in spatial)
            if math.prod(fit) == 16 ** len(fit):
                fit = (32,) + fit[1:]
            raise ValueError(f"SegMamba needs every spatial size divisible by 16 and at least one of them >= 32 "
                             f"(instance norm needs more than one voxel at 1/16 resolution); got {spatial}, "
                             f"pad to e.g. {fit}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape)
        skips = self.vit(x)  # resolutions 1/2, 1/4, 1/8, 1/16
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(skips[0]), self.encoder3(skips[1]), self.encoder4(skips[2])
        dec = self.decoder5(self.encoder5(skips[3]), enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec))


# Clipping is not part of SegMamba's description; 12 is the nnU-Net value its trainer inherits.
RECIPE = Recipe("sgd", 1e-2, 3e-5, momentum=0.99, nesterov=True, loss="ce", mirror_tta=True,
                source="SegMamba: SGD 1e-2, momentum 0.99 Nesterov, wd 3e-5, poly per iteration, CE, "
                       "batch 2 at 128^3, 8-way mirror TTA")
CARD = dict(task="segmentation", size_divisor=16, in_channels=4, recipe=RECIPE,
            reference="Xing et al. 2024, SegMamba, arXiv 2401.13560; code: github.com/ge-xing/SegMamba")


@register_model(spatial_dims=(3,), input_size=(128, 128, 128), **CARD)
def segmamba_3d(**kwargs) -> SegMamba:
    """The published SegMamba: 3D, feature sizes 48-384, 67.4 M parameters (4 in, 4 out)."""
    return SegMamba(**{"spatial_dims": 3, **kwargs})


@register_model(spatial_dims=(3,), input_size=(128, 128, 128), ablation_of="segmamba_3d", **CARD)
def segmamba_3d_nomamba(**kwargs) -> SegMamba:
    """SegMamba 3D with every tri-orientated Mamba replaced by the identity (No-Mamba ablation)."""
    return SegMamba(**{"spatial_dims": 3, **kwargs, "no_mamba": True})


@register_model(spatial_dims=(2,), input_size=(256, 256), **CARD)
def segmamba_2d(**kwargs) -> SegMamba:
    """The same network on 2D images (third scan column-major)."""
    return SegMamba(**{"spatial_dims": 2, **kwargs})


@register_model(spatial_dims=(3, 2), input_size=(32, 32, 32), **CARD)
def segmamba_tiny(**kwargs) -> SegMamba:
    """A tiny SegMamba for tests (one Mamba layer a stage, 8-32 channels); 3D unless ``spatial_dims=2``."""
    return SegMamba(**{"spatial_dims": 3, "depths": (1, 1, 1, 1), "feature_size": (8, 16, 24, 32),
                       "hidden_size": 32, **kwargs})
