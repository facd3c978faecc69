"""The optimiser and the per-iteration learning-rate schedule of a recipe (a model's recipe is on
its card: ``medssm.get_model_card(name).recipe``), for both trainers.

Example:
    >>> recipe = medssm.get_model_card("lightm_unet_2d").recipe   # Adam 1e-4, wd 1e-5, poly 0.9, Dice+CE, clip 12
    >>> opt = make_optimizer(model.parameters(), recipe)
    >>> sched = make_scheduler(opt, recipe.schedule, total_steps=100 * 250)
"""

from __future__ import annotations

import math

import torch

from ..nets.cards import Recipe


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser: ``adam`` (L2 weight decay, as torch.optim.Adam), ``adamw`` or ``sgd``."""
    name, lr, weight_decay = recipe.optimizer.lower(), recipe.lr, recipe.weight_decay
    momentum, nesterov = recipe.momentum, recipe.nesterov
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               nesterov=nesterov and momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose from adam, adamw, sgd")


def poly_factor(step: int, total_steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay: ``(1 − step/total)^0.9``."""
    return (1 - min(step, total_steps) / max(total_steps, 1)) ** exponent


class Schedule:
    """The factor of the base learning rate at a step: ``poly``, ``cosine`` or ``constant`` after an
    optional linear warm-up. An object rather than a closure: LambdaLR keeps its fields in the
    scheduler's state, so a total changed during a run (a budget refitted) is resumed with it."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int = 0):
        name = name.lower()
        if name not in ("poly", "cosine", "constant"):
            raise ValueError(f"unknown schedule {name!r}; choose from poly, cosine, constant")
        self.name, self.total_steps, self.warmup_steps = name, int(total_steps), int(warmup_steps)
        self.offset = 0  # the step the schedule (re)started at

    def __call__(self, step: int) -> float:
        step -= self.offset
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        s, n = step - self.warmup_steps, max(self.total_steps - self.warmup_steps, 1)
        if self.name == "poly":
            return poly_factor(s, n)
        if self.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, n) / n))
        return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration schedule (call ``.step()`` after every optimiser step): ``poly``, ``cosine``
    or ``constant``, with an optional linear warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(name, total_steps, warmup_steps))


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Stretch or shorten the schedule of a running ``scheduler`` to end at ``total_steps``."""
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = int(total_steps) - schedule.offset


def restart(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Start the schedule again from the current step, from the base rate, over ``steps`` more steps
    (a warm restart, as SGDR's), without warm-up: training extended past a schedule that had ended."""
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        schedule.offset, schedule.total_steps, schedule.warmup_steps = scheduler.last_epoch, int(steps), 0
        group["lr"] = base * schedule(scheduler.last_epoch)
