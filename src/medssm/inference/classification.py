"""Predict with a trained classifier (``medssm predict -m RUN -i DATA -o predictions.csv``).

The input can be a split of a MedMNIST ``.npz``, of image folders or of a CSV, a folder of images,
or one image or volume. A multi-label model (``model.json``'s ``multi_label``) gives a sigmoid
probability per finding, and reads a CSV's finding columns by the findings' names. Images are read with the model's channels (grey/RGB converted), resized to
its input size and normalised as in training (``model.json``'s ``normalize``, from the model's card). The CSV (:func:`medssm.metrics.evaluate_classification.write_predictions`)
has one row per sample: ``path``, the predicted ``label`` (index) and ``label_name``, the
``target`` index when the input is labelled, and one ``prob_<class>`` column per class. It is
written atomically, never over an input, and replaces an existing file only with ``--overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.classification import ClassificationDataset, open_classification_data
from ..devices import cpu_threads, resolve_device
from ..files import guard_outputs
from ..metrics.classification import write_predictions
from ..runs import load_run
from ..ssm import use_backend

__all__ = ["ClassifierPredictConfig", "predict_classifier", "predict_proba"]


@dataclass
class ClassifierPredictConfig:
    """Predict classes and probabilities with a trained classification run; write a CSV."""

    model: str = field(metadata={"flags": ("-m", "--model", "--run"),
                                 "help": "the training run folder (or a saved model folder)"})
    input: str = field(metadata={"flags": ("-i", "--input"), "help": "a .npz or MedMNIST name, image folders, a CSV "
                                                                     "of path[,label], a folder of images, or one image"})
    output: str = field(default="predictions.csv", metadata={"flags": ("-o", "--output"),
                                                             "help": "the CSV to write (a folder: FOLDER/predictions.csv)"})
    checkpoint: str = field(default="best", metadata={"help": "best or last"})
    split: str = field(default="test", metadata={"help": "split of a .npz, folder tree or CSV with splits"})
    batch_size: int = field(default=64, metadata={"help": "samples per forward pass"})
    size: int = field(default=28, metadata={"help": "MedMNIST image size when --input is a name"})
    data_root: str | None = field(default=None, metadata={"help": "folder of MedMNIST files for names"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing CSV"})
    skip_existing: bool = field(default=False, metadata={"help": "do nothing if the CSV exists (it is complete)"})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, cuda:N, mps or auto (the kind of device the run was trained on when present here)"})
    scan_backend: str = field(default="auto", metadata={
        "help": "selective-scan implementation: auto, fused (CPU), chunked, triton, cuda, reference"})
    threads: int | None = field(default=None, metadata={"help": (
        "CPU threads for torch and the numba kernels (default: torch's, one per core); fewer on a busy machine")})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@torch.no_grad()
def predict_proba(model: torch.nn.Module, dataset, batch_size: int = 64, device: torch.device | str = "cpu",
                  progress: bool = False, desc: str = "predict", multi_label: bool = False) -> np.ndarray:
    """Probabilities ``(N, K)`` of ``model`` over ``dataset`` (in its order): the softmax over the
    classes, or with ``multi_label`` a sigmoid per finding."""
    from tqdm import tqdm

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=not progress):
        logits = model(x.to(device)).float()
        out.append((logits.sigmoid() if multi_label else logits.softmax(1)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def predict_classifier(cfg: ClassifierPredictConfig) -> Path:
    """Predict every sample of ``cfg.input`` (its ``cfg.split``) and write the CSV; returns its path."""
    with use_backend(cfg.scan_backend), cpu_threads(cfg.threads):
        return _predict(cfg)


def _predict(cfg: ClassifierPredictConfig) -> Path:
    run = load_run(cfg.model)
    if run.task != "classification":
        raise ValueError(f"{run.path}: a {run.task} run; classification prediction needs a classification run")
    meta = run.description
    for key in ("classes", "input_size"):
        if key not in meta:
            raise ValueError(f"{run.path / 'model.json'}: missing {key!r}; not a classification run of medssm train")
    classes, multi = list(meta["classes"]), bool(meta.get("multi_label"))
    source = open_classification_data(cfg.input, cfg.split, root=cfg.data_root, size=cfg.size, classes=classes,
                                      in_chans=meta.get("in_chans"), label_columns=classes if multi else None)
    if source.spatial_dims != meta.get("spatial_dims", 2):
        raise ValueError(f"{cfg.input}: {source.spatial_dims}D data, but the model in {cfg.model} is "
                         f"{meta.get('spatial_dims', 2)}D")
    source.check_labels(len(classes), f"the model in {cfg.model}")
    out = Path(cfg.output)
    if out.is_dir() or not out.suffix:
        out = out / "predictions.csv"
    if guard_outputs([out], source.inputs(), overwrite=cfg.overwrite,
                     skip_existing=cfg.skip_existing):
        print(f"{out} exists and is complete: nothing to predict (--skip-existing)")
        return out
    device = resolve_device(cfg.device, prefer=meta.get("device"))
    model = run.load_model(cfg.checkpoint, device=device)
    norm = meta.get("normalize") or dict(zip(("mean", "std"), run.card.normalize))  # as the model was trained
    dataset = ClassificationDataset(source, meta["input_size"], train=False, in_chans=meta.get("in_chans"),
                                    normalize=(norm["mean"], norm["std"]))
    probs = predict_proba(model, dataset, batch_size=cfg.batch_size, device=device, progress=cfg.progress,
                          multi_label=multi)
    names = [source.name(i) for i in range(len(source))]
    targets = source.labels if multi or (source.labels >= 0).any() else None
    write_predictions(out, names, probs, classes, targets)
    print(f"{len(names)} predictions on {device} -> {out}")
    return out
