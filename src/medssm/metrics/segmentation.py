"""Segmentation metrics of one case: Dice, IoU and HD95 (MONAI's implementations) of each structure, a
class or a region (the union of several labels, :mod:`medssm.labels`), in label maps.

Conventions for empty structures (as nnU-Net and the MSD challenge): a class absent from both the
prediction and the reference scores Dice = IoU = 1 and HD95 = 0; a class present in only one of them
scores Dice = IoU = 0 and HD95 = NaN (undefined; left out of the means, counted in ``n_hd95_undefined``).

Example:
    >>> scores = case_metrics(pred, ref, {"lung": 1}, spacing=(1.0, 1.0))
    >>> scores["lung"]["dice"]
    >>> case_metrics(pred, ref, {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": 3})
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch


def _onehot(a: np.ndarray, values: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.isin(a, values)))[None, None].float()  # (1, 1, *S)


def structure_metrics(pred: np.ndarray, ref: np.ndarray, values: int | Sequence[int],
                      spacing: Sequence[float] | None = None) -> dict:
    """Dice, IoU and HD95 (in the units of ``spacing``, voxels if None) of one structure: the voxels
    holding ``values`` (one class, or the labels of a region)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    values = [int(v) for v in np.atleast_1d(values)]
    p, r = _onehot(pred, values), _onehot(ref, values)
    n_pred, n_ref = int(p.sum()), int(r.sum())
    out = {"n_pred": n_pred, "n_ref": n_ref}
    if n_pred == 0 and n_ref == 0:
        return {**out, "dice": 1.0, "iou": 1.0, "hd95": 0.0}
    if n_pred == 0 or n_ref == 0:
        return {**out, "dice": 0.0, "iou": 0.0, "hd95": math.nan}
    dice = float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
    iou = float(compute_iou(p, r, include_background=True, ignore_empty=False)[0, 0])
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                        spacing=list(spacing) if spacing is not None else None)
    return {**out, "dice": dice, "iou": iou, "hd95": float(hd[0, 0])}


def case_metrics(pred: np.ndarray, ref: np.ndarray, structures: Mapping[str, int | Sequence[int]],
                 spacing: Sequence[float] | None = None) -> dict[str, dict]:
    """``{name: {dice, iou, hd95, n_pred, n_ref}}`` for every structure ``{name: value or [values]}``
    (background, value 0 alone, and ``ignore`` are not structures)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return {name: structure_metrics(pred, ref, v, spacing) for name, v in structures.items()
            if name != "ignore" and list(np.atleast_1d(v)) != [0]}


def dice_of_masks(pred: np.ndarray, ref: np.ndarray) -> list[float]:
    """Fast hard Dice of each structure of boolean masks ``(structures, *S)``; 1.0 where both are
    empty. Used for validation during training."""
    axes = tuple(range(1, np.ndim(pred)))
    both, total = np.sum(pred & ref, axis=axes), np.sum(pred, axis=axes) + np.sum(ref, axis=axes)
    return [1.0 if t == 0 else 2.0 * float(b) / float(t) for b, t in zip(both, total)]


def summarize(rows: list[dict], metrics: Sequence[str] = ("dice", "iou", "hd95")) -> dict:
    """Means per class and over classes from per-case-per-class rows (``{"case", "class", metric...}``);
    NaN values are left out of the means and counted."""
    classes = list(dict.fromkeys(r["class"] for r in rows))
    per_class = {}
    for c in classes:
        vals = {m: [r[m] for r in rows if r["class"] == c] for m in metrics}
        per_class[c] = {m: _nanmean(v) for m, v in vals.items()}
        per_class[c]["n_cases"] = len(vals[metrics[0]])
        if "hd95" in vals:
            per_class[c]["n_hd95_undefined"] = sum(1 for v in vals["hd95"] if math.isnan(v))
    mean = {m: _nanmean([per_class[c][m] for c in classes]) for m in metrics}
    return {"mean": mean, "per_class": per_class, "n_cases": len({r["case"] for r in rows})}


def _nanmean(values) -> float:
    v = [x for x in values if not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else math.nan
