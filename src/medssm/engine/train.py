"""``medssm train``: segmentation training on an nnU-Net raw dataset, in one readable loop.

The steps: check the dataset (nothing is written if it fails) → plan → splits (sorted cases, seed,
5 folds, ``splits.json``) → preprocess once into a cache → sample patches (a third
foreground-oversampled) → augment (MONAI) → Dice + CE → the model's official optimiser, schedule and
clipping (overridable) → validation on the held-out fold every ``val_every`` epochs (sliding-window
Dice) → ``checkpoints/last`` every epoch, ``checkpoints/best`` on a better validation Dice.
``--resume`` continues from ``checkpoints/last`` exactly (weights, optimiser, schedule, random
generators, patch sampler), so a killed run ends with the same weights as an uninterrupted one.

Run folder::

    RUN/model.json            task, model name and arguments, plan, labels (what ``medssm predict -m RUN`` reads)
    RUN/plan.json, RUN/splits.json, RUN/config.json
    RUN/checkpoints/{best,last}/   model.safetensors + model.json + training_state.pt
    RUN/log.csv, RUN/log.json, RUN/curves.png
    RUN/preprocessed/         the preprocessing cache (``--cache`` to share one between runs)

Example:
    medssm train --data ../shared/data/Dataset001_LungXray --model lightm_unet_2d -o runs/lung --epochs 100
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..nets.registry import create_model
from . import distributed
from .devices import autocast, backward_and_step, check_precision, grad_scaler
from .schedules import Recipe, make_optimizer, make_scheduler, recipe_for

N_FOLDS = 5


@dataclasses.dataclass
class TrainConfig:
    """Train a segmentation model on an nnU-Net raw dataset (imagesTr/labelsTr/dataset.json)."""

    data: str = dataclasses.field(metadata={"flags": ("-d", "--data"), "help": (
        "nnU-Net raw dataset folder, or its name under $MEDSSM_DATA (e.g. Dataset001_LungXray)")})
    out: str | None = dataclasses.field(default=None, metadata={
        "flags": ("-o", "--out"), "help": "run folder (default: runs/DATASET_MODEL_foldF)"})
    model: str | None = dataclasses.field(default=None, metadata={"help": (
        "registered medssm model (medssm.list_models()) or monai:CLASS (e.g. monai:SegResNet); "
        "default lightm_unet_2d / lightm_unet_3d after the data")})
    model_kwargs: str = dataclasses.field(default="{}", metadata={
        "help": "extra model arguments as JSON, e.g. '{\"init_filters\": 16}'"})
    fold: int = dataclasses.field(default=0, metadata={"help": f"validation fold, 0..{N_FOLDS - 1}"})
    epochs: int = 100
    iterations_per_epoch: int = 250
    val_every: int = dataclasses.field(default=5, metadata={
        "help": "validate (sliding-window Dice on the held-out fold) every N epochs, and after the last"})
    val_cases: int = dataclasses.field(default=0, metadata={
        "help": "validate on the first N held-out cases only (0: all)"})
    patch_size: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"help": "override the plan's"})
    target_spacing: tuple[float, ...] | None = dataclasses.field(default=None, metadata={
        "help": "override the plan's (e.g. 2 2 halves a 1-spacing 2D set: faster on a CPU)"})
    batch_size: int | None = dataclasses.field(default=None, metadata={"help": "override the plan's"})
    optimizer: str | None = dataclasses.field(default=None, metadata={
        "help": "adam, adamw or sgd (default: the model's official recipe)"})
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str | None = dataclasses.field(default=None, metadata={"help": "poly, cosine or constant"})
    loss: str | None = dataclasses.field(default=None, metadata={"help": "dice_ce, ce or dice"})
    grad_clip: float | None = dataclasses.field(default=None, metadata={"help": "max gradient norm (0: off)"})
    augment: bool = dataclasses.field(default=True, metadata={"help": "MONAI training augmentation"})
    oversample_foreground: float = 1 / 3
    seed: int = 12345
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue RUN from checkpoints/last"})
    precision: str = dataclasses.field(default="fp32", metadata={
        "help": "fp32, bf16 or fp16 (mixed precision; fp16 on a GPU only; the scan stays float32)"})
    device: str = dataclasses.field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU); under torchrun: the LOCAL_RANK GPU"})
    num_workers: int = 0
    cache: str | None = dataclasses.field(default=None, metadata={
        "help": "preprocessing cache folder (default RUN/preprocessed)"})
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# Models: registered medssm networks and MONAI baselines, through one function.


def instantiate(name: str, kwargs: dict) -> torch.nn.Module:
    """Build ``name`` with ``kwargs``: a registered medssm model, or ``monai:CLASS`` from
    ``monai.networks.nets``. The model records ``medssm_config`` so checkpoints can rebuild it."""
    if name.startswith("monai:"):
        import monai.networks.nets as nets

        cls = getattr(nets, name.split(":", 1)[1], None)
        if cls is None or not isinstance(cls, type):
            raise ValueError(f"{name!r}: monai.networks.nets has no network {name.split(':', 1)[1]!r}")
        model = cls(**kwargs)
        model.medssm_config = {"name": name, "kwargs": dict(kwargs)}
        return model
    return create_model(name, **kwargs)


def build_model(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                kwargs: dict | None = None) -> torch.nn.Module:
    """The network for data of ``spatial_dims`` with ``in_channels`` and ``out_channels`` classes."""
    kwargs = dict(kwargs or {})
    if name.startswith("monai:"):
        kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels, **kwargs}
        return instantiate(name, kwargs)
    named_dims = re.search(r"_([23])d(_|$)", name)
    if named_dims and int(named_dims[1]) != spatial_dims:
        raise ValueError(f"model {name!r} is {named_dims[1]}D but the data are {spatial_dims}D; "
                         f"use the {spatial_dims}D form (e.g. {name.replace(named_dims[0][:3], f'_{spatial_dims}d')})")
    if not named_dims:
        kwargs.setdefault("spatial_dims", spatial_dims)
    return instantiate(name, {"in_channels": in_channels, "out_channels": out_channels, **kwargs})


def checkpoint_dir(run: str | os.PathLike, which: str = "best") -> Path:
    """A run's checkpoint folder: ``RUN/checkpoints/{which}`` (``best`` falls back to ``last``), or
    ``run`` itself when it holds ``model.safetensors``."""
    run = Path(run)
    if (run / "model.safetensors").is_file():
        return run
    for w in (which, "last") if which == "best" else (which,):
        d = run / "checkpoints" / w
        if (d / "model.safetensors").is_file():
            return d
    raise FileNotFoundError(f"{run}: no trained model here (looked for checkpoints/{which}/model.safetensors)")


def load_trained(run: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"):
    """``(model in eval mode, model.json metadata)`` of a trained run or checkpoint folder."""
    from safetensors.torch import load_file

    ckpt = checkpoint_dir(run, which)
    meta = json.loads((ckpt / "model.json").read_text())
    model = instantiate(meta["name"], meta.get("kwargs", {}))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# One optimisation step (device, precision and DDP helpers: medssm.engine.devices / .distributed).


def train_step(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn,
               optimizer: torch.optim.Optimizer, scheduler=None, grad_clip: float | None = 12.0,
               device: torch.device | str = "cpu", precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One update from this process's slice of the global batch (``image``, ``label``): forward
    under autocast unless fp32, the loss on the global batch (every rank's labels gathered), backward,
    gradient-norm clipping, optimiser and schedule step; returns the loss. A non-finite loss skips
    the update (and is returned, so the caller can count it)."""
    device = torch.device(device)
    image = image.to(device, non_blocking=True)
    label = distributed.all_gather(label.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = distributed.global_loss(loss_fn, model(image), label)
    if torch.isfinite(loss):
        backward_and_step(loss, model, optimizer, scaler, grad_clip)
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# Validation: sliding-window Dice on preprocessed held-out cases.


@torch.no_grad()
def validate(model: torch.nn.Module, cases: list[tuple[np.ndarray, np.ndarray]], patch_size, num_classes: int,
             device: torch.device | str = "cpu", progress: bool = False) -> list[float]:
    """Mean hard Dice per foreground class over ``cases`` (``(image (C,*S), label (*S))``, preprocessed)."""
    from tqdm import tqdm

    from ..inference.sliding import sliding_window_probabilities
    from ..metrics.segmentation import dice_per_class

    scores = []
    for image, label in tqdm(cases, desc="validate", unit="case", leave=False, disable=not progress):
        probs = sliding_window_probabilities(model, torch.as_tensor(image), patch_size, device=device)
        scores.append(dice_per_class(probs.argmax(0), torch.as_tensor(np.asarray(label)).reshape(probs.shape[1:]),
                                     num_classes))
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


def effective_recipe(cfg: TrainConfig, model_name: str) -> Recipe:
    """The model's official recipe with the config's overrides applied."""
    r = recipe_for(model_name)
    overrides = {k: getattr(cfg, k) for k in ("optimizer", "lr", "weight_decay", "momentum", "schedule", "loss",
                                              "grad_clip") if getattr(cfg, k) is not None}
    if overrides:
        r = dataclasses.replace(r, **overrides, source=r.source + f"; overridden: {overrides}")
    return r


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def _check_config(cfg: TrainConfig) -> dict:
    if not 0 <= cfg.fold < N_FOLDS:
        raise ValueError(f"fold must be 0..{N_FOLDS - 1}, got {cfg.fold}")
    if cfg.epochs < 1 or cfg.iterations_per_epoch < 1:
        raise ValueError("epochs and iterations_per_epoch must be at least 1")
    try:
        kwargs = json.loads(cfg.model_kwargs) if isinstance(cfg.model_kwargs, str) else dict(cfg.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs is not valid JSON ({e}): {cfg.model_kwargs!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {cfg.model_kwargs!r}")
    return kwargs


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns the run folder."""
    from tqdm import tqdm

    from ..data.nnunet import verify_dataset
    from ..data.plan import Plan, make_plan
    from ..data.preprocess import build_cache, load_cache
    from ..data.sampling import PatchSampler
    from ..data.splits import load_or_create_splits, make_splits
    from ..data.transforms import training_transforms
    from .checkpoint import load_checkpoint, save_checkpoint
    from .history import History
    from .losses import make_loss

    # 1. Check everything that can be checked before anything is written.
    model_kwargs = _check_config(cfg)
    env, device = distributed.setup(cfg.device)  # one process, or one of torchrun's / srun's
    check_precision(cfg.precision, device)
    main, progress = env.rank == 0, cfg.progress and env.rank == 0
    root = resolve_data(cfg.data)
    dataset = verify_dataset(root)  # DatasetError listing every bad case; nothing written yet
    model_name = cfg.model or f"lightm_unet_{dataset.spatial_dims}d"
    run = Path(cfg.out) if cfg.out else Path("runs") / f"{dataset.name}_{model_name.replace(':', '_')}_fold{cfg.fold}"
    last_dir = run / "checkpoints" / "last"
    if cfg.resume and not (last_dir / "model.json").is_file() and not (run / "checkpoints" / "last.old").is_dir():
        raise FileNotFoundError(f"{run}: nothing to resume (no checkpoints/last)")
    if not cfg.resume and (run / "checkpoints").exists():
        raise FileExistsError(f"{run} already holds a training run; pass --resume to continue it or choose "
                              f"another --out")
    recipe = effective_recipe(cfg, model_name)

    if cfg.resume:
        plan = Plan.load(run / "plan.json")
    else:
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in (
            ("patch_size", cfg.patch_size), ("batch_size", cfg.batch_size), ("target_spacing", cfg.target_spacing))
            if v}
        plan = make_plan(dataset, divisor=model_divisor(model_name), oversample_foreground=cfg.oversample_foreground,
                         **overrides)
    distributed.local_batch(plan.batch_size)  # refuse a global batch that does not split over the ranks
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(model_name, plan.spatial_dims, plan.num_channels, plan.num_classes, model_kwargs).to(device)
    if not (run / "splits.json").exists():
        make_splits(dataset.cases, N_FOLDS, seed=12345)  # too few cases for 5 folds: refuse before writing

    # 2. The run folder: plan, splits, config, model description.
    run.mkdir(parents=True, exist_ok=True)
    if main and not cfg.resume:
        plan.save(run / "plan.json")
    with distributed.main_first():  # rank 0 writes splits.json, the other ranks read it
        splits = load_or_create_splits(run / "splits.json", dataset.cases)
    train_cases, val_cases = list(splits[cfg.fold]["train"]), list(splits[cfg.fold]["val"])
    if cfg.val_cases > 0:
        val_cases = val_cases[: cfg.val_cases]
    labels = {k: v for k, v in dataset.labels.items() if k != "ignore"}
    metadata = {"task": "segmentation", "dataset": dataset.name, "labels": labels, "plan": _plan_dict(plan),
                "fold": cfg.fold, "recipe": dataclasses.asdict(recipe), "file_ending": dataset.file_ending,
                "channel_names": dataset.channel_names}
    if main:
        _write_json(run / "model.json", {**model.medssm_config, **metadata})
        _write_json(run / "config.json", dataclasses.asdict(cfg))

    # 3. Preprocess once; patches; augmentation; loss; optimiser; schedule.
    with distributed.main_first():  # rank 0 preprocesses, the other ranks find the cache built
        cache = load_cache(build_cache(dataset, plan, Path(cfg.cache) if cfg.cache else run / "preprocessed",
                                       progress=progress, cases=sorted({*train_cases, *val_cases})))
    sampler = PatchSampler(cache, train_cases, plan.patch_size, plan.batch_size,
                           oversample_foreground=plan.oversample_foreground, seed=cfg.seed)
    augment = training_transforms(plan.spatial_dims, plan.patch_size, seed=cfg.seed) if cfg.augment else None
    loss_fn = make_loss(recipe.loss)
    optimizer = make_optimizer(model.parameters(), recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=recipe.momentum, nesterov=recipe.nesterov)
    scheduler = make_scheduler(optimizer, recipe.schedule, total_steps=cfg.epochs * cfg.iterations_per_epoch)
    scaler = grad_scaler(device, cfg.precision)

    start_epoch, best = 0, -math.inf
    if cfg.resume:
        state = load_checkpoint(last_dir, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, extra = int(state["epoch"]), state["extra"]
        best = float(extra.get("best", -math.inf))
        sampler.load_state_dict(extra["sampler"])
        if augment is not None and "augment" in extra:
            augment.load_state_dict(extra["augment"])
        if main:
            print(f"resuming {run} after epoch {start_epoch}/{cfg.epochs}")
    history = History(run, resume=cfg.resume, resume_epoch=start_epoch)
    # Each rank validates every world_size-th held-out case; the means are then combined.
    val_data = [(cache[c]["image"], cache[c]["label"]) for c in val_cases[env.rank::env.world_size]]
    ddp_model = distributed.wrap(model, device)  # `model` itself is what is validated and saved

    # 4. The loop.
    batches = iter(sampler)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, losses = time.time(), []
        bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                   disable=not progress, leave=False)
        for _ in bar:  # every rank draws the global batch, then augments and learns from its slice
            batch = {k: distributed.shard(v) for k, v in next(batches).items() if k in ("image", "label")}
            if augment is not None:
                batch = augment(batch, first=env.rank * len(batch["image"]))
            losses.append(train_step(ddp_model, batch["image"], batch["label"], loss_fn, optimizer, scheduler,
                                     recipe.grad_clip, device, cfg.precision, scaler))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        finite = [v for v in losses if math.isfinite(v)]
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(finite)) if finite else math.nan,
               "lr": optimizer.param_groups[0]["lr"], "nonfinite_steps": len(losses) - len(finite)}
        is_last = epoch + 1 == cfg.epochs
        improved = False
        if val_cases and (is_last or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)):
            with autocast(device, cfg.precision):
                per_class = validate(model, val_data, plan.patch_size, plan.num_classes, device, progress)
            per_class = distributed.weighted_mean(per_class, len(val_data))
            row["val_dice"] = float(np.mean(per_class))
            names = [k for k, v in sorted(labels.items(), key=lambda kv: kv[1]) if v > 0]
            row.update({f"val_dice_{n}": d for n, d in zip(names, per_class)})
            improved = row["val_dice"] > best
            best = max(best, row["val_dice"])
        row["time_s"] = round(time.time() - t0, 2)
        extra = {"best": best, "sampler": sampler.state_dict(),
                 "augment": augment.state_dict() if augment is not None else {}}
        if not main:  # rank 0 alone writes checkpoints and logs
            continue
        ckpt_meta = {**metadata, "epoch": epoch + 1, "val_dice": row.get("val_dice"), "best_val_dice": best
                     if math.isfinite(best) else None}
        if improved:
            save_checkpoint(run / "checkpoints" / "best", model, epoch=epoch + 1, metadata=ckpt_meta)
        save_checkpoint(last_dir, model, epoch=epoch + 1, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        metadata=ckpt_meta, extra_state=extra)
        history.log(**row)
        history.plot()
        msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}"
        if "val_dice" in row:
            msg += f", val Dice {row['val_dice']:.4f}" + (" (best)" if improved else "")
        if cfg.progress:
            tqdm.write(msg + f" [{row['time_s']:.0f} s]")
    if main and not (run / "checkpoints" / "best").is_dir():  # no validation at all (e.g. no held-out cases)
        save_checkpoint(run / "checkpoints" / "best", model, epoch=cfg.epochs,
                        metadata={**metadata, "epoch": cfg.epochs})
    distributed.barrier()  # every rank returns once rank 0's checkpoints are written
    return run


# ----------------------------------------------------------------------------------------------
# Adapters to medssm.data.


def _plan_dict(plan) -> dict:
    return plan.to_dict() if hasattr(plan, "to_dict") else json.loads(json.dumps(dataclasses.asdict(plan), default=str))


def model_divisor(name: str) -> int:
    """What every patch axis must be divisible by: 2**(number of down-samplings) of the network."""
    return 16 if name.startswith("segmamba") else 8
