"""An exponential moving average of a model's weights (``--ema``), as timm's ``ModelEmaV3``.

After every optimiser step the averaged copy moves towards the trained weights,
``w_ema <- d * w_ema + (1 - d) * w``, with the decay warmed up as ``d = min(decay, (1 + t) / (10 + t))``
after ``t`` updates, so the first epochs are not dominated by the initial weights. Buffers
(normalisation statistics) are copied. On a small dataset the average is a smoother, better model
to validate and keep than the last weights.

Example:
    >>> ema = WeightAverage(model, decay=0.998)
    >>> for x, y in loader:
    ...     train_step(...); ema.update(model)
    >>> probs = predict_proba(ema.module, val_ds)
"""

from __future__ import annotations

import copy

import torch

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of ``model``'s weights in ``self.module`` (an eval-mode copy)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema: the decay must lie strictly between 0 and 1 (e.g. 0.998), got {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for avg, new in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(new.detach(), 1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
