"""Preprocessing (crop to nonzero, normalise, resample to the plan's spacing), its inverse for
predictions, and the on-disk cache of preprocessed training cases.

The cache is a folder with, per case, ``{case}.npz`` (``image`` float32 ``(C, *S)``, ``label``
int16 ``(*S)``, ``locations_{k}`` int32 ``(N, ndim)``: up to 10,000 voxels of each foreground class
``k``, for foreground oversampling) and ``{case}.json`` (the properties that :func:`revert_to_original`
needs, the plan's preprocessing key, the source files' sizes and times, and the SHA-256 of the
``.npz``). A case is redone when any of these changed, and, with a warning, when its ``.npz`` no
longer matches its SHA-256 (truncated, altered) or its ``.json`` is unreadable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from ...files import atomic_path
from ..io import Geometry
from .cropping import nonzero_box
from .normalization import normalize

if TYPE_CHECKING:
    from .nnunet import NnUNetDataset
    from .plan import Plan

MAX_LOCATIONS_PER_CLASS = 10000


def resize(array: np.ndarray, shape: tuple[int, ...] | list[int], order: int) -> np.ndarray:
    """Resample a spatial array ``(*S)`` to ``shape`` with spline ``order``, voxel centres aligned
    (edge values are extended)."""
    shape = tuple(int(s) for s in shape)
    array = np.asarray(array, dtype=np.float32)
    if array.shape == shape:
        return array.copy()
    scale = np.asarray(array.shape, dtype=float) / np.asarray(shape, dtype=float)
    offset = 0.5 * scale - 0.5  # input coordinate = (out + 0.5) * scale - 0.5
    return ndimage.affine_transform(array, scale, offset=offset, output_shape=shape, order=order,
                                    mode="nearest", prefilter=order > 1).astype(np.float32)


def resize_label(label: np.ndarray, shape, values, order: int = 1) -> np.ndarray:
    """Resample a label map: each value's mask with ``order`` (1: linear, as nnU-Net), then the most
    likely value per voxel; ``order`` 0 is nearest neighbour."""
    shape = tuple(int(s) for s in shape)
    if label.shape == shape:
        return label.copy()
    if order == 0:
        return resize(label, shape, 0).round().astype(label.dtype)
    values = np.asarray(sorted(values))
    scores = np.stack([resize(label == v, shape, order) for v in values])  # (K, *shape)
    return values[np.argmax(scores, axis=0)].astype(label.dtype)


def preprocess_case(image: np.ndarray, geometry: Geometry, plan: Plan,
                    label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop to the nonzero region, normalise each channel, resample to ``plan.target_spacing``.

    Args:
        image: ``(C, *S)`` any numeric dtype. geometry: its :class:`Geometry`. label: ``(*S)`` or None.

    Returns:
        ``(image float32 (C, *S'), label int16 (*S') or None, props)``; ``props`` is JSON-able and
        holds what :func:`revert_to_original` needs.
    """
    image = np.asarray(image)
    if image.ndim != plan.spatial_dims + 1 or image.shape[0] != plan.num_channels:
        raise ValueError(f"image of shape {image.shape} does not match the plan: expected "
                         f"({plan.num_channels}, {plan.spatial_dims} spatial axes)")
    if tuple(image.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"image shape {image.shape[1:]} differs from its geometry's {geometry.shape}")
    if label is not None and tuple(label.shape) != tuple(geometry.shape):
        raise ValueError(f"label shape {label.shape} differs from image shape {geometry.shape}")
    box = nonzero_box(image) if plan.crop_to_nonzero else [(0, s) for s in geometry.shape]
    region = tuple(slice(a, b) for a, b in box)
    cropped = image[(slice(None), *region)]
    mask = ndimage.binary_fill_holes(np.any(cropped != 0, axis=0)) if any(plan.use_mask_for_norm) else None
    channels = [normalize(cropped[c], plan.normalization[c], plan.intensity_properties[c],
                          mask if plan.use_mask_for_norm[c] else None) for c in range(len(cropped))]
    shape = [max(1, int(round(n * s / t))) for n, s, t in
             zip(cropped.shape[1:], geometry.spacing, plan.target_spacing)]
    out = np.stack([resize(c, shape, plan.image_order) for c in channels]).astype(np.float32)
    out_label = None
    if label is not None:
        values = sorted(set(plan.label_set.values) | set(np.unique(label[region]).tolist()))
        out_label = resize_label(np.asarray(label[region], dtype=np.int16), shape, values, plan.label_order)
    props = {"geometry": geometry.to_dict(), "original_shape": list(geometry.shape),
             "crop_box": [list(b) for b in box], "shape_after_crop": list(cropped.shape[1:]),
             "spacing": list(geometry.spacing), "target_spacing": list(plan.target_spacing),
             "shape_after_resample": shape}
    return out, out_label, props


