"""Segmentation losses, as nnU-Net computes them, for integer classes and for regions (:mod:`medssm.labels`).

Every loss takes raw logits ``(B, K, *S)`` and the integer label map ``(B, 1, *S)`` or ``(B, *S)``
(augmentation moves label maps; a region's target is made here, as the union of its labels):

- classes (softmax): soft Dice of the foreground classes + cross-entropy (``dice_ce``, nnU-Net's,
  1:1), cross-entropy alone (``ce``, SegMamba's) or the Dice alone (``dice``);
- regions (one sigmoid per region): soft Dice of every region + binary cross-entropy (``dice_ce``:
  nnU-Net's ``DC_and_BCE_loss``), BCE alone (``ce``) or the Dice alone (``dice``).

Dice sums run over the whole batch (``batch_dice``) with smoothing 1e-5, as nnU-Net's. Voxels of
an ``ignore`` label count in neither term.

Example:
    >>> loss_fn = make_loss("dice_ce", LabelSet({"background": 0, "lung": 1}))
    >>> loss = loss_fn(torch.randn(2, 2, 16, 16), torch.randint(0, 2, (2, 1, 16, 16)))
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..labels import LabelSet

LOSSES = ("dice_ce", "ce", "dice")


class SegmentationLoss(nn.Module):
    """``weight_ce`` x (B)CE + ``weight_dice`` x (1 - soft Dice) for ``labels`` (classes or regions)."""

    def __init__(self, labels: LabelSet, weight_ce: float = 1.0, weight_dice: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.labels, self.weight_ce, self.weight_dice, self.smooth = labels, weight_ce, weight_dice, smooth
        self.register_buffer("members", torch.tensor([[v in values for v in range(max(labels.values) + 1)]
                                                      for values in labels.structures.values()]), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target, logits = target.long(), logits.float()
        ignore = self.labels.ignore_label
        valid = (target != ignore) if ignore is not None else None  # (B, *S); None: every voxel counts
        if valid is not None:
            target = torch.where(valid, target, torch.zeros_like(target))
        regions = self.labels.has_regions
        if regions:  # (B, R, *S): region membership, for both terms
            onehot = self.members.to(target.device)[:, target].movedim(0, 1).float()
        elif self.weight_dice:  # (B, K - 1, *S): the foreground classes, for the Dice alone
            onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        loss = logits.new_zeros(())
        if self.weight_ce:
            ce = (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1) if regions
                  else F.cross_entropy(logits, target, reduction="none"))
            ce = ce.mean() if valid is None else (ce * valid).sum() / valid.sum().clamp_min(1)
            loss = loss + self.weight_ce * ce
        if self.weight_dice:
            probs = logits.sigmoid() if regions else logits.softmax(1)[:, 1:]
            if valid is not None:
                probs, onehot = probs * valid[:, None], onehot * valid[:, None]
            axes = (0, *range(2, probs.ndim))
            intersection = (probs * onehot).sum(axes)
            denominator = probs.sum(axes) + onehot.sum(axes)
            dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
            loss = loss + self.weight_dice * (1 - dice.mean())
        return loss


def make_loss(name: str, labels: LabelSet) -> nn.Module:
    """``"dice_ce"`` (Dice + (B)CE, 1:1), ``"ce"`` or ``"dice"``, for ``labels``' classes or regions."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return SegmentationLoss(labels, weight_ce=float(name != "dice"), weight_dice=float(name != "ce"))
