"""Predict with a trained classifier (``medssm predict -m RUN -i DATA -o predictions.csv``).

The input can be a split of a MedMNIST ``.npz``, of image folders or of a CSV, a folder of images,
or one image or volume. Images are read with the model's channels (grey/RGB converted), resized to
its input size and normalised as in training. The CSV has one row per sample: ``path``, the
predicted ``label`` (index) and ``label_name``, the ``target`` index when the input is labelled,
and one ``prob_<class>`` column per class.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.classification import ClassificationDataset, open_classification_data
from ..metrics.classification import predict_labels
from ..files import atomic_path
from ..nets.registry import load_model

__all__ = ["ClassifierPredictConfig", "predict_classifier", "load_classifier", "write_predictions", "read_predictions"]


@dataclass
class ClassifierPredictConfig:
    """Predict classes and probabilities with a trained classification run; write a CSV."""

    run: str = field(metadata={"flags": ("-m", "--run"), "help": "the training run folder (or a saved model folder)"})
    input: str = field(metadata={"flags": ("-i", "--input"), "help": "a .npz or MedMNIST name, image folders, a CSV "
                                                                     "of path[,label], a folder of images, or one image"})
    output: str = field(default="predictions.csv", metadata={"flags": ("-o", "--output"),
                                                             "help": "the CSV to write (a folder: FOLDER/predictions.csv)"})
    split: str = field(default="test", metadata={"help": "split of a .npz, folder tree or CSV with splits"})
    batch_size: int = field(default=64, metadata={"help": "samples per forward pass"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --input is a name"})
    data_root: str | None = field(default=None, metadata={"help": "folder of MedMNIST files for names"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda ... (auto: cuda if available)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def load_classifier(run: str | os.PathLike, device: str = "cpu"):
    """(model, metadata) of a classification run: its best model (``RUN/model.json``), or a
    checkpoint folder such as ``RUN/last``."""
    run = Path(run)
    if not (run / "model.json").is_file():
        raise FileNotFoundError(f"{run / 'model.json'}: missing; not a trained run or saved model folder")
    meta = json.loads((run / "model.json").read_text())
    if meta.get("task") != "classification":
        raise ValueError(f"{run}: model.json says task {meta.get('task')!r}, not a classification run")
    for key in ("classes", "input_size"):
        if key not in meta:
            raise ValueError(f"{run / 'model.json'}: missing {key!r}")
    return load_model(run, device=device).eval(), meta


def write_predictions(path: str | os.PathLike, names: list[str], probs: np.ndarray, classes: list[str],
                      targets: np.ndarray | None = None) -> Path:
    """Write the predictions CSV (atomically); see the module docstring for its columns."""
    pred = predict_labels(probs)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "label_name", "target"] + [f"prob_{c}" for c in classes])
    for i, name in enumerate(names):
        t = "" if targets is None or targets[i] < 0 else int(targets[i])
        w.writerow([name, int(pred[i]), classes[pred[i]], t] + [f"{v:.6g}" for v in probs[i]])
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def read_predictions(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, probabilities (N, K), targets (N,) with -1 where absent, class names) of a predictions CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions CSV")
    rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{path}: not a predictions CSV (expected a header with path and prob_<class> columns)")
    head = rows[0]
    prob_cols = [i for i, h in enumerate(head) if h.startswith("prob_")]
    if len(prob_cols) < 2:
        raise ValueError(f"{path}: needs one prob_<class> column per class (at least 2), found {len(prob_cols)}")
    ip, it = head.index("path"), head.index("target") if "target" in head else None
    names, probs, targets = [], [], []
    for n, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        try:
            names.append(r[ip])
            probs.append([float(r[i]) for i in prob_cols])
            targets.append(int(r[it]) if it is not None and r[it].strip() != "" else -1)
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}, line {n}: malformed row ({e})") from e
    return names, np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64), \
        [head[i][len("prob_"):] for i in prob_cols]


def predict_classifier(cfg: ClassifierPredictConfig) -> Path:
    """Predict every sample of ``cfg.input`` (its ``cfg.split``) and write the CSV; returns its path."""
    from ..engine.classify import predict_proba
    from ..engine.devices import resolve_device

    device = resolve_device(cfg.device)
    model, meta = load_classifier(cfg.run, device=str(device))
    classes = list(meta["classes"])
    source = open_classification_data(cfg.input, cfg.split, root=cfg.data_root, size=cfg.size, classes=classes,
                                      in_chans=meta.get("in_chans"))
    if source.spatial_dims != meta.get("spatial_dims", 2):
        raise ValueError(f"{cfg.input}: {source.spatial_dims}D data, but the model in {cfg.run} is "
                         f"{meta.get('spatial_dims', 2)}D")
    source.check_labels(len(classes), f"the model in {cfg.run}")
    dataset = ClassificationDataset(source, meta["input_size"], train=False, in_chans=meta.get("in_chans"))
    probs = predict_proba(model, dataset, batch_size=cfg.batch_size, device=device, progress=cfg.progress)
    out = Path(cfg.output)
    if out.is_dir() or not out.suffix:
        out = out / "predictions.csv"
    names = [source.name(i) for i in range(len(source))]
    targets = source.labels if (source.labels >= 0).any() else None
    write_predictions(out, names, probs, classes, targets)
    print(f"{len(names)} predictions -> {out}")
    return out
