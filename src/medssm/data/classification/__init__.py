"""Classification data, whatever its source: MedMNIST ``.npz`` files, image folders, a CSV of
``path,label``, or unlabelled images; :func:`open_classification_data` picks the reader from what
``data`` is (:func:`classification_format`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from . import folders, medmnist
from .base import SPLITS, ClassificationSource, Subset, class_weights, finding_weights, split_indices
from .dataset import ClassificationDataset, match_channels, random_flip, random_resized_crop, resize

__all__ = ["SPLITS", "ClassificationSource", "Subset", "ClassificationDataset", "classification_format",
           "open_classification_data", "open_training_data", "random_resized_crop", "resize", "random_flip", "match_channels",
           "split_indices", "class_weights", "finding_weights"]


def classification_format(data: str | os.PathLike) -> str | None:
    """Which labelled classification dataset ``data`` is, or None (an nnU-Net dataset, unlabelled
    images): ``"medmnist"`` (a ``.npz``, or a MedMNIST name that is not an existing path), ``"csv"``
    (a ``.csv`` that is not a folder) or ``"folders"`` (a folder with train/val/test folders)."""
    p = Path(data)
    if p.suffix.lower() == ".npz" or (not p.exists() and medmnist.parse_name(str(data)) is not None):
        return "medmnist"
    if p.suffix.lower() == ".csv" and not p.is_dir():
        return "csv"
    if p.is_dir() and any((p / s).is_dir() for s in SPLITS):
        return "folders"
    return None


def open_classification_data(data: str | os.PathLike, split: str = "train", *, root: str | os.PathLike | None = None,
                             size: int = 28, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                             classes: Sequence[str] | None = None, in_chans: int | None = None,
                             label_columns: Sequence[str] | None = None) -> ClassificationSource:
    """One split of a dataset, by what ``data`` is.

    * a ``.npz`` file, or a MedMNIST name (``pneumoniamnist``, ``organmnist3d``, ...) looked up in
      ``root`` (default ``$MEDSSM_DATA/medmnist``) at ``size`` (28, 64, 128 or 224), downloaded
      when ``download`` and missing;
    * a folder with ``train/`` (and ``val/``, ``test/``) of class folders;
    * a CSV of ``path,label`` (optionally ``split``), or of ``path`` and a 0/1 column per finding
      (multi-label: ``label_columns``, else every column but ``path`` and ``split``);
    * for prediction: a folder of images, or one image/volume file (no labels).

    Where a dataset has no validation split, ``val`` and ``train`` are a ``val_fraction`` split of the
    sorted training samples with ``seed`` (stratified by class). ``classes`` fixes the class list (e.g.
    a trained model's); ``in_chans`` the channels to read images as.
    """
    if split not in SPLITS and split != "all":
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or 'all', got {split!r}")
    p = Path(data)
    kind = classification_format(data)
    if kind == "medmnist":
        source = medmnist.open_medmnist(data, split, root=root, size=size, download=download)
        if label_columns and (not source.multi_label or list(label_columns) != source.classes):
            raise ValueError(f"{data}: holds the findings {source.classes if source.multi_label else 'none'}, not "
                             f"{list(label_columns)} (--label-columns picks the finding columns of a CSV)")
        return source
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (expected a .npz, a MedMNIST name, a folder "
                                "with train/val/test class folders, a CSV of path,label, or an image)")
    if kind == "csv":
        return folders.CsvSource(p, split, val_fraction=val_fraction, seed=seed, classes=classes, in_chans=in_chans,
                                 label_columns=label_columns)
    if kind == "folders":
        return folders.ImageFolderSource(p, split, val_fraction=val_fraction, seed=seed, classes=classes,
                                         in_chans=in_chans, label_columns=label_columns)
    if p.is_dir() or folders.is_image_file(p):
        return folders.UnlabelledImages(p, classes=classes, in_chans=in_chans, label_columns=label_columns)
    raise ValueError(f"{p}: not a dataset medssm can read (.npz, .csv, image folder, image or volume file)")


def open_training_data(data: str | os.PathLike, limit: int | None = None, seed: int = 0,
                       **options) -> tuple[ClassificationSource, ClassificationSource]:
    """The ``train`` and ``val`` splits of a labelled dataset, checked for training (a label on every
    sample, at least two classes or one finding, val's labels among train's), each cut to about ``limit``
    samples (seeded, stratified). ``options``: as :func:`open_classification_data` takes them."""
    train = open_classification_data(data, "train", seed=seed, **options)
    val = open_classification_data(data, "val", classes=train.classes, in_chans=train.in_chans, seed=seed, **options)
    if not train.has_labels or not val.has_labels:
        raise ValueError(f"{data}: training needs a label for every train and val sample")
    if len(train.classes) < (1 if train.multi_label else 2):
        raise ValueError(f"{data}: found {len(train.classes)} class(es); classification needs at least 2")
    val.check_labels(len(train.classes), "the training data")
    return train.limited(limit, seed), val.limited(limit, seed)
