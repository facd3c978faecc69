"""A whole BraTS-sized case predicted on the CPU: SegMamba (random weights) on a synthetic 4 x 240 x 240 x 155
case (four MRI sequences, a brain of 1 mm voxels), sliding windows of 128³ with half overlap, as
``medssm predict`` runs it (``medssm.inference.segmentation.predict_case``: preprocessing, the Gaussian-
blended windows, the regions' sigmoids, back to the case's grid). Each row in its own process: time of
the case, number of windows, peak RSS of the process.

    python benchmarks/predict_case.py                                 # fp32 and bf16, without mirroring
    python benchmarks/predict_case.py --rows fp32 bf16 bf16-mirror     # and the 8 mirrorings in bf16
    python benchmarks/predict_case.py --shape 4 96 96 64 --patch 64    # a small check

Writes benchmarks/results/predict_case.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"fp32": dict(precision="fp32", mirror=False), "bf16": dict(precision="bf16", mirror=False),
        "fp32-mirror": dict(precision="fp32", mirror=True), "bf16-mirror": dict(precision="bf16", mirror=True),
        "bf16-float16-accumulator": dict(precision="bf16", mirror=False, accumulate="float16")}


def one_row(row: str, shape: list[int], patch: int, model: str, threads: int) -> dict:
    """Predict the case once in this process as ``row`` says; its time and the process's peak RSS."""
    import numpy as np
    import torch

    import medssm
    from medssm.data.io import Geometry
    from medssm.data.segmentation.plan import Plan
    from medssm.devices import keep_freed_memory, peak_memory
    from medssm.inference.segmentation import predict_case

    torch.set_num_threads(threads)
    keep_freed_memory()  # as the command line does
    settings = ROWS[row]
    c, *spatial = shape
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in spatial], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    image = (rng.normal(500, 80, (c, *spatial)) * brain).astype(np.float32)
    plan = Plan("synthetic", 3, c, 4, {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
                                       "enhancing tumour": 3}, {str(i): f"MR{i}" for i in range(c)}, ".nii.gz",
                ["ZScore"] * c, [True] * c, [{}] * c, [1.0] * 3, [1.0] * 3, list(spatial), [patch] * 3, 2,
                divisor=16, regions_class_order=[1, 2, 3])
    net = medssm.create_model(model, in_channels=c, out_channels=3).eval()
    geometry = Geometry((1.0,) * 3, (0.0,) * 3, tuple(map(tuple, np.eye(3))), tuple(spatial))
    start = time.perf_counter()
    probs = predict_case(net, plan, image, geometry, mirror=settings["mirror"], precision=settings["precision"],
                         accumulate=getattr(torch, settings.get("accumulate", "float32")))
    seconds = time.perf_counter() - start
    windows = int(np.prod([1 + max(0, -(-(s - patch) // (patch // 2))) for s in spatial]))
    return {"row": row, "shape": shape, "patch": patch, "model": model, "seconds": round(seconds, 1),
            "windows": windows, "passes": 8 if settings["mirror"] else 1, "peak_rss_gib": round(peak_memory() / 2**30, 2),
            "finite": bool(np.isfinite(probs).all()), "threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["fp32", "bf16"], choices=sorted(ROWS))
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 155, 240, 240], help="channels and spatial size")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--model", default="segmamba_3d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "predict_case.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one row in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_row(args.one, args.shape, args.patch, args.model, args.threads)))
        return 0
    results = []
    print(f"{args.model}: a {' x '.join(map(str, args.shape))} case, windows of {args.patch}³, {args.threads} threads",
          flush=True)
    print(f"{'row':<26}{'windows':>8}{'passes':>8}{'seconds':>10}{'peak RSS GiB':>14}", flush=True)
    for row in args.rows:
        proc = subprocess.run([sys.executable, __file__, "--one", row, "--shape", *map(str, args.shape), "--patch",
                               str(args.patch), "--model", args.model, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{row}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{row:<26}{r['windows']:>8}{r['passes']:>8}{r['seconds']:>10.1f}{r['peak_rss_gib']:>14.2f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
