"""Token orders: how a 2D or 3D feature map becomes a sequence for a scan, and back.

An order is named by which spatial axis varies fastest along the sequence and whether the
sequence is read backwards:

- ``"raster"``: C order, the last spatial axis fastest (``x.flatten(2)``);
- ``"reversed"``: raster read backwards;
- ``"slice"``: the first spatial axis fastest, the others in raster order: column-major in 2D
  (MedMamba's second scan, SegMamba's 2D form) and depth-fastest in 3D (SegMamba's inter-slice
  scan);
- ``"slice_reversed"``: ``"slice"`` read backwards;
- ``"axis1"`` / ``"axis1_reversed"`` (3D only): the second spatial axis fastest.

``to_order`` / ``from_order`` act on sequences already flattened in raster order (last axis L), so
a layer can project once and scan in several orders; ``image_to_tokens`` / ``tokens_to_image``
go between feature maps and raster sequences. Every function has an exact inverse.
"""

from __future__ import annotations

from typing import Sequence

import torch

ORDERS = ("raster", "reversed", "slice", "slice_reversed", "axis1", "axis1_reversed")
CROSS_SCAN_2D = ("raster", "slice", "reversed", "slice_reversed")  # MedMamba's k = 0, 1, 2, 3
CROSS_SCAN_3D = ("raster", "slice", "axis1", "reversed", "slice_reversed", "axis1_reversed")


def _parse(order: str, ndim: int) -> tuple[int, bool]:
    """(spatial axis that varies fastest, read backwards) for ``order`` on ``ndim`` spatial axes."""
    if order not in ORDERS:
        raise ValueError(f"unknown token order {order!r}; choose from {ORDERS}")
    base, reverse = order.removesuffix("_reversed"), order.endswith("_reversed") or order == "reversed"
    axis = {"raster": ndim - 1, "reversed": ndim - 1, "slice": 0, "axis1": 1}[base]
    if base == "axis1" and ndim != 3:
        raise ValueError(f"token order {order!r} needs 3 spatial axes, got {ndim}")
    return axis, reverse


def to_order(seq: torch.Tensor, spatial_shape: Sequence[int], order: str) -> torch.Tensor:
    """Reorder ``seq`` (..., L), given in raster order over ``spatial_shape``, into ``order``."""
    axis, reverse = _parse(order, len(spatial_shape))
    lead = seq.shape[:-1]
    if axis != len(spatial_shape) - 1:
        grid = seq.reshape(*lead, *spatial_shape)  # (..., *S)
        seq = grid.movedim(len(lead) + axis, -1).flatten(len(lead))  # (..., L), axis fastest
    return seq.flip(-1) if reverse else seq


def from_order(seq: torch.Tensor, spatial_shape: Sequence[int], order: str) -> torch.Tensor:
    """Exact inverse of :func:`to_order`: back to raster order."""
    axis, reverse = _parse(order, len(spatial_shape))
    if reverse:
        seq = seq.flip(-1)
    if axis == len(spatial_shape) - 1:
        return seq
    lead = seq.shape[:-1]
    moved = [s for i, s in enumerate(spatial_shape) if i != axis] + [spatial_shape[axis]]
    grid = seq.reshape(*lead, *moved)  # (..., *S without axis, S[axis])
    return grid.movedim(-1, len(lead) + axis).flatten(len(lead))


def image_to_tokens(x: torch.Tensor, order: str = "raster") -> torch.Tensor:
    """(B, C, *S) feature map -> (B, L, C) tokens in ``order``."""
    return to_order(x.flatten(2), x.shape[2:], order).transpose(1, 2)


def tokens_to_image(tokens: torch.Tensor, spatial_shape: Sequence[int], order: str = "raster") -> torch.Tensor:
    """(B, L, C) tokens in ``order`` -> (B, C, *S) feature map; inverse of :func:`image_to_tokens`."""
    seq = from_order(tokens.transpose(1, 2), spatial_shape, order)  # (B, C, L)
    return seq.unflatten(-1, tuple(spatial_shape))  # keeps B and C as they are (a traced export needs C)


def cross_scan(x: torch.Tensor, orders: Sequence[str] | None = None) -> torch.Tensor:
    """(B, C, *S) -> (B, K, C, L): the map read in each of ``orders`` (default: 2D or 3D cross-scan)."""
    orders = orders or (CROSS_SCAN_2D if x.dim() == 4 else CROSS_SCAN_3D)
    seq = x.flatten(2)
    return torch.stack([to_order(seq, x.shape[2:], o) for o in orders], dim=1)


def cross_merge(ys: torch.Tensor, spatial_shape: Sequence[int], orders: Sequence[str] | None = None) -> torch.Tensor:
    """(B, K, C, L) scans in ``orders`` -> (B, C, L) raster: each restored, then summed."""
    orders = orders or (CROSS_SCAN_2D if len(spatial_shape) == 2 else CROSS_SCAN_3D)
    return sum(from_order(y, spatial_shape, o) for y, o in zip(ys.unbind(1), orders))
