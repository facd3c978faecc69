"""nnU-Net v2 raw datasets, read as they are, and their integrity check.

Layout::

    DatasetXXX_Name/
      dataset.json          channel_names, labels (integer classes, or regions with regions_class_order:
                          :mod:`medssm.labels`), file_ending (numTraining checked when present)
      imagesTr/{case}_{XXXX}{file_ending}   one file per channel (an RGB file holds three)
      labelsTr/{case}{file_ending}
      imagesTs/{case}_{XXXX}{file_ending}   optional
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...labels import LabelError, LabelSet
from ..io import (SUPPORTED_ENDINGS, Geometry, ImageFileError, format_number, itk_axes, nonfinite_text, read_channels,
                  read_image)
from ..io import file_ending as ending_of

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """A dataset that fails its integrity check. ``problems`` lists ``(case, path, problem)``."""

    def __init__(self, root: str | os.PathLike, problems: list[tuple[str, str, str]]):
        self.root = Path(root)
        self.problems = problems
        cases = sorted({c for c, _, _ in problems if c})
        lines = [f"{path}: {problem}" + (f" (case {case})" if case else "") for case, path, problem in problems]
        head = f"dataset {self.root} failed its integrity check: {len(problems)} problem(s)"
        if cases:
            head += f" in {len(cases)} case(s): {', '.join(cases)}"
        super().__init__(head + "\n  " + "\n  ".join(lines))


@dataclass
class Case:
    """One training case: ``image`` float32 ``(C, *S)``, ``label`` int16 ``(*S)`` or None."""

    case: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


def _group_channel_files(folder: Path, ending: str) -> tuple[dict[str, dict[int, Path]], list[Path]]:
    """``{case: {channel: path}}`` for files named ``{case}_{XXXX}{ending}``, and the misnamed ones."""
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    misnamed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        stem = _strip_ending(path.name, ending)
        if stem is None or path.name.startswith("."):
            continue
        m = _CHANNEL_FILE.match(stem)
        if m is None:
            misnamed.append(path)
        else:
            groups[m["case"]][int(m["channel"])] = path
    return dict(sorted(groups.items())), misnamed


class NnUNetDataset:
    """An nnU-Net v2 raw dataset folder. Reading it checks ``dataset.json`` only; call
    :func:`verify_dataset` to check every case."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(self.root, [("", str(meta_path), "missing; not an nnU-Net raw dataset")])
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(self.root, [("", str(meta_path), f"not valid JSON ({e})")]) from None
        problems = self._check_meta(meta_path)
        if problems:
            raise DatasetError(self.root, problems)
        self.name = self.root.name
        self.channel_names: dict[str, str] = {str(k): str(v) for k, v in
                                              (self.meta.get("channel_names") or self.meta["modality"]).items()}
        self.label_set = LabelSet.from_json(self.meta["labels"], self.meta.get("regions_class_order"), str(meta_path))
        self.labels: dict = self.label_set.labels
        self.file_ending: str = self.meta["file_ending"]
        self._images, self._misnamed = _group_channel_files(self.root / "imagesTr", self.file_ending)
        self.cases: list[str] = list(self._images)
        self._one_file_per_case = all(len(group) == 1 for group in self._images.values())

    def _check_meta(self, meta_path: Path) -> list[tuple[str, str, str]]:
        m, where, problems = self.meta, str(meta_path), []
        if not isinstance(m, dict):
            return [("", where, "must hold a JSON object")]
        channels = m.get("channel_names", m.get("modality"))
        if not isinstance(channels, dict) or not channels:
            problems.append(("", where, "needs 'channel_names' ({\"0\": \"CT\", ...})"))
        elif sorted(channels, key=str) != [str(i) for i in range(len(channels))]:
            problems.append(("", where, f"channel_names keys must be 0..{len(channels) - 1}, got {list(channels)}"))
        try:
            LabelSet.from_json(m.get("labels"), m.get("regions_class_order"), where)
        except LabelError as e:
            problems.append(("", where, str(e).removeprefix(f"{where}: ")))
        ending = m.get("file_ending")
        if ending not in SUPPORTED_ENDINGS:
            problems.append(("", where, f"file_ending {ending!r} is not one of {', '.join(SUPPORTED_ENDINGS)}"))
        return problems

    @property
    def num_classes(self) -> int:
        """The integer labels a label file may hold, background included (an ``ignore`` label is not one)."""
        return len([v for v in self.label_set.values if v != self.ignore_label])

    @property
    def ignore_label(self) -> int | None:
        return self.label_set.ignore_label

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def spatial_dims(self) -> int:
        """Spatial dimensions, read from the first case's label (or image)."""
        if not self.cases:
            raise DatasetError(self.root, [("", str(self.root / "imagesTr"), "no training cases")])
        case = self.cases[0]
        path = self.label_file(case) if self.label_file(case).is_file() else self.image_files(case)[0]
        return len(read_image(path)[1].shape)

    def image_files(self, case: str) -> list[Path]:
        """The case's channel files in imagesTr, by channel index."""
        if case not in self._images:
            raise KeyError(f"{case!r} is not a training case of {self.root}")
        return [p for _, p in sorted(self._images[case].items())]

    def label_file(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{self.file_ending}"

    def test_cases(self) -> list[str]:
        """Case ids in imagesTs, sorted; [] when there is none."""
        return list(_group_channel_files(self.root / "imagesTs", self.file_ending)[0])

    def test_image_files(self, case: str) -> list[Path]:
        groups = _group_channel_files(self.root / "imagesTs", self.file_ending)[0]
        if case not in groups:
            raise KeyError(f"{case!r} is not a test case of {self.root}")
        return [p for _, p in sorted(groups[case].items())]

    def load_case(self, case: str) -> Case:
        """Read a training case; it must pass the integrity check (else DatasetError)."""
        case_data, problems = self._read_case(case)
        if problems:
            raise DatasetError(self.root, problems)
        return case_data

    def _read_case(self, case: str) -> tuple[Case | None, list[tuple[str, str, str]]]:
        files = self.image_files(case)
        channels, geometries, problems = _read_channel_files(case, files)
        label_path = self.label_file(case)
        label = label_geometry = None
        if not label_path.is_file():
            problems.append((case, str(label_path), "missing label file"))
        else:
            try:
                label, label_geometry = read_image(label_path)
            except ImageFileError as e:
                problems.append((case, str(label_path), str(e).removeprefix(f"{label_path}: ")))
        if label is not None and label.ndim != len(label_geometry.shape):
            problems.append((case, str(label_path), "label has several components per pixel; it must have one"))
            label = None
        problems += self._check_channels(case, files, channels)
        problems += _check_geometry(case, geometries, label_path, label_geometry)
        problems += _check_values(case, [p for p, _ in geometries], channels, label_path, label, self.label_set.values)
        if problems:
            return None, problems
        image = np.concatenate([c.astype(np.float32, copy=False) for c in channels], axis=0)
        return Case(case, image, label.astype(np.int16), geometries[0][1]), []

    def _check_channels(self, case: str, files: list[Path], channels: list[np.ndarray]) -> list:
        present = self._images[case]
        expected = self.num_channels
        problems = []
        if len(channels) < len(files) and self._one_file_per_case:
            return problems  # an unreadable file (reported already) whose channels are unknown (an RGB file?)
        if all(len(c) == 1 for c in channels):
            for i in range(expected):
                if i not in present:
                    path = self.root / "imagesTr" / f"{case}_{i:04d}{self.file_ending}"
                    problems.append((case, str(path), f"missing channel {i} ({self.channel_names[str(i)]})"))
            for i, path in present.items():
                if i >= expected:
                    problems.append((case, str(path), f"unexpected channel {i}; dataset.json declares {expected}"))
        elif len(channels) == len(files) and sum(len(c) for c in channels) != expected:
            problems.append((case, str(files[0]), f"files hold {sum(len(c) for c in channels)} channels; "
                                                  f"dataset.json declares {expected}"))
        return problems

    def misnamed_files(self) -> list[Path]:
        """Files in imagesTr with the dataset's ending but not named ``{case}_{XXXX}``."""
        return list(self._misnamed)

    def __repr__(self) -> str:
        return (f"NnUNetDataset({str(self.root)!r}: {len(self.cases)} cases, channels {self.channel_names}, "
                f"labels {self.labels})")


def _check_geometry(case, geometries, label_path, label_geometry) -> list:
    """Every channel file against the first one, and the label against the image: shape, spacing,
    origin and direction, each named when it differs, in ITK/NIfTI (x, y, z) order."""
    problems = []
    if not geometries:
        return problems
    ref_path, ref = geometries[0]
    for path, g in geometries[1:]:
        problems += _geometry_problems(case, path, "", g.differences(ref), f"{ref_path.name}'s", len(ref.shape))
    if label_geometry is not None:
        problems += _geometry_problems(case, label_path, "label ", label_geometry.differences(ref), "the image's",
                                       len(ref.shape))
    return problems


def _geometry_problems(case, path, what, differences, whose, ndim) -> list:
    if not differences:
        return []
    text = "; ".join(f"{what}{name} {mine} differs from {whose} {theirs}" for name, mine, theirs in differences)
    return [(case, str(path), f"{text} ({itk_axes(ndim)})")]


def _check_values(case, files, channels, label_path, label, allowed) -> list:
    problems = []
    for path, array in zip(files, channels):
        if nonfinite := nonfinite_text(array):
            problems.append((case, str(path), nonfinite))
    if label is not None:
        if nonfinite := nonfinite_text(label):
            problems.append((case, str(label_path), f"label holds {nonfinite}"))
            return problems
        values = np.unique(label)
        bad = [format_number(v) for v in values if v not in allowed]
        if bad:
            problems.append((case, str(label_path), f"label values [{', '.join(bad[:10])}] not declared in "
                                                    f"dataset.json (declared: {allowed})"))
    return problems


def resolve_data(data: str | os.PathLike) -> Path:
    """A dataset folder, or a dataset name under ``$MEDSSM_DATA``."""
    p = Path(data)
    root = os.environ.get("MEDSSM_DATA")
    if not p.is_dir() and root and (Path(root) / data).is_dir():
        p = Path(root) / data
    if not p.is_dir():
        raise FileNotFoundError(f"{data}: no such dataset folder (nor under $MEDSSM_DATA)")
    return p


def verify_dataset(root: str | os.PathLike) -> NnUNetDataset:
    """Check every training case (as nnU-Net's ``--verify_dataset_integrity``): missing label or
    channel, image/label shape or geometry mismatch, undeclared label values, NaN/Inf, unreadable
    files, misnamed files, labels without images, numTraining, and for a region dataset a region
    label no label file holds. Raises one :class:`DatasetError` listing every problem; returns the
    dataset when all is well."""
    dataset = NnUNetDataset(root)
    problems = [("", str(p), "not named {case}_{XXXX}" + dataset.file_ending) for p in dataset.misnamed_files()]
    if not dataset.cases:
        problems.append(("", str(dataset.root / "imagesTr"), f"no training images ending in {dataset.file_ending}"))
    seen: set[int] = set()
    for case in dataset.cases:
        found, case_problems = dataset._read_case(case)
        problems += case_problems
        if found is not None:
            seen.update(np.unique(found.label).tolist())
    if dataset.label_set.has_regions and dataset.cases and not problems:
        for name, values in dataset.label_set.structures.items():
            problems += [("", str(dataset.root / "dataset.json"), f"region {name!r}: label {v} occurs in no label file")
                         for v in values if v not in seen]
    labels_dir = dataset.root / "labelsTr"
    for path in sorted(labels_dir.iterdir()) if labels_dir.is_dir() else []:
        stem = _strip_ending(path.name, dataset.file_ending)
        if stem is not None and not path.name.startswith(".") and stem not in dataset._images:
            problems.append((stem, str(path), "label without image files in imagesTr"))
    expected = dataset.meta.get("numTraining")
    if isinstance(expected, int) and expected != len(dataset.cases):
        problems.append(("", str(dataset.root / "dataset.json"),
                         f"numTraining is {expected} but imagesTr holds {len(dataset.cases)} cases"))
    if problems:
        raise DatasetError(dataset.root, problems)
    return dataset


def read_case_images(files: list[str | os.PathLike], case: str = "") -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case (e.g. from :func:`find_cases`) as float32 ``(C, *S)`` with
    the first file's geometry; unreadable files, shape or geometry mismatches and NaN/Inf raise
    DatasetError."""
    files = [Path(f) for f in files]
    channels, geometries, problems = _read_channel_files(case, files)
    problems += _check_geometry(case, geometries, None, None)
    problems += _check_values(case, [p for p, _ in geometries], channels, None, None, [])
    if problems or not files:
        raise DatasetError(files[0].parent if files else Path("."), problems or [(case, "", "no image files")])
    return np.concatenate([c.astype(np.float32, copy=False) for c in channels], axis=0), geometries[0][1]


def find_cases(folder: str | os.PathLike, file_ending: str | None = None) -> dict[str, list[Path]]:
    """Group the images of a prediction input folder by case, sorted by case id.

    Files named ``{case}_{XXXX}{ending}`` are the channels of ``case``; any other file is a case
    of its own with one channel. ``file_ending`` None accepts every supported ending. Every case
    must have channels 0..n-1 and all cases the same number of files, else DatasetError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, [("", str(folder), "not a folder")])
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    problems = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ending = ending_of(path)
        except ImageFileError:
            continue
        if file_ending is not None and ending != file_ending.lower():
            continue
        stem = path.name[: -len(ending)]
        m = _CHANNEL_FILE.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if channel in groups[case]:
            problems.append((case, str(path), f"a second file for channel {channel} of case {case}"))
        groups[case][channel] = path
    counts = {len(files) for files in groups.values()}
    for case, files in groups.items():
        if sorted(files) != list(range(len(files))):
            problems.append((case, str(folder), f"channel files {sorted(files)}; expected 0..{len(files) - 1}"))
    if len(counts) > 1:
        problems.append(("", str(folder), f"cases have different numbers of channel files: {sorted(counts)}"))
    if not groups:
        problems.append(("", str(folder), "no images found" + (f" ending in {file_ending}" if file_ending else "")))
    if problems:
        raise DatasetError(folder, problems)
    return {case: [p for _, p in sorted(files.items())] for case, files in sorted(groups.items())}


def _read_channel_files(case: str, files: list[Path]):
    """Read a case's channel files: (arrays, [(path, geometry)], problems for the unreadable ones)."""
    channels, geometries, problems = [], [], []
    for path in files:
        try:
            array, geometry = read_channels(path)
        except ImageFileError as e:
            problems.append((case, str(path), str(e).removeprefix(f"{path}: ")))
            continue
        channels.append(array)
        geometries.append((path, geometry))
    return channels, geometries, problems
