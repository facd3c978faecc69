"""A time budget on thin structures: ``medssm train --budget`` on DRIVE-like data (vessels 1-3 pixels
wide on 565x584 RGB images, made by ``tests/synthetic.py``), in a child process: how long the
planner's timing took (``calibration_s``), the whole run against its budget, the child's peak RSS,
the candidate chosen and the validation Dice. Run it alone on an idle machine.

    python benchmarks/budget_thin.py                         # LightM-UNet 2D, 4 minutes, 20 images
    python benchmarks/budget_thin.py --model monai:UNet --budget 2m
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lightm_unet_2d")
    parser.add_argument("--budget", default="4m")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--json", default=str(RESULTS / "budget_thin.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from medssm.devices import peak_memory
    from tests.synthetic import vessels_like

    with tempfile.TemporaryDirectory() as work:
        data = vessels_like(Path(work) / "Dataset010_Vessels", cases=args.cases)
        run = Path(work) / "run"
        command = [sys.executable, "-m", "medssm", "train", "-d", str(data), "--model", args.model, "--recipe", "short",
                   "--budget", args.budget, "--over-budget", "--no-progress", "-o", str(run)]
        print("running:", " ".join(command[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        budget = json.loads((run / "budget.json").read_text())
        log = json.loads((run / "log.json").read_text())
    row = {"model": args.model, "budget_s": budget["budget_s"], "calibration_s": budget["calibration_s"],
           "actual_s": budget["actual_s"], "wall_s": round(wall, 1),
           "peak_rss_bytes": peak_memory(children=True),
           "candidate": budget["candidate"], "samples": budget["samples"],
           "best_val_dice": max((r["val_dice"] for r in log if r.get("val_dice") is not None), default=None)}
    print(f"{row['model']}: budget {row['budget_s']:.0f} s, timing {row['calibration_s']:.0f} s "
          f"({row['calibration_s'] / row['budget_s']:.0%}), run {row['actual_s']:.0f} s (process {row['wall_s']:.0f} s), "
          f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, chose {row['candidate']}, val Dice {row['best_val_dice']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2))
    print("written", args.json)


if __name__ == "__main__":
    main()
