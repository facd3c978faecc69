"""Fingerprint a dataset and plan its preprocessing and training patches (nnU-Net's automation).

:func:`plan_dataset` measures every case (spacing, shape before and after cropping to the nonzero
region, foreground intensities per channel); :func:`make_plan` turns that into a :class:`Plan`:
target spacing, normalisation per channel, patch size and batch size. Every field of the plan can be
overridden (``make_plan(ds, patch_size=[64, 64])``, or ``parse_overrides(["patch_size=64,64"])``
for command lines); values that depend on an overridden one are derived from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...files import atomic_path
from ...labels import LabelError, LabelSet
from .nnunet import NnUNetDataset
from .normalization import SCHEMES, scheme_for_channel
from .cropping import nonzero_box

PLAN_VERSION = 1


@dataclass
class Fingerprint:
    """What :func:`plan_dataset` measured: per case lists, and foreground intensity statistics
    per channel (``mean std median min max percentile_00_5 percentile_99_5``)."""

    cases: list[str]
    spacings: list[list[float]]
    shapes_before_crop: list[list[int]]
    shapes_after_crop: list[list[int]]
    intensity_properties: list[dict]
    thickness: list[float] | None = None  # per case, of its thinnest foreground structure: see structure_thickness

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fingerprint:
        return cls(**json.loads(Path(path).read_text()))


def plan_dataset(dataset: NnUNetDataset, cases: list[str] | None = None, samples_per_case: int = 10000,
                 seed: int = 1234, progress: bool = False) -> Fingerprint:
    """Fingerprint ``cases`` (default: all) of ``dataset``; foreground is every label > 0."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    cases = sorted(dataset.cases if cases is None else cases)
    if not cases:
        raise ValueError(f"{dataset.root}: no cases to fingerprint")
    spacings, before, after, thickness = [], [], [], []
    samples: list[list[np.ndarray]] = [[] for _ in range(dataset.num_channels)]
    for case in tqdm(cases, desc="fingerprint", unit="case", leave=False, disable=not progress):
        c = dataset.load_case(case)
        thickness.append(structure_thickness(c.label, [v for v in dataset.label_set.values
                                                       if v not in (0, dataset.ignore_label)]))
        box = nonzero_box(c.image)
        spacings.append(list(c.geometry.spacing))
        before.append(list(c.geometry.shape))
        after.append([stop - start for start, stop in box])
        foreground = c.image[:, (c.label > 0) & (c.label != (dataset.ignore_label or -1))]  # (C, N)
        take = rng.choice(foreground.shape[1], min(samples_per_case, foreground.shape[1]), replace=False)
        for ch in range(len(samples)):
            samples[ch].append(foreground[ch, take])
    intensity = []
    for ch_samples in samples:
        v = np.concatenate(ch_samples).astype(np.float64)
        if v.size == 0:
            v = np.zeros(1)
        intensity.append({"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                          "min": float(v.min()), "max": float(v.max()),
                          "percentile_00_5": float(np.percentile(v, 0.5)),
                          "percentile_99_5": float(np.percentile(v, 99.5))})
    return Fingerprint(cases, spacings, before, after, intensity, thickness)


def structure_thickness(label: np.ndarray, values) -> float:
    """How thick the thinnest foreground structure of a label map is, in voxels: for each label value,
    twice its voxels over its boundary voxels (a line or sheet ``w`` voxels wide gives ``w``; a disc of
    radius ``r`` gives ``r``); inf when no label is present. A structure only a few voxels thick vanishes
    when the image is downsampled: the budget planner keeps such data at its own resolution."""
    from scipy import ndimage

    found = []
    for v in values:
        mask = label == v
        n = int(mask.sum())
        if n:
            boundary = int((mask & ~ndimage.binary_erosion(mask, border_value=1)).sum())
            found.append(2 * n / max(boundary, 1))
    return float(min(found)) if found else float("inf")


