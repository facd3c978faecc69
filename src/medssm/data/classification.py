"""Classification data, whatever its source: one sample interface, the augmentations, a Dataset.

A *source* (:class:`ClassificationSource`) is one split of a dataset: MedMNIST ``.npz`` arrays
(:mod:`medssm.data.medmnist`), image folders or a CSV of ``path,label``
(:mod:`medssm.data.folders`). Each sample is a float32 array ``(C, *spatial)`` in [0, 1] with an
integer label (-1 when unknown) and a name (its path, or ``file.npz:split/index``).
:func:`open_classification_data` picks the reader from what ``data`` is (:func:`classification_format`).

The transforms are MedMamba's official recipe written in torch for 2D and 3D alike (no
torchvision): random-resized crop (scale 0.08-1, aspect 3/4-4/3) and horizontal flip for training,
a plain resize for evaluation, then normalisation to [-1, 1] (mean 0.5, std 0.5).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClassificationSource", "ClassificationDataset", "classification_format", "open_classification_data",
           "random_resized_crop", "resize", "random_flip", "match_channels", "split_indices", "class_weights"]

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

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    def subset(self, indices: Sequence[int]) -> "Subset":
        return Subset(self, indices)

    def check_labels(self, num_classes: int, what: str = "the model") -> None:
        """Raise a clear error if a known label is not a class index of ``num_classes`` classes."""
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


def split_indices(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` (samples in sorted order) into (kept, held-out) with a fixed seed,
    stratified by ``labels`` when given, each part sorted."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for g in groups:
        g = rng.permutation(g)
        held.extend(g[: int(round(len(g) * fraction))].tolist())
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'Balanced' cross-entropy weights: ``n / (K * count_c)`` (absent classes get weight 0)."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    w = np.divide(counts.sum(), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


# ----------------------------------------------------------------------------------- transforms


def _interp_mode(spatial_dims: int) -> str:
    return "bilinear" if spatial_dims == 2 else "trilinear"


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(C, *S)`` to ``size`` (bi/trilinear, antialiased when shrinking a 2D image)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    d = x.dim() - 1
    shrink = any(s < t for s, t in zip(size, x.shape[1:]))
    out = F.interpolate(x[None], size=size, mode=_interp_mode(d), align_corners=False,
                        antialias=shrink and d == 2)
    return out[0]


def random_resized_crop(x: torch.Tensor, size: Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` for ``(C, H, W)`` and ``(C, D, H, W)``: a crop covering a
    random fraction ``scale`` of the area (volume) with random aspect ratios in ``ratio`` (log-uniform,
    for each pair of axes), resized to ``size``. Falls back to the whole input after 10 tries."""
    spatial = x.shape[1:]
    d = len(spatial)
    lo, hi = math.log(ratio[0]) / 2, math.log(ratio[1]) / 2
    for _ in range(10):
        frac = float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        logs = torch.empty(d).uniform_(lo, hi, generator=generator)
        logs = logs - logs.mean()  # product of the axis factors is 1: the crop keeps the area fraction
        sides = [round(s * frac ** (1 / d) * math.exp(float(a))) for s, a in zip(spatial, logs)]
        if all(0 < c <= s for c, s in zip(sides, spatial)):
            starts = [int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(spatial, sides)]
            crop = x[(slice(None),) + tuple(slice(a, a + c) for a, c in zip(starts, sides))]
            return resize(crop, size)
    return resize(x, size)


