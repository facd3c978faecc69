"""The plain CNN loop that ``medssm compare`` must not fall behind: MONAI SegResNet(init_filters=16) on
the lung X-rays, written as a user would without medssm.

Fold 0 of the sorted 5-fold split (the same cases ``medssm compare`` holds out), full 256² images
scaled to [0, 1] and standardised with the training set's mean and std, random flips of both axes,
batch 8, AdamW 1e-3, Dice + cross-entropy (MONAI's), for a wall-clock budget (the step in progress
when it runs out is finished). Then the held-out Dice of the last weights, scored with the same
per-case Dice as ``medssm evaluate``. Prints a table and writes ``benchmarks/results/plain_loop.json``.

    python benchmarks/plain_loop.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def load(folder: Path, cases: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 256, 256) float32 in [0, 1] and labels (N, 1, 256, 256) int64 of ``cases``."""
    from PIL import Image

    images = np.stack([np.asarray(Image.open(folder / "imagesTr" / f"{c}_0000.png"), np.float32) / 255 for c in cases])
    labels = np.stack([np.asarray(Image.open(folder / "labelsTr" / f"{c}.png"), np.int64) for c in cases])
    return images[:, None], labels[:, None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("MEDSSM_DATA", "../shared/data"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/plain_loop.json")
    args = parser.parse_args()

    from monai.losses import DiceCELoss
    from monai.networks.nets import SegResNet

    from medssm.data.segmentation.splits import make_splits
    from medssm.metrics.segmentation import case_metrics

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root = Path(args.data) / "Dataset001_LungXray"
    cases = sorted(p.name[: -len("_0000.png")] for p in (root / "imagesTr").glob("*_0000.png"))
    fold = make_splits(cases)[0]
    x_train, y_train = load(root, fold["train"])
    x_val, y_val = load(root, fold["val"])
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std

    model = SegResNet(spatial_dims=2, init_filters=16, in_channels=1, out_channels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    budget, start, steps, epochs = 60 * args.minutes, time.perf_counter(), 0, 0
    while time.perf_counter() - start < budget:
        epochs += 1
        order = rng.permutation(len(x_train))
        for first in range(0, len(order) - 7, 8):
            idx = order[first:first + 8]
            x, y = torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx])
            for axis in (2, 3):  # random flips of each axis, per sample
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                x[flip], y[flip] = x[flip].flip(axis), y[flip].flip(axis)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= budget:
                break
    train_s = time.perf_counter() - start

    model.eval()
    dice = []
    with torch.no_grad():
        for i in range(len(x_val)):
            pred = model(torch.from_numpy(x_val[i:i + 1])).argmax(1)[0].numpy()
            dice.append(case_metrics(pred, y_val[i, 0], {"lung": 1})["lung"]["dice"])
    result = {"model": "MONAI SegResNet(init_filters=16)", "recipe": "AdamW 1e-3, Dice+CE, flips, batch 8, 256^2",
              "minutes": args.minutes, "train_s": round(train_s, 1), "steps": steps, "epochs": epochs,
              "samples": 8 * steps, "held_out_cases": len(x_val), "held_out_dice": float(np.mean(dice)),
              "threads": args.threads, "machine": platform.processor() or platform.machine()}
    print(f"{'model':<34} {'steps':>6} {'samples':>8} {'train min':>9} {'held-out Dice':>13}")
    print(f"{result['model']:<34} {steps:>6} {8 * steps:>8} {train_s / 60:>9.1f} {result['held_out_dice']:>13.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
