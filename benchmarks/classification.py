"""MedMamba on the MedMNIST v2 benchmark: PneumoniaMNIST and BreastMNIST, test ACC and AUC.

For each dataset: train on the official train split with ``medssm.engine.classification`` (MedMamba's
recipe: Adam 1e-4, cross-entropy, batch 32, random-resized crop + horizontal flip, inputs in
[-1, 1]), keep the epoch with the best validation AUC, predict the official test split with that
model and score it in the MedMNIST v2 convention (ACC at p > 0.5, AUC of the positive class).
Printed beside the published numbers (MedMNIST v2 paper; MedMamba's README).

Input size: 28 by default, the files' own resolution; the figures in docs/how-to/classification.md
were measured at 64 on the CPU and at 64, 128 and 224 on a GPU (``--input-size``: the 28 px images
upsampled). MedMamba-T patchifies by 4 and halves three times, so at 28 px its last stage sees one
token; at 64 it sees 2x2, for ~1.75x the CPU time of 28 (the recipe's 224 is ~12x more again: a
GPU's size). At these sizes the recipe's crop of 8-100 % of the area leaves crops of a few pixels, so
the benchmark crops 50-100 % (``--crop-scale``).

Every ``medssm train`` option for classification can be given (``--ema``, ``--drop-path``, ...);
the benchmark sets the data, the run folder, the seed (``--seeds``: one run each, and their mean and
standard deviation) and resuming itself.

    python benchmarks/classification.py                       # full: 100 epochs each
    python benchmarks/classification.py --datasets breastmnist --input-size 224 --optimizer adamw \
        --schedule cosine --ema 0.995 --epochs 50 --seeds 0 1 2 3 4    # the GPU table's best row
    python benchmarks/classification.py --epochs 1 --limit 256 --iterations-per-epoch 4   # a smoke run

prints a table and writes benchmarks/results/classification.json (and the runs under --runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "classification.json"

# test ACC, AUC as published
PUBLISHED = {
    "pneumoniamnist": {"Google AutoML Vision (MedMNIST v2)": (0.946, 0.991), "ResNet-18 (28) (MedMNIST v2)": (0.854, 0.944),
                       "ResNet-50 (224) (MedMNIST v2)": (0.884, 0.962), "MedMamba README": (0.899, 0.965)},
    "breastmnist": {"Google AutoML Vision (MedMNIST v2)": (0.861, 0.919), "ResNet-18 (28) (MedMNIST v2)": (0.863, 0.901),
                    "MedMamba README": (0.853, 0.825)},
}
TARGETS = {"pneumoniamnist": (0.90, 0.97), "breastmnist": (0.87, 0.92)}
# Training options the benchmark sets itself (per dataset, or with its own flags above).
BENCHMARK_OWNS = ("data", "out", "resume", "size", "data_root", "download", "progress", "seed")


def main(argv: list[str] | None = None) -> int:
    from medssm.cli import add_config_arguments
    from medssm.engine.classification import ClassifierTrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--root", default=None, help="MedMNIST folder (default $MEDSSM_DATA/medmnist, else ../shared/data/medmnist)")
    ap.add_argument("--size", type=int, default=28, help="which MedMNIST file: 28, 64, 128, 224")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table adds mean ± sd")
    ap.add_argument("--runs", default="runs/benchmark_classification", help="where the training runs go")
    ap.add_argument("--resume", action="store_true", help="continue runs already in --runs")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the JSON results file")
    training = ap.add_argument_group("training (medssm train's options; defaults: MedMamba's recipe, crops of 50-100 %%)")
    add_config_arguments(training, ClassifierTrainConfig, exclude=BENCHMARK_OWNS)
    ap.set_defaults(model="medmamba_t", input_size=None, epochs=ClassifierTrainConfig.epochs, crop_scale=(0.5, 1.0),
                    device="auto")  # read back below; the others take the config's defaults
    args = ap.parse_args(argv)
    import torch

    root = Path(args.root) if args.root else Path(os.environ.get(
        "MEDSSM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "medmnist"
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "torch_threads": getattr(args, "threads", None) or torch.get_num_threads(), "datasets": {}}
    t_all = time.perf_counter()
    for name in args.datasets:
        runs = []
        for seed in args.seeds:
            runs.append(train_and_test(args, name, seed, root))
            results["datasets"][name] = summarise(runs)
            results["wall_s"] = round(time.perf_counter() - t_all, 1)
            write_json(args.out, results)  # after every run: a long benchmark cut short keeps what it has

    print(f"\n{args.model} at {args.input_size or args.size}px (files of {args.size}px), {args.epochs} epochs, "
          f"best of validation AUC; test split; seeds {' '.join(map(str, args.seeds))}")
    print(f"{'dataset':<16} {'method':<38} {'ACC':>6} {'AUC':>6}")
    for name, r in results["datasets"].items():
        for run in r["runs"]:
            method = f"medssm {args.model}, seed {run['seed']}"
            print(f"{name:<16} {method:<38} {run['test_acc']:>6.3f} "
                  f"{run['test_auc']:>6.3f}   (best epoch {run['best_epoch']}, val AUC {run['val_auc']:.3f}, "
                  f"{run['wall_s']:.0f}s)")
        if len(r["runs"]) > 1:
            print(f"{'':<16} {'mean ± sd over seeds':<38} {r['test_acc_mean']:>6.3f} {r['test_auc_mean']:>6.3f}"
                  f"   (± {r['test_acc_sd']:.3f}, ± {r['test_auc_sd']:.3f})")
        ta, tu = TARGETS[name] if name in TARGETS else (float("nan"),) * 2
        print(f"{'':<16} {'target':<38} {ta:>6.3f} {tu:>6.3f}")
        for method, (acc, auc) in PUBLISHED.get(name, {}).items():
            print(f"{'':<16} {method:<38} {acc:>6.3f} {auc:>6.3f}")
    print(f"total wall time {results['wall_s']:.0f}s")
    print(f"-> {args.out}")
    return 0


def train_and_test(args: argparse.Namespace, name: str, seed: int, root: Path) -> dict:
    """Train one run, keep its best epoch by validation AUC, and score it on the test split."""
    from medssm.cli import config_from_args
    from medssm.engine.classification import ClassifierTrainConfig, train_classifier
    from medssm.files import read_json
    from medssm.inference.classification import ClassifierPredictConfig, predict_classifier
    from medssm.metrics.evaluate_classification import ClassifierEvaluateConfig, evaluate_classifier
    from medssm.runs import has_checkpoint, load_run

    t0 = time.perf_counter()
    run = Path(args.runs) / f"{name}_{args.model}_{args.input_size or args.size}_seed{seed}"
    cfg = config_from_args(ClassifierTrainConfig, argparse.Namespace(**{
        **vars(args), "data": name, "data_root": str(root), "out": str(run), "seed": seed,
        "resume": args.resume and has_checkpoint(run), "progress": not args.no_progress}))
    train_classifier(cfg)
    trained = load_run(run)
    meta, best = trained.description, read_json(trained.checkpoint("best") / "model.json")
    predictions = predict_classifier(ClassifierPredictConfig(
        model=str(run), input=name, split="test", size=args.size, data_root=str(root), output=str(run / "test_predictions.csv"),
        overwrite=True, device=args.device, batch_size=128, progress=not args.no_progress))
    m = evaluate_classifier(ClassifierEvaluateConfig(predictions=str(predictions), out=str(run / "test_evaluation"),
                                                     overwrite=True, progress=False))
    return {"seed": seed, "test_acc": m["acc"], "test_auc": m["auc"], "test_f1": m["f1"],
            "best_epoch": best["epoch"], "val_auc": best["val_auc"], "train_samples": meta["train_samples"],
            "test_samples": m["n"], "wall_s": round(time.perf_counter() - t0, 1), "run": str(run)}


def summarise(runs: list[dict]) -> dict:
    """The runs of one dataset with the mean and (sample) standard deviation of test ACC and AUC."""
    out = {"runs": runs}
    for key in ("test_acc", "test_auc"):
        values = [r[key] for r in runs]
        out[f"{key}_mean"] = statistics.mean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write_json(path: Path, results: dict) -> None:
    from medssm.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
