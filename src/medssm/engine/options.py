"""The options of ``medssm train``: those both tasks take (:class:`TrainOptions`), and each task's own
(:class:`TrainConfig` for segmentation, :class:`ClassifierTrainConfig` for classification), with the model's recipe as the default for every
training value: an option left unset means "as the model's card says".

An option's rules are in its field's metadata and checked by :meth:`TrainOptions.check` for every
task alike: ``min`` (each value at least this), ``choices``, ``budgeted`` (``--budget`` sets it, so
it is refused beside ``--budget``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..budget import parse_duration
from ..data.segmentation.splits import N_FOLDS
from ..nets.cards import RECIPES, ModelCard, Recipe
from ..nets.registry import get_model_card

__all__ = ["TrainOptions", "TrainConfig", "ClassifierTrainConfig", "RECIPE_OPTIONS", "DEFAULT_MODELS"]

# The model trained when none is given: the task's Mamba model for the data's dimensionality.
DEFAULT_MODELS = {("segmentation", 2): "lightm_unet_2d", ("segmentation", 3): "lightm_unet_3d",
                  ("classification", 2): "medmamba_t", ("classification", 3): "medmamba_t"}
# Options that override the model's recipe when given.
RECIPE_OPTIONS = ("optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs", "grad_clip", "epochs",
                  "batch_size", "loss", "augmentation")


@dataclass
class TrainOptions:
    """Options of ``medssm train`` for both tasks."""

    data: str = field(metadata={"flags": ("-d", "--data"), "help": (
        "the dataset: an nnU-Net raw dataset folder or its name under $MEDSSM_DATA (segmentation); a MedMNIST "
        ".npz or name, a folder of train/val/test class folders, or a CSV of path,label (classification)")})
    out: str | None = field(default=None, metadata={"flags": ("-o", "--out"), "help": (
        "run folder (default: runs/DATASET_MODEL, with _foldF for segmentation)")})
    model: str | None = field(default=None, metadata={"help": (
        "registered model (medssm.list_models()) or monai:CLASS (default: LightM-UNet for segmentation, MedMamba-T "
        "for classification)")})
    model_kwargs: str = field(default="{}", metadata={"help": "extra model arguments as JSON, e.g. '{\"init_filters\": 16}'"})
    epochs: int | None = field(default=None, metadata={"min": 1, "budgeted": True, "help": (
        "training epochs (default: the model's recipe)")})
    iterations_per_epoch: int | None = field(default=None, metadata={"min": 1, "budgeted": True, "help": (
        "training steps per epoch (default: the recipe's: 250 for segmentation, one pass over the data for "
        "classification, where this is the most an epoch takes)")})
    batch_size: int | None = field(default=None, metadata={"min": 1, "help": (
        "global batch size (default: the plan's for segmentation, the recipe's for classification)")})
    recipe: str | None = field(default=None, metadata={"help": (
        "start from another recipe than the model's own: short (for runs of minutes: AdamW 1e-3, cosine, "
        "mirroring) or a registered model's name")})
    optimizer: str | None = field(default=None, metadata={"help": "adam, adamw or sgd (default: the recipe's)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the recipe's)"})
    weight_decay: float | None = field(default=None, metadata={"help": "weight decay (default: the recipe's)"})
    momentum: float | None = field(default=None, metadata={"help": "SGD momentum (default: the recipe's)"})
    schedule: str | None = field(default=None, metadata={"help": "poly, cosine or constant, per step (default: the recipe's)"})
    warmup_epochs: int | None = field(default=None, metadata={"help": "linear warm-up epochs (default: the recipe's)"})
    grad_clip: float | None = field(default=None, metadata={"help": "max gradient norm, 0 off (default: the recipe's)"})
    budget: str | None = field(default=None, metadata={"help": (
        "train to a time budget on this machine, e.g. 90s, 20m, 2h: the step is measured and the length, the "
        "validation and (segmentation) the resolution are fitted to it (sets --epochs and the validation)")})
    over_budget: bool = field(default=False, metadata={"help": (
        "with --budget: when even the minimum training does not fit, train it anyway (and report the real time)")})
    val_every: int | None = field(default=None, metadata={"min": 1, "budgeted": True, "help": (
        "validate every N epochs and after the last (default: 5 for segmentation, 1 for classification)")})
    ema: float = field(default=0.0, metadata={
        "help": "decay of a moving average of the weights, e.g. 0.998 (0: off); validation, the best model "
                "and predictions then use the average"})
    checkpointing: bool = field(default=False, metadata={"help": (
        "activation checkpointing: every Mamba layer, encoder stage and decoder block keeps only its input and is "
        "computed again in the backward (the same gradients; about 0.2-0.6x the memory for ~1.3x the step; "
        "medssm.nets.set_checkpointing to choose the blocks)")})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, sampling, augmentation)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16", "fp16"),
        "help": "fp32, bf16 or fp16 (mixed precision; fp16 on a GPU only; the scan stays float32)"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU); under torchrun: the LOCAL_RANK GPU"})
    scan_backend: str = field(default="auto", metadata={
        "help": "selective-scan implementation: auto, fused (CPU), chunked, triton, cuda, reference"})
    threads: int | None = field(default=None, metadata={"min": 1, "help": (
        "CPU threads for torch and the numba kernels (default: torch's, one per core); on a machine whose cores are "
        "busy with other work, fewer (e.g. 1) avoid threads waiting for each other")})
    num_workers: int = field(default=0, metadata={"min": 0, "help": "data-loading worker processes"})
    progress: bool = field(default=True, metadata={"help": "progress bars (one line per epoch is printed either way)"})

    def check(self) -> None:
        """Refuse option values no run can train with (each option's ``min`` and ``choices``), and the
        options ``--budget`` sets beside it; one line naming the option."""
        for f in dataclasses.fields(self):
            value, rule, flag = getattr(self, f.name), f.metadata, "--" + f.name.replace("_", "-")
            if value is None:
                continue
            if "choices" in rule and value not in rule["choices"]:
                raise ValueError(f"{flag} must be one of {', '.join(map(str, rule['choices']))}, got {value!r}")
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if "min" in rule and any(v < rule["min"] for v in values):
                raise ValueError(f"{flag} must be at least {rule['min']}, got {' '.join(map(str, values))}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema must be a decay in [0, 1), got {self.ema}")
        if self.budget is not None:
            parse_duration(self.budget)
            given = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(self)
                     if f.metadata.get("budgeted") and getattr(self, f.name) not in (None, 0)]
            if given:
                raise ValueError("--budget fits the training length and the validation to the time: leave out "
                                 + ", ".join(given))

    def resolve_recipe(self, card: ModelCard) -> Recipe:
        """The recipe to train with: ``--recipe``'s or the card's, with the options that were given."""
        base = card.recipe if self.recipe is None else named_recipe(self.recipe)
        return base.with_overrides(**{k: getattr(self, k, None) for k in RECIPE_OPTIONS})


def named_recipe(name: str) -> Recipe:
    """A recipe by name: one of :data:`~medssm.nets.cards.RECIPES`, or a registered model's."""
    if name in RECIPES:
        return RECIPES[name]
    try:
        return get_model_card(name).recipe
    except ValueError:
        raise ValueError(f"--recipe: {name!r} is neither a named recipe ({', '.join(RECIPES)}) nor a registered "
                         "model") from None


@dataclass
class TrainConfig(TrainOptions):
    """Train a segmentation model on an nnU-Net raw dataset (imagesTr/labelsTr/dataset.json)."""

    fold: int = field(default=0, metadata={"choices": range(N_FOLDS), "help": f"validation fold, 0..{N_FOLDS - 1}"})
    val_cases: int = field(default=0, metadata={"min": 0, "budgeted": True, "help": (
        "validate on the first N held-out cases only (0: all)")})
    patch_size: tuple[int, ...] | None = field(default=None, metadata={"min": 1, "help": "override the plan's"})
    target_spacing: tuple[float, ...] | None = field(default=None, metadata={"min": 1e-9, "help": (
        "override the plan's (e.g. 2 2 halves a 1-spacing 2D set: faster on a CPU)")})
    loss: str | None = field(default=None, metadata={"choices": ("dice_ce", "ce", "dice"), "help": (
        "dice_ce, ce or dice (default: the recipe's)")})
    augmentation: str | None = field(default=None, metadata={"choices": ("nnunet", "mirror", "none"), "help": (
        "nnunet (nnU-Net's set, MONAI transforms), mirror (flips only) or none (default: the recipe's)")})
    oversample_foreground: float = field(default=1 / 3, metadata={"min": 0, "help": (
        "share of patches centred on foreground")})
    cache: str | None = field(default=None, metadata={"help": "preprocessing cache folder (default RUN/preprocessed)"})

    def plan_overrides(self) -> dict:
        """The plan fields these options set."""
        given = {"patch_size": self.patch_size, "batch_size": self.batch_size, "target_spacing": self.target_spacing}
        return {"oversample_foreground": self.oversample_foreground,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in given.items() if v}}


