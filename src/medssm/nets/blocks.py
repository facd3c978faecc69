"""Small blocks more than one family uses."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["NoMixer"]


class NoMixer(nn.Module):
    """The No-Mamba ablation's token mixer (Isensee et al. 2024, "nnU-Net Revisited"): returns its
    tokens unchanged; extra arguments a Mamba mixer takes (a spatial shape) are ignored."""

    def forward(self, tokens: torch.Tensor, *args) -> torch.Tensor:
        return tokens
