"""The pieces of a training loop below the trainer (:mod:`.trainer`): seeding, one optimisation step,
the step timer the budget planner and the quickstart use, and how an epoch ends (checkpoints, log,
curves, one printed line).

Example:
    >>> seed_everything(cfg.seed)
    >>> loss = train_step(ddp_model, images, labels, loss_fn, optimizer, scheduler, grad_clip=12.0)
    >>> seconds, memory = time_step(model, lambda: (images, labels), loss_fn, device, "bf16")
    >>> recorder.end_epoch(row, epochs, improved, model, evaluated, optimizer=optimizer, scheduler=scheduler)
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..devices import autocast, peak_memory, resident_memory
from ..runs import checkpoint_folder, save_checkpoint
from . import distributed
from .history import History

__all__ = ["seed_everything", "grad_scaler", "backward_and_step", "train_step", "time_step", "call_seconds",
           "EpochRecorder"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active for fp16 only (bf16 has float32's range); disabled it passes through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def backward_and_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None) -> None:
    """Backward (loss-scaled for fp16), optional gradient-norm clipping on the true gradients, optimiser step."""
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
    scaler.scale(loss).backward()
    if grad_clip and grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_step(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn,
               optimizer: torch.optim.Optimizer, scheduler=None, grad_clip: float | None = 12.0,
               device: torch.device | str = "cpu", precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One update from this process's slice of the global batch (``image``, ``label``): forward
    under autocast unless fp32, the loss on the global batch (every rank's labels gathered), backward,
    gradient-norm clipping, optimiser and schedule step; returns the loss. A non-finite loss skips
    the update (and is returned, so the caller can count it)."""
    device = torch.device(device)
    image = image.to(device, non_blocking=True)
    label = distributed.all_gather(label.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss = distributed.global_loss(loss_fn, model(image), label)
    if torch.isfinite(loss):
        backward_and_step(loss, model, optimizer, scaler, grad_clip)
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a clock read before would stop too early on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def call_seconds(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds of one call of ``fn`` on ``device`` (after a first, uncounted one), its kernels finished."""
    device = torch.device(device)
    fn()
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def time_step(model: torch.nn.Module, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], loss_fn,
              device: torch.device | str = "cpu", precision: str = "fp32", steps: int = 2) -> tuple[float, int]:
    """(seconds, bytes) of one training step of ``model`` as the trainer takes it (the batch from
    ``next_batch``, forward under the run's precision, loss, backward, Adam update) on ``device``, its
    kernels finished: the best time of ``steps`` after a first, uncounted one (it compiles the scan
    kernels), and the memory the process grew by beyond what it held before (its peak resident set).
    This process alone: the budget is timed on rank 0 while the other ranks wait."""
    device = torch.device(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    scaler = grad_scaler(device, precision)
    times, before = [], resident_memory()
    for _ in range(steps + 1):
        _synchronize(device)
        start = time.perf_counter()
        image, label = next_batch()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(model(image.to(device)), label.to(device))
        backward_and_step(loss, model, optimizer, scaler)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:]), max(0, peak_memory() - before)


class EpochRecorder:
    """How an epoch ends, on rank 0: ``checkpoints/last`` (everything to resume), then
    ``checkpoints/best`` when validation improved, a row in ``log.csv``/``log.json``, the curves,
    and one line on stdout (printed with or without progress bars). Other ranks record nothing."""

    def __init__(self, run: Path, metadata: dict, *, resume_epoch: int | None = None, main: bool = True,
                 score: str = "val_score"):
        self.run, self.metadata, self.main, self.score = Path(run), metadata, main, score
        self.history = History(self.run, resume=resume_epoch is not None, resume_epoch=resume_epoch)

    def end_epoch(self, row: dict, epochs: int, improved: bool, model: torch.nn.Module, evaluated: torch.nn.Module,
                  *, optimizer, scheduler=None, scaler=None, extra_state: dict | None = None) -> None:
        """Record epoch ``row["epoch"]``: ``model`` (the trained weights) into ``last`` with the
        training state, ``evaluated`` (the same, or its moving average) into ``best`` if ``improved``."""
        if not self.main:
            return
        epoch = row["epoch"]
        meta = {**self.metadata, **{k: v for k, v in row.items() if k.startswith("val_")}}
        save_checkpoint(checkpoint_folder(self.run, "last"), model, epoch=epoch, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, metadata=meta, extra_state=extra_state)
        if improved:
            save_checkpoint(checkpoint_folder(self.run, "best"), evaluated, epoch=epoch, metadata=meta)
        self.history.log(**row)
        self.history.plot()
        print(self.line(row, epochs, improved), file=sys.stdout, flush=True)

    def finish(self, evaluated: torch.nn.Module, epoch: int) -> Path:
        """Make sure ``checkpoints/best`` exists (a run without validation keeps its last model) and
        print where the run is, with its best validation score."""
        best = checkpoint_folder(self.run, "best")
        if self.main:
            if not best.is_dir():
                save_checkpoint(best, evaluated, epoch=epoch, metadata=self.metadata)
            scored = [r for r in self.history.rows if isinstance(r.get(self.score), float) and math.isfinite(r[self.score])]
            top = max(scored, key=lambda r: r[self.score], default=None)
            said = f"best {self.score.replace('_', ' ')} {top[self.score]:.4f} at epoch {top['epoch']}; " if top else ""
            print(f"done: {said}run in {self.run}", flush=True)
        distributed.barrier()  # every rank returns once rank 0's files are written
        return self.run

    def line(self, row: dict, epochs: int, improved: bool) -> str:
        """``epoch 3/10: loss 0.41, val Dice 0.90 (best) [12 s]``: losses and validation scores of ``row``."""
        parts = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items()
                 if isinstance(v, float) and math.isfinite(v) and (k.endswith("loss") or k in (self.score, "val_acc"))]
        text = f"epoch {row['epoch']}/{epochs}: " + ", ".join(parts)
        return text + (" (best)" if improved else "") + f" [{row.get('time_s', 0):.0f} s]"
