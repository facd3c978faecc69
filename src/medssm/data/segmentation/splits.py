"""Cross-validation splits, as nnU-Net makes them: ``KFold(n_folds, shuffle=True, random_state=seed)``
on the sorted case list, saved as ``splits.json`` (a list of ``{"train": [...], "val": [...]}``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...files import atomic_path

N_FOLDS = 5
SEED = 12345  # nnU-Net's


def make_splits(cases, n_folds: int = N_FOLDS, seed: int = SEED) -> list[dict[str, list[str]]]:
    """``n_folds`` folds of ``sorted(cases)``; identical to scikit-learn's shuffled KFold (and so to
    nnU-Net's ``splits_final.json``). Lists within a fold are sorted."""
    cases = sorted(cases)
    if len(set(cases)) != len(cases):
        raise ValueError("case list has duplicates")
    if not 2 <= n_folds <= len(cases):
        raise ValueError(f"cannot make {n_folds} folds of {len(cases)} cases (need 2 <= n_folds <= cases)")
    order = np.arange(len(cases))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, len(cases) // n_folds)
    sizes[: len(cases) % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = np.zeros(len(cases), dtype=bool)
        val[order[start:start + size]] = True
        start += size
        splits.append({"train": [c for c, v in zip(cases, val) if not v], "val": [c for c, v in zip(cases, val) if v]})
    return splits


def read_or_make_splits(path: str | os.PathLike, cases, n_folds: int = N_FOLDS, seed: int = SEED) -> list[dict]:
    """The splits saved at ``path`` when it exists (every case it names must be in ``cases``), else
    :func:`make_splits` (not written: :func:`save_splits` does that)."""
    path = Path(path)
    if not path.exists():
        return make_splits(cases, n_folds, seed)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read splits ({e})") from None
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise ValueError(f"{path}: splits must be a list of {{\"train\": [...], \"val\": [...]}}")
    unknown = sorted({c for s in splits for c in (*s["train"], *s["val"])} - set(cases))
    if unknown:
        raise ValueError(f"{path}: names cases not in the dataset: {unknown[:10]}"
                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return splits


def save_splits(path: str | os.PathLike, splits: list[dict]) -> Path:
    """Write ``splits`` to ``path`` atomically (nnU-Net's ``splits_final.json`` format)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=1))
    return Path(path)
