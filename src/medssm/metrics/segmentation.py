"""Per-class segmentation metrics of one case: Dice, IoU and HD95 (MONAI's implementations).

Conventions for empty structures (as nnU-Net and the MSD challenge): a class absent from both the
prediction and the reference scores Dice = IoU = 1 and HD95 = 0; a class present in only one of them
scores Dice = IoU = 0 and HD95 = NaN (undefined; left out of the means, counted in ``n_hd95_undefined``).

Example:
    >>> scores = case_metrics(pred, ref, labels={"lung": 1}, spacing=(1.0, 1.0))
    >>> scores["lung"]["dice"]
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch


def _onehot(a: np.ndarray, label: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a == label))[None, None].float()  # (1, 1, *S)


def class_metrics(pred: np.ndarray, ref: np.ndarray, label: int, spacing: Sequence[float] | None = None) -> dict:
    """Dice, IoU and HD95 (in the units of ``spacing``, voxels if None) of one label value."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    p, r = _onehot(pred, label), _onehot(ref, label)
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


def case_metrics(pred: np.ndarray, ref: np.ndarray, labels: Mapping[str, int],
                 spacing: Sequence[float] | None = None) -> dict[str, dict]:
    """``{class name: {dice, iou, hd95, n_pred, n_ref}}`` for every foreground label (value > 0)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return {name: class_metrics(pred, ref, int(v), spacing) for name, v in labels.items() if int(v) > 0}


def dice_per_class(pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, num_classes: int) -> list[float]:
    """Fast hard Dice for each foreground class (1..K−1) of integer maps; 1.0 where both are empty.
    Used for validation during training."""
    pred, ref = torch.as_tensor(pred), torch.as_tensor(ref)
    out = []
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        denominator = int(p.sum() + r.sum())
        out.append(1.0 if denominator == 0 else 2.0 * int((p & r).sum()) / denominator)
    return out


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
