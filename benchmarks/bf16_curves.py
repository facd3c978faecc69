"""bf16 against fp32 training of every 3D segmentation model on the hippocampus set: the same run (seed,
data, steps) in both precisions through ``medssm train``, the training loss of each epoch side by side,
and whether any step was not finite. On a CPU, bf16 autocast runs the convolutions and matrix products in
bfloat16 (where the CPU has AVX512-BF16 or AMX); the scan stays float32.

    python benchmarks/bf16_curves.py                                  # six models, 6 epochs x 10 steps
    python benchmarks/bf16_curves.py --models lightm_unet_3d monai:DynUNet --epochs 2 --steps 3   # a check

Writes benchmarks/results/bf16_curves.json and a PNG of the curves beside it; a model run again
replaces its row, the others' rows (of the same epochs, steps and batch) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"lightm_unet_3d": {}, "segmamba_3d": {}, "monai:SwinUNETR": {"feature_size": 24}, "monai:UNETR": {},
          "monai:SegResNet": {"init_filters": 16}, "monai:DynUNet": {}}
PATCH = (40, 56, 40)  # the hippocampus' median shape, rounded up to each model's size divisor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--data", default=str(Path(os.environ.get("MEDSSM_DATA", "../shared/data")) / "Dataset002_Hippocampus"))
    parser.add_argument("--json", type=Path, default=RESULTS / "bf16_curves.json")
    args = parser.parse_args()

    from medssm.engine.segmentation import TrainConfig, train
    from medssm.nets import get_model_card
    from medssm.runs import load_run

    setting = {"epochs": args.epochs, "steps": args.steps, "batch": args.batch_size}
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    results = [r for r in previous.get("results", []) if r["model"] not in args.models
               and {key: previous.get(key) for key in setting} == setting]
    print(f"{'model':<18}{'precision':<10}" + "".join(f"{'ep ' + str(e):>8}" for e in range(1, args.epochs + 1))
          + f"{'non-finite':>12}{'s':>8}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            divisor = get_model_card(name).size_divisor
            patch = tuple(-(-size // divisor) * divisor for size in PATCH)
            fixed = {"img_size": patch} if name == "monai:UNETR" else {}  # its position embeddings fix the input size
            kwargs = {**MODELS.get(name, {}), **fixed}
            curves = {}
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                run = train(TrainConfig(
                    data=args.data, out=f"{scratch}/{name.replace(':', '_')}_{precision}", model=name,
                    model_kwargs=json.dumps(kwargs), epochs=args.epochs, iterations_per_epoch=args.steps,
                    val_every=args.epochs, val_cases=4, batch_size=args.batch_size,
                    patch_size=patch, recipe="short", precision=precision, seed=0,
                    device="cpu", progress=False, cache=f"{scratch}/cache_{'x'.join(map(str, patch))}"))
                log = load_run(run).log
                curves[precision] = {"loss": [r["train_loss"] for r in log],
                                     "nonfinite": sum(r["nonfinite_steps"] for r in log),
                                     "seconds": round(time.perf_counter() - start, 1)}
                print(f"{name:<18}{precision:<10}" + "".join(f"{v:>8.4f}" for v in curves[precision]["loss"])
                      + f"{curves[precision]['nonfinite']:>12}{curves[precision]['seconds']:>8.0f}", flush=True)
            fp32, bf16 = curves["fp32"]["loss"], curves["bf16"]["loss"]
            gap = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
            results.append({"model": name, "kwargs": kwargs, **curves, "largest_relative_gap": gap})
            print(f"{'':<18}{'gap':<10}{gap:>8.1%} (largest relative difference of an epoch's loss)", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)  # after every model: a failed one keeps the rest
            args.json.write_text(json.dumps({**setting, "results": results}, indent=2))
    plot(results, args.json.with_suffix(".png"))
    print(f"-> {args.json}")
    return 0


def plot(results: list[dict], path: Path) -> None:
    from medssm.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), squeeze=False)
    for ax, r in zip(axes[0], results):
        for precision, style in (("fp32", "-o"), ("bf16", "--s")):
            ax.plot(range(1, len(r[precision]["loss"]) + 1), r[precision]["loss"], style, label=precision, ms=3)
        ax.set_title(r["model"], fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