@dataclass
class ClassifierTrainConfig(TrainOptions):
    """Train a classifier (the model's recipe by default) on a MedMNIST .npz or name, image folders
    (root/{train,val,test}/{class}/*) or a CSV of path,label[,split]; keep the best by validation AUC."""

    input_size: int | None = field(default=None, metadata={
        "help": "network input side in pixels/voxels (default: the data's own size; MedMamba's recipe uses 224)"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "help": "cross-entropy label smoothing"})
    class_weights: str = field(default="none", metadata={
        "help": "none, balanced (n / (K * count)) or comma-separated weights, one per class"})
    label_columns: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "multi-label CSV: its 0/1 finding columns (default: every column but path and split, when there are several "
        "and none is named label); ChestMNIST's findings are read as they are")})
    pos_weight: str = field(default="none", metadata={"help": (
        "multi-label: the binary cross-entropy weight of each finding's positives: none, balanced (negatives / "
        "positives in the training set, for rare findings) or comma-separated numbers, one per finding")})
    crop_scale: tuple[float, ...] = field(default=(0.08, 1.0), metadata={
        "help": "random-resized crop area range (the recipe: 0.08 1.0)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    vflip: bool = field(default=False, metadata={"help": "random vertical flips"})
    drop_path: float | None = field(default=None, metadata={"help": "stochastic depth rate (MedMamba default 0.1)"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --data is a name (28, 64, 128, 224)"})
    data_root: str | None = field(default=None, metadata={
        "help": "folder of MedMNIST files for names (default $MEDSSM_DATA/medmnist)"})
    download: bool = field(default=False, metadata={"help": "download a missing MedMNIST file (MD5-checked)"})
    val_fraction: float = field(default=0.1, metadata={"help": "validation share when the data has no val split"})
    limit: int | None = field(default=None, metadata={"min": 1, "help": (
        "use at most this many (seeded, stratified) samples of train and of val: quick runs")})

    def make_loss(self, labels, num_classes: int):
        """The loss these options give for training ``labels``: cross-entropy over ``num_classes`` classes
        (``--class-weights``, ``--label-smoothing``), or for findings ``(N, K)`` binary cross-entropy per
        finding (``--pos-weight``); the options of the other kind are refused."""
        import torch

        from ..data.classification import class_weights, finding_weights

        multi = labels.ndim == 2
        given = [f"--{o.replace('_', '-')}" for o, off in (("class_weights", "none"), ("label_smoothing", 0.0),
                                                           ("pos_weight", "none")) if getattr(self, o) != off]
        wrong = [o for o in given if (o == "--pos-weight") != multi]
        if wrong:
            raise ValueError(f"{self.data}: {', '.join(wrong)} " + ("apply to one class per sample; this data is "
                             "multi-label (use --pos-weight)" if multi else "applies to multi-label data only"))
        if multi:
            return torch.nn.BCEWithLogitsLoss(pos_weight=finding_weights(self.pos_weight, labels))
        return torch.nn.CrossEntropyLoss(weight=class_weights(self.class_weights, labels, num_classes),
                                         label_smoothing=self.label_smoothing)
