"""A training run: one folder layout for both tasks, one way to load it (:func:`load_run`), and the
mechanics that write it (claiming the folder, checkpoints written atomically, resumed exactly).

Layout (segmentation and classification alike)::

    RUN/model.json              what the run is: task, model name and arguments, and what prediction
                                needs (plan and labels, or classes and input size), recipe, device
    RUN/config.json             the training options
    RUN/splits.json             the samples each fold or split holds (plan.json too for segmentation)
    RUN/budget.json             with --budget: how the run fits its time (medssm.budget.BudgetPlan)
    RUN/checkpoints/best/       model.safetensors + model.json: the model kept by validation
    RUN/checkpoints/last/       the same + training_state.pt (optimiser, schedule, generators, epoch)
    RUN/log.csv, log.json, curves.png
    RUN/.lock                   held (an OS lock) while a training process writes the run

``load_run`` also reads a checkpoint folder or a saved model (``model.json`` + ``model.safetensors``),
and classification runs written before this layout (the best model at ``RUN/``, the last
checkpoint at ``RUN/last/``).

Example:
    >>> run = load_run("runs/lung")
    >>> model = run.load_model("best", device="cpu")   # eval mode
    >>> run.task, run.card.size_divisor, run.plan.patch_size
    >>> run.budget.step_s, run.log[-1]["val_dice"], run.splits[0]["val"]
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from .budget import BudgetPlan
from .files import output_folder, read_json, read_safetensors, read_torch, write_file, write_json
from .nets.cards import ModelCard
from .nets.registry import create_model, get_model_card, save_model

__all__ = ["Run", "load_run", "claim_run", "RunBusyError", "save_checkpoint", "load_training_state",
           "has_checkpoint", "checkpoint_folder", "write_description", "CHECKPOINTS", "STATE_FILE"]

CHECKPOINTS = ("best", "last")
STATE_FILE = "training_state.pt"
LOCK_FILE = ".lock"
WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"


@dataclass(frozen=True)
class Run:
    """A trained run (or a saved model): its description and where its checkpoints are."""

    path: Path
    description: dict
    checkpoints: dict[str, Path] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.description["name"]

    @property
    def model_kwargs(self) -> dict:
        return dict(self.description.get("kwargs", {}))

    @property
    def card(self) -> ModelCard:
        return get_model_card(self.model_name)

    @property
    def task(self) -> str:
        return self.description.get("task") or self.card.task

    @property
    def plan(self):
        """The segmentation plan the run was trained with."""
        from .data.segmentation.plan import Plan

        if "plan" not in self.description:
            raise ValueError(f"{self.path / DESCRIPTION}: no plan in it; not a segmentation run of medssm train")
        return Plan.from_dict(self.description["plan"], str(self.path / DESCRIPTION))

    @property
    def budget(self) -> BudgetPlan | None:
        """The run's budget plan (``budget.json``), refitted and finished as training left it; None
        for a run trained without ``--budget``."""
        path = self.path / "budget.json"
        return BudgetPlan.from_dict(read_json(path, "budget plan"), str(path)) if path.is_file() else None

    @property
    def log(self) -> list[dict]:
        """The training log (``log.json``): one row per epoch; [] before the first epoch ends."""
        path = self.path / "log.json"
        return read_json(path, "training log", list) if path.is_file() else []

    @property
    def splits(self):
        """The samples each fold (segmentation: a list of ``{"train", "val"}``) or split (classification:
        ``{"train", "val"}``) holds (``splits.json``)."""
        return read_json(self.path / "splits.json", "splits", (list, dict))

    def checkpoint(self, which: str = "best") -> Path:
        """The folder holding the ``which`` weights (``best`` falls back to ``last``)."""
        if which not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
        for w in (which, "last") if which == "best" else (which,):
            if w in self.checkpoints:
                return self.checkpoints[w]
        raise FileNotFoundError(f"{self.path}: no trained model here (no checkpoints/{which}/{WEIGHTS})")

    def build_model(self) -> nn.Module:
        """The run's network, untrained; arguments it cannot be built with are a one-line error naming model.json."""
        try:
            return create_model(self.model_name, **self.model_kwargs)
        except ValueError as e:
            raise ValueError(f"{self.path / DESCRIPTION}: {e}") from None

    def load_weights(self, model: nn.Module, which: str = "best") -> Path:
        """Load the ``which`` weights into ``model`` (strictly); returns their checkpoint folder."""
        folder = self.checkpoint(which)
        try:
            model.load_state_dict(read_safetensors(folder / WEIGHTS), strict=True)
        except RuntimeError as e:  # missing/unexpected keys or shapes: not this model's weights
            raise ValueError(f"{folder / WEIGHTS}: does not fit {self.model_name} ({str(e).splitlines()[0]})") from None
        return folder

    def load_model(self, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
        """The run's network with the ``which`` weights, in eval mode, on ``device``."""
        model = self.build_model()
        self.load_weights(model, which)
        return model.to(device).eval()


def _checkpoint_folders(run: Path) -> dict[str, Path]:
    """``{"best": folder, "last": folder}`` of the complete checkpoints in ``run`` (either may be absent)."""
    found = {}
    for which in CHECKPOINTS:
        # .old: a crash between the two renames of save_checkpoint
        for folder in (run / "checkpoints" / which, run / "checkpoints" / f"{which}.old"):
            if (folder / WEIGHTS).is_file():
                found[which] = folder
                break
    if not found:  # a checkpoint or saved model folder; or a classification run from before 0.2, which kept
        legacy = {"best": run, "last": run / "last"}  # its best model at RUN/ and its last checkpoint at RUN/last
        found = {w: f for w, f in legacy.items() if (f / WEIGHTS).is_file()}
    return found


def load_run(path: str | os.PathLike) -> Run:
    """The run at ``path``: a training run folder, one of its checkpoint folders, or a saved model
    folder (``model.json`` + ``model.safetensors``). Damaged or missing files are one-line errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    checkpoints = _checkpoint_folders(path)
    # The run's description, or a checkpoint's own copy of it (each checkpoint carries one).
    source = next((p for p in (path, *checkpoints.values()) if (p / DESCRIPTION).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{path}: not a medssm run (no {DESCRIPTION}) nor a saved model "
                                f"({DESCRIPTION} + {WEIGHTS})")
    description = read_json(source / DESCRIPTION, "run description")
    if not isinstance(description.get("name"), str):
        raise ValueError(f"{source / DESCRIPTION}: names no model (expected a \"name\" key)")
    run = Run(path, description, checkpoints)
    run.card  # an unknown model is an error here, not at first use
    return run


def checkpoint_folder(run: str | os.PathLike, which: str) -> Path:
    """Where a training run keeps its ``which`` checkpoint (``best`` or ``last``)."""
    return Path(run) / "checkpoints" / which


# ----------------------------------------------------------------------------------------------
# Writing a run.


class RunBusyError(FileExistsError):
    """Another process is writing this run."""


@contextlib.contextmanager
def claim_run(run: str | os.PathLike) -> Iterator[Path]:
    """Hold ``RUN/.lock`` while the block writes the run; a second process gets :class:`RunBusyError`
    naming the holder. The lock is the OS's (``flock``), so a process that dies releases it: a
    crashed run never leaves the folder locked. A folder this call made, left holding only the lock
    because the block failed (a refused option), is removed again."""
    run = Path(run)
    new = not run.exists()
    output_folder(run, "a run folder")
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(f"{run}: in use by {lock_holder(run / LOCK_FILE, fd)}; wait for it to finish or "
                               "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        yield run
    except BaseException:
        if new and [p.name for p in run.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(run, ignore_errors=True)
        raise
    finally:
        os.close(fd)  # releases the lock


def lock_holder(path: Path, fd: int) -> str:
    """Who holds the ``flock`` of ``path``: the process the OS names (``/proc/locks``), with its command
    line, and what the file says when that is this process (a medssm run writes its pid, host and
    start there); else what the file says."""
    said = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    inode = os.fstat(fd).st_ino
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                pid = fields[4]
                if said.startswith(f"process {pid} "):
                    return said
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"process {pid} ({command.strip()[:200] or 'another program'})"
    except OSError:
        pass
    return said or "another process"


def has_checkpoint(run: str | os.PathLike) -> bool:
    """Whether ``run`` holds a complete checkpoint to resume from."""
    return "last" in _checkpoint_folders(Path(run))


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


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, *, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    scaler: torch.amp.GradScaler | None = None,
                    metadata: dict | None = None, extra_state: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: ``model.safetensors`` + ``model.json`` (``metadata``,
    JSON-able) and, with an ``optimizer``, ``training_state.pt`` (optimiser, schedule, scaler, epoch,
    random generators, ``extra_state``). A crash leaves the previous checkpoint (or its ``.old``
    copy), never a half-written one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_model(model, tmp, extra={**(metadata or {}), "epoch": epoch})
        if optimizer is not None:
            state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": rng_state(), "extra": extra_state or {}}
            write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # say the file as it would have been named, not its temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        name = str(e.filename or "").replace(str(tmp), str(directory))
        raise OSError(e.errno, e.strerror or str(e), name or str(directory)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_training_state(directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
                        scheduler=None, scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True) -> dict:
    """Restore the optimiser, schedule and scaler saved in a checkpoint folder and (by default) the
    random generators; returns the state (``epoch``, ``extra``)."""
    state = read_torch(Path(directory) / STATE_FILE, "training state")
    try:
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if restore_rng:
            set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{Path(directory) / STATE_FILE}: not a training state of this run ({e})") from None
    return state


def write_description(run: Path, model: nn.Module, metadata: dict) -> None:
    """``RUN/model.json``: the model's name and arguments with ``metadata``."""
    write_json(run / DESCRIPTION, {**model.medssm_config, **metadata}, default=str)
