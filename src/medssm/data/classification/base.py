"""The one sample interface every classification source has, and what all sources share.

A *source* (:class:`ClassificationSource`) is one split of a dataset: MedMNIST ``.npz`` arrays
(:mod:`.medmnist`), image folders or a CSV of ``path,label`` (:mod:`.folders`). Each sample is a
float32 array ``(C, *spatial)`` in [0, 1] with a name (its path, or ``file.npz:split/index``) and
its labels: one class index (``labels`` of shape ``(N,)``), or for a *multi-label* source (ChestMNIST,
a CSV with a 0/1 column per finding) one 0/1 per finding (``labels`` of shape ``(N, K)``, the
findings in ``classes``); -1 where unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["SPLITS", "ClassificationSource", "Subset", "split_indices", "class_weights", "finding_weights",
           "empty_classes",
           "empty_classes_message"]

SPLITS = ("train", "val", "test")


class ClassificationSource:
    """One split of a classification dataset. Subclasses fill ``classes``, ``labels`` (int64, -1 for
    unknown), ``spatial_dims``, ``in_chans``, ``native_size`` and implement :meth:`load` and
    :meth:`name`."""

    description: str = ""
    classes: list[str]
    labels: np.ndarray
    spatial_dims: int = 2
    in_chans: int = 1
    native_size: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        """Sample ``i`` as float32 ``(C, *spatial)`` in [0, 1]."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        """The files and folders this source reads (nothing may ever be written over them)."""
        return []

    @property
    def multi_label(self) -> bool:
        """Whether every sample has a 0/1 for each finding (``labels`` ``(N, K)``) rather than one class."""
        return self.labels.ndim == 2

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    def subset(self, indices: Sequence[int]) -> "Subset":
        return Subset(self, indices)

    def limited(self, n: int | None, seed: int) -> "ClassificationSource":
        """At most about ``n`` samples (None: all), the same share of every class (at least one each), seeded."""
        if n is None or n >= len(self):
            return self
        strata = None if self.multi_label else self.labels
        return self.subset(split_indices(len(self), n / len(self), seed, strata, at_least=1)[1])

    def check_labels(self, num_classes: int, what: str = "the model") -> None:
        """Raise a clear error if a known label is not a class index of ``num_classes`` classes (or, for
        multi-label, not one 0/1 for each of ``num_classes`` findings)."""
        if self.multi_label:
            if self.labels.shape[1] != num_classes:
                raise ValueError(f"{self.description}: {self.labels.shape[1]} findings per sample; {what} has "
                                 f"{num_classes}")
            bad = np.argwhere((self.labels > 1) | (self.labels < -1))
            if len(bad):
                i, k = (int(v) for v in bad[0])
                raise ValueError(f"{self.name(i)}: finding {self.classes[k]!r} is {int(self.labels[i, k])}; "
                                 "multi-label findings are 0 or 1")
            return
        bad = np.flatnonzero((self.labels >= num_classes) | (self.labels < -1))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{self.name(i)}: label {int(self.labels[i])} is out of range: {what} has "
                             f"{num_classes} classes (0..{num_classes - 1})")


class Subset(ClassificationSource):
    """Some samples of a source, in the given order."""

    def __init__(self, source: ClassificationSource, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = source.labels[self.indices]
        for attr in ("classes", "spatial_dims", "in_chans", "native_size", "description"):
            setattr(self, attr, getattr(source, attr))

    def load(self, i: int) -> np.ndarray:
        return self.source.load(int(self.indices[i]))

    def name(self, i: int) -> str:
        return self.source.name(int(self.indices[i]))

    def inputs(self) -> list[Path]:
        return self.source.inputs()


def empty_classes(labels: np.ndarray) -> tuple[int, list[int]]:
    """For class indices used as labels (no class list declared): ``K`` = the largest + 1, and the
    classes of ``0..K-1`` that no label uses (each one would be a class the model cannot learn)."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if labels.size else 0
    return k, np.flatnonzero(np.bincount(labels, minlength=k) == 0).tolist()


def empty_classes_message(where: str, k: int, empty: list[int], searched: str) -> str:
    """``"{where} makes 4 classes, but class 2 has no sample in {searched}; ..."``, ``where`` naming
    the label that first goes past an empty class."""
    head = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    classes = f"class {head} has" if len(empty) == 1 else f"classes {head} have"
    return (f"{where} makes {k} classes, but {classes} no sample in {searched}; numeric labels are class "
            "indices 0..K-1, each with samples")


def split_indices(n: int, fraction: float, seed: int, labels: np.ndarray | None = None,
                  at_least: int = 0) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` (samples in sorted order) into (kept, held-out) with a fixed seed,
    stratified by ``labels`` when given (``at_least`` held out of each class), each part sorted."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for g in groups:
        g = rng.permutation(g)
        held.extend(g[: max(at_least, int(round(len(g) * fraction)))].tolist())
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def class_weights(spec: str, labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Cross-entropy weights as ``--class-weights`` gives them: ``none`` (None), ``balanced``
    (``n / (K * count_c)`` from ``labels``; absent classes get weight 0) or one number per class."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return None
    if spec == "balanced":
        counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
        w = np.divide(counts.sum(), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
        return torch.tensor(w, dtype=torch.float32)
    try:
        weights = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class-weights: expected none, balanced or {num_classes} comma-separated numbers, "
                         f"got {spec!r}") from None
    if len(weights) != num_classes:
        raise ValueError(f"--class-weights: {len(weights)} weights for {num_classes} classes")
    return torch.tensor(weights, dtype=torch.float32)


def finding_weights(spec: str, labels: np.ndarray) -> torch.Tensor | None:
    """Binary cross-entropy weights of each finding's positives as ``--pos-weight`` gives them: ``none``
    (None), ``balanced`` (negatives / positives of each finding in ``labels`` ``(N, K)``, so a rare
    finding counts as much as a common one) or one number per finding."""
    spec, k = spec.strip().lower(), labels.shape[1]
    if spec in ("", "none"):
        return None
    if spec == "balanced":
        positives = (labels == 1).sum(0).astype(np.float64)
        negatives = (labels == 0).sum(0).astype(np.float64)
        return torch.tensor(np.divide(negatives, positives, out=np.ones(k), where=positives > 0), dtype=torch.float32)
    try:
        weights = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--pos-weight: expected none, balanced or {k} comma-separated numbers, got {spec!r}") from None
    if len(weights) != k:
        raise ValueError(f"--pos-weight: {len(weights)} weights for {k} findings")
    return torch.tensor(weights, dtype=torch.float32)
