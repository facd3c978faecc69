"""Per-channel intensity normalisation, chosen by channel name as nnU-Net does.

=================  =========================================================================
scheme             what it does
=================  =========================================================================
``CT``             clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with
                   the dataset's foreground mean and std (one setting for all cases)
``ZScore``         z-score with the case's own mean and std (inside the nonzero mask when
                   ``use_mask_for_norm``; outside it becomes 0)
``rescale_to_0_1`` the case's min..max to 0..1
``rgb_to_0_1``     0..255 to 0..1
``noNorm``         unchanged (cast to float32)
=================  =========================================================================

A channel named ``CT``, ``noNorm``, ``zscore``, ``rescale_to_0_1`` or ``rgb_to_0_1`` (any case)
gets that scheme; every other name (``MRI``, ``X-ray``, ``T2`` ...) gets ``ZScore``.
"""

from __future__ import annotations

import numpy as np

SCHEMES: tuple[str, ...] = ("CT", "ZScore", "rescale_to_0_1", "rgb_to_0_1", "noNorm")
_BY_NAME = {s.casefold(): s for s in SCHEMES}


def scheme_for_channel(channel_name: str) -> str:
    """The normalisation scheme nnU-Net picks for a channel name."""
    return _BY_NAME.get(str(channel_name).casefold(), "ZScore")


def normalize(channel: np.ndarray, scheme: str, intensity: dict | None = None,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel ``(*S)`` to float32.

    Args:
        scheme: one of :data:`SCHEMES`.
        intensity: the dataset's foreground statistics for the channel (``mean``, ``std``,
            ``percentile_00_5``, ``percentile_99_5``); needed by ``CT``.
        mask: boolean ``(*S)``; ``ZScore`` uses only the voxels inside it and sets the rest to 0.
    """
    x = np.asarray(channel, dtype=np.float32)
    if scheme == "CT":
        if not intensity:
            raise ValueError("CT normalisation needs the dataset's intensity properties")
        x = np.clip(x, intensity["percentile_00_5"], intensity["percentile_99_5"])
        return ((x - intensity["mean"]) / max(intensity["std"], 1e-8)).astype(np.float32)
    if scheme == "ZScore":
        if mask is None:
            return ((x - x.mean()) / max(float(x.std()), 1e-8)).astype(np.float32)
        inside = x[mask]
        mean, std = (float(inside.mean()), float(inside.std())) if inside.size else (0.0, 1.0)
        return np.where(mask, (x - mean) / max(std, 1e-8), 0).astype(np.float32)
    if scheme == "rescale_to_0_1":
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    if scheme == "rgb_to_0_1":
        return np.clip(x / 255.0, 0, 1).astype(np.float32)
    if scheme == "noNorm":
        return x.copy()
    raise ValueError(f"unknown normalisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