def random_flip(x: torch.Tensor, axes: Sequence[int], p: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each of the spatial ``axes`` (0 = first spatial axis; -1 = last, the horizontal one)
    with probability ``p``."""
    for a in axes:
        if float(torch.rand(1, generator=generator)) < p:
            x = torch.flip(x, dims=(a if a < 0 else a + 1,))
    return x


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey to RGB by repetition, RGB to grey by luminance (ITU-R 601), else unchanged."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, *x.shape[1:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, *([1] * (x.dim() - 1)))
        return (x * w).sum(0, keepdim=True)
    raise ValueError(f"cannot turn {c}-channel images into the model's {channels} channels")


class ClassificationDataset(torch.utils.data.Dataset):
    """A source with its transforms: items are ``(image (C, *size), label, index)``.

    Args:
        source: a :class:`ClassificationSource`.
        input_size: side of the network input (every spatial axis).
        train: random-resized crop + flips when True, a plain resize otherwise.
        in_chans: channels the model takes (grey/RGB converted to match); default the source's.
        crop_scale, crop_ratio: the random-resized crop's ranges.
        hflip, vflip: flip the last / second-to-last spatial axis with probability 0.5 (training).
    """

    def __init__(self, source: ClassificationSource, input_size: int, train: bool = False,
                 in_chans: int | None = None, crop_scale: Sequence[float] = (0.08, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True, vflip: bool = False):
        self.source = source
        self.size = (int(input_size),) * source.spatial_dims
        self.train = train
        self.in_chans = in_chans or source.in_chans
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_axes = ([-1] if hflip else []) + ([-2] if vflip else [])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.source.load(i), dtype=np.float32))
        x = match_channels(x, self.in_chans)
        if self.train:
            x = random_resized_crop(x, self.size, self.crop_scale, self.crop_ratio)
            x = random_flip(x, self.flip_axes)
        else:
            x = resize(x, self.size)
        return (x - 0.5) / 0.5, int(self.source.labels[i]), i


def classification_format(data: str | os.PathLike) -> str | None:
    """Which labelled classification dataset ``data`` is, or None (an nnU-Net dataset, unlabelled
    images): ``"medmnist"`` (a ``.npz``, or a MedMNIST name that is not an existing path), ``"csv"``
    (a ``.csv`` that is not a folder) or ``"folders"`` (a folder with train/val/test folders)."""
    from .medmnist import parse_name

    p = Path(data)
    if p.suffix.lower() == ".npz" or (not p.exists() and parse_name(str(data)) is not None):
        return "medmnist"
    if p.suffix.lower() == ".csv" and not p.is_dir():
        return "csv"
    if p.is_dir() and any((p / s).is_dir() for s in SPLITS):
        return "folders"
    return None


def open_classification_data(data: str | os.PathLike, split: str = "train", *, root: str | os.PathLike | None = None,
                             size: int = 28, download: bool = False, val_fraction: float = 0.1, seed: int = 0,
                             classes: Sequence[str] | None = None, in_chans: int | None = None) -> ClassificationSource:
    """One split of a dataset, by what ``data`` is.

    * a ``.npz`` file, or a MedMNIST name (``pneumoniamnist``, ``organmnist3d``, ...) looked up in
      ``root`` (default ``$MEDSSM_DATA/medmnist``) at ``size`` (28, 64, 128 or 224), downloaded
      when ``download`` and missing;
    * a folder with ``train/`` (and ``val/``, ``test/``) of class folders;
    * a CSV of ``path,label`` (optionally ``split``);
    * for prediction: a folder of images, or one image/volume file (no labels).

    Where a dataset has no validation split, ``val`` and ``train`` are a stratified
    ``val_fraction`` split of the sorted training samples with ``seed``. ``classes`` fixes the class
    list (e.g. a trained model's); ``in_chans`` the channels to read images as.
    """
    from . import folders, medmnist

    if split not in SPLITS and split != "all":
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or 'all', got {split!r}")
    p = Path(data)
    kind = classification_format(data)
    if kind == "medmnist":
        return medmnist.open_medmnist(data, split, root=root, size=size, download=download)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (expected a .npz, a MedMNIST name, a folder "
                                "with train/val/test class folders, a CSV of path,label, or an image)")
    if kind == "csv":
        return folders.CsvSource(p, split, val_fraction=val_fraction, seed=seed, classes=classes, in_chans=in_chans)
    if kind == "folders":
        return folders.ImageFolderSource(p, split, val_fraction=val_fraction, seed=seed, classes=classes,
                                         in_chans=in_chans)
    if p.is_dir() or folders.is_image_file(p):
        return folders.UnlabelledImages(p, classes=classes, in_chans=in_chans)
    raise ValueError(f"{p}: not a dataset medssm can read (.npz, .csv, image folder, image or volume file)")