@dataclass
class Plan:
    """Everything preprocessing and patch sampling need; JSON-able. Shapes and spacings are in
    numpy axis order (see :mod:`medssm.data.io`)."""

    dataset_name: str
    spatial_dims: int
    num_channels: int
    num_classes: int  # integer labels in the label files, background included
    labels: dict  # dataset.json's: {name: value}, or {name: [values]} for regions
    channel_names: dict[str, str]
    file_ending: str
    normalization: list[str]
    use_mask_for_norm: list[bool]
    intensity_properties: list[dict]
    target_spacing: list[float]
    median_spacing: list[float]
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    divisor: int = 8
    memory_budget_mb: float = 1024.0
    bytes_per_voxel: float = 1500.0
    crop_to_nonzero: bool = True
    oversample_foreground: float = 1 / 3
    image_order: int = 3
    label_order: int = 1
    version: int = PLAN_VERSION
    notes: dict = field(default_factory=dict)
    regions_class_order: list[int] | None = None  # for regions: the label painted for each region
    thickness: float | None = None  # median over cases of the thinnest structure, voxels at the target spacing

    @property
    def label_set(self) -> LabelSet:
        """What the labels are (classes or regions): the network's channels and activation follow from it."""
        return LabelSet(self.labels, tuple(self.regions_class_order) if self.regions_class_order else None)

    def validate(self) -> Plan:
        """Raise ValueError naming every inconsistent field; return self."""
        errors = []
        n, c = self.spatial_dims, self.num_channels
        for name in ("target_spacing", "median_spacing", "median_shape", "patch_size"):
            if len(getattr(self, name)) != n:
                errors.append(f"{name} needs {n} values, got {getattr(self, name)}")
        for name in ("normalization", "use_mask_for_norm", "intensity_properties"):
            if len(getattr(self, name)) != c:
                errors.append(f"{name} needs {c} values (one per channel), got {getattr(self, name)}")
        errors += [f"normalization {s!r} unknown; choose from {', '.join(SCHEMES)}"
                   for s in self.normalization if s not in SCHEMES]
        if any(p % self.divisor or p <= 0 for p in self.patch_size):
            errors.append(f"patch_size {self.patch_size} must be positive multiples of divisor {self.divisor}")
        if any(s <= 0 for s in self.target_spacing):
            errors.append(f"target_spacing {self.target_spacing} must be positive")
        if self.batch_size < 1:
            errors.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.oversample_foreground <= 1:
            errors.append(f"oversample_foreground must be in [0, 1], got {self.oversample_foreground}")
        try:
            LabelSet.from_json(self.labels, self.regions_class_order, "labels")
        except LabelError as e:
            errors.append(str(e))
        if errors:
            raise ValueError("invalid plan: " + "; ".join(errors))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError(f"{source}: not a medssm plan (unknown fields {unknown}, missing fields {missing})")
        return cls(**d).validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read plan ({e})") from None
        return cls.from_dict(d, str(path))

    def preprocessing_key(self) -> dict:
        """The fields that decide what preprocessing writes (a cache made with another key is stale)."""
        return {k: getattr(self, k) for k in ("target_spacing", "normalization", "use_mask_for_norm",
                                              "intensity_properties", "crop_to_nonzero", "image_order",
                                              "label_order", "num_classes", "version")}


