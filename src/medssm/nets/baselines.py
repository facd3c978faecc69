"""MONAI networks as baselines, registered as ``monai:NAME`` with cards and sensible defaults.

``monai:SegResNet`` (init_filters 16), ``monai:UNet`` (32..256, strides 2, two residual units a
level), ``monai:DynUNet`` (shaped by the patch as nnU-Net plans it), ``monai:SwinUNETR`` (feature
size 48) and ``monai:resnet18`` (classification) have cards here; any other class of
``monai.networks.nets`` builds as ``monai:CLASS`` with a generic segmentation card. Arguments
given to :func:`medssm.create_model` override the defaults.

Example:
    >>> net = medssm.create_model("monai:SegResNet", spatial_dims=2, in_channels=1, out_channels=2)
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .cards import NNUNET_DEFAULT, Recipe
from .registry import register_family, register_model

__all__ = ["dynunet_layout", "monai_network", "register_unlisted"]

MONAI = "MONAI (Cardoso et al. 2022, arXiv 2211.02701); code: github.com/Project-MONAI/MONAI"


def monai_network(class_name: str):
    """The class (or constructor function) ``monai.networks.nets.<class_name>``."""
    import monai.networks.nets as nets

    cls = getattr(nets, class_name, None)
    if cls is None or not callable(cls) or class_name.startswith("_"):
        raise ValueError(f"monai:{class_name}: monai.networks.nets has no network {class_name!r}")
    return cls


def dynunet_layout(patch_size: Sequence[int], max_levels: int = 6) -> tuple[list, list]:
    """(kernel sizes, strides) for DynUNet as nnU-Net plans them: an axis is halved at a level while
    it stays even and at least 8 (the bottleneck keeps 4 or more), at most ``max_levels`` times."""
    size = [int(s) for s in patch_size]
    kernels, strides = [[3] * len(size)], [[1] * len(size)]
    for _ in range(max_levels):
        stride = [2 if s % 2 == 0 and s >= 8 else 1 for s in size]
        if not any(s == 2 for s in stride):
            break
        size = [s // st for s, st in zip(size, stride)]
        kernels.append([3] * len(size))
        strides.append(stride)
    return kernels, strides


SEGMENTATION = dict(task="segmentation", spatial_dims=(2, 3), input_size=(256, 256), recipe=NNUNET_DEFAULT,
                    reference=MONAI)


@register_model(name="monai:SegResNet", size_divisor=8, **SEGMENTATION)
def monai_segresnet(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **kwargs) -> nn.Module:
    """MONAI SegResNet (Myronenko 2018) with 16 initial filters."""
    return monai_network("SegResNet")(spatial_dims=spatial_dims, in_channels=in_channels,
                                      out_channels=out_channels, **{"init_filters": 16, **kwargs})


@register_model(name="monai:UNet", size_divisor=8, **SEGMENTATION)
def monai_unet(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **kwargs) -> nn.Module:
    """MONAI residual UNet: channels 32..256, strides 2, two residual units a level."""
    defaults = {"channels": (32, 64, 128, 256), "strides": (2, 2, 2), "num_res_units": 2}
    return monai_network("UNet")(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                                 **{**defaults, **kwargs})


@register_model(name="monai:DynUNet", size_divisor=8, adapts_to_patch=True, **SEGMENTATION)
def monai_dynunet(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                  patch_size: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """MONAI DynUNet laid out for the patch as nnU-Net plans it (halve each axis while it stays >= 4)."""
    kernels, strides = dynunet_layout(patch_size or ((256, 256) if spatial_dims == 2 else (128,) * 3))
    defaults = {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], "res_block": True}
    return monai_network("DynUNet")(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                                    **{**defaults, **kwargs})


@register_model(name="monai:SwinUNETR", size_divisor=32, **SEGMENTATION)
def monai_swinunetr(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **kwargs) -> nn.Module:
    """MONAI SwinUNETR, feature size 48."""
    return monai_network("SwinUNETR")(spatial_dims=spatial_dims, in_channels=in_channels,
                                      out_channels=out_channels, **{"feature_size": 48, **kwargs})


@register_model(name="monai:resnet18", task="classification", spatial_dims=(2, 3), size_divisor=1,
                input_size=(224, 224), in_channels=3, reference=MONAI + "; ResNet: He et al. 2016",
                recipe=Recipe("adam", 1e-3, schedule="cosine", loss="ce", grad_clip=0.0, batch_size=128,
                              iterations_per_epoch=None,
                              source="MedMNIST v2's ResNet-18 baseline: Adam 1e-3, batch 128, 100 epochs "
                                     "(its x0.1 steps at epochs 50 and 75 as a cosine here)"))
def monai_resnet18(spatial_dims: int = 2, in_chans: int = 3, num_classes: int = 2, **kwargs) -> nn.Module:
    """MONAI ResNet-18 (timm's argument names: in_chans, num_classes)."""
    return monai_network("resnet18")(spatial_dims=spatial_dims, n_input_channels=in_chans, num_classes=num_classes,
                                     **kwargs)


def register_unlisted(name: str) -> None:
    """Register ``monai:CLASS`` for any other class of ``monai.networks.nets`` with a generic card: a
    segmentation network of either dimensionality whose sizes are kept to multiples of 32 (enough for
    every U-Net of MONAI with five halvings)."""
    cls = monai_network(name.split(":", 1)[1])
    register_model(lambda **kwargs: cls(**kwargs), name=name, **{**SEGMENTATION, "size_divisor": 32},
                   description="a MONAI network (generic card)")


register_family("monai", register_unlisted)
