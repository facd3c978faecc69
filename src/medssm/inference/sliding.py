"""Sliding-window inference with Gaussian blending and optional mirror test-time augmentation.

Shared by validation during training and by ``medssm predict``. Built on MONAI's
``sliding_window_inference`` (``mode="gaussian"``, σ = 1/8 of the patch, as nnU-Net).

Example:
    >>> probs = sliding_window_probabilities(model, image, patch_size=(256, 256))  # (K, *S), sums to 1
    >>> labels = probs.argmax(0)
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch


def mirror_axes_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes to flip (2^d, the identity first): 4 in 2D, 8 in 3D."""
    axes = tuple(range(spatial_dims)) if axes is None else tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def sliding_window_probabilities(model: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int], *,
                                 overlap: float = 0.5, mirror: bool = False, mirror_axes: Sequence[int] | None = None,
                                 batch_size: int = 1, device: torch.device | str | None = None,
                                 activation: str = "softmax", progress: bool = False) -> torch.Tensor:
    """Probabilities ``(K, *S)`` (float32, on the CPU) of one image ``(C, *S)``: the softmax over the
    classes, or with ``activation="sigmoid"`` one probability per region (:mod:`medssm.labels`).

    Windows of ``patch_size`` overlap by ``overlap``; their logits are blended with a Gaussian
    weight; images smaller than a patch are padded and cropped back. With ``mirror=True`` the
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
        return model(patch.as_tensor() if hasattr(patch, "as_tensor") else patch)

    flips = mirror_axes_sets(len(patch_size), mirror_axes) if mirror else [()]
    total = None
    try:
        for flip in flips:
            dims = [2 + a for a in flip]
            xi = x.flip(dims) if dims else x
            logits = sliding_window_inference(xi, roi_size=tuple(int(p) for p in patch_size), sw_batch_size=batch_size,
                                              predictor=predictor, overlap=overlap, mode="gaussian", sigma_scale=0.125,
                                              padding_mode="constant", cval=0.0, progress=progress)
            logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
            probs = logits.float().softmax(1) if activation == "softmax" else logits.float().sigmoid()
            if dims:
                probs = probs.flip(dims)
            total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    return (total / len(flips))[0].cpu()
