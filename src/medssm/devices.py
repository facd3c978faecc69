"""Where a model runs and in which precision: ``--device`` and ``--precision``, for training and prediction.

``--device auto`` picks CUDA, then MPS, then the CPU. ``--precision bf16|fp16`` runs the network
under :func:`torch.autocast` (the selective scan still computes in float32: it turns autocast off
for itself); fp32 is plain float32. fp16 needs a GPU and a gradient scaler, bf16 needs neither;
on the CPU only bf16 is offered (CPU autocast in fp16 is slow and many CPU kernels lack it).

Example:
    >>> device = resolve_device("auto")
    >>> check_precision("bf16", device)
    >>> with autocast(device, "bf16"):
    ...     logits = model(x)
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "resolve_device", "check_precision", "autocast"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int | None = None, prefer: str | None = None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` as a device.

    ``auto`` is the ``prefer`` kind when given and present here (e.g. the kind a run was trained
    on), else CUDA, else MPS, else the CPU. With ``local_rank`` (one process per GPU), a bare
    ``cuda`` becomes ``cuda:local_rank``. Raises a clear error when the backend is not there.
    """
    if name == "auto":
        present = {"cuda": torch.cuda.is_available(), "mps": _mps_available(), "cpu": True}
        name = prefer if present.get(prefer or "") else next(k for k, ok in present.items() if ok)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda, cuda:N, mps or auto, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch build sees no CUDA GPU (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"--device {name}: the MPS backend (Apple GPU) is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N, mps or auto, got {name!r}")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, saying what to use instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a GPU (CUDA or MPS); on the CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])
