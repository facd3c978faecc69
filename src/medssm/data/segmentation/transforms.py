"""Training augmentation: MONAI dictionary transforms with nnU-Net's choices and probabilities.

Per sample, in this order: rotation (p 0.2; ±180° in 2D, ±30° about each axis in 3D), scaling
(p 0.2, 0.7-1.4), Gaussian noise (p 0.1, std up to 0.1), Gaussian blur (p 0.2, sigma 0.5-1),
brightness (p 0.15, x0.75-1.25), contrast (p 0.15, x0.75-1.25 about the mean, range kept),
low-resolution simulation (p 0.25, zoom 0.5-1), gamma on the inverted image (p 0.1) and gamma
(p 0.3, 0.7-1.5, statistics kept), mirroring (p 0.5 along each axis). Spatial transforms move the
label with nearest-neighbour interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
)


class TrainingTransforms:
    """Callable on a batch ``{"image": (B, C, *P), "label": (B, 1, *P), ...}``; returns a new batch
    with the same shapes and dtypes (other keys are passed through).

    With a seed, sample ``i`` of call ``n`` is augmented with every transform reseeded from
    ``(seed, n, first + i)``: it depends on the seed, the call count and its place in the global
    batch alone, so ranks that each augment their own slice (``first``: the slice's offset) produce
    what one process does on the whole batch, and ``state_dict`` is just the seed and the count.
    """

    def __init__(self, compose: Compose, seed: int | None = 0, patch_size=None):
        self.compose = compose
        self.seed = seed
        self.calls = 0
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)

    def __call__(self, batch: dict, first: int = 0) -> dict:
        if self.patch_size is not None and tuple(batch["image"].shape[2:]) != self.patch_size:
            raise ValueError(f"batch of spatial shape {tuple(batch['image'].shape[2:])}; these transforms "
                             f"were made for patch size {self.patch_size}")
        images, labels = [], []
        for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
            if self.seed is not None:
                entropy = [self.seed, self.calls, first + i]
                self.compose.set_random_state(seed=int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            out = self.compose({"image": image, "label": label.float()})
            images.append(_plain(out["image"]).float())
            labels.append(_plain(out["label"]).round().long())
        self.calls += 1
        return {**batch, "image": torch.stack(images), "label": torch.stack(labels)}

    def set_random_state(self, seed: int | None) -> TrainingTransforms:
        """Seed the augmentation (None: unseeded, MONAI's own generators) and restart the count."""
        self.seed, self.calls = seed, 0
        return self

    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.calls = state["seed"], int(state["calls"])


def training_transforms(spatial_dims: int, patch_size=None, level: str = "nnunet", rotation_deg: float | None = None,
                        scale_range: tuple[float, float] = (0.7, 1.4), mirror_axes=None,
                        seed: int | None = 0) -> TrainingTransforms:
    """nnU-Net-like augmentation for ``spatial_dims`` 2 or 3 (see the module docstring).

    Args:
        patch_size: the plan's patch size; batches of another spatial shape are refused (None:
            any shape). The transforms keep the input size.
        level: ``"nnunet"`` (every transform above) or ``"mirror"`` (the mirroring alone).
        rotation_deg: maximum rotation; default 180 in 2D, 30 in 3D.
        mirror_axes: spatial axes to mirror (default all).
        seed: seeds every transform (None leaves them unseeded).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if level not in ("nnunet", "mirror"):
        raise ValueError(f"augmentation must be nnunet, mirror or none, got {level!r}")
    keys = ("image", "label")
    angle = math.radians(rotation_deg if rotation_deg is not None else (180 if spatial_dims == 2 else 30))
    rotate = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    mirror_axes = list(range(spatial_dims)) if mirror_axes is None else list(mirror_axes)
    mirror = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in mirror_axes]
    if level == "mirror":
        return TrainingTransforms(Compose(mirror), seed, patch_size)
    transforms = [
        RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True, **rotate),
        RandZoomd(keys, prob=0.2, min_zoom=scale_range[0], max_zoom=scale_range[1], mode=("bilinear", "nearest"),
                  padding_mode="constant", keep_size=True),
        RandGaussianNoised("image", prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", prob=0.15, factors=0.25),
        RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
        RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0),
                                   upsample_mode="bicubic" if spatial_dims == 2 else "trilinear"),
        RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        *mirror,
    ]
    return TrainingTransforms(Compose(transforms), seed, patch_size)


def _plain(t) -> torch.Tensor:
    """A plain tensor: MONAI hands back MetaTensors, which compiled kernels (the fused scan) refuse."""
    t = torch.as_tensor(t)
    return t.as_tensor() if hasattr(t, "as_tensor") else t
