"""Training checkpoints: written atomically, loaded without unpickling code, resumable exactly.

A checkpoint is a folder: ``model.safetensors`` + ``model.json`` (what :func:`medssm.load_model`
reads: model name, arguments and any metadata such as the plan and label names) and
``training_state.pt`` (optimiser, schedule, loss scaler, epoch, random generators), all written into a temporary
folder that then replaces the old one, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..nets.registry import save_model

STATE_FILE = "training_state.pt"


def rng_state() -> dict:
    """The global random generators' states (torch, the current CUDA device's once CUDA is in use,
    numpy, python), in a weights_only-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():  # absent in older checkpoints
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, *, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    scaler: torch.amp.GradScaler | None = None,
                    metadata: dict | None = None, extra_state: dict | None = None) -> Path:
    """Write a checkpoint folder atomically. ``metadata`` goes into model.json (JSON-able);
    ``extra_state`` (tensors, numbers, strings) into training_state.pt."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_model(model, tmp, extra=metadata)
        state = {
            "epoch": epoch,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "extra": extra_state or {},
        }
        torch.save(state, tmp / STATE_FILE)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True) -> dict:
    """Load a checkpoint folder into ``model`` (and optimiser/schedule/scaler); returns the training state
    (``epoch``, ``extra``). Reads the ``.old`` copy if a crash interrupted the last replacement."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_FILE).is_file() and (directory.with_name(directory.name + ".old") / STATE_FILE).is_file():
        directory = directory.with_name(directory.name + ".old")
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no checkpoint here (missing {STATE_FILE})")
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):  # absent in checkpoints from before it was saved here
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
