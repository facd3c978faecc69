"""Sliding-window inference with Gaussian blending and optional mirror test-time augmentation.

Shared by validation during training and by ``medssm predict``. Built on MONAI's
``sliding_window_inference`` (``mode="gaussian"``, σ = 1/8 of the patch, as nnU-Net).

Example:
    >>> probs = sliding_window_probabilities(model, image, patch_size=(256, 256))  # (K, *S), sums to 1
    >>> labels = probs.argmax(0)
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

WINDOW_VOXELS = 64 ** 3  # windows of a forward pass hold this many voxels, when the training batch allows


def window_batch(patch_size: Sequence[int], training_batch: int) -> int:
    """Windows per forward pass by default: as many as hold :data:`WINDOW_VOXELS` (a small patch pays a
    forward's fixed cost once for several windows), never more than the training batch (whose step fits
    memory), at least one."""
    return max(1, min(training_batch, WINDOW_VOXELS // math.prod(patch_size)))


def mirror_axes_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes to flip (2^d, the identity first): 4 in 2D, 8 in 3D."""
    axes = tuple(range(spatial_dims)) if axes is None else tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def sliding_window_probabilities(model: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int], *,
                                 overlap: float = 0.5, mirror: bool = False, mirror_axes: Sequence[int] | None = None,
                                 batch_size: int = 1, device: torch.device | str | None = None,
                                 activation: str = "softmax", accumulate: torch.dtype = torch.float32,
                                 progress: bool = False) -> torch.Tensor:
    """Probabilities ``(K, *S)`` (float32, on the CPU) of one image ``(C, *S)``: the softmax over the
    classes, or with ``activation="sigmoid"`` one probability per region (:mod:`medssm.labels`).

    Windows of ``patch_size`` overlap by ``overlap``, ``batch_size`` of them a forward pass; their
    logits are blended with a Gaussian weight into one accumulator of the image's size, of dtype
    ``accumulate`` (``torch.float16`` halves it, as nnU-Net's option does); images smaller than a patch
    are padded and cropped back. Memory: the accumulator, its weights and the image, the probabilities
    summed over flips, and one batch of windows through the network. With ``mirror=True`` the
    probabilities are averaged over all flips of the spatial axes (``mirror_axes`` to restrict them).
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
    if image.ndim != len(patch_size) + 1:
        raise ValueError(f"image of shape {tuple(image.shape)} does not match a {len(patch_size)}-D patch size "
                         f"{tuple(patch_size)}; expected (C, *spatial)")
    from monai.inferers import sliding_window_inference

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = image[None].to(device=device, dtype=torch.float32)  # (1, C, *S)
    def predictor(patch: torch.Tensor) -> torch.Tensor:  # MONAI hands over MetaTensors; networks get tensors
        return model(patch.as_tensor() if hasattr(patch, "as_tensor") else patch).to(accumulate)

    flips = mirror_axes_sets(len(patch_size), mirror_axes) if mirror else [()]
    total = None
    try:
        for flip in flips:
            dims = [2 + a for a in flip]
            xi = x.flip(dims) if dims else x
            logits = sliding_window_inference(xi, roi_size=tuple(int(p) for p in patch_size), sw_batch_size=batch_size,
                                              predictor=predictor, overlap=overlap, mode="gaussian", sigma_scale=0.125,
                                              padding_mode="constant", cval=0.0, progress=progress)
            logits = (logits.as_tensor() if hasattr(logits, "as_tensor") else logits).float()
            probs = logits.softmax(1) if activation == "softmax" else logits.sigmoid_()
            del logits
            if dims:
                probs = probs.flip(dims)
            total = probs if total is None else total.add_(probs)
            del probs
    finally:
        model.train(was_training)
    return total.div_(len(flips))[0].cpu()