def revert_to_original(array: np.ndarray, props: dict, is_label: bool = False, order: int = 1,
                       background: bool = True) -> np.ndarray:
    """Bring a prediction on the preprocessed grid back to the original image's grid.

    Args:
        array: probabilities ``(C, *S')`` (or one map ``(*S')``), or with ``is_label`` a label map
            ``(*S')``.
        props: from :func:`preprocess_case`.
        order: interpolation order (labels: each value's mask, then argmax).
        background: channel 0 of the probabilities is the background class (softmax); False for
            region probabilities (one sigmoid per region).

    Returns:
        ``(C, *S)`` / ``(*S)`` on the original grid; outside the crop box, background (channel 0
        is 1 and the others 0, or every region 0; label 0). The geometry is
        ``Geometry.from_dict(props["geometry"])``.
    """
    original = tuple(props["original_shape"])
    crop_shape = props["shape_after_crop"]
    region = tuple(slice(a, b) for a, b in props["crop_box"])
    array = np.asarray(array)
    if tuple(array.shape[-len(original):]) != tuple(props["shape_after_resample"]):
        raise ValueError(f"array of shape {array.shape} is not on the preprocessed grid "
                         f"{props['shape_after_resample']}")
    if is_label:
        if array.ndim != len(original):
            raise ValueError(f"a label map must be ({len(original)} spatial axes), got shape {array.shape}")
        out = np.zeros(original, dtype=array.dtype)
        out[region] = resize_label(array, crop_shape, np.unique(array), order)
        return out
    squeeze = array.ndim == len(original)
    channels = array[None] if squeeze else array
    out = np.zeros((len(channels), *original), dtype=np.float32)
    if len(channels) > 1 and background:
        out[0] = 1.0
    for c, channel in enumerate(channels):
        out[(c, *region)] = resize(channel, crop_shape, order)
    return out[0] if squeeze else out


