"""The lung X-rays to a time budget, model after model: ``medssm train --budget``, ``medssm predict``
on the held-out fold (fold 0's ``val`` cases of ``RUN/splits.json``), ``medssm evaluate``; the Dice
against the target (LightM-UNet's paper: 96.17 on its own split, at 512²).

The runs train at the full 256² (``--target-spacing 1 1 --patch-size 256 256``: a given spacing
leaves the budget planner no coarser candidates). The first model gets ``--budget`` or, when less
time is left in ``--seconds``, what is left after an allowance for start-up, prediction and
evaluation; each later model runs only if the same budget (the first model's) still fits, its
allowance being what the first model's took beyond its budget. Each command has a time limit; the
JSON is rewritten after every model; with ``--archive`` the runs' small files (plan, budget, log,
splits, evaluation; no weights) go into one tar.gz.

    python benchmarks/lung_budget.py -d $MEDSSM_DATA/Dataset001_LungXray --work /tmp/lung --seconds 380
    python benchmarks/lung_budget.py -d ... --tiny      # tiny models at 64² on the CPU: a check of the script
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TARGET_DICE = 0.962  # LightM-UNet's paper: 96.17
ALLOWANCE_S = 55.0  # start-up, the budget's overrun, prediction and evaluation, until one model has measured it
SMALL_FILES = ("model.json", "config.json", "plan.json", "budget.json", "splits.json", "log.csv", "log.json",
               "curves.png", "checkpoints/best/model.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--data", required=True, help="the Dataset001_LungXray folder")
    parser.add_argument("--work", required=True, help="folder for the runs and predictions")
    parser.add_argument("--models", default="lightm_unet_2d,monai:UNet", help="comma-separated, in order")
    parser.add_argument("--budget", type=float, default=300.0, help="training budget of each model, seconds")
    parser.add_argument("--seconds", type=float, default=None, help="time this script may take in all")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--train-args", default="", help="more medssm train options, one string")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models at 64², CPU, 1 thread, 8 held-out cases: a check of the script")
    parser.add_argument("--json", default="benchmarks/results/lung_budget.json")
    parser.add_argument("--archive", default=None, help="tar.gz of the runs' small files")
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + (args.seconds if args.seconds else float("inf"))
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "medssm.cli"]
    resolution = ["--target-spacing", "4", "4", "--patch-size", "64", "64"] if args.tiny else \
        ["--target-spacing", "1", "1", "--patch-size", "256", "256"]
    machine = ["--device", "cpu", "--threads", "1"] if args.tiny else ["--device", args.device]
    names = {"lightm_unet_2d": "lightm_unet_2d_tiny"} if args.tiny else {}
    result = {"data": str(data), "target_dice": TARGET_DICE, "budget_asked_s": args.budget, "tiny": args.tiny,
              "precision": "fp32" if args.tiny else args.precision, "resolution": resolution, "models": []}

    def write() -> None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    def run(label: str, command: list[str], limit: float) -> dict:
        """Run ``command`` (its output goes straight through) for at most ``limit`` seconds."""
        print(f"\n$ {shlex.join(command)}    [limit {limit:.0f} s]", flush=True)
        began = time.monotonic()
        try:
            code = subprocess.run(command, timeout=max(1.0, limit)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        took = time.monotonic() - began
        print(f"[{label}: exit {code}, {took:.0f} s]", flush=True)
        return {"exit": code, "seconds": round(took, 1)}

    budget, allowance = None, ALLOWANCE_S
    for i, asked in enumerate(m for m in args.models.split(",") if m):
        name = names.get(asked, asked)
        entry = {"model": name}
        result["models"].append(entry)
        left = deadline - time.monotonic()
        if budget is None:  # the first model: the budget asked, or what is left
            budget = min(args.budget, left - allowance)
            if budget < (20 if args.tiny else 60):
                entry["skipped"] = f"{left:.0f} s left: too little for a budget run"
                print(f"\n{name}: skipped, {entry['skipped']}", flush=True)
                write()
                break
            if budget < args.budget:
                print(f"\n{name}: budget {budget:.0f} s instead of {args.budget:.0f} s ({left:.0f} s left)", flush=True)
        elif left < budget + allowance:
            entry["skipped"] = (f"{left:.0f} s left; the same budget ({budget:.0f} s) needs about "
                                f"{budget + allowance:.0f} s with prediction and evaluation")
            print(f"\n{name}: skipped, {entry['skipped']}", flush=True)
            write()
            continue
        tag = name.replace(":", "_")
        rundir, pred, evaluation = work / f"lung_{tag}", work / f"lung_{tag}_pred", work / f"lung_{tag}_eval"
        began = time.monotonic()
        train = [*cli, "train", "-d", str(data), "--model", name, "--budget", f"{budget:.0f}s", *machine,
                 "--precision", result["precision"], "-o", str(rundir), *resolution, "--no-progress",
                 *shlex.split(args.train_args)]
        if args.tiny:
            train.append("--over-budget")  # a busy CPU may not fit the minimum in a tiny budget
        entry.update(budget_s=round(budget), train=run("train", train, min(budget + allowance, deadline - time.monotonic())))
        try:
            cases = json.loads((rundir / "splits.json").read_text())[0]["val"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            entry["error"] = f"no fold 0 in {rundir / 'splits.json'}: {e}"
            write()
            continue
        cases = cases[:8] if args.tiny else cases
        entry["held_out_cases"] = len(cases)
        if (rundir / "checkpoints").is_dir():
            predict = [*cli, "predict", "-i", str(data / "imagesTr"), "-o", str(pred), "-m", str(rundir),
                       *machine, "--overwrite", "--no-progress", "--cases", *cases]
            entry["predict"] = run("predict", predict, deadline - time.monotonic())
            evaluate = [*cli, "evaluate", str(pred), str(data / "labelsTr"), "-o", str(evaluation),
                        "--no-overlays", "--overwrite", "--no-progress"]
            entry["evaluate"] = run("evaluate", evaluate, deadline - time.monotonic())
        for key, path in (("budget_plan", rundir / "budget.json"), ("plan", rundir / "plan.json")):
            try:
                entry[key] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        try:
            log = json.loads((rundir / "log.json").read_text())
            entry["epochs_run"] = len(log)
            entry["last_epoch"] = log[-1] if log else None
        except (OSError, ValueError, TypeError):
            pass
        try:
            mean = json.loads((evaluation / "summary.json").read_text())["mean"]
            entry.update(dice=mean["dice"], iou=mean["iou"], hd95=mean["hd95"], meets_target=mean["dice"] >= TARGET_DICE)
            print(f"\n{name}: held-out Dice {mean['dice']:.4f} on {len(cases)} cases (target >= {TARGET_DICE}: "
                  f"{'met' if entry['meets_target'] else 'not met'}), IoU {mean['iou']:.4f}, HD95 {mean['hd95']:.2f} px",
                  flush=True)
        except (OSError, ValueError, KeyError):
            entry["error"] = "no evaluation"
        entry["seconds"] = round(time.monotonic() - began, 1)
        if i == 0 and "dice" in entry:  # the next model's allowance: what this one took beyond its budget
            allowance = max(30.0, entry["seconds"] - budget + 15.0)
        write()
        if args.archive:
            archive(Path(args.archive), work)
    result["seconds"] = round(time.monotonic() - start, 1)
    write()
    print(f"written {args.json}")


def archive(path: Path, work: Path) -> None:
    """The small files of every run and evaluation under ``work`` into ``path`` (tar.gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = work / (path.name + ".tmp")  # not beside path: a half-written file there would be one file too many
    with tarfile.open(tmp, "w:gz") as tar:
        for rundir in sorted(work.glob("lung_*")):
            files = [rundir / f for f in SMALL_FILES] + [rundir / "summary.json", rundir / "metrics.csv"]
            for f in files:
                if f.is_file():
                    tar.add(f, arcname=str(f.relative_to(work)))
    shutil.copyfile(tmp, path)
    tmp.unlink()


if __name__ == "__main__":
    main()
