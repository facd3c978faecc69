"""The training log: one row per epoch, kept as CSV and JSON, and drawn as a PNG of the curves."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..figures import pyplot, save_figure
from ..files import atomic_path


class History:
    """Rows of metrics (``epoch`` first) saved to ``log.csv`` / ``log.json`` in ``run_dir``.

    With ``resume=True`` the rows already on disk are kept, up to and including ``resume_epoch``
    (rows past it were written after the checkpoint being resumed and are dropped).
    """

    def __init__(self, run_dir: str | os.PathLike, resume: bool = False, resume_epoch: int | None = None):
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []
        log = self.run_dir / "log.json"
        if resume and log.is_file():
            self.rows = [r for r in json.loads(log.read_text())
                         if resume_epoch is None or r.get("epoch", 0) <= resume_epoch]

    def log(self, **row) -> None:
        """Append a row and rewrite the CSV and JSON (each atomically)."""
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_path(self.run_dir / "log.csv") as tmp:
            tmp.write_text(buf.getvalue())
        with atomic_path(self.run_dir / "log.json") as tmp:
            tmp.write_text(json.dumps(self.rows, indent=1))

    def plot(self, path: str | os.PathLike | None = None, x: str = "epoch") -> Path:
        """Draw every numeric column against ``x``: losses on one panel, other metrics on another."""
        plt = pyplot()
        path = Path(path or self.run_dir / "curves.png")
        columns = [k for k in dict.fromkeys(k for r in self.rows for k in r)
                   if k != x and all(isinstance(r.get(k), (int, float)) for r in self.rows if k in r)]
        bookkeeping = ("lr", "time", "step", "nonfinite")  # columns that are not curves to look at
        columns = [c for c in columns if not any(word in c for word in bookkeeping)]
        groups = {"loss": [c for c in columns if "loss" in c], "metrics": [c for c in columns if "loss" not in c]}
        groups = {k: v for k, v in groups.items() if v}
        fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4), squeeze=False)
        for ax, (title, cols) in zip(axes[0], groups.items()):
            for c in cols:
                pts = [(r[x], r[c]) for r in self.rows if c in r and x in r]
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=c)
            ax.set_xlabel(x)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        return save_figure(fig, path)