def _target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing; for a strongly anisotropic axis (nnU-Net's rule) its 10th percentile."""
    target = np.median(spacings, axis=0)
    if len(target) < 2:
        return target
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    median_shape = np.median(shapes, axis=0)
    if target[worst] > 3 * max(target[others]) and median_shape[worst] * 3 < min(median_shape[others]):
        spacing = np.percentile(spacings[:, worst], 10)
        target[worst] = max(spacing, max(target[others]) + 1e-5)
    return target


def _patch_and_batch(median_shape, spacing, divisor, budget_mb, bytes_per_voxel, total_voxels,
                     patch_size=None) -> tuple[list[int], int]:
    """Patch: the median shape rounded up to ``divisor``, shrunk along its longest physical axis
    until two samples fit the budget. Batch: as many as fit, at most 5% of the dataset's voxels,
    at least 2 (nnU-Net's rules)."""
    def cost_mb(patch, batch):
        return batch * math.prod(patch) * bytes_per_voxel / 2**20

    if patch_size is None:
        patch = [max(divisor, math.ceil(s / divisor) * divisor) for s in median_shape]
        while cost_mb(patch, 2) > budget_mb and any(p > divisor for p in patch):
            extent = [p * s if p > divisor else -1 for p, s in zip(patch, spacing)]
            patch[int(np.argmax(extent))] -= divisor
    else:
        patch = [int(p) for p in patch_size]
    by_memory = int(budget_mb // cost_mb(patch, 1))
    by_coverage = int(0.05 * total_voxels // math.prod(patch))
    return patch, max(2, min(by_memory, by_coverage))


def make_plan(dataset: NnUNetDataset, divisor: int = 8, memory_budget_mb: float = 1024.0,
              bytes_per_voxel: float = 1500.0, fingerprint: Fingerprint | None = None, **overrides) -> Plan:
    """Plan preprocessing and patches for ``dataset``.

    Args:
        divisor: the model's required divisibility of every patch axis (2**number of poolings).
        memory_budget_mb: memory one training batch may take; ``bytes_per_voxel`` is the rough
            activation memory per input voxel used to estimate it.
        fingerprint: from :func:`plan_dataset` (computed when None).
        **overrides: any :class:`Plan` field; a per-channel field also takes a single value for
            all channels. Derived values follow (an overridden ``target_spacing`` changes
            ``median_shape``, an overridden ``patch_size`` changes ``batch_size``).

    Examples:
        >>> plan = make_plan(NnUNetDataset(root), divisor=16, patch_size=[128, 128])  # doctest: +SKIP
    """
    fields = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown plan fields {unknown}; known: {', '.join(sorted(fields))}")
    fp = fingerprint or plan_dataset(dataset)
    n_ch = dataset.num_channels

    def per_channel(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * n_ch

    spacings = np.asarray(fp.spacings, dtype=float)
    shapes = np.asarray(fp.shapes_after_crop, dtype=float)
    target = [float(s) for s in overrides.get("target_spacing", _target_spacing(spacings, shapes))]
    median_shape = [int(round(v)) for v in np.median(shapes * spacings / np.asarray(target), axis=0)]
    median_shape = [int(v) for v in overrides.get("median_shape", median_shape)]
    total_voxels = float(np.sum(np.prod(shapes * spacings / np.asarray(target), axis=1)))

    normalization = per_channel(overrides.get(
        "normalization", [scheme_for_channel(dataset.channel_names[str(i)]) for i in range(n_ch)]))
    # nnU-Net: z-score inside the nonzero mask when cropping to it removes a quarter of the image.
    shrunk = np.median(np.prod(shapes, 1) / np.prod(np.asarray(fp.shapes_before_crop, dtype=float), 1)) < 0.75
    crop = overrides.get("crop_to_nonzero", True)
    use_mask = per_channel(overrides.get(
        "use_mask_for_norm", [bool(crop and shrunk and s == "ZScore") for s in normalization]))
    patch, batch = _patch_and_batch(median_shape, target, divisor, memory_budget_mb, bytes_per_voxel,
                                    total_voxels, overrides.get("patch_size"))
    values = dict(
        dataset_name=dataset.name, spatial_dims=len(target), num_channels=n_ch, num_classes=dataset.num_classes,
        labels=dict(dataset.labels), regions_class_order=list(dataset.label_set.regions_class_order or []) or None,
        channel_names=dict(dataset.channel_names), file_ending=dataset.file_ending,
        normalization=normalization, use_mask_for_norm=[bool(u) for u in use_mask],
        intensity_properties=fp.intensity_properties, target_spacing=target,
        median_spacing=[float(s) for s in np.median(spacings, axis=0)], median_shape=median_shape,
        patch_size=patch, batch_size=batch, divisor=divisor, memory_budget_mb=memory_budget_mb,
        bytes_per_voxel=bytes_per_voxel, notes={"fingerprint_cases": len(fp.cases)},
        thickness=thickness_at(fp, target),
    )
    values.update({k: v for k, v in overrides.items() if k not in ("normalization", "use_mask_for_norm")})
    if "intensity_properties" in overrides:
        values["intensity_properties"] = per_channel(overrides["intensity_properties"])
    return Plan(**values).validate()


def thickness_at(fp: Fingerprint, target_spacing) -> float | None:
    """The median over cases of their thinnest structure, in voxels at ``target_spacing`` (None when the
    fingerprint did not measure it)."""
    if not fp.thickness:
        return None
    finite = [t * min(s) / min(target_spacing) for t, s in zip(fp.thickness, fp.spacings) if np.isfinite(t)]
    return float(np.median(finite)) if finite else None


def parse_overrides(items: list[str]) -> dict:
    """``["patch_size=64,64", "normalization=CT", "batch_size=4"]`` -> keyword overrides for
    :func:`make_plan`. Values are JSON where they parse as JSON, comma lists become lists."""
    def value(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"plan override {item!r}: expected key=value")
        text = text.strip()
        out[key.strip()] = ([value(t.strip()) for t in text.split(",")] if "," in text and not
                            text.startswith(("[", "{")) else value(text))
    return out


MIN_THICKNESS = 3.0  # voxels a structure keeps at the resolution it is trained at


def budget_plans(dataset: NnUNetDataset, fingerprint: Fingerprint, divisor: int, **overrides) -> list[Plan]:
    """The plans a time budget may train with, most preferred first (the budget planner's candidates).

    The plan with ``overrides`` first. Then, by the rule of the thinnest structure (``Plan.thickness``,
    measured by the fingerprint): where halving the resolution would leave it thinner than
    ``MIN_THICKNESS`` voxels (vessels, nerves, a small hippocampus), crops of half and a quarter of the
    patch along every axis at the dataset's own resolution and the plan's batch (nnU-Net's way: full
    resolution, less context; the batch that would cover as much of the data with a crop is hundreds,
    which would only make their timing long); otherwise whole images at 1/2 and 1/4 of the resolution, while the structure keeps
    ``MIN_THICKNESS`` voxels and the median image stays at least 4 patches of ``divisor`` wide. A
    given patch shrinks with the resolution; a given target spacing or patch is kept at full resolution.
    """
    full = make_plan(dataset, divisor=divisor, fingerprint=fingerprint, **overrides)
    plans = [full]
    if full.thickness is not None and full.thickness / 2 < MIN_THICKNESS:
        if "patch_size" in overrides:
            return plans
        for k in (2, 4):
            patch = [max(divisor, round(p / k / divisor) * divisor) for p in full.patch_size]
            if patch != plans[-1].patch_size:
                plans.append(make_plan(dataset, divisor=divisor, fingerprint=fingerprint,
                                       **{"batch_size": full.batch_size, **overrides}, patch_size=patch))
        return plans
    for scale in () if "target_spacing" in overrides else (2.0, 4.0):
        if min(full.median_shape) < 4 * scale * divisor or (full.thickness or math.inf) / scale < MIN_THICKNESS:
            break
        coarser = {**overrides, "target_spacing": [scale * s for s in full.target_spacing]}
        if "patch_size" in overrides:
            coarser["patch_size"] = [max(divisor, round(p / scale / divisor) * divisor) for p in full.patch_size]
        plans.append(make_plan(dataset, divisor=divisor, fingerprint=fingerprint, **coarser))
    return plans
