"""``medssm train`` for classification: a MedMNIST file, image folders or a CSV in, a trained run out.

The model's recipe is the default (MedMamba's: Adam at 1e-4, constant rate, cross-entropy, batch
32, 100 epochs), with random-resized crop and horizontal flip, inputs normalised to [-1, 1];
options add AdamW, a cosine schedule with warm-up, label smoothing, class weights, gradient
clipping and a moving average of the weights (``--ema``). The model (with ``--ema``: the average)
is validated each epoch, the samples shared out over the processes; the one with the best
validation AUC is ``checkpoints/best``. The run folder is laid out as :mod:`medssm.runs` describes.

Examples:
    >>> cfg = ClassifierTrainConfig(data="pneumoniamnist", model="medmamba_t", out="runs/pneumonia",
    ...                             input_size=28, epochs=100)
    >>> train_classifier(cfg)           # CLI: medssm train --data pneumoniamnist.npz --out runs/pneumonia
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classification import ClassificationDataset, class_weights, open_classification_data
from ..devices import autocast, check_precision, cpu_threads
from ..files import read_json, write_json
from ..inference.classification import predict_proba
from ..metrics.classification import classification_metrics
from ..nets.registry import build_for_data, get_model_card, parse_model_kwargs
from ..runs import claim_run, has_checkpoint, load_run, load_training_state, write_description
from ..ssm import use_backend
from . import distributed
from .ema import WeightAverage
from .budget import epoch_iterations
from .loop import EpochRecorder, grad_scaler, refit_budget, seed_everything, train_step, validation_due
from .options import TrainOptions
from .schedules import make_optimizer, make_scheduler

__all__ = ["ClassifierTrainConfig", "train_classifier"]

DEFAULT_MODEL = "medmamba_t"


@dataclass
class ClassifierTrainConfig(TrainOptions):
    """Train a classifier (the model's recipe by default) on a MedMNIST .npz or name, image folders
    (root/{train,val,test}/{class}/*) or a CSV of path,label[,split]; keep the best by validation AUC."""

    input_size: int | None = field(default=None, metadata={
        "help": "network input side in pixels/voxels (default: the data's own size; MedMamba's recipe uses 224)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    class_weights: str = field(default="none", metadata={
        "help": "none, balanced (n / (K * count)) or comma-separated weights, one per class"})
    crop_scale: tuple[float, ...] = field(default=(0.08, 1.0), metadata={
        "help": "random-resized crop area range (the recipe: 0.08 1.0)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    vflip: bool = field(default=False, metadata={"help": "random vertical flips"})
    ema: float = field(default=0.0, metadata={
        "help": "decay of a moving average of the weights, e.g. 0.998 (0: off); validation, the best model "
                "and predictions then use the average"})
    drop_path: float | None = field(default=None, metadata={"help": "stochastic depth rate (MedMamba default 0.1)"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --data is a name (28, 64, 128, 224)"})
    data_root: str | None = field(default=None, metadata={
        "help": "folder of MedMNIST files for names (default $MEDSSM_DATA/medmnist)"})
    download: bool = field(default=False, metadata={"help": "download a missing MedMNIST file (MD5-checked)"})
    val_fraction: float = field(default=0.1, metadata={"help": "validation share when the data has no val split"})
    limit: int | None = field(default=None, metadata={
        "help": "use at most this many (seeded, stratified) samples of train and of val: quick runs"})
    max_steps: int | None = field(default=None, metadata={"help": "at most this many steps per epoch"})


def _limit(source, n: int | None, seed: int):
    """At most about ``n`` samples, the same share of every class (at least one each), seeded."""
    if n is None or n >= len(source):
        return source
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c in np.unique(source.labels):
        group = rng.permutation(np.flatnonzero(source.labels == c))
        picked += group[: max(1, round(len(group) * n / len(source)))].tolist()
    return source.subset(sorted(picked))


def _class_weights(spec: str, labels: np.ndarray, k: int) -> torch.Tensor | None:
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return None
    if spec == "balanced":
        return class_weights(labels, k)
    try:
        w = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class-weights: expected none, balanced or {k} comma-separated numbers, got {spec!r}")
    if len(w) != k:
        raise ValueError(f"--class-weights: {len(w)} weights for {k} classes")
    return torch.tensor(w, dtype=torch.float32)


def fit_budget(cfg: ClassifierTrainConfig, new_model, train_src, val_src, input_size: int, batch_size: int,
               device):
    """The :class:`~medssm.engine.budget.BudgetPlan` that fits ``cfg.budget``: a real training step
    (data loading and augmentation included) and the validation of a sample, timed on this machine."""
    from .budget import Candidate, Timing, parse_duration, plan_budget

    budget_s = parse_duration(cfg.budget)

    def measure(candidate: Candidate) -> Timing:
        model = new_model()
        dataset = ClassificationDataset(train_src, input_size, train=True, crop_scale=cfg.crop_scale,
                                        hflip=cfg.hflip, vflip=cfg.vflip)
        draws = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=3 * candidate.batch_size)
        loader = iter(torch.utils.data.DataLoader(dataset, batch_size=candidate.batch_size, sampler=draws))
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        times = []
        for _ in range(3):  # the first step compiles the scan kernels: not counted
            t = time.perf_counter()
            x, y, _ = next(loader)
            train_step(model, x, y, torch.nn.CrossEntropyLoss(), optimizer, device=device)
            times.append(time.perf_counter() - t)
        few = torch.utils.data.Subset(ClassificationDataset(val_src, input_size), range(min(64, len(val_src))))
        t = time.perf_counter()
        predict_proba(model, few, batch_size=64, device=device)
        return Timing(min(times[1:]), (time.perf_counter() - t) / len(few))

    return plan_budget(budget_s, [Candidate(1.0, batch_size)], measure, held_out=len(val_src),
                       samples_per_epoch=len(train_src), over_budget=cfg.over_budget,
                       batch_multiple=distributed.world().world_size, keep_batch=bool(cfg.batch_size))


def validate(model: torch.nn.Module, dataset: ClassificationDataset, batch_size: int, device, precision: str,
             progress: bool) -> np.ndarray:
    """Probabilities ``(N, K)`` over ``dataset``, each process predicting its share of the samples."""
    share = distributed.split_work(range(len(dataset)))
    with autocast(device, precision):
        probs = predict_proba(model, torch.utils.data.Subset(dataset, share), batch_size=batch_size, device=device,
                              progress=progress, desc="validate") if share else np.zeros((0, 0))
    return np.asarray(distributed.gather_work(list(probs)))


def train_classifier(cfg: ClassifierTrainConfig) -> Path:
    """Train as ``cfg`` says; returns the run folder. See the module docstring for what it writes."""
    with use_backend(cfg.scan_backend), cpu_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: ClassifierTrainConfig) -> Path:
    model_name = cfg.model or DEFAULT_MODEL
    card = get_model_card(model_name)
    if card.task != "classification":
        raise ValueError(f"{model_name} is a {card.task} model; {cfg.data} is a classification dataset")
    recipe = cfg.resolve_recipe(card)
    if recipe.optimizer not in ("adam", "adamw", "sgd") or recipe.epochs < 1 or (recipe.batch_size or 1) < 1:
        raise ValueError(f"--optimizer must be adam, adamw or sgd and --epochs, --batch-size at least 1 (got "
                         f"{recipe.optimizer}, {recipe.epochs}, {recipe.batch_size})")
    cfg.check_budget("max_steps")
    model_kwargs = parse_model_kwargs(cfg.model_kwargs)
    env, device = distributed.setup(cfg.device)  # one process, or one of torchrun's / srun's
    check_precision(cfg.precision, device)
    main = env.rank == 0

    opts = dict(root=cfg.data_root, size=cfg.size, download=cfg.download, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_src = open_classification_data(cfg.data, "train", **opts)
    val_src = open_classification_data(cfg.data, "val", classes=train_src.classes, in_chans=train_src.in_chans, **opts)
    if not train_src.has_labels or not val_src.has_labels:
        raise ValueError(f"{cfg.data}: training needs a label for every train and val sample")
    train_src, val_src = _limit(train_src, cfg.limit, cfg.seed), _limit(val_src, cfg.limit, cfg.seed)
    k = len(train_src.classes)
    if k < 2:
        raise ValueError(f"{cfg.data}: found {k} class(es); classification needs at least 2")
    val_src.check_labels(k, "the training data")
    run = Path(cfg.out) if cfg.out else Path("runs") / f"{Path(str(cfg.data)).stem}_{model_name.replace(':', '_')}"
    with claim_run(run) if main else contextlib.nullcontext():
        return _train_claimed(cfg, env, device, card, recipe, model_kwargs, train_src, val_src, run)


def _train_claimed(cfg, env, device, card, recipe, model_kwargs, train_src, val_src, run: Path) -> Path:
    from tqdm import tqdm

    started = time.perf_counter()
    main = env.rank == 0
    resuming = cfg.resume and has_checkpoint(run)
    if cfg.resume and not resuming and main:
        print(f"{run}: no complete checkpoint yet; starting from the beginning")
    if not cfg.resume and has_checkpoint(run):
        raise FileExistsError(f"{run}: already holds a run; pass --resume to continue it or choose another --out")
    classes, k = train_src.classes, len(train_src.classes)
    input_size = int(cfg.input_size or (train_src.native_size[0] if train_src.native_size else card.input_size[0]))
    if cfg.drop_path is not None:
        model_kwargs = {"drop_path_rate": cfg.drop_path, **model_kwargs}
    batch_size = recipe.batch_size or 32

    def new_model():
        return build_for_data(card.name, spatial_dims=train_src.spatial_dims, in_channels=train_src.in_chans,
                              num_classes=k, **model_kwargs).to(device)

    epochs, max_steps, val_every = recipe.epochs, cfg.max_steps, cfg.val_every or 1
    budget = read_json(run / "budget.json") if resuming and (run / "budget.json").is_file() else None
    if cfg.budget and not resuming:  # measured on rank 0 only, so that every rank trains the same plan
        fitted = fit_budget(cfg, new_model, train_src, val_src, input_size, batch_size, device) if main else None
        if main:
            print(fitted, flush=True)
        budget = distributed.broadcast(fitted.as_dict() if main else None)
    if budget:
        epochs, max_steps, val_every = budget["epochs"], budget["iterations_per_epoch"], budget["val_every"]
        batch_size = budget["candidate"]["batch_size"]
        val_src = _limit(val_src, budget["val_cases"] or None, cfg.seed)
        if resuming and "refit" in budget:
            started -= budget["refit"]["elapsed_s"]  # the time the interrupted run had spent counts
    seed_everything(cfg.seed)
    model = new_model()
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    evaluated = ema.module if ema else model  # what is validated, kept and predicted with
    metadata = {
        "task": "classification", "classes": classes, "in_chans": train_src.in_chans,
        "spatial_dims": train_src.spatial_dims, "input_size": input_size, "normalize": {"mean": 0.5, "std": 0.5},
        "data": str(cfg.data), "train_samples": len(train_src), "val_samples": len(val_src),
        "recipe": dataclasses.asdict(recipe), "device": device.type,
    }

    train_ds = ClassificationDataset(train_src, input_size, train=True, crop_scale=cfg.crop_scale,
                                     hflip=cfg.hflip, vflip=cfg.vflip)
    val_ds = ClassificationDataset(val_src, input_size, train=False)
    sampler = distributed.data_sampler(train_ds, cfg.seed)  # the batch size is the global batch
    loader = torch.utils.data.DataLoader(train_ds, batch_size=distributed.local_batch(batch_size),
                                         shuffle=sampler is None, sampler=sampler, drop_last=False,
                                         num_workers=cfg.num_workers)
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    weights = _class_weights(cfg.class_weights, train_src.labels, k)
    criterion = torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                          label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model.parameters(), recipe)
    scheduler = make_scheduler(optimizer, recipe.schedule, total_steps=epochs * steps,
                               warmup_steps=recipe.warmup_epochs * steps)
    scaler = grad_scaler(device, cfg.precision)

    start, best_auc, best_epoch = 0, -math.inf, 0
    if resuming:
        last = load_run(run).load_weights(model, "last")
        state = load_training_state(last, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start = int(state["epoch"])
        best_auc, best_epoch = float(state["extra"]["best_auc"]), int(state["extra"]["best_epoch"])
        if ema:
            if "ema" not in state["extra"]:
                raise ValueError(f"{last}: this run was trained without --ema; resume it without")
            ema.load_state_dict(state["extra"]["ema"])
        if main:
            print(f"resuming {run} after epoch {start} (best val AUC {best_auc:.4f} at epoch {best_epoch})")
    elif main:
        write_description(run, model, metadata)
        write_json(run / "config.json", dataclasses.asdict(cfg), default=str)
        write_json(run / "splits.json", {"train": [train_src.name(i) for i in range(len(train_src))],
                                         "val": [val_src.name(i) for i in range(len(val_src))]})
        if budget:
            write_json(run / "budget.json", budget, default=str)
    recorder = EpochRecorder(run, metadata, resume_epoch=start if cfg.resume else None, main=main, score="val_auc")
    ddp_model = distributed.wrap(model, device)  # `model` itself is what is validated and saved
    if main:
        print(f"{card.name}: {sum(p.numel() for p in model.parameters()):,} parameters, {k} classes {classes}, "
              f"{len(train_src)} train / {len(val_src)} val samples at {input_size}px on {device}"
              + (f" x {env.world_size} processes" if env.distributed else ""))

    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, seen, nonfinite = 0.0, 0, 0
        epoch_steps = min(len(loader), epoch_iterations(budget, epoch)) if budget else steps
        bar = tqdm(loader, total=epoch_steps, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=not (cfg.progress and main))
        for step, (x, y, _) in enumerate(bar):
            if step >= epoch_steps:
                break
            loss = train_step(ddp_model, x, y, criterion, optimizer, scheduler, recipe.grad_clip, device,
                              cfg.precision, scaler)
            if ema:
                ema.update(model)
            if not math.isfinite(loss):
                nonfinite += 1
                continue
            total += loss * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        train_s = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": total / seen if seen else math.nan, "nonfinite_steps": nonfinite,
               "lr": optimizer.param_groups[0]["lr"]}
        improved = False
        if validation_due(epoch, epochs, val_every):
            probs = validate(evaluated, val_ds, max(batch_size, 64), device, cfg.precision, cfg.progress and main)
            m = classification_metrics(val_src.labels, probs, classes)
            row.update(val_loss=float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                                 torch.from_numpy(val_src.labels))),
                       val_acc=m["acc"], val_auc=m["auc"], val_f1=m["f1"])
            score = m["auc"] if not math.isnan(m["auc"]) else m["acc"]
            improved = score > best_auc
            if improved:
                best_auc, best_epoch = score, epoch
        row["time_s"] = round(time.perf_counter() - t0, 2)
        if budget and epoch < epochs:  # before `last` is written: it keeps the refitted schedule
            budget = refit_budget(run, budget, scheduler, epoch=epoch, step_s=train_s / epoch_steps,
                                  elapsed_s=time.perf_counter() - started, most=len(loader), held_out=len(val_src),
                                  validation_s=row["time_s"] - train_s if "val_auc" in row else None, main=main)
        recorder.end_epoch(row, epochs, improved, model, evaluated, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, extra_state={"best_auc": best_auc, "best_epoch": best_epoch,
                                                       **({"ema": ema.state_dict()} if ema else {})})
    if budget and main:
        write_json(run / "budget.json", {**budget, "actual_s": round(time.perf_counter() - started, 1)}, default=str)
    return recorder.finish(evaluated, epochs)
