"""Score classification predictions (``medssm evaluate predictions.csv [-r DATA]``).

Reads a predictions CSV (from ``medssm predict``); the true labels come from its ``target``
column(s) or from ``--reference`` (a .npz, image folders or CSV, matched by path). Writes
``metrics.json`` (accuracy, AUC, macro F1, precision, sensitivity, specificity, per class and
averaged, in the MedMNIST v2 convention), ``confusion_matrix.png`` and ``roc.png``; for
multi-label predictions the same per finding, and ``roc.png`` with a curve per finding. Beside them
``cases.csv`` (every sample with its target and probabilities, in the predictions CSV format) and
``report.html`` (:mod:`.html_report`).

The CSV: ``path``, then ``label`` (index), ``label_name`` and ``target`` for one class per sample,
or ``findings`` (the findings over 0.5, ``;``-separated) and a ``target_<finding>`` per finding
(0/1) for multi-label; then one ``prob_<class or finding>`` column each. An empty target is unknown.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_path
from ..progress import stage
from .classification import (classification_metrics, format_metrics, plot_confusion_matrix, plot_roc, read_predictions,
                             write_predictions)
from .html_report import write_html_report

__all__ = ["ClassifierEvaluateConfig", "evaluate_classifier", "evaluate_predictions"]


@dataclass
class ClassifierEvaluateConfig:
    """Score a predictions CSV: ACC, AUC, F1, precision, sensitivity, specificity; confusion matrix and ROC PNGs."""

    predictions: str = field(metadata={"positional": True, "help": "predictions CSV written by medssm predict"})
    reference: str | None = field(default=None, metadata={
        "flags": ("-r", "--ref", "--reference"), "help": "labelled data (.npz, folders, CSV) when the CSV has no target column"})
    split: str = field(default="test", metadata={"help": "split of --reference"})
    out: str | None = field(default=None, metadata={
        "flags": ("-o", "--out"),
        "help": "folder for metrics.json and the PNGs (default: <predictions>_evaluation beside the CSV)"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --reference is a name"})
    data_root: str | None = field(default=None, metadata={"help": "folder of MedMNIST files for names"})
    allow_missing: bool = field(default=False, metadata={"help": (
        "score the samples of --reference that have a prediction, warn about the others and count them "
        "(default: a sample without prediction is an error)")})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing evaluation"})
    html: bool = field(default=True, metadata={
        "help": "write report.html: the metrics, confusion matrix, ROC curves and a sortable table of the samples"})
    progress: bool = field(default=True, metadata={"help": "print each stage and its time (on stderr)"})


def evaluate_predictions(y_true, probs, classes: Sequence[str], out: str | os.PathLike | None = None,
                         title: str = "", missing: int = 0, about: dict | None = None) -> dict:
    """Metrics of ``probs`` against ``y_true``; with ``out``, also metrics.json (with ``about``: what
    was evaluated) and the PNGs. ``missing``: the references without prediction (left out, counted in
    the metrics as ``n_missing``)."""
    m = {**classification_metrics(y_true, probs, classes), "n_missing": missing}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps({**m, **(about or {})}, indent=2))
        if "confusion_matrix" in m:  # one class per sample
            plot_confusion_matrix(m["confusion_matrix"], classes, out / "confusion_matrix.png", title=title)
        plot_roc(y_true, probs, classes, out / "roc.png", title=title)
    return m


def evaluate_classifier(cfg: ClassifierEvaluateConfig) -> dict:
    """Score the predictions CSV; returns the metrics. Every check comes before anything is written."""
    from ..data.classification import open_classification_data

    pred_path = Path(cfg.predictions)
    names, probs, targets, classes = read_predictions(pred_path)
    multi, missing = targets.ndim == 2, []
    if cfg.reference is not None:
        with stage(f"reading the labels of {cfg.reference} [{cfg.split}]", cfg.progress):
            ref = open_classification_data(cfg.reference, cfg.split, root=cfg.data_root, size=cfg.size,
                                           classes=classes, label_columns=classes if multi else None)
        ref.check_labels(len(classes), f"{pred_path} (its prob_ columns)")
        by_name = {ref.name(i): ref.labels[i] for i in range(len(ref))}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{pred_path}: {len(unknown)} predicted paths are not in {cfg.reference} [{cfg.split}], "
                             f"e.g. {unknown[0]!r}")
        missing = sorted(set(by_name) - set(names))
        if missing and not cfg.allow_missing:
            raise ValueError(f"{pred_path}: no prediction for {len(missing)} of {len(by_name)} samples of "
                             f"{cfg.reference} [{cfg.split}], e.g. {missing[0]!r}; predict them, or pass --allow-missing")
        targets = np.asarray([by_name[n] for n in names], dtype=np.int64)
    unknown_rows = (targets < 0).reshape(len(targets), -1).any(axis=1)
    if unknown_rows.any():
        raise ValueError(f"{pred_path}: {int(unknown_rows.sum())} rows have no target; give the labelled data "
                         "with --reference")
    if not multi and targets.max() >= len(classes):
        bad = int(np.flatnonzero(targets >= len(classes))[0])
        raise ValueError(f"{pred_path}, row for {names[bad]!r}: label {int(targets[bad])} is out of range for "
                         f"{len(classes)} classes")
    out = Path(cfg.out) if cfg.out else pred_path.with_name(pred_path.stem + "_evaluation")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder (the evaluation's folder); choose another --out")
    if (out / "metrics.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}: already holds an evaluation; pass --overwrite to replace it")
    if missing:
        print(f"warning: {len(missing)} samples of {cfg.reference} [{cfg.split}] have no prediction and are not "
              f"scored, e.g. {missing[0]!r}", file=sys.stderr)
    about = {"predictions": str(pred_path.resolve()), "reference": cfg.reference and str(cfg.reference),
             "split": cfg.split if cfg.reference else None,
             "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with stage("scoring and drawing the " + ("ROC curves" if multi else "confusion matrix and ROC curves"), cfg.progress):
        m = evaluate_predictions(targets, probs, classes, out, title=pred_path.stem, missing=len(missing),
                                 about=about)
        write_predictions(out / "cases.csv", names, probs, classes, targets)
    print(format_metrics(m))
    print(f"metrics.json, {'' if multi else 'confusion_matrix.png, '}roc.png, cases.csv -> {out}")
    if cfg.html:
        print(f"report: {write_html_report(out)}")
    return m
