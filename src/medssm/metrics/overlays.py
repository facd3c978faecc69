"""Overlay pictures of a segmentation: image | reference | prediction, side by side, as PNG.

2D cases give one row (an RGB image in colour); 3D cases give three rows, the middle slices
(through the centre of the reference's foreground, or of the volume when it has none) along each
axis. Pure numpy + Pillow.

Example:
    >>> save_overlay("case_001.png", image, reference, prediction, title="case_001  Dice 0.97")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import atomic_path

# Class colours (RGB), class k uses COLOURS[(k - 1) % len]: the tab10 palette.
COLOURS = np.array([[255, 127, 14], [31, 119, 180], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207], [127, 127, 127]], np.float32)
MIN_SIDE = 256  # small panels are enlarged (nearest neighbour) to at least this many pixels


def _background(image: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The image panel, RGB ``(*shape, 3)`` in 0..255: a grey ``(*shape)`` image repeated, an RGB
    ``(*shape, 3)`` one as it is; stretched to its 0.5..99.5 percentiles (all channels together);
    black without an image."""
    if image is None:
        return np.zeros((*shape, 3), np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    picture = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return picture if picture.ndim == len(shape) + 1 else np.repeat(picture[..., None], 3, axis=-1)


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def colour_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture of a 2D image (0..255; grey ``(H, W)`` or RGB ``(H, W, 3)``) with ``labels``
    filled at ``alpha`` and outlined."""
    rgb = (image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)).astype(np.float32)
    for k in np.unique(labels):
        if k <= 0:
            continue
        mask = labels == k
        colour = COLOURS[(int(k) - 1) % len(COLOURS)]
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
        rgb[_boundary(mask)] = colour
    return rgb.clip(0, 255).astype(np.uint8)


def _middle_slices(volume_shape, reference: np.ndarray) -> list[tuple]:
    fg = np.argwhere(reference > 0)
    centre = ((fg.min(0) + fg.max(0)) // 2) if len(fg) else np.array(volume_shape) // 2
    return [tuple(int(centre[a]) if i == a else slice(None) for i in range(3)) for a in range(3)]


def overlay_panels(image: np.ndarray | None, reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The overlay as one RGB array: rows of [image | reference | prediction]. ``image``: ``(*S)``,
    or ``(C, *S)`` of which a 2D RGB(A) image is drawn in colour, any other the first channel."""
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if image is not None and image.ndim == reference.ndim + 1:
        colour = reference.ndim == 2 and image.shape[0] in (3, 4)
        image = np.moveaxis(image[:3], 0, -1) if colour else image[0]  # (H, W, 3) or (*S)
    if reference.ndim == 2:
        views = [(slice(None), slice(None))]
    elif reference.ndim == 3:
        views = _middle_slices(reference.shape, reference)
    else:
        raise ValueError(f"overlays need 2D or 3D label maps, got shape {reference.shape}")
    rows = []
    for view in views:
        background = _background(None if image is None else image[view], reference[view].shape)
        row = [background.astype(np.uint8), colour_labels(background, reference[view]),
               colour_labels(background, prediction[view])]
        scale = max(1, int(np.ceil(MIN_SIDE / max(min(row[0].shape[:2]), 1))))
        row = [np.kron(p, np.ones((scale, scale, 1), np.uint8)) for p in row]
        gap = np.full((row[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([row[0], gap, row[1], gap, row[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def save_overlay(path: str | os.PathLike, image: np.ndarray | None, reference: np.ndarray, prediction: np.ndarray,
                 title: str = "") -> Path:
    """Write the overlay PNG atomically, with ``title`` written above the panels."""
    from PIL import Image, ImageDraw

    panels = overlay_panels(image, reference, prediction)
    canvas = np.full((panels.shape[0] + 18, panels.shape[1], 3), 255, np.uint8)
    canvas[18:] = panels
    picture = Image.fromarray(canvas)
    ImageDraw.Draw(picture).text((4, 3), f"{title}   (image | reference | prediction)".strip(), fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
