"""``medssm quickstart``: LightM-UNet 2D on the lung X-ray set, end to end on a CPU: train, predict the
whole held-out fold, evaluate, and write a report folder.

It does a fixed, known amount of work, the same on every machine: ``epochs`` x ``iterations_per_epoch``
steps of ``batch_size`` at the resolution below, validation on ``val_cases`` held-out cases after every
``val_every`` epochs, then prediction and evaluation of every case of the held-out fold. Before it
starts it times a training step and a prediction here and says how long the job will take
(``REFERENCE_MINUTES`` on an idle 2-core CPU); a slower or busier machine takes longer and says so,
it never trains less or evaluates fewer cases.

The recipe is medssm's short-run recipe (``--recipe short``: AdamW, cosine, Dice + CE, mirroring in
training and at prediction) at lr 2e-3, batch 16 at 64², bf16 where the CPU computes in it; not
LightM-UNet's official one (Adam 1e-4 for 100 x 250 steps, days on a CPU): see
docs/getting-started/quickstart.md for what was measured.

Output::

    OUT/run/            the training run (checkpoints, log.csv/json, curves.png, splits.json, plan.json)
    OUT/predictions/    label maps of the held-out cases (PNG, 256²)
    OUT/report/         report.html (the page to open), report.md, summary.json, metrics.csv, curves.png,
                        overlays/*.png, timings.json

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

import torch

from ..files import atomic_path
from ..metrics.html_report import write_html_report
from ..runs import has_checkpoint

LUNG = "Dataset001_LungXray"


@dataclasses.dataclass
class QuickstartConfig:
    """Train LightM-UNet 2D on the lung X-ray set, predict its whole held-out fold, evaluate, report."""

    data: str | None = dataclasses.field(default=None, metadata={"help": (
        f"the lung dataset folder, or the folder holding {LUNG} (default: $MEDSSM_DATA, else ../shared/data)")})
    out: str = dataclasses.field(default="runs/quickstart", metadata={"flags": ("-o", "--out"),
                                                                       "help": "output folder"})
    model: str = "lightm_unet_2d"
    recipe: str = dataclasses.field(default="short", metadata={"help": "the training recipe (see medssm train --recipe)"})
    epochs: int = 8
    iterations_per_epoch: int = 76
    target_spacing: float = dataclasses.field(default=4.0, metadata={
        "help": "preprocessing spacing (4: the 256² images at 64²; 2: at 128², a step about 2x slower)"})
    patch_size: int = 64
    batch_size: int = 16
    lr: float | None = dataclasses.field(default=2e-3, metadata={
        "help": "learning rate (None: the recipe's; 2e-3 learns faster than the short recipe's 1e-3 in 600 steps)"})
    augmentation: str | None = dataclasses.field(default=None, metadata={
        "help": "nnunet, mirror or none (default: the recipe's)"})
    fold: int = 0
    val_every: int = 4
    val_cases: int = dataclasses.field(default=16, metadata={
        "help": "held-out cases scored during training (the final evaluation uses the whole fold)"})
    precision: str = dataclasses.field(default="auto", metadata={
        "help": "auto (bf16 on a CPU with AVX512-BF16/AMX, else fp32), fp32, or bf16 (convolutions and GEMMs in "
                "bfloat16; the scan stays float32)"})
    seed: int = 0
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue an interrupted quickstart"})
    progress: bool = True


# What the default job takes on an idle 2-core CPU of the CI's kind (measured: see the docs page), and the
# options that decide that work.
REFERENCE_MINUTES = 12.6
WORKLOAD = ("model", "recipe", "epochs", "iterations_per_epoch", "target_spacing", "patch_size", "batch_size", "lr",
            "augmentation", "val_every", "val_cases")
# Real training steps against the timed one (sampling, augmentation, logging, checkpoints): measured
# 1.07-1.12 in runs of the default job on that machine.
PIPELINE_OVERHEAD = 1.12


def find_lung_data(data: str | None) -> Path:
    candidates = [Path(data)] if data else [Path(os.environ["MEDSSM_DATA"])] if os.environ.get("MEDSSM_DATA") \
        else [Path("../shared/data")]
    for c in candidates:
        for p in (c, c / LUNG):
            if (p / "dataset.json").is_file():
                return p
    raise FileNotFoundError(f"no {LUNG} under {candidates[0]}: pass --data or set MEDSSM_DATA")


def estimate_seconds(cfg: QuickstartConfig, held_out: int, mirror: bool) -> dict:
    """Seconds this machine will take, from a training step and a prediction timed now as the job
    takes them (the run's precision; the prediction mirrored when the recipe predicts so)."""
    from ..devices import autocast
    from ..engine.loop import call_seconds, time_step
    from ..engine.losses import make_loss
    from ..inference.sliding import sliding_window_probabilities
    from ..labels import LabelSet
    from ..nets.registry import build_for_data

    cpu, patch = torch.device("cpu"), (cfg.patch_size,) * 2
    model = build_for_data(cfg.model, spatial_dims=2, in_channels=1, num_classes=2, patch_size=patch)
    batch = torch.randn(cfg.batch_size, 1, *patch), torch.randint(0, 2, (cfg.batch_size, 1, *patch))
    lung = LabelSet({"background": 0, "lung": 1})
    step, _ = time_step(model, lambda: batch, make_loss("dice_ce", lung), cpu, cfg.precision)
    image = torch.randn(1, *patch)  # a preprocessed case is one patch at this resolution
    with autocast(cpu, cfg.precision):
        case = call_seconds(lambda: sliding_window_probabilities(model, image, patch, mirror=mirror))
    validations = -(-cfg.epochs // cfg.val_every)
    return {"s_per_step": step, "s_per_case": case,
            "train_s": cfg.epochs * cfg.iterations_per_epoch * step * PIPELINE_OVERHEAD
                       + validations * cfg.val_cases * case,
            "predict_and_evaluate_s": held_out * (case + 0.3)}  # + reading, resampling, writing, scoring, overlay


def quickstart(cfg: QuickstartConfig) -> Path:
    """Run the whole job; returns the report folder."""
    from ..data.segmentation.nnunet import NnUNetDataset
    from ..data.segmentation.splits import make_splits
    from ..devices import cpu_has_native_bf16
    from ..engine.options import named_recipe
    from ..engine.segmentation import TrainConfig, train
    from ..inference.segmentation import PredictConfig, predict
    from ..metrics.evaluate_segmentation import EvaluateConfig, evaluate

    t0 = time.perf_counter()
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision="bf16" if cpu_has_native_bf16() else "fp32")
    data = find_lung_data(cfg.data)
    out = Path(cfg.out)
    run, pred_dir, report = out / "run", out / "predictions", out / "report"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder (the quickstart's folder); choose another --out")
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --resume to continue it or choose another --out")
    dataset = NnUNetDataset(data)
    splits = make_splits(dataset.cases)  # the same splits train writes to run/splits.json
    held_out = splits[cfg.fold]["val"]
    estimate = estimate_seconds(cfg, len(held_out), named_recipe(cfg.recipe).mirror_tta)
    expected = (estimate["train_s"] + estimate["predict_and_evaluate_s"]) / 60
    plan_txt = (f"{cfg.epochs} epochs x {cfg.iterations_per_epoch} steps of batch {cfg.batch_size}, patch "
                f"{cfg.patch_size}² at target spacing {cfg.target_spacing}, recipe {cfg.recipe}, {cfg.precision}; "
                f"then all {len(held_out)} held-out cases predicted and evaluated")
    print(f"quickstart: {plan_txt}")
    default_job = all(getattr(cfg, f) == getattr(QuickstartConfig(), f) for f in WORKLOAD)
    slower = default_job and expected > 1.2 * REFERENCE_MINUTES
    print(f"quickstart: expected {expected:.0f} min on this machine ({estimate['s_per_step']:.2f} s a step, measured "
          "now" + (f"; the default job takes about {REFERENCE_MINUTES:.0f} min on an idle 2-core CPU" if default_job else "")
          + ")" + ("; this machine is slower or busier: the job takes longer, it does not do less" if slower else ""),
          flush=True)

    t_train = time.perf_counter()
    train(TrainConfig(data=str(data), out=str(run), model=cfg.model, recipe=cfg.recipe, fold=cfg.fold,
                      epochs=cfg.epochs, iterations_per_epoch=cfg.iterations_per_epoch, val_every=cfg.val_every,
                      val_cases=cfg.val_cases, patch_size=(cfg.patch_size,) * 2, batch_size=cfg.batch_size,
                      target_spacing=(cfg.target_spacing,) * 2, lr=cfg.lr,
                      augmentation=cfg.augmentation, precision=cfg.precision, seed=cfg.seed,
                      resume=cfg.resume and has_checkpoint(run), progress=cfg.progress))
    t_predict = time.perf_counter()
    predict(PredictConfig(input=str(data / "imagesTr"), output=str(pred_dir), model=str(run),
                          cases=tuple(held_out), overwrite=cfg.resume, progress=cfg.progress))
    t_eval = time.perf_counter()
    evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(data / "labelsTr"), out=str(report), cases=tuple(held_out),
                            images=str(data / "imagesTr"), overwrite=cfg.resume, progress=cfg.progress))
    t_end = time.perf_counter()

    timings = {"calibration_and_setup_s": t_train - t0, "train_s": t_predict - t_train,
               "predict_s": t_eval - t_predict, "evaluate_s": t_end - t_eval, "total_s": t_end - t0,
               "estimated": estimate, "expected_min": expected, "reference_min": REFERENCE_MINUTES,
               "epochs": cfg.epochs, "iterations_per_epoch": cfg.iterations_per_epoch,
               "held_out_cases": len(held_out), "torch_threads": torch.get_num_threads()}
    for name in ("curves.png", "log.csv"):
        with atomic_path(report / name) as tmp:
            shutil.copyfile(run / name, tmp)
    with atomic_path(report / "timings.json") as tmp:
        tmp.write_text(json.dumps(timings, indent=2))
    summary = json.loads((report / "summary.json").read_text())
    write_report(report, cfg, plan_txt, summary, timings, json.loads((run / "log.json").read_text()))
    print(f"quickstart done in {timings['total_s'] / 60:.1f} min (expected {expected:.0f}): held-out Dice "
          f"{summary['mean']['dice']:.4f} on all {summary['n_cases']} held-out cases; report in {report}")
    print(f"report: {write_html_report(report)}")
    return report


def write_report(report: Path, cfg: QuickstartConfig, plan_txt: str, summary: dict, timings: dict,
                 log: list[dict]) -> Path:
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    mean = summary["mean"]
    lines = [
        "# medssm quickstart report", "",
        f"`{cfg.model}` on the lung X-ray set, fold {cfg.fold}: {plan_txt}.", "",
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
