"""Cropping to the region an image actually covers (nnU-Net's crop to non-zero), used by the
fingerprint and by preprocessing."""

from __future__ import annotations

import numpy as np


def nonzero_box(image: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` per spatial axis of the region where any channel of ``image``
    ``(C, *S)`` is nonzero; the whole image when all is zero."""
    nonzero = np.any(image != 0, axis=0)
    if not nonzero.any():
        return [(0, s) for s in nonzero.shape]
    box = []
    for axis in range(nonzero.ndim):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box