def class_locations(label: np.ndarray, classes, seed: int = 1234) -> dict[int, np.ndarray]:
    """Up to :data:`MAX_LOCATIONS_PER_CLASS` voxel coordinates ``(N, ndim)`` of each class."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in classes:
        where = np.argwhere(label == k).astype(np.int32)
        if len(where) > MAX_LOCATIONS_PER_CLASS:
            where = where[np.sort(rng.choice(len(where), MAX_LOCATIONS_PER_CLASS, replace=False))]
        out[int(k)] = where
    return out


def _cache_key(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.preprocessing_key(), sort_keys=True).encode()).hexdigest()[:16]


def _source_stamp(paths: list[Path]) -> list[list]:
    stats = [(p, p.stat() if p.is_file() else None) for p in paths]
    return [[p.name, s.st_size, s.st_mtime_ns] if s else [p.name, None, None] for p, s in stats]


def _entry_state(npz: Path, meta: Path, key: str, stamp: list) -> tuple[bool, str | None]:
    """``(usable, what is wrong)`` for a cached case: a missing, half-written or stale entry (other
    plan, changed source files) is not usable and nothing is wrong with it; a corrupt one says why."""
    if not npz.is_file() or not meta.is_file():
        return False, None
    try:
        props = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        return False, f"its {meta.name} is unreadable ({type(e).__name__})"
    if not isinstance(props, dict) or props.get("cache_key") != key or props.get("source") != stamp \
            or "sha256" not in props:
        return False, None
    try:
        digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    except OSError as e:
        return False, f"unreadable ({type(e).__name__}: {e})"
    if digest != props["sha256"]:
        return False, "its SHA-256 does not match the one recorded when it was written (truncated or altered)"
    return True, None


class Cache(dict):
    """``{case: npz path}``, as :func:`build_cache` returns it; ``load(case)`` reads a case's arrays
    (``{"image", "label", "class_locations", "props"}``) once and keeps them in memory."""

    def __init__(self, paths: dict[str, Path]):
        super().__init__(paths)
        self._loaded: dict[str, dict] = {}

    def load(self, case: str) -> dict:
        if case not in self._loaded:
            self._loaded[case] = _load_entry(self[case])
        return self._loaded[case]


def build_cache(dataset: NnUNetDataset, plan: Plan, cache_dir: str | os.PathLike, progress: bool = True,
                cases: list[str] | None = None) -> Cache:
    """Preprocess ``cases`` (default: all) of ``dataset`` into ``cache_dir``; cases already cached
    with the same plan and source files are skipped when their ``.npz`` still matches its recorded
    SHA-256, and rebuilt with a warning when it does not. Each case must pass the integrity check.
    Returns ``{case: npz path}`` (a :class:`Cache`), every entry checked."""
    from tqdm import tqdm

    if plan.num_channels != dataset.num_channels or plan.labels != dataset.labels:
        raise ValueError(f"the plan ({plan.num_channels} channels, labels {plan.labels}) does not fit {dataset.root} "
                         f"({dataset.num_channels} channels, labels {dataset.labels})")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(plan)
    foreground = [v for v in plan.label_set.values if v not in (0, plan.label_set.ignore_label)]
    out = Cache({})
    for case in tqdm(sorted(dataset.cases if cases is None else cases), desc="preprocess",
                     disable=not progress, leave=False):
        npz, meta = cache_dir / f"{case}.npz", cache_dir / f"{case}.json"
        stamp = _source_stamp([*dataset.image_files(case), dataset.label_file(case)])
        usable, corrupt = _entry_state(npz, meta, key, stamp)
        if corrupt:
            warnings.warn(f"{npz}: cached case is corrupt: {corrupt}; rebuilding it from {dataset.root}",
                          stacklevel=2)
        if not usable:
            c = dataset.load_case(case)
            image, label, props = preprocess_case(c.image, c.geometry, plan, c.label)
            arrays = {"image": image, "label": label}
            arrays.update({f"locations_{k}": v for k, v in class_locations(label, foreground).items()})
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            with atomic_path(npz) as tmp:
                tmp.write_bytes(buffer.getvalue())
            props = {**props, "case": case, "cache_key": key, "source": stamp,
                     "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(props, indent=1))
        out[case] = npz
    return out


def _load_entry(npz: str | os.PathLike) -> dict:
    """A cached case's arrays and props; a corrupt entry raises ValueError naming the file (build_cache
    checks every entry it returns and rebuilds the corrupt ones)."""
    try:
        with np.load(npz, allow_pickle=False) as f:
            return {"image": f["image"], "label": f["label"],
                    "class_locations": {int(n.split("_", 1)[1]): f[n] for n in f.files if n.startswith("locations_")},
                    "props": json.loads(Path(npz).with_suffix(".json").read_text())}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{npz}: unreadable cache entry ({type(e).__name__}: {e}); build_cache rebuilds it") from None


def load_cache(paths: dict[str, Path]) -> dict[str, dict]:
    """Load what :func:`build_cache` returned into memory: ``{case: {"image", "label",
    "class_locations": {k: (N, ndim)}, "props"}}``."""
    return {case: _load_entry(npz) for case, npz in paths.items()}
