"""``medssm quickstart``: LightM-UNet 2D on the lung X-ray set, end to end, in about 15 minutes on a
2-core CPU: train, predict the held-out fold, evaluate, and write a report folder.

What it does, so that it fits the time on any machine:

- the 256² X-rays are preprocessed at half resolution (target spacing 2 → 128², patch 128², batch 4);
  predictions are brought back to 256² and scored there;
- it first times a few training steps and one prediction on this machine, then sets the number of
  iterations (10 epochs; ``--epochs`` / ``--iterations-per-epoch`` fix them instead) so that
  training, the held-out predictions and the evaluation fit ``--minutes``;
- Adam at lr 1e-3 (LightM-UNet's official 1e-4 is for 100 × 250 iterations; a few hundred need a
  larger step), poly schedule, Dice + CE, clipping 12, nnU-Net augmentation — the official recipe
  otherwise.

Output::

    OUT/run/            the training run (checkpoints, log.csv/json, curves.png, splits.json, plan.json)
    OUT/predictions/    label maps of the held-out cases (PNG, 256²)
    OUT/report/         report.md, summary.json, metrics.csv, curves.png, overlays/*.png, timings.json

Example:
    medssm quickstart --data ../shared/data -o runs/quickstart
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_path

LUNG = "Dataset001_LungXray"


@dataclasses.dataclass
class QuickstartConfig:
    """Train LightM-UNet 2D on the lung X-ray set, predict its held-out fold, evaluate, report."""

    data: str | None = dataclasses.field(default=None, metadata={"help": (
        f"the lung dataset folder, or the folder holding {LUNG} (default: $MEDSSM_DATA, else ../shared/data)")})
    out: str = dataclasses.field(default="runs/quickstart", metadata={"flags": ("-o", "--out"),
                                                                       "help": "output folder"})
    model: str = "lightm_unet_2d"
    minutes: float = dataclasses.field(default=15.0, metadata={"help": "time budget for the whole job"})
    epochs: int = 10
    iterations_per_epoch: int | None = dataclasses.field(default=None, metadata={
        "help": "fix the iterations per epoch (default: as many as fit --minutes, measured on this machine)"})
    target_spacing: float = dataclasses.field(default=2.0, metadata={
        "help": "preprocessing spacing (2: the 256² images at 128²; 1: full resolution, ~4x slower)"})
    patch_size: int = 128
    batch_size: int = 4
    lr: float = 1e-3
    fold: int = 0
    val_cases: int = dataclasses.field(default=16, metadata={
        "help": "held-out cases scored during training (the final evaluation uses the whole fold)"})
    max_predict_cases: int = dataclasses.field(default=0, metadata={
        "help": "predict at most this many held-out cases (0: as many as fit the budget, up to all)"})
    seed: int = 12345
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue an interrupted quickstart"})
    progress: bool = True


def find_lung_data(data: str | None) -> Path:
    candidates = [Path(data)] if data else [Path(os.environ["MEDSSM_DATA"])] if os.environ.get("MEDSSM_DATA") \
        else [Path("../shared/data")]
    for c in candidates:
        for p in (c, c / LUNG):
            if (p / "dataset.json").is_file():
                return p
    raise FileNotFoundError(f"no {LUNG} under {candidates[0]}: pass --data or set MEDSSM_DATA")


def calibrate(model_name: str, patch: int | Sequence[int], batch: int, steps: int = 2, *, classes: int = 2,
              model_kwargs: dict | None = None) -> dict:
    """Seconds per training step and per prediction at this size, on this machine, now. An int
    ``patch`` is a square 2D patch; the input has one channel."""
    from ..nets.registry import build_for_data
    from .losses import make_loss

    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    model = build_for_data(model_name, spatial_dims=len(patch), in_channels=1, num_classes=classes, patch_size=patch,
                           **(model_kwargs or {}))
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = make_loss("dice_ce")
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, classes, (batch, 1, *patch))
    times = []
    for _ in range(steps + 1):  # the first step compiles kernels: not counted
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        model(x[:1])
        infer = time.perf_counter() - t
    return {"s_per_step": min(times[1:]), "s_per_prediction": infer}


def quickstart(cfg: QuickstartConfig) -> Path:
    """Run the whole job; returns the report folder."""
    from ..data.segmentation.nnunet import NnUNetDataset
    from ..data.segmentation.splits import make_splits
    from ..inference.segmentation import PredictConfig, predict
    from ..metrics.evaluate_segmentation import EvaluateConfig, evaluate
    from .segmentation import TrainConfig, train

    t0 = time.perf_counter()
    data = find_lung_data(cfg.data)
    out = Path(cfg.out)
    run, pred_dir, report = out / "run", out / "predictions", out / "report"
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --resume to continue it or choose another --out")
    dataset = NnUNetDataset(data)
    splits = make_splits(dataset.cases)  # the same splits train writes to run/splits.json
    held_out = splits[cfg.fold]["val"]
    budget = cfg.minutes * 60

    timing = calibrate(cfg.model, cfg.patch_size, cfg.batch_size)
    per_case = timing["s_per_prediction"] * 1.3 + 0.35  # + reading, resampling, writing; + evaluation, overlay
    n_predict = len(held_out)
    if cfg.max_predict_cases > 0:
        n_predict = min(n_predict, cfg.max_predict_cases)
    else:  # predictions and evaluation take at most a fifth of the budget
        n_predict = max(10, min(n_predict, int(0.2 * budget / per_case)))
    cases_to_predict = held_out[:n_predict]
    if cfg.iterations_per_epoch:
        iterations = cfg.iterations_per_epoch
    else:
        preprocess_s = 0.4 * len(dataset.cases)  # fingerprint + cache, first run only
        validation_s = 2 * cfg.val_cases * timing["s_per_prediction"] * 1.2
        left = budget - (time.perf_counter() - t0) - preprocess_s - validation_s - n_predict * per_case - 30
        iterations = max(1, int(left / (cfg.epochs * timing["s_per_step"] * 1.1)))
    plan_txt = (f"{cfg.epochs} epochs x {iterations} iterations, batch {cfg.batch_size}, patch {cfg.patch_size}², "
                f"target spacing {cfg.target_spacing}; measured {timing['s_per_step']:.2f} s/step, "
                f"{timing['s_per_prediction']:.2f} s/prediction; predicting {n_predict}/{len(held_out)} held-out cases")
    print(f"quickstart: {plan_txt}")

    t_train = time.perf_counter()
    train(TrainConfig(data=str(data), out=str(run), model=cfg.model, fold=cfg.fold, epochs=cfg.epochs,
                      iterations_per_epoch=iterations, val_every=max(1, cfg.epochs // 2), val_cases=cfg.val_cases,
                      patch_size=(cfg.patch_size,) * 2, batch_size=cfg.batch_size,
                      target_spacing=(cfg.target_spacing,) * 2, lr=cfg.lr, seed=cfg.seed,
                      resume=cfg.resume and (run / "checkpoints" / "last").is_dir(), progress=cfg.progress))
    t_predict = time.perf_counter()
    predict(PredictConfig(input=str(data / "imagesTr"), output=str(pred_dir), model=str(run),
                          cases=tuple(cases_to_predict), overwrite=cfg.resume, progress=cfg.progress))
    t_eval = time.perf_counter()
    evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(data / "labelsTr"), out=str(report),
                            images=str(data / "imagesTr"), overwrite=cfg.resume, progress=cfg.progress))
    t_end = time.perf_counter()

    timings = {"calibration_and_setup_s": t_train - t0, "train_s": t_predict - t_train,
               "predict_s": t_eval - t_predict, "evaluate_s": t_end - t_eval, "total_s": t_end - t0,
               "measured": timing, "epochs": cfg.epochs, "iterations_per_epoch": iterations,
               "predicted_cases": n_predict, "held_out_cases": len(held_out), "torch_threads": torch.get_num_threads()}
    for name in ("curves.png", "log.csv"):
        with atomic_path(report / name) as tmp:
            shutil.copyfile(run / name, tmp)
    with atomic_path(report / "timings.json") as tmp:
        tmp.write_text(json.dumps(timings, indent=2))
    summary = json.loads((report / "summary.json").read_text())
    write_report(report, cfg, plan_txt, summary, timings, json.loads((run / "log.json").read_text()))
    print(f"quickstart done in {timings['total_s'] / 60:.1f} min: held-out Dice {summary['mean']['dice']:.4f} "
          f"on {n_predict} cases; report in {report}")
    return report


def write_report(report: Path, cfg: QuickstartConfig, plan_txt: str, summary: dict, timings: dict,
                 log: list[dict]) -> Path:
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    mean = summary["mean"]
    lines = [
        "# medssm quickstart report", "",
        f"LightM-UNet 2D (`{cfg.model}`) on the lung X-ray set, fold {cfg.fold}. {plan_txt}.", "",
        "## Held-out fold", "",
        "| class | Dice | IoU | HD95 (px) | cases |", "|---|---|---|---|---|",
        *[f"| {c} | {fmt(m['dice'])} | {fmt(m['iou'])} | {fmt(m['hd95'])} | {m['n_cases']} |"
          for c, m in summary["per_class"].items()],
        f"| **mean** | {fmt(mean['dice'])} | {fmt(mean['iou'])} | {fmt(mean['hd95'])} | {summary['n_cases']} |", "",
        "Per case: `metrics.csv`. Overlays (image | reference | prediction): `overlays/`.", "",
        "## Training", "", "![curves](curves.png)", "",
        "| epoch | train loss | val Dice |", "|---|---|---|",
        *[f"| {r['epoch']} | {fmt(r.get('train_loss'))} | {fmt(r.get('val_dice'))} |" for r in log], "",
        "## Time", "",
        *[f"- {k[:-2].replace('_', ' ')}: {v / 60:.1f} min" for k, v in timings.items() if k.endswith("_s")], "",
        "A full run of the official recipe: `medssm train --data DATA/Dataset001_LungXray --model lightm_unet_2d` "
        "(100 epochs x 250 iterations at 256²).",
    ]
    with atomic_path(report / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return report / "report.md"
