"""Each model's official optimiser, schedule, loss and clipping (docs: ../shared/specs/models.md),
and the small factories that build them. Every value is overridable from ``medssm train``.

Example:
    >>> recipe = recipe_for("lightm_unet_2d")            # Adam 1e-4, wd 1e-5, poly 0.9, Dice+CE, clip 12
    >>> opt = make_optimizer(model.parameters(), recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay)
    >>> sched = make_scheduler(opt, recipe.schedule, total_steps=100 * 250)
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is trained by its authors."""

    optimizer: str  # "adam", "adamw" or "sgd"
    lr: float
    weight_decay: float
    momentum: float = 0.0  # SGD only
    nesterov: bool = False  # SGD only
    schedule: str = "poly"  # "poly" (exponent 0.9, per iteration), "cosine" or "constant"
    loss: str = "dice_ce"
    grad_clip: float = 12.0  # max gradient norm; 0 turns clipping off
    mirror_tta: bool = False  # the authors' default at prediction
    source: str = ""


# nnU-Net v2's default trainer: what MONAI baselines (SegResNet, UNet ...) get unless told otherwise.
NNUNET_DEFAULT = Recipe("sgd", 1e-2, 3e-5, momentum=0.99, nesterov=True, mirror_tta=True,
                        source="nnU-Net v2 default trainer (SGD, Nesterov, poly)")
RECIPES: dict[str, Recipe] = {
    "lightm_unet": Recipe("adam", 1e-4, 1e-5, source="LightM-UNet's nnU-Net trainer: Adam 1e-4, wd 1e-5, "
                                                    "poly 0.9, Dice+CE, clip 12, no mirror TTA"),
    # Clipping is not part of SegMamba's description; 12 is the nnU-Net value its trainer inherits.
    "segmamba": Recipe("sgd", 1e-2, 3e-5, momentum=0.99, nesterov=True, loss="ce", mirror_tta=True,
                       source="SegMamba: SGD 1e-2, momentum 0.99 Nesterov, wd 3e-5, poly per iteration, "
                              "CE, 8-way mirror TTA"),
}


def recipe_for(model: str) -> Recipe:
    """The official recipe of a model family, found by name prefix (``lightm_unet_2d_tiny`` →
    LightM-UNet's); any other model (``monai:SegResNet`` ...) gets nnU-Net's default."""
    for prefix, recipe in RECIPES.items():
        if model.startswith(prefix):
            return recipe
    return NNUNET_DEFAULT


def make_optimizer(params, name: str, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """``adam`` (L2 weight decay, as torch.optim.Adam), ``adamw`` or ``sgd``."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               nesterov=nesterov and momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose from adam, adamw, sgd")


def poly_factor(step: int, total_steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay: ``(1 − step/total)^0.9``."""
    return (1 - min(step, total_steps) / max(total_steps, 1)) ** exponent


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration schedule (call ``.step()`` after every optimiser step): ``poly``, ``cosine``
    or ``constant``, with an optional linear warm-up."""
    name = name.lower()
    if name not in ("poly", "cosine", "constant"):
        raise ValueError(f"unknown schedule {name!r}; choose from poly, cosine, constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        s, n = step - warmup_steps, max(total_steps - warmup_steps, 1)
        if name == "poly":
            return poly_factor(s, n)
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, n) / n))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
