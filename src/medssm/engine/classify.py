"""Train a classifier (``medssm train`` on a MedMNIST file, image folders or a CSV).

MedMamba's official recipe is the default: Adam at 1e-4, cross-entropy, random-resized crop and
horizontal flip, inputs normalised to [-1, 1], batch 32, 100 epochs. Options add AdamW, a cosine
schedule with warm-up, label smoothing, class weights, gradient clipping and a moving average of
the weights (``--ema``). The model (with ``--ema``: the average) is validated each epoch; the
one with the best validation AUC is the run's model (``RUN/model.safetensors`` + ``model.json``
with ``"task": "classification"``, its classes and input size), ``RUN/last/`` is the checkpoint to
resume from, and ``log.csv``/``log.json``/``curves.png`` record the epochs.

Examples:
    >>> cfg = ClassifierTrainConfig(data="pneumoniamnist", model="medmamba_t", out="runs/pneumonia",
    ...                             input_size=28, epochs=100)
    >>> train_classifier(cfg)           # CLI: medssm train --data pneumoniamnist.npz --out runs/pneumonia
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classification import ClassificationDataset, class_weights, open_classification_data
from ..metrics.classification import classification_metrics
from ..files import atomic_path
from ..nets.registry import create_model, save_model
from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .devices import autocast, check_precision, grad_scaler
from .ema import WeightAverage
from .history import History
from .train import train_step

__all__ = ["ClassifierTrainConfig", "train_classifier", "predict_proba"]


@dataclass
class ClassifierTrainConfig:
    """Train a classifier (MedMamba's recipe by default) on a MedMNIST .npz or name, image folders
    (root/{train,val,test}/{class}/*) or a CSV of path,label[,split]; keep the best by validation AUC."""

    data: str = field(metadata={"flags": ("-d", "--data"), "help": "a .npz file, a MedMNIST name (pneumoniamnist, breastmnist_64, ...), "
                                        "a folder with train/ (val/, test/) class folders, or a CSV of path,label"})
    out: str = field(default="runs/classify", metadata={"flags": ("-o", "--out"),
                                                        "help": "run folder (model, checkpoints, logs, curves)"})
    model: str = field(default="medmamba_t", metadata={"help": "registered model name (medssm.list_models())"})
    model_kwargs: str = field(default="{}", metadata={
        "help": "extra model arguments as JSON, e.g. '{\"d_state\": 8}'"})
    input_size: int | None = field(default=None, metadata={
        "help": "network input side in pixels/voxels (default: the data's own size; MedMamba's recipe uses 224)"})
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    optimizer: str = field(default="adam", metadata={"help": "adam (the recipe) or adamw"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (decoupled for adamw)"})
    schedule: str = field(default="constant", metadata={"help": "constant (the recipe) or cosine (per epoch)"})
    warmup_epochs: int = field(default=0, metadata={"help": "linear warm-up epochs before the schedule"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    class_weights: str = field(default="none", metadata={
        "help": "none, balanced (n / (K * count)) or comma-separated weights, one per class"})
    crop_scale: tuple[float, ...] = field(default=(0.08, 1.0), metadata={
        "help": "random-resized crop area range (the recipe: 0.08 1.0)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    vflip: bool = field(default=False, metadata={"help": "random vertical flips"})
    grad_clip: float = field(default=0.0, metadata={"help": "max gradient norm (0: off, as in the recipe)"})
    ema: float = field(default=0.0, metadata={
        "help": "decay of a moving average of the weights, e.g. 0.998 (0: off); validation, the best model "
                "and predictions then use the average"})
    drop_path: float | None = field(default=None, metadata={"help": "stochastic depth rate (MedMamba default 0.1)"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, augmentation, initialisation)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --data is a name (28, 64, 128, 224)"})
    data_root: str | None = field(default=None, metadata={
        "help": "folder of MedMNIST files for names (default $MEDSSM_DATA/medmnist)"})
    download: bool = field(default=False, metadata={"help": "download a missing MedMNIST file (MD5-checked)"})
    val_fraction: float = field(default=0.1, metadata={"help": "validation share when the data has no val split"})
    limit: int | None = field(default=None, metadata={
        "help": "use at most this many (seeded, stratified) samples of train and of val: quick runs"})
    max_steps: int | None = field(default=None, metadata={"help": "at most this many steps per epoch"})
    num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU); under torchrun: the LOCAL_RANK GPU"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, bf16 or fp16 (mixed precision; fp16 on a GPU only; the scan stays float32)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


@torch.no_grad()
def predict_proba(model: torch.nn.Module, dataset: ClassificationDataset, batch_size: int = 64,
                  device: torch.device | str = "cpu", progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Softmax probabilities ``(N, K)`` of ``model`` over ``dataset`` (in its order)."""
    from tqdm import tqdm

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=not progress):
        out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    return torch.cat(out).numpy().astype(np.float64)


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


def _lr_lambda(cfg: ClassifierTrainConfig):
    def factor(epoch: int) -> float:  # epoch: number of completed epochs
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.schedule == "cosine":
            t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0
    return factor


def train_classifier(cfg: ClassifierTrainConfig) -> Path:
    """Train as ``cfg`` says; returns the run folder. See the module docstring for what it writes."""
    from tqdm import tqdm

    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"--optimizer must be adam or adamw, got {cfg.optimizer!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"--schedule must be constant or cosine, got {cfg.schedule!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    out = Path(cfg.out)
    if not cfg.resume and ((out / "model.json").exists() or (out / "last").exists()):
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    if cfg.resume and not (out / "last").exists():
        raise FileNotFoundError(f"{out / 'last'}: no checkpoint to resume from")
    env, device = distributed.setup(cfg.device)  # one process, or one of torchrun's / srun's
    check_precision(cfg.precision, device)
    main = env.rank == 0
    _seed_all(cfg.seed)

    opts = dict(root=cfg.data_root, size=cfg.size, download=cfg.download, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_src = open_classification_data(cfg.data, "train", **opts)
    val_src = open_classification_data(cfg.data, "val", classes=train_src.classes, in_chans=train_src.in_chans, **opts)
    if not train_src.has_labels or not val_src.has_labels:
        raise ValueError(f"{cfg.data}: training needs a label for every train and val sample")
    train_src, val_src = _limit(train_src, cfg.limit, cfg.seed), _limit(val_src, cfg.limit, cfg.seed)
    classes, k = train_src.classes, len(train_src.classes)
    if k < 2:
        raise ValueError(f"{cfg.data}: found {k} class(es); classification needs at least 2")
    val_src.check_labels(k, "the training data")
    input_size = int(cfg.input_size or (train_src.native_size[0] if train_src.native_size else 224))

    kwargs = {"in_chans": train_src.in_chans, "num_classes": k}
    if train_src.spatial_dims == 3:
        kwargs["spatial_dims"] = 3
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        extra = json.loads(cfg.model_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs: not valid JSON ({e}): {cfg.model_kwargs!r}") from e
    if not isinstance(extra, dict):
        raise ValueError(f"--model-kwargs: expected a JSON object, got {cfg.model_kwargs!r}")
    kwargs.update(extra)
    model = create_model(cfg.model, **kwargs).to(device)
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    evaluated = ema.module if ema else model  # what is validated, kept and predicted with
    metadata = {
        "task": "classification", "classes": classes, "in_chans": train_src.in_chans,
        "spatial_dims": train_src.spatial_dims, "input_size": input_size, "normalize": {"mean": 0.5, "std": 0.5},
        "data": str(cfg.data), "train_samples": len(train_src), "val_samples": len(val_src),
    }

    train_ds = ClassificationDataset(train_src, input_size, train=True, crop_scale=cfg.crop_scale,
                                     hflip=cfg.hflip, vflip=cfg.vflip)
    val_ds = ClassificationDataset(val_src, input_size, train=False)
    sampler = distributed.data_sampler(train_ds, cfg.seed)  # --batch-size is the global batch
    loader = torch.utils.data.DataLoader(train_ds, batch_size=distributed.local_batch(cfg.batch_size),
                                         shuffle=sampler is None, sampler=sampler, drop_last=False,
                                         num_workers=cfg.num_workers)
    weights = _class_weights(cfg.class_weights, train_src.labels, k)
    criterion = torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                          label_smoothing=cfg.label_smoothing)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    scaler = grad_scaler(device, cfg.precision)

    start, best_auc, best_epoch = 1, -math.inf, 0
    if cfg.resume:
        state = load_checkpoint(out / "last", model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start = int(state["epoch"]) + 1
        best_auc, best_epoch = float(state["extra"]["best_auc"]), int(state["extra"]["best_epoch"])
        if ema:
            if "ema" not in state["extra"]:
                raise ValueError(f"{out / 'last'}: this run was trained without --ema; resume it without")
            ema.load_state_dict(state["extra"]["ema"])
        if main:
            print(f"resuming {out} after epoch {state['epoch']} (best val AUC {best_auc:.4f} at epoch {best_epoch})")
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        with atomic_path(out / "split.json") as tmp:
            tmp.write_text(json.dumps({"train": [train_src.name(i) for i in range(len(train_src))],
                                       "val": [val_src.name(i) for i in range(len(val_src))]}, indent=0))
    history = History(out, resume=cfg.resume, resume_epoch=start - 1)
    ddp_model = distributed.wrap(model, device)  # `model` itself is what is validated and saved
    if main:
        print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {k} classes {classes}, "
              f"{len(train_src)} train / {len(val_src)} val samples at {input_size}px on {device}"
              + (f" x {env.world_size} processes" if env.distributed else ""))

    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, seen, nonfinite = 0.0, 0, 0
        steps = len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps)
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and main))
        for step, (x, y, _) in enumerate(bar):
            if step >= steps:
                break
            loss = train_step(ddp_model, x, y, criterion, optimizer, None, cfg.grad_clip, device, cfg.precision, scaler)
            if ema:
                ema.update(model)
            if not math.isfinite(loss):
                nonfinite += 1
                continue
            total += loss * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if not main:  # rank 0 alone validates (the unwrapped model: no collective calls) and writes
            continue

        with autocast(device, cfg.precision):
            probs = predict_proba(evaluated, val_ds, batch_size=max(cfg.batch_size, 64), device=device,
                                  progress=cfg.progress, desc="validate")
        val_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                    torch.from_numpy(val_src.labels)))
        m = classification_metrics(val_src.labels, probs, classes)
        score = m["auc"] if not math.isnan(m["auc"]) else m["acc"]
        improved = score > best_auc
        if improved:
            best_auc, best_epoch = score, epoch
            save_model(evaluated, out, extra={**metadata, "best_epoch": epoch, "val_auc": m["auc"], "val_acc": m["acc"]})
        save_checkpoint(out / "last", model, epoch=epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        metadata=metadata, extra_state={"best_auc": best_auc, "best_epoch": best_epoch,
                                                        **({"ema": ema.state_dict()} if ema else {})})
        train_loss = total / seen if seen else math.nan
        history.log(epoch=epoch, train_loss=train_loss, nonfinite_steps=nonfinite, val_loss=val_loss, val_acc=m["acc"],
                    val_auc=m["auc"], val_f1=m["f1"], lr=lr, time_s=round(time.perf_counter() - t0, 2))
        history.plot()
        print(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
              f"val ACC {m['acc']:.4f}  val AUC {m['auc']:.4f}{'  *best*' if improved else ''}  "
              f"({time.perf_counter() - t0:.1f}s)")
    if main:
        print(f"done: best val AUC {best_auc:.4f} at epoch {best_epoch}; model in {out}")
    distributed.barrier()  # every rank returns once rank 0's files are written
    return out
