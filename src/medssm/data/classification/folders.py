"""A user's own images: ``ImageFolder`` trees, CSVs of ``path,label``, and unlabelled images.

* **Folders** (torchvision's ``ImageFolder`` layout): ``root/{train,val,test}/{class}/*``; the
  classes are the sorted folder names under ``train/``. Without ``val/`` the validation split is a
  stratified, seeded fraction of the sorted training files.
* **CSV**: one row per sample, ``path,label`` with an optional ``split`` column (``train``,
  ``val``, ``test``) and an optional header. Paths are relative to the CSV's folder. Labels are
  class indices (0..K-1) or class names (then sorted into indices); empty for unlabelled images.
  Without a split column, training splits the rows into train/val (seeded, stratified) and the
  ``test`` split (what predict and evaluate read) is every row.
* **Multi-label CSV** (ChestX-ray14 or CheXpert style): a header with ``path`` and one column of
  0/1 per finding (the columns given as ``label_columns``, else every column but ``path`` and
  ``split`` when there are several and none is named ``label``); an empty cell is unknown. Image
  folders cannot say that an image has several findings.
* Images: PNG, JPEG, BMP, TIFF (grey, RGB; 8 or 16 bit); volumes: ``.npy`` (D, H, W) and
  NIfTI (``.nii``, ``.nii.gz``). Grey and RGB are detected from the files (RGB if any is colour).

Examples:
    >>> train = ImageFolderSource("my_xrays", "train")   # my_xrays/train/{normal,tb}/*.png
    >>> train.classes, len(train), train.load(0).shape
    (['normal', 'tb'], 412, (1, 256, 256))
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import nonfinite_text
from .base import SPLITS, ClassificationSource, empty_classes, empty_classes_message, split_indices

__all__ = ["ImageFolderSource", "CsvSource", "UnlabelledImages", "read_image", "is_image_file", "IMAGE_SUFFIXES",
           "VOLUME_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".npy", ".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and not p.name.startswith(".") and _suffix(p) in IMAGE_SUFFIXES + VOLUME_SUFFIXES


def _is_volume(path: Path) -> bool:
    return _suffix(path) in VOLUME_SUFFIXES


def _is_colour(path: Path) -> bool:
    if _is_volume(path):
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise ValueError(f"{path}: not a readable image ({e})") from e


def _scale(x: np.ndarray) -> np.ndarray:
    """To float32 in [0, 1]: integers by their type's range, floats by min-max unless already in it."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype.kind in "ui":
        hi = 65535.0 if x.max(initial=0) > 255 else 255.0
        return np.clip(x.astype(np.float32) / hi, 0, 1)
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        return x
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def read_image(path: str | os.PathLike, in_chans: int = 1) -> np.ndarray:
    """An image as float32 ``(in_chans, H, W)`` or a volume as ``(1, D, H, W)``, in [0, 1]. A file
    that cannot be read, or that holds NaN or Inf, raises ValueError naming it."""
    path = Path(path)
    try:
        x = _read_pixels(path, in_chans)
        if x.size == 0:
            raise ValueError(f"no pixels (shape {x.shape})")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - give the file name with any reader's error
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e
    if nonfinite := nonfinite_text(x):
        raise ValueError(f"{path}: {nonfinite}")
    return _scale(x)


def _read_pixels(path: Path, in_chans: int) -> np.ndarray:
    """The file's values as they are stored, ``(C, *S)``."""
    suffix = _suffix(path)
    if suffix == ".npy":
        x = np.load(path, allow_pickle=False)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"expected a (D, H, W) volume, got shape {x.shape}")
        return x[None]
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        x = np.asarray(nib.load(str(path)).dataobj)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {x.shape}")
        return np.ascontiguousarray(np.transpose(x, (2, 1, 0)))[None]  # (x, y, z) -> (D, H, W)
    from PIL import Image

    with Image.open(path) as im:
        if in_chans == 3:
            return np.moveaxis(np.asarray(im.convert("RGB")), -1, 0)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return np.asarray(im)[None]
        return np.asarray(im.convert("L"))[None]


def _image_size(path: Path) -> tuple[int, ...]:
    if _is_volume(path):
        return tuple(read_image(path).shape[1:])
    from PIL import Image

    with Image.open(path) as im:
        return (im.height, im.width)


