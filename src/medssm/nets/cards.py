"""Model cards: the facts about a registered model, declared where it is registered (timm's
``pretrained_cfg`` is the model). Everything above ``medssm.nets`` asks a model's card — its task,
dimensions, size divisor, default input, official training recipe, reference — and never its name.

Example:
    >>> card = medssm.get_model_card("lightm_unet_2d")
    >>> card.task, card.spatial_dims, card.size_divisor, card.recipe.optimizer
    ('segmentation', (2,), 8, 'adam')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Recipe", "ModelCard", "TASKS", "NNUNET_DEFAULT", "CLASSIFIER_DEFAULT", "SHORT_RUN", "RECIPES"]

TASKS = ("segmentation", "classification")


@dataclass(frozen=True)
class Recipe:
    """How a model is trained by its authors; every value is overridable from ``medssm train``."""

    optimizer: str  # "adam" (L2 weight decay), "adamw" or "sgd"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    nesterov: bool = False  # SGD only
    schedule: str = "poly"  # per iteration: "poly" (exponent 0.9), "cosine" or "constant"
    warmup_epochs: int = 0  # linear warm-up before the schedule
    loss: str = "dice_ce"  # segmentation: "dice_ce", "ce" or "dice"; classification: cross-entropy
    grad_clip: float = 12.0  # max gradient norm; 0 turns clipping off
    augmentation: str = "nnunet"  # segmentation: "nnunet" (nnU-Net's set), "mirror" (flips only) or "none"
    mirror_tta: bool = False  # the authors' default at prediction (segmentation)
    epochs: int = 100
    iterations_per_epoch: int | None = 250  # None: one pass over the training set
    batch_size: int | None = None  # None: the segmentation plan's
    source: str = ""

    def with_overrides(self, **overrides) -> "Recipe":
        """This recipe with the non-None ``overrides`` applied (and said in ``source``)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return dataclasses.replace(self, **given, source=f"{self.source}; overridden: {given}")


# nnU-Net v2's default trainer: what segmentation baselines get unless their card says otherwise.
NNUNET_DEFAULT = Recipe("sgd", 1e-2, 3e-5, momentum=0.99, nesterov=True, mirror_tta=True,
                        source="nnU-Net v2 default trainer (SGD 1e-2, Nesterov 0.99, wd 3e-5, poly, Dice+CE)")
# MedMamba's released train.py: what classification baselines get unless their card says otherwise.
CLASSIFIER_DEFAULT = Recipe("adam", 1e-4, schedule="constant", loss="ce", grad_clip=0.0, batch_size=32,
                            iterations_per_epoch=None,
                            source="MedMamba's train.py: Adam 1e-4, constant, cross-entropy, batch 32, 100 epochs")


# For runs of minutes rather than days (a --budget, the quickstart, medssm compare): the official
# recipes are tuned for 25,000 steps and barely start to converge in a few hundred.
# It trains with mirroring only and predicts with it (the 2^d flips averaged, as nnU-Net does): +0.003 to
# +0.005 held-out Dice measured on the lung and hippocampus sets, for 2^d forward passes a case (the
# quickstart's 113 lung cases: 5.4 s without, 16.5 s with).
SHORT_RUN = Recipe("adamw", 1e-3, 1e-4, schedule="cosine", augmentation="mirror", mirror_tta=True,
                   source="medssm's short-run recipe: AdamW 1e-3, wd 1e-4, cosine, Dice+CE, clip 12, mirroring "
                          "in training and prediction")
# Recipes that are not a model's own, by name (``--recipe short``).
RECIPES = {"short": SHORT_RUN}


@dataclass(frozen=True)
class ModelCard:
    """What a registered model is.

    Attributes:
        name: the registered name (``create_model(name)``).
        task: ``"segmentation"`` (MONAI arguments ``in_channels``, ``out_channels``; returns per-voxel
            logits) or ``"classification"`` (timm arguments ``in_chans``, ``num_classes``).
        spatial_dims: the dimensionalities it takes, its default first (``spatial_dims=`` picks another).
        size_divisor: every spatial input size must be a multiple of it (1: any size).
        input_size: a typical spatial input size for its default dimensionality.
        in_channels: its default input channels.
        recipe: the official training recipe.
        reference: paper and released code.
        description: one line.
        adapts_to_patch: the constructor takes ``patch_size`` and lays itself out for it (DynUNet).
        trace_size: for a model that pads its input, a side at which every padding branch of the
            forward runs, so a graph traced there (ONNX export) holds at every size.
        ablation_of: for an ablation, the model it is derived from.
        normalize: a classifier's input normalisation ``(mean, std)``, applied to images scaled to
            [0, 1] (MedMamba's transforms: 0.5, 0.5, i.e. [-1, 1]); recorded in a run's ``model.json``.
    """

    name: str
    task: str
    spatial_dims: tuple[int, ...]
    size_divisor: int
    input_size: tuple[int, ...]
    in_channels: int = 1
    recipe: Recipe = NNUNET_DEFAULT
    reference: str = ""
    description: str = ""
    adapts_to_patch: bool = False
    trace_size: int | None = None
    ablation_of: str | None = None
    normalize: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")
        if not self.spatial_dims or any(d not in (2, 3) for d in self.spatial_dims):
            raise ValueError(f"{self.name}: spatial_dims must be 2 and/or 3, got {self.spatial_dims}")
        if len(self.input_size) != self.spatial_dims[0]:
            raise ValueError(f"{self.name}: input_size {self.input_size} is not {self.spatial_dims[0]}D")

    def __str__(self) -> str:
        rows = [("task", self.task), ("spatial dims", ", ".join(f"{d}D" for d in self.spatial_dims)),
                ("size divisor", self.size_divisor), ("input", f"{self.in_channels} x {' x '.join(map(str, self.input_size))}"),
                ("recipe", self.recipe.source or self.recipe), ("reference", self.reference)]
        if self.ablation_of:
            rows.append(("ablation of", self.ablation_of))
        return "\n".join([f"{self.name}: {self.description}"] + [f"  {k:<14}{v}" for k, v in rows])
