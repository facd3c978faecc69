"""Make MedMamba creatable through timm: after :func:`register_with_timm` (which ``import medssm``
calls), ``timm.create_model("medmamba_t", num_classes=2)`` builds ``medssm.nets.medmamba.MedMamba``.

timm is optional: when it is not installed, or fails to import (as it does when its torchvision
does not load), nothing is registered and nothing is raised.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch.nn as nn

from . import medmamba
from .cards import ModelCard
from .registry import create_model, get_model_card

__all__ = ["TIMM_MODELS", "register_with_timm"]

TIMM_MODELS = ("medmamba_tiny", "medmamba_t", "medmamba_s", "medmamba_b")
# Arguments timm's create_model passes to every entrypoint that medssm's constructors do not take.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_with_timm() -> list[str]:
    """Register :data:`TIMM_MODELS` as timm entrypoints (module ``"medmamba"`` in timm's listing).

    Names timm already knows are left alone. Returns the names registered: none when timm is
    missing or broken; a registry API that fails is reported with a ``RuntimeWarning``.
    """
    try:
        from timm.models import is_model, register_model
    except Exception:  # not installed, or broken: timm imports torchvision, which may not load
        return []
    registered = []
    try:
        for name in TIMM_MODELS:
            if not is_model(name):
                register_model(_timm_entrypoint(name))
                registered.append(name)
    except Exception as e:  # a timm whose registry API differs must not break `import medssm`
        warnings.warn(f"medssm: could not register its models with timm: {e!r}", RuntimeWarning, stacklevel=2)
    return registered


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    """A timm-style entrypoint ``fn(pretrained=False, **kwargs)`` named ``name``, building it through
    :func:`medssm.create_model` (so ``medssm.save_model`` works on the result)."""

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"medssm hosts no pretrained weights for {name!r}; build it with pretrained=False "
                             "and load a checkpoint (the authors' MedMamba state dicts load with strict=True)")
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        model = create_model(name, **kwargs)
        model.pretrained_cfg = model.default_cfg = _data_config(model, get_model_card(name))
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    # timm looks __module__ up in sys.modules, lists the model under its last component and appends
    # the name to its __all__: medssm.nets.medmamba defines every name in TIMM_MODELS.
    entrypoint.__module__ = medmamba.__name__
    entrypoint.__doc__ = f"timm entrypoint for medssm's {name}."
    return entrypoint


def _data_config(model: nn.Module, card: ModelCard) -> dict:
    """timm's pretrained_cfg keys for data set-up: the card's input size, scaled to [-1, 1]."""
    in_chans = model.patch_embed.proj.in_channels
    return {
        "input_size": (in_chans,) + (card.input_size[0],) * model.spatial_dims,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "num_classes": model.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