class _FileSource(ClassificationSource):
    """Samples that are files: ``self.paths`` and ``self.labels``, listed by ``self.origin`` (a folder
    or a CSV); works out dims, channels, size."""

    paths: list[Path]
    origin: Path

    def _describe(self, in_chans: int | None) -> None:
        if not self.paths:
            raise ValueError(f"{self.description}: no images")
        first = self.paths[0]
        self.spatial_dims = 3 if _is_volume(first) else 2
        if any((_is_volume(p)) != (self.spatial_dims == 3) for p in self.paths):
            raise ValueError(f"{self.description}: mixes 2D images and 3D volumes")
        if in_chans is None:
            in_chans = 3 if self.spatial_dims == 2 and any(_is_colour(p) for p in self.paths) else 1
        self.in_chans = in_chans
        self.native_size = _image_size(first)

    def load(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.in_chans if self.spatial_dims == 2 else 1)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def inputs(self) -> list[Path]:
        return [self.origin, *self.paths]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


class ImageFolderSource(_FileSource):
    """One split of ``root/{train,val,test}/{class}/*`` (see the module docstring).

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        val_fraction, seed: the validation split made from ``train/`` when there is no ``val/``.
        classes: fix the class list (e.g. a trained model's); by default the folders of ``train/``.
        in_chans: read images as 1 (grey) or 3 (RGB) channels; by default detected.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                 classes: Sequence[str] | None = None, in_chans: int | None = None,
                 label_columns: Sequence[str] | None = None):
        self.root = self.origin = Path(root)
        if label_columns:
            raise ValueError(f"{self.root}: image folders hold one class per image; several findings per image "
                             "(--label-columns) need a CSV with a 0/1 column per finding")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.description = f"{self.root} [{split}]"
        if classes is None:
            base = self.root / "train" if (self.root / "train").is_dir() else self.root / split
            classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not classes:
                raise ValueError(f"{base}: no class folders (expected {base}/<class>/<images>)")
        self.classes = list(classes)
        from_train = split in ("train", "val") and not (self.root / "val").is_dir()
        folder = self.root / ("train" if from_train else split)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no {split} split in this dataset")
        paths, labels = [], []
        for d in sorted(x for x in folder.iterdir() if x.is_dir() and not x.name.startswith(".")):
            if d.name not in self.classes:
                raise ValueError(f"{d}: class {d.name!r} is not one of the classes {self.classes}")
            files = _images_in(d)
            if not files:
                raise ValueError(f"{d}: empty class folder: no images ({', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)})")
            paths += files
            labels += [self.classes.index(d.name)] * len(files)
        if split == "train":
            for c in self.classes:
                if not (folder / c).is_dir():
                    raise ValueError(f"{folder / c}: missing class folder")
        labels = np.asarray(labels, dtype=np.int64)
        if from_train:
            keep, held = split_indices(len(paths), val_fraction, seed, labels)
            idx = keep if split == "train" else held
            paths, labels = [paths[i] for i in idx], labels[idx]
        self.paths, self.labels = paths, labels
        self._describe(in_chans)


class CsvSource(_FileSource):
    """One split of a CSV of ``path,label[,split]``, or of ``path`` and a 0/1 column per finding
    (multi-label; see the module docstring)."""

    def __init__(self, csv_path: str | os.PathLike, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0,
                 classes: Sequence[str] | None = None, in_chans: int | None = None,
                 label_columns: Sequence[str] | None = None):
        self.csv_path = self.origin = Path(csv_path)
        self.description = f"{self.csv_path} [{split}]"
        rows, columns = self._read()
        findings = list(label_columns or [])
        if not findings and "label" not in columns and len(columns) > 1:
            findings = columns  # every column but path and split
        unknown = [c for c in findings if c not in columns]
        if unknown:
            raise ValueError(f"{self.csv_path}: no column {', '.join(map(repr, unknown))} (--label-columns); its "
                             f"columns are {', '.join(['path', *columns])}")
        labels = self._findings(rows, findings) if findings else self._classes(rows, classes)
        has_split = any(r[2] for r in rows)
        if split == "all":
            idx = list(range(len(rows)))
        elif has_split:
            idx = [i for i, r in enumerate(rows) if r[2] == split]
        elif split in ("train", "val"):
            keep, held = split_indices(len(rows), val_fraction, seed, None if findings else labels)
            idx = keep if split == "train" else held
        else:  # no split column: for predict/evaluate the CSV is the test set as a whole
            idx = list(range(len(rows)))
        self.paths, self.labels = [rows[i][0] for i in idx], labels[idx]
        if not self.paths:
            raise ValueError(f"{self.description}: no rows in this split")
        self._describe(in_chans)

    def _findings(self, rows, findings: list[str]) -> np.ndarray:
        """``(N, K)`` 0/1 of each finding column (-1 for an empty cell)."""
        self.classes = findings
        labels = np.full((len(rows), len(findings)), -1, dtype=np.int64)
        for i, (_, cells, _, line) in enumerate(rows):
            for k, column in enumerate(findings):
                value = cells.get(column, "")
                if value not in ("", "0", "1", "0.0", "1.0"):
                    raise ValueError(f"{self.csv_path}, line {line}: {column} is {value!r}; a finding is 0, 1 or empty")
                labels[i, k] = int(float(value)) if value else -1
        return labels

    def _classes(self, rows, classes: Sequence[str] | None) -> np.ndarray:
        """``(N,)`` class indices of the label column (-1 for an empty cell); sets the class list."""
        raw = [r[1].get("label", "") for r in rows]
        numeric = all(_is_int(v) for v in raw if v != "")
        if classes is None:
            if numeric:
                values = [int(v) for v in raw if v != ""]
                if values and min(values) < 0:
                    line = next(r[3] for r, v in zip(rows, raw) if v != "" and int(v) < 0)
                    raise ValueError(f"{self.csv_path}, line {line}: label {min(values)} is out of range "
                                     "(class indices start at 0)")
                k, empty = empty_classes(np.asarray(values))
                if empty:
                    line, label = next((r[3], int(v)) for r, v in zip(rows, raw) if v != "" and int(v) > empty[0])
                    raise ValueError(empty_classes_message(f"{self.csv_path}, line {line}: label {label}", k, empty,
                                                           "any row"))
                classes = [str(i) for i in range(k)]
            else:
                classes = sorted({v for v in raw if v != ""})
        self.classes = list(classes)
        labels = []
        for (_, _, _, line), value in zip(rows, raw):
            if value == "":
                labels.append(-1)
            elif _is_int(value) and (numeric or value not in self.classes):
                k = int(value)
                if not 0 <= k < len(self.classes):
                    raise ValueError(f"{self.csv_path}, line {line}: label {k} is out of range for "
                                     f"{len(self.classes)} classes (0..{len(self.classes) - 1})")
                labels.append(k)
            elif value in self.classes:
                labels.append(self.classes.index(value))
            else:
                raise ValueError(f"{self.csv_path}, line {line}: unknown class {value!r}; classes are {self.classes}")
        return np.asarray(labels, dtype=np.int64)

    def _read(self) -> tuple[list[tuple[Path, dict[str, str], str, int]], list[str]]:
        """``([(path, {column: cell}, split, line)], the columns beside path and split)``."""
        try:
            text = self.csv_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.csv_path}: not a UTF-8 text CSV ({e})") from e
        reader = list(csv.reader(text.splitlines()))
        if not reader:
            raise ValueError(f"{self.csv_path}: empty CSV")
        head = [h.strip() for h in reader[0]]
        if "path" in [h.lower() for h in head]:
            head = [h.lower() if h.lower() in ("path", "label", "split") else h for h in head]
            body, first_line = reader[1:], 2
        else:
            head, body, first_line = ["path", "label", "split"], reader, 1
        columns = [h for h in head if h not in ("path", "split")]
        rows = []
        base = self.csv_path.parent
        for n, r in enumerate(body, start=first_line):
            if not r or all(not c.strip() for c in r):
                continue
            cells = {h: (r[i].strip() if i < len(r) else "") for i, h in enumerate(head)}
            if not cells["path"]:
                raise ValueError(f"{self.csv_path}, line {n}: no path")
            p = Path(cells["path"])
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise FileNotFoundError(f"{self.csv_path}, line {n}: {p} does not exist")
            s = cells.get("split", "").lower()
            if s and s not in SPLITS:
                raise ValueError(f"{self.csv_path}, line {n}: split {s!r} is not one of {', '.join(SPLITS)}")
            rows.append((p, cells, s, n))
        if not rows:
            raise ValueError(f"{self.csv_path}: no rows")
        return rows, columns


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


class UnlabelledImages(_FileSource):
    """Images to predict: one file, or every image/volume under a folder (sorted)."""

    def __init__(self, path: str | os.PathLike, *, classes: Sequence[str] | None = None, in_chans: int | None = None,
                 label_columns: Sequence[str] | None = None):
        p = self.origin = Path(path)
        self.description = str(p)
        self.paths = [p] if p.is_file() else _images_in(p)
        if not self.paths:
            raise ValueError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)})")
        shape = (len(self.paths), len(label_columns)) if label_columns else (len(self.paths),)
        self.labels = np.full(shape, -1, dtype=np.int64)
        self.classes = list(classes or [])
        self._describe(in_chans)
