"""Segmentation benchmark: full training schedules through medssm's own pipeline, validation Dice
beside the published numbers, and wall time.

    python benchmarks/segmentation.py --data ../shared/data                 # both tasks, full schedules
    python benchmarks/segmentation.py --task lung --epochs 20 --iterations 250
    python benchmarks/segmentation.py --task hippocampus --skip-baseline

Each task trains the medssm model and a MONAI baseline (SegResNet) with the same pipeline (plan,
patches, augmentation, Dice + CE, sliding-window validation on fold 0 of the sorted-case splits);
the baseline is given the same wall time as the medssm model (its iterations are set from a timed
run of a few steps), so the comparison is per unit of compute. Results: a table on stdout and
``benchmarks/results/segmentation.json``.

Targets (issue 9): lung Dice ≥ 0.970 and above SegResNet's; hippocampus mean Dice ≥ 0.89.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PUBLISHED = {
    "lung": {"LightM-UNet (paper, 512²)": 0.9617, "SegResNet (paper, 512²)": 0.9597, "nnU-Net (paper, 512²)": 0.9613,
             "SegResNet 16 filters, 20 epochs, 256², flips only, 2-core CPU (issue)": 0.967},
    "hippocampus": {"nnU-Net 3D (MSD, mean of anterior 0.90 / posterior 0.89)": 0.895},
}
TASKS = {
    # name: dataset, medssm model, baseline, official-schedule epochs x iterations, target
    "lung": dict(dataset="Dataset001_LungXray", model="lightm_unet_2d", baseline="monai:SegResNet",
                 baseline_kwargs={"init_filters": 16}, patch=(256, 256), batch=4, target=0.970),
    "hippocampus": dict(dataset="Dataset002_Hippocampus", model="lightm_unet_3d", baseline="monai:SegResNet",
                        baseline_kwargs={"init_filters": 16}, patch=(40, 56, 40), batch=9, target=0.89),
}


def run_task(name: str, args) -> list[dict]:
    from medssm.data.segmentation.nnunet import NnUNetDataset
    from medssm.engine.quickstart import calibrate
    from medssm.nets import get_model_card
    from medssm.engine.segmentation import TrainConfig, train

    spec = TASKS[name]
    data = Path(args.data) / spec["dataset"]
    classes = NnUNetDataset(data).num_classes
    out = Path(args.out) / name
    rows = []
    base = dict(data=str(data), fold=0, epochs=args.epochs, val_every=args.val_every, patch_size=spec["patch"],
                batch_size=spec["batch"], progress=not args.no_progress, resume=args.resume)
    iterations = args.iterations
    t = time.perf_counter()
    run = train(TrainConfig(out=str(out / spec["model"]), model=spec["model"], iterations_per_epoch=iterations,
                            **base))
    wall = time.perf_counter() - t
    rows.append(_row(name, spec["model"], run, wall, spec["target"]))
    if not args.skip_baseline:
        # Same wall time: scale the baseline's iterations by the ratio of step times.
        recipe = get_model_card(spec["model"]).recipe  # the baseline gets the medssm model's optimiser
        ratio = (calibrate(spec["model"], spec["patch"], spec["batch"], classes=classes)["s_per_step"]
                 / calibrate(spec["baseline"], spec["patch"], spec["batch"], classes=classes,
                             model_kwargs=spec["baseline_kwargs"])["s_per_step"])
        t = time.perf_counter()
        run = train(TrainConfig(out=str(out / spec["baseline"].replace(":", "_")), model=spec["baseline"],
                                model_kwargs=json.dumps(spec["baseline_kwargs"]),
                                iterations_per_epoch=max(1, round(iterations * ratio)),
                                optimizer=recipe.optimizer, lr=args.lr or recipe.lr, weight_decay=recipe.weight_decay,
                                **base))
        rows.append(_row(name, spec["baseline"], run, time.perf_counter() - t, None,
                         note=f"same wall time: {round(iterations * ratio)} it/epoch, LightM-UNet's optimiser"))
    return rows


def _row(task: str, model: str, run: Path, wall: float, target, note: str = "") -> dict:
    log = json.loads((run / "log.json").read_text())
    dice = [r["val_dice"] for r in log if "val_dice" in r]
    return {"task": task, "model": model, "best_val_dice": max(dice) if dice else None,
            "last_val_dice": dice[-1] if dice else None, "epochs": log[-1]["epoch"], "wall_s": round(wall, 1),
            "target": target, "run": str(run), "note": note}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("MEDSSM_DATA", "../shared/data"))
    p.add_argument("--task", choices=[*TASKS, "all"], default="all")
    p.add_argument("--epochs", type=int, default=100, help="official: 100")
    p.add_argument("--iterations", type=int, default=250, help="per epoch; official: 250")
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="baseline lr (default LightM-UNet's 1e-4)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/segmentation")
    args = p.parse_args(argv)
    rows = []
    for task in (TASKS if args.task == "all" else [args.task]):
        rows += run_task(task, args)
    print(f"\n{'task':12} {'model':22} {'best val Dice':>13} {'target':>7} {'wall':>9}  note")
    for r in rows:
        best = f"{r['best_val_dice']:.4f}" if r["best_val_dice"] is not None else "n/a"
        target = f"{r['target']:.3f}" if r["target"] else ""
        print(f"{r['task']:12} {r['model']:22} {best:>13} {target:>7} {r['wall_s'] / 60:8.1f}m  {r['note']}")
    for task in {r["task"] for r in rows}:
        for k, v in PUBLISHED[task].items():
            print(f"{task:12} {k}: {v:.4f} (published)")
    out = Path("benchmarks/results/segmentation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "published": PUBLISHED, "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
