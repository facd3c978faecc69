"""The options both trainers take (``medssm train``), with the model's recipe as the default for every
training value: an option left unset means "as the model's card says"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..nets.cards import RECIPES, ModelCard, Recipe
from ..nets.registry import get_model_card

__all__ = ["TrainOptions", "RECIPE_OPTIONS"]

# Options that override the model's recipe when given.
RECIPE_OPTIONS = ("optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs", "grad_clip", "epochs",
                  "batch_size")


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
    epochs: int | None = field(default=None, metadata={"help": "training epochs (default: the model's recipe)"})
    batch_size: int | None = field(default=None, metadata={"help": (
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
    val_every: int | None = field(default=None, metadata={"help": (
        "validate every N epochs and after the last (default: 5 for segmentation, 1 for classification)")})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, sampling, augmentation)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, bf16 or fp16 (mixed precision; fp16 on a GPU only; the scan stays float32)"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU); under torchrun: the LOCAL_RANK GPU"})
    scan_backend: str = field(default="auto", metadata={
        "help": "selective-scan implementation: auto, fused (CPU), chunked, triton, cuda, reference"})
    threads: int | None = field(default=None, metadata={"help": (
        "CPU threads for torch and the numba kernels (default: torch's, one per core); on a machine whose cores are "
        "busy with other work, fewer (e.g. 1) avoid threads waiting for each other")})
    num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    progress: bool = field(default=True, metadata={"help": "progress bars (one line per epoch is printed either way)"})

    def check_budget(self, *sets: str) -> None:
        """``--budget`` fits the options named in ``sets``: refuse them beside it."""
        given = [n for n in ("epochs", "val_every", *sets) if getattr(self, n) not in (None, 0)]
        if self.budget and given:
            raise ValueError("--budget fits the training length and the validation to the time: leave out "
                             + ", ".join("--" + n.replace("_", "-") for n in given))

    def resolve_recipe(self, card: ModelCard) -> Recipe:
        """The recipe to train with: ``--recipe``'s or the card's, with the options that were given."""
        base = card.recipe if self.recipe is None else named_recipe(self.recipe)
        return base.with_overrides(**{k: getattr(self, k) for k in RECIPE_OPTIONS})


def named_recipe(name: str) -> Recipe:
    """A recipe by name: one of :data:`~medssm.nets.cards.RECIPES`, or a registered model's."""
    if name in RECIPES:
        return RECIPES[name]
    try:
        return get_model_card(name).recipe
    except ValueError:
        raise ValueError(f"--recipe: {name!r} is neither a named recipe ({', '.join(RECIPES)}) nor a registered "
                         "model") from None


def option_names(config_cls) -> list[str]:
    """The option names of a config dataclass, in order."""
    return [f.name for f in dataclasses.fields(config_cls)]
