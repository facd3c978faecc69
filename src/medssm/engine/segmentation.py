"""``medssm train`` for segmentation: an nnU-Net raw dataset in, a trained run out, in one readable loop.

The steps: check the dataset (nothing is written if it fails) → claim the run folder → plan →
splits (sorted cases, 5 folds, ``splits.json``) → preprocess once into a cache → sample patches (a
third foreground-oversampled) → augment (MONAI) → the model's recipe (optimiser, schedule, loss,
clipping: its card's, each value overridable) → validation on the held-out fold every
``val_every`` epochs (sliding-window Dice, the cases shared out over the processes) →
``checkpoints/last`` every epoch, ``checkpoints/best`` on a better validation Dice.
``--resume`` continues from ``checkpoints/last`` exactly (weights, optimiser, schedule, random
generators, patch sampler), so a killed run ends with the same weights as an uninterrupted one.
The run folder is laid out as :mod:`medssm.runs` describes (plus ``plan.json`` and the
preprocessing cache ``preprocessed/``).

Example:
    medssm train --data ../shared/data/Dataset001_LungXray --model lightm_unet_2d -o runs/lung --epochs 100
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..devices import autocast, check_precision, cpu_threads
from ..files import read_json, write_json
from ..inference.sliding import sliding_window_probabilities
from ..metrics.segmentation import dice_per_class
from ..nets.registry import build_for_data, get_model_card, parse_model_kwargs
from ..runs import claim_run, has_checkpoint, load_run, load_training_state, write_description
from ..ssm import use_backend
from . import distributed
from .budget import epoch_iterations
from .loop import EpochRecorder, grad_scaler, refit_budget, seed_everything, train_step, validation_due
from .options import TrainOptions
from .schedules import make_optimizer, make_scheduler

N_FOLDS = 5
DEFAULT_MODELS = {2: "lightm_unet_2d", 3: "lightm_unet_3d"}  # by the data's spatial dimensions


@dataclass
class TrainConfig(TrainOptions):
    """Train a segmentation model on an nnU-Net raw dataset (imagesTr/labelsTr/dataset.json)."""

    fold: int = field(default=0, metadata={"help": f"validation fold, 0..{N_FOLDS - 1}"})
    iterations_per_epoch: int | None = field(default=None, metadata={
        "help": "training steps per epoch (default: the recipe's, 250)"})
    val_cases: int = field(default=0, metadata={"help": "validate on the first N held-out cases only (0: all)"})
    patch_size: tuple[int, ...] | None = field(default=None, metadata={"help": "override the plan's"})
    target_spacing: tuple[float, ...] | None = field(default=None, metadata={
        "help": "override the plan's (e.g. 2 2 halves a 1-spacing 2D set: faster on a CPU)"})
    loss: str | None = field(default=None, metadata={"help": "dice_ce, ce or dice (default: the recipe's)"})
    augmentation: str | None = field(default=None, metadata={"help": (
        "nnunet (nnU-Net's set, MONAI transforms), mirror (flips only) or none (default: the recipe's)")})
    oversample_foreground: float = field(default=1 / 3, metadata={"help": "share of patches centred on foreground"})
    cache: str | None = field(default=None, metadata={"help": "preprocessing cache folder (default RUN/preprocessed)"})


# ----------------------------------------------------------------------------------------------
# Validation: sliding-window Dice on preprocessed held-out cases.


@torch.no_grad()
def validate(model: torch.nn.Module, cases: list[tuple[np.ndarray, np.ndarray]], patch_size, num_classes: int,
             device: torch.device | str = "cpu", progress: bool = False) -> list[float]:
    """Mean hard Dice per foreground class over ``cases`` (``(image (C,*S), label (*S))``, preprocessed),
    each process scoring its share of the cases."""
    from tqdm import tqdm

    scores = []
    for image, label in tqdm(distributed.split_work(cases), desc="validate", unit="case", leave=False,
                             disable=not progress):
        probs = sliding_window_probabilities(model, torch.as_tensor(image), patch_size, device=device)
        scores.append(dice_per_class(probs.argmax(0), torch.as_tensor(np.asarray(label)).reshape(probs.shape[1:]),
                                     num_classes))
    scores = distributed.gather_work(scores)
    return [float(v) for v in np.mean(scores, axis=0)] if scores else []


# ----------------------------------------------------------------------------------------------
# The run.


def resolve_data(data: str) -> Path:
    """A dataset folder, or a dataset name under $MEDSSM_DATA."""
    p = Path(data)
    if not p.is_dir() and os.environ.get("MEDSSM_DATA") and (Path(os.environ["MEDSSM_DATA"]) / data).is_dir():
        p = Path(os.environ["MEDSSM_DATA"]) / data
    if not p.is_dir():
        raise FileNotFoundError(f"{data}: no such dataset folder (nor under $MEDSSM_DATA)")
    return p


def fit_budget(cfg: TrainConfig, dataset, fingerprint, card, recipe, model_kwargs: dict, val_count: int, device):
    """The plan and the :class:`~medssm.engine.budget.BudgetPlan` that fit ``cfg.budget``: candidates
    at the dataset's resolution and at 1/2 and 1/4 of it (while the median image stays at least 4
    patches of the size divisor wide), each timed on this machine."""
    from ..data.segmentation.plan import make_plan
    from ..data.segmentation.preprocess import preprocess_case
    from .budget import Candidate, Timing, call_seconds, parse_duration, plan_budget, step_seconds
    from .losses import make_loss

    budget_s = parse_duration(cfg.budget)
    base = dict(divisor=card.size_divisor, oversample_foreground=cfg.oversample_foreground, fingerprint=fingerprint)
    plans = {1.0: make_plan(dataset, **base, **overrides_of(cfg))}
    full = plans[1.0]
    coarser_scales = () if cfg.target_spacing else (2.0, 4.0)  # a given spacing is kept
    for scale in coarser_scales:
        if min(full.median_shape) < 4 * scale * card.size_divisor:
            break
        patch = [max(card.size_divisor, round(p / scale / card.size_divisor) * card.size_divisor)
                 for p in full.patch_size]
        coarser = {**overrides_of(cfg), "target_spacing": [scale * s for s in full.target_spacing],
                   **({"patch_size": patch} if cfg.patch_size else {})}
        plans[scale] = make_plan(dataset, **base, **coarser)
    case = dataset.load_case(dataset.cases[0])
    preprocess_s = call_seconds(lambda: preprocess_case(case.image, case.geometry, full, case.label)) * len(dataset.cases)

    def measure(candidate: Candidate) -> Timing:
        plan = plans[candidate.scale]
        model = build_for_data(card.name, spatial_dims=plan.spatial_dims, in_channels=plan.num_channels,
                               num_classes=plan.num_classes, patch_size=plan.patch_size, **model_kwargs).to(device)
        x = torch.randn(candidate.batch_size, plan.num_channels, *plan.patch_size, device=device)
        y = torch.randint(0, plan.num_classes, (candidate.batch_size, 1, *plan.patch_size), device=device)
        step = step_seconds(model, x, y, make_loss(recipe.loss))
        image = torch.randn(plan.num_channels, *plan.median_shape)
        case_s = call_seconds(lambda: sliding_window_probabilities(model, image, plan.patch_size, device=device))
        return Timing(step, case_s, preprocess_s)

    candidates = [Candidate(scale, p.batch_size, tuple(p.patch_size)) for scale, p in plans.items()]
    fitted = plan_budget(budget_s, candidates, measure, held_out=val_count, over_budget=cfg.over_budget,
                         batch_multiple=distributed.world().world_size, keep_batch=bool(cfg.batch_size))
    return dataclasses.replace(plans[fitted.candidate.scale], batch_size=fitted.candidate.batch_size), fitted


def overrides_of(cfg: TrainConfig) -> dict:
    """The plan fields the options override."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (
        ("patch_size", cfg.patch_size), ("batch_size", cfg.batch_size), ("target_spacing", cfg.target_spacing)) if v}


