"""Training patches with foreground oversampling, as nnU-Net draws them.

Each batch draws its cases with replacement; the last ``round(batch_size * oversample_foreground)``
patches of the batch are centred on a voxel of a randomly chosen foreground class present in the case,
the others lie anywhere in the case. Cases smaller than the patch are zero-padded (label 0).
"""

from __future__ import annotations

import numpy as np
import torch


def _crop_padded(array: np.ndarray, start: list[int], patch: list[int]) -> np.ndarray:
    """``array[..., start:start+patch]`` over the trailing axes, zero where it leaves the array."""
    lead = array.shape[: array.ndim - len(patch)]
    out = np.zeros((*lead, *patch), dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch, array.shape[len(lead):]):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


def _entry(cache, case: str) -> dict:
    """The arrays of ``case``: the cache's own dict, or read from its npz path."""
    item = cache[case]
    if isinstance(item, dict):
        return item
    if hasattr(cache, "load"):
        return cache.load(case)
    from .preprocess import load_cache

    return load_cache({case: item})[case]


class PatchSampler:
    """An endless, seeded iterator of training batches.

    Args:
        cache: ``{case: {"image": (C, *S) float32, "label": (*S) int, "class_locations": {k: (N, ndim)}}}``
            (``class_locations`` optional), or what :func:`medssm.data.segmentation.preprocess.build_cache`
            returns (``{case: npz path}``; the cases are then read into memory).
        cases: the cases to draw from (e.g. a fold's ``train``); their order does not matter.
        patch_size, batch_size: as in the plan.
        oversample_foreground: fraction of each batch centred on foreground (nnU-Net: 1/3).
        seed: the draws are a function of the seed alone; ``state_dict`` / ``load_state_dict``
            resume them exactly.

    Yields:
        ``{"image": float32 (B, C, *P), "label": int64 (B, 1, *P), "case": [B case ids]}``.
    """

    def __init__(self, cache: dict[str, dict], cases, patch_size, batch_size: int,
                 oversample_foreground: float = 1 / 3, seed: int = 0):
        self.cases = sorted(cases)
        if not self.cases:
            raise ValueError("PatchSampler needs at least one case")
        missing = [c for c in self.cases if c not in cache]
        if missing:
            raise KeyError(f"cases not in the cache: {missing[:10]}")
        self.cache = {case: _entry(cache, case) for case in self.cases}
        self.patch_size = [int(p) for p in patch_size]
        for case in self.cases:
            image, label = self.cache[case]["image"], self.cache[case]["label"]
            if image.ndim != len(self.patch_size) + 1 or tuple(label.shape) != tuple(image.shape[1:]):
                raise ValueError(f"case {case}: image {image.shape} / label {label.shape} do not fit "
                                 f"patch size {self.patch_size}")
        self.batch_size = int(batch_size)
        self.oversample_foreground = float(oversample_foreground)
        self.rng = np.random.default_rng(seed)
        self.batches_drawn = 0
        self._locations: dict[str, dict[int, np.ndarray]] = {}

    def __iter__(self) -> PatchSampler:
        return self

    def __next__(self) -> dict:
        picks = self.rng.integers(len(self.cases), size=self.batch_size)
        first_forced = round(self.batch_size * (1 - self.oversample_foreground))
        images, labels = [], []
        for i, pick in enumerate(picks):
            case = self.cases[pick]
            start = self._start(case, force_foreground=i >= first_forced)
            images.append(_crop_padded(self.cache[case]["image"], start, self.patch_size))
            labels.append(_crop_padded(self.cache[case]["label"], start, self.patch_size))
        self.batches_drawn += 1
        return {"image": torch.from_numpy(np.stack(images).astype(np.float32)),            # (B, C, *P)
                "label": torch.from_numpy(np.stack(labels).astype(np.int64))[:, None],     # (B, 1, *P)
                "case": [self.cases[p] for p in picks]}

    def _start(self, case: str, force_foreground: bool) -> list[int]:
        shape = self.cache[case]["label"].shape
        lows = [min(0, s - p) for s, p in zip(shape, self.patch_size)]
        highs = [max(0, s - p) for s, p in zip(shape, self.patch_size)]
        locations = self._class_locations(case) if force_foreground else {}
        present = [k for k in sorted(locations) if len(locations[k])]
        if present:
            where = locations[present[self.rng.integers(len(present))]]
            centre = where[self.rng.integers(len(where))]
            return [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.patch_size, lows, highs)]
        return [int(self.rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]

    def _class_locations(self, case: str) -> dict[int, np.ndarray]:
        entry = self.cache[case]
        if "class_locations" in entry:
            return entry["class_locations"]
        if case not in self._locations:
            label = entry["label"]
            self._locations[case] = {int(k): np.argwhere(label == k) for k in np.unique(label) if k > 0}
        return self._locations[case]

    def state_dict(self) -> dict:
        """The generator's state (plain ints and strings: JSON- and ``weights_only``-safe)."""
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])
