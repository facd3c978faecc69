"""What a segmentation's labels say they are, in one place: integer classes or nnU-Net v2 regions.

A dataset.json's ``labels`` map names to integer values (classes: background 0, then 1, 2, ...) or,
for region datasets, some names to lists of values: a *region* is the union of those labels
(BraTS: whole tumour [1, 2, 3], tumour core [2, 3], enhancing tumour 3). nnU-Net's rule decides
which: a dataset has regions when any entry is a list of more than one value; every foreground
entry is then a region (a single value is a region of one label) and ``regions_class_order`` says
which label to paint for each region when probabilities become a label map again.

Everything downstream follows from this one fact (:class:`LabelSet`): the network's output channels
(the classes, background included; or one per region, no background), its activation (softmax over
the classes; a sigmoid per region), the label map of probabilities (argmax; or the regions painted
in order where their probability exceeds 0.5), and the structures that are scored (each foreground
class; or each region), as masks of a label map.

Example:
    >>> labels = LabelSet.from_json({"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
    ...                              "enhancing tumour": 3}, regions_class_order=[1, 2, 3])
    >>> labels.has_regions, labels.channels, labels.activation
    (True, 3, 'sigmoid')
    >>> labels.structures
    {'whole tumour': (1, 2, 3), 'tumour core': (2, 3), 'enhancing tumour': (3,)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["LabelSet", "LabelError"]


class LabelError(ValueError):
    """A labels declaration that cannot be used; the message says what is wrong."""


def _values(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class LabelSet:
    """A dataset's labels (dataset.json's ``labels``, background and ``ignore`` included) and, for
    regions, ``regions_class_order``."""

    labels: dict
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def from_json(cls, labels, regions_class_order=None, source: str = "dataset.json", *,
                  scoring: bool = False) -> LabelSet:
        """Read and check a declaration; a :class:`LabelError` naming ``source`` says what is wrong. With
        ``scoring`` (structures to score, as ``evaluate --regions``) regions need no ``regions_class_order``."""
        def fail(problem: str):
            raise LabelError(f"{source}: {problem}")

        if not isinstance(labels, Mapping) or not labels:
            fail("needs 'labels' ({\"background\": 0, ...})")
        for name, value in labels.items():
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
                fail(f"label {name!r} must be a non-negative integer or a list of them (a region), got {value!r}")
        declared = {str(k): (list(_values(v)) if isinstance(v, (list, tuple)) else int(v)) for k, v in labels.items()}
        if declared.get("background", 0) != 0:
            fail(f"'background' must be 0, got {declared['background']!r}")
        order = tuple(int(c) for c in regions_class_order) if regions_class_order is not None else None
        labels_ = cls(declared, order)
        values = sorted({x for k, vs in labels_._entries() if k != "ignore" for x in vs})
        if labels_.has_regions:
            regions = labels_.structures
            if order is None and not scoring:
                fail("a dataset with regions (labels given as lists) needs 'regions_class_order': for each region, "
                     "the label painted where it is predicted")
            if order is not None and len(order) != len(regions):
                fail(f"regions_class_order has {len(order)} entries for {len(regions)} regions ({', '.join(regions)})")
            for c, (name, members) in zip(order or (), regions.items()):
                if c not in members:
                    fail(f"regions_class_order paints {c} for region {name!r}, which holds labels {list(members)}: a "
                         "painted label must belong to its region, or the label map would not give the region back")
            if 0 in {v for vs in regions.values() for v in vs}:
                fail("a region cannot hold the background label 0")
        else:
            if order is not None:
                fail("regions_class_order is given but no label is a region (a list of values)")
            if values != list(range(len(values))):
                fail(f"label values must be consecutive from 0, got {values}")
        if "ignore" in declared:
            if isinstance(declared["ignore"], list) or declared["ignore"] <= max(values):
                fail("the 'ignore' label must be one integer, higher than every other label")
        return labels_

    @classmethod
    def classes(cls, count: int) -> LabelSet:
        """``count`` integer classes, background included, named by their values (``"1"``, ``"2"``, ...)."""
        return cls({"background": 0, **{str(v): v for v in range(1, count)}})

    def _entries(self):
        return [(k, _values(v)) for k, v in self.labels.items()]

    @property
    def has_regions(self) -> bool:
        """nnU-Net's rule: some entry is a list of more than one label."""
        return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in self.labels.values())

    @property
    def ignore_label(self) -> int | None:
        return self.labels.get("ignore")

    @property
    def structures(self) -> dict[str, tuple[int, ...]]:
        """The scored structures with their label values: each foreground class by value, or each region
        in the declared order (the order of the network's channels and of ``regions_class_order``)."""
        found = [(k, v) for k, v in self._entries() if k not in ("background", "ignore") and v != (0,)]
        return dict(found if self.has_regions else sorted(found, key=lambda kv: kv[1]))

    @property
    def channels(self) -> int:
        """The network's output channels: every class with background; or one per region."""
        return len(self.structures) if self.has_regions else len(self.structures) + 1

    @property
    def activation(self) -> str:
        return "sigmoid" if self.has_regions else "softmax"

    @property
    def values(self) -> list[int]:
        """The integer values a label file may hold (background, the classes or the regions' labels, ignore)."""
        return sorted({0, *(v for _, vs in self._entries() for v in vs)})

    def to_label_map(self, probabilities: np.ndarray) -> np.ndarray:
        """A label map ``(*S)`` of probabilities ``(channels, *S)``: the most likely class; or, for regions,
        the ``regions_class_order`` label painted in order wherever a region's probability exceeds 0.5."""
        probabilities = np.asarray(probabilities)
        if not self.has_regions:
            return probabilities.argmax(0)
        out = np.zeros(probabilities.shape[1:], dtype=np.int64)
        for c, p in zip(self.regions_class_order, probabilities):
            out[p > 0.5] = c
        return out

    def masks(self, label_map: np.ndarray) -> np.ndarray:
        """``(structures, *S)`` booleans: where each scored structure is in a label map."""
        label_map = np.asarray(label_map)
        return np.stack([np.isin(label_map, values) for values in self.structures.values()])

    def to_dict(self) -> dict:
        return {"labels": self.labels, "regions_class_order": list(self.regions_class_order)
                if self.regions_class_order is not None else None}