def _check_config(cfg: TrainConfig) -> None:
    if not 0 <= cfg.fold < N_FOLDS:
        raise ValueError(f"--fold must be 0..{N_FOLDS - 1}, got {cfg.fold}")
    for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    cfg.check_budget("iterations_per_epoch", "val_cases")
    if cfg.augmentation not in (None, "nnunet", "mirror", "none"):
        raise ValueError(f"--augmentation must be nnunet, mirror or none, got {cfg.augmentation!r}")


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns the run folder."""
    with use_backend(cfg.scan_backend), cpu_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    from ..data.segmentation.nnunet import verify_dataset
    from ..data.segmentation.splits import make_splits

    # 1. Check everything that can be checked before anything is written.
    _check_config(cfg)
    model_kwargs = parse_model_kwargs(cfg.model_kwargs)
    env, device = distributed.setup(cfg.device)  # one process, or one of torchrun's / srun's
    check_precision(cfg.precision, device)
    root = resolve_data(cfg.data)
    dataset = verify_dataset(root)  # DatasetError listing every bad case; nothing written yet
    model_name = cfg.model or DEFAULT_MODELS[dataset.spatial_dims]
    card = get_model_card(model_name)
    if card.task != "segmentation":
        raise ValueError(f"{model_name} is a {card.task} model; {root} is a segmentation dataset")
    if dataset.spatial_dims not in card.spatial_dims:
        raise ValueError(f"{model_name} takes {'/'.join(f'{d}D' for d in card.spatial_dims)} input; {root} is "
                         f"{dataset.spatial_dims}D (try {DEFAULT_MODELS[dataset.spatial_dims]})")
    run = Path(cfg.out) if cfg.out else Path("runs") / f"{dataset.name}_{model_name.replace(':', '_')}_fold{cfg.fold}"
    if not (run / "splits.json").exists():
        make_splits(dataset.cases, N_FOLDS, seed=12345)  # too few cases for 5 folds: refuse before writing
    with claim_run(run) if env.rank == 0 else contextlib.nullcontext():
        return _train_claimed(cfg, env, device, dataset, card, model_kwargs, run)


def _train_claimed(cfg, env, device, dataset, card, model_kwargs, run: Path) -> Path:
    from tqdm import tqdm

    from ..data.segmentation.plan import Plan, make_plan, plan_dataset
    from ..data.segmentation.preprocess import build_cache, load_cache
    from ..data.segmentation.sampling import PatchSampler
    from ..data.segmentation.splits import load_or_create_splits, make_splits
    from ..data.segmentation.transforms import training_transforms
    from .losses import make_loss

    started = time.perf_counter()
    main = env.rank == 0
    progress = cfg.progress and main
    resuming = cfg.resume and has_checkpoint(run)
    if cfg.resume and not resuming and main:
        print(f"{run}: no complete checkpoint yet; starting from the beginning")
    if not cfg.resume and has_checkpoint(run):
        raise FileExistsError(f"{run} already holds a training run; pass --resume to continue it or choose another --out")
    recipe = cfg.resolve_recipe(card).with_overrides(loss=cfg.loss, augmentation=cfg.augmentation)
    epochs = recipe.epochs
    iterations = cfg.iterations_per_epoch or recipe.iterations_per_epoch or 250
    val_every = cfg.val_every or 5
    folds = (load_or_create_splits(run / "splits.json", dataset.cases) if (run / "splits.json").exists()
             else make_splits(dataset.cases, N_FOLDS, seed=12345))
    held_out = len(folds[cfg.fold]["val"])
    val_count = min(cfg.val_cases, held_out) if cfg.val_cases > 0 else held_out

    budget = None
    if resuming and (run / "plan.json").is_file():
        plan = Plan.load(run / "plan.json")
        budget = read_json(run / "budget.json") if (run / "budget.json").is_file() else None  # the same fit
    else:
        fingerprint = plan_dataset(dataset, progress=progress)
        if cfg.budget:  # measured on rank 0 only, so that every rank trains the same plan
            fitted = fit_budget(cfg, dataset, fingerprint, card, recipe, model_kwargs, val_count, device) if main else None
            if main:
                print(fitted[1], flush=True)
            plan_dict, budget = distributed.broadcast((fitted[0].to_dict(), fitted[1].as_dict()) if main else None)
            plan = Plan.from_dict(plan_dict)
        else:
            plan = make_plan(dataset, divisor=card.size_divisor, oversample_foreground=cfg.oversample_foreground,
                             fingerprint=fingerprint, **overrides_of(cfg))
    if budget:
        epochs, iterations, val_every = budget["epochs"], budget["iterations_per_epoch"], budget["val_every"]
        val_count = budget["val_cases"] or held_out
        if resuming and "refit" in budget:
            started -= budget["refit"]["elapsed_s"]  # the time the interrupted run had spent counts
    distributed.local_batch(plan.batch_size)  # refuse a global batch that does not split over the ranks
    seed_everything(cfg.seed)
    model = build_for_data(card.name, spatial_dims=plan.spatial_dims, in_channels=plan.num_channels,
                           num_classes=plan.num_classes, patch_size=plan.patch_size, **model_kwargs).to(device)

    # 2. The run folder: plan, splits, config, description.
    if main:
        plan.save(run / "plan.json")
    with distributed.main_first():  # rank 0 writes splits.json, the other ranks read it
        splits = load_or_create_splits(run / "splits.json", dataset.cases)
    train_cases, val_cases = list(splits[cfg.fold]["train"]), list(splits[cfg.fold]["val"])[:val_count]
    labels = {k: v for k, v in dataset.labels.items() if k != "ignore"}
    metadata = {"task": "segmentation", "dataset": dataset.name, "labels": labels, "plan": plan.to_dict(),
                "fold": cfg.fold, "recipe": dataclasses.asdict(recipe), "file_ending": dataset.file_ending,
                "channel_names": dataset.channel_names, "device": device.type}
    if main:
        write_description(run, model, metadata)
        write_json(run / "config.json", dataclasses.asdict(cfg), default=str)
        if budget:
            write_json(run / "budget.json", budget, default=str)

    # 3. Preprocess once; patches; augmentation; loss; optimiser; schedule.
    with distributed.main_first():  # rank 0 preprocesses, the other ranks find the cache built
        cache = load_cache(build_cache(dataset, plan, Path(cfg.cache) if cfg.cache else run / "preprocessed",
                                       progress=progress, cases=sorted({*train_cases, *val_cases})))
    sampler = PatchSampler(cache, train_cases, plan.patch_size, plan.batch_size,
                           oversample_foreground=plan.oversample_foreground, seed=cfg.seed)
    augment = (training_transforms(plan.spatial_dims, plan.patch_size, recipe.augmentation, seed=cfg.seed)
               if recipe.augmentation != "none" else None)
    loss_fn = make_loss(recipe.loss)
    optimizer = make_optimizer(model.parameters(), recipe)
    scheduler = make_scheduler(optimizer, recipe.schedule, total_steps=epochs * iterations,
                               warmup_steps=recipe.warmup_epochs * iterations)
    scaler = grad_scaler(device, cfg.precision)

    start_epoch, best = 0, -math.inf
    if resuming:
        last = load_run(run).load_weights(model, "last")
        state = load_training_state(last, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, extra = int(state["epoch"]), state["extra"]
        best = float(extra.get("best", -math.inf))
        sampler.load_state_dict(extra["sampler"])
        if augment is not None and "augment" in extra:
            augment.load_state_dict(extra["augment"])
        if main:
            print(f"resuming {run} after epoch {start_epoch}/{epochs}")
    recorder = EpochRecorder(run, metadata, resume_epoch=start_epoch if cfg.resume else None, main=main,
                             score="val_dice")
    val_data = [(cache[c]["image"], cache[c]["label"]) for c in val_cases]
    ddp_model = distributed.wrap(model, device)  # `model` itself is what is validated and saved

    # 4. The loop.
    batches = iter(sampler)
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        t0, losses = time.time(), []
        steps = epoch_iterations(budget, epoch) if budget else iterations
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", unit="it", disable=not progress, leave=False)
        for _ in bar:  # every rank draws the global batch, then augments and learns from its slice
            batch = {k: distributed.shard(v) for k, v in next(batches).items() if k in ("image", "label")}
            if augment is not None:
                batch = augment(batch, first=env.rank * len(batch["image"]))
            losses.append(train_step(ddp_model, batch["image"], batch["label"], loss_fn, optimizer, scheduler,
                                     recipe.grad_clip, device, cfg.precision, scaler))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        train_s = time.time() - t0
        finite = [v for v in losses if math.isfinite(v)]
        row = {"epoch": epoch, "train_loss": float(np.mean(finite)) if finite else math.nan,
               "lr": optimizer.param_groups[0]["lr"], "nonfinite_steps": len(losses) - len(finite)}
        improved = False
        if val_cases and validation_due(epoch, epochs, val_every):
            with autocast(device, cfg.precision):
                per_class = validate(model, val_data, plan.patch_size, plan.num_classes, device, progress)
            row["val_dice"] = float(np.mean(per_class))
            names = [k for k, v in sorted(labels.items(), key=lambda kv: kv[1]) if v > 0]
            row.update({f"val_dice_{n}": d for n, d in zip(names, per_class)})
            improved = row["val_dice"] > best
            best = max(best, row["val_dice"])
        row["time_s"] = round(time.time() - t0, 2)
        if budget and epoch < epochs:  # before `last` is written: it keeps the refitted schedule
            budget = refit_budget(run, budget, scheduler, epoch=epoch, step_s=train_s / steps,
                                  elapsed_s=time.perf_counter() - started,
                                  validation_s=row["time_s"] - train_s if "val_dice" in row else None,
                                  held_out=len(val_cases), main=main)
        recorder.end_epoch(row, epochs, improved, model, model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, extra_state={"best": best, "sampler": sampler.state_dict(),
                                                       "augment": augment.state_dict() if augment else {}})
    if budget and main:
        write_json(run / "budget.json", {**budget, "actual_s": round(time.perf_counter() - started, 1)}, default=str)
    return recorder.finish(model, epochs)
