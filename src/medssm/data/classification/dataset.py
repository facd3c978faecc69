"""What a classifier is fed: MedMamba's official transforms written in torch for 2D and 3D alike (no
torchvision) and a ``Dataset`` over any source.

Training: random-resized crop (scale 0.08-1, aspect 3/4-4/3) and horizontal flip; evaluation: a
plain resize; then the model's normalisation (its card's ``normalize``; MedMamba's: mean 0.5, std 0.5,
to [-1, 1]).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import ClassificationSource

__all__ = ["ClassificationDataset", "random_resized_crop", "resize", "random_flip", "match_channels"]


def _interp_mode(spatial_dims: int) -> str:
    return "bilinear" if spatial_dims == 2 else "trilinear"


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(C, *S)`` to ``size`` (bi/trilinear, antialiased when shrinking a 2D image)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    d = x.dim() - 1
    shrink = any(s < t for s, t in zip(size, x.shape[1:]))
    out = F.interpolate(x[None], size=size, mode=_interp_mode(d), align_corners=False,
                        antialias=shrink and d == 2)
    return out[0]


def random_resized_crop(x: torch.Tensor, size: Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` for ``(C, H, W)`` and ``(C, D, H, W)``: a crop covering a
    random fraction ``scale`` of the area (volume) with random aspect ratios in ``ratio`` (log-uniform,
    for each pair of axes), resized to ``size``. Falls back to the whole input after 10 tries."""
    spatial = x.shape[1:]
    d = len(spatial)
    lo, hi = math.log(ratio[0]) / 2, math.log(ratio[1]) / 2
    for _ in range(10):
        frac = float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        logs = torch.empty(d).uniform_(lo, hi, generator=generator)
        logs = logs - logs.mean()  # product of the axis factors is 1: the crop keeps the area fraction
        sides = [round(s * frac ** (1 / d) * math.exp(float(a))) for s, a in zip(spatial, logs)]
        if all(0 < c <= s for c, s in zip(sides, spatial)):
            starts = [int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(spatial, sides)]
            crop = x[(slice(None),) + tuple(slice(a, a + c) for a, c in zip(starts, sides))]
            return resize(crop, size)
    return resize(x, size)


def random_flip(x: torch.Tensor, axes: Sequence[int], p: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each of the spatial ``axes`` (0 = first spatial axis; -1 = last, the horizontal one)
    with probability ``p``."""
    for a in axes:
        if float(torch.rand(1, generator=generator)) < p:
            x = torch.flip(x, dims=(a if a < 0 else a + 1,))
    return x


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey to RGB by repetition, RGB to grey by luminance (ITU-R 601), else unchanged."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, *x.shape[1:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, *([1] * (x.dim() - 1)))
        return (x * w).sum(0, keepdim=True)
    raise ValueError(f"cannot turn {c}-channel images into the model's {channels} channels")


class ClassificationDataset(torch.utils.data.Dataset):
    """A source with its transforms: items are ``(image (C, *size), label, index)``; the label is the
    class index, or for a multi-label source a float tensor of the findings' 0/1.

    Args:
        source: a :class:`ClassificationSource`.
        input_size: side of the network input (every spatial axis).
        train: random-resized crop + flips when True, a plain resize otherwise.
        in_chans: channels the model takes (grey/RGB converted to match); default the source's.
        crop_scale, crop_ratio: the random-resized crop's ranges.
        hflip, vflip: flip the last / second-to-last spatial axis with probability 0.5 (training).
        normalize: ``(mean, std)`` applied to the [0, 1] image (the model card's ``normalize``).
    """

    def __init__(self, source: ClassificationSource, input_size: int, train: bool = False,
                 in_chans: int | None = None, crop_scale: Sequence[float] = (0.08, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True, vflip: bool = False,
                 normalize: Sequence[float] = (0.5, 0.5)):
        self.source = source
        self.size = (int(input_size),) * source.spatial_dims
        self.train = train
        self.in_chans = in_chans or source.in_chans
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.flip_axes = ([-1] if hflip else []) + ([-2] if vflip else [])
        self.mean, self.std = (float(v) for v in normalize)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.source.load(i), dtype=np.float32))
        x = match_channels(x, self.in_chans)
        if self.train:
            x = random_resized_crop(x, self.size, self.crop_scale, self.crop_ratio)
            x = random_flip(x, self.flip_axes)
        else:
            x = resize(x, self.size)
        label = self.source.labels[i]
        target = torch.as_tensor(label, dtype=torch.float32) if self.source.multi_label else int(label)
        return (x - self.mean) / self.std, target, i
