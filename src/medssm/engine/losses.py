"""Segmentation losses: soft Dice + cross-entropy (nnU-Net's, 1:1) and plain cross-entropy.

Both take raw logits ``(B, K, *S)`` and an integer label map ``(B, 1, *S)`` or ``(B, *S)``.

Example:
    >>> loss_fn = make_loss("dice_ce")
    >>> loss = loss_fn(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 1, 16, 16)))
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _as_index(target: torch.Tensor) -> torch.Tensor:
    if target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


class SoftDiceLoss(nn.Module):
    """1 − soft Dice of the softmax probabilities, averaged over foreground classes.

    As nnU-Net's: background left out (``include_background=False``), smoothing ``1e-5`` in
    numerator and denominator, and with ``batch_dice=True`` the sums run over the whole batch
    (one Dice per class) rather than per sample.
    """

    def __init__(self, include_background: bool = False, batch_dice: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.include_background, self.batch_dice, self.smooth = include_background, batch_dice, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _as_index(target)
        probs = logits.float().softmax(1)  # (B, K, *S)
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)  # (B, K, *S)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        axes = tuple(range(2, probs.ndim))
        if self.batch_dice:
            axes = (0, *axes)
        intersection = (probs * onehot).sum(axes)
        denominator = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``weight_ce · CE + weight_dice · SoftDice`` (nnU-Net's default, weights 1:1)."""

    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True):
        super().__init__()
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.dice = SoftDiceLoss(batch_dice=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _as_index(target)
        return self.weight_ce * F.cross_entropy(logits.float(), target) + self.weight_dice * self.dice(logits, target)


class CELoss(nn.Module):
    """Plain cross-entropy on logits and an index label map (SegMamba's loss)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), _as_index(target))


LOSSES = {"dice_ce": DiceCELoss, "ce": CELoss, "dice": SoftDiceLoss}


def make_loss(name: str) -> nn.Module:
    """``"dice_ce"`` (Dice + CE, 1:1), ``"ce"`` or ``"dice"``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]()
