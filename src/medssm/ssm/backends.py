"""Which selective-scan implementation runs: the backend registry and the runtime switch.

Backends live in their own modules and register themselves when imported: ``reference``
(sequential, the float64 oracle), ``chunked`` (pure PyTorch, any device, exports to ONNX),
``fused`` (numba CPU kernels), ``triton`` (GPU kernels) and ``cuda`` (``mamba_ssm``'s kernel); a
module whose dependency is missing registers nothing. How a scan runs is not part of a model:
:func:`use_backend` picks the backend for every scan inside a block (``medssm train|predict|export
--scan-backend``), ``"auto"`` the fastest one available for the tensors' device.

Example:
    >>> with use_backend("chunked"):
    ...     logits = model(x)
"""

from __future__ import annotations

import contextvars
import importlib
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["register_backend", "available_backends", "use_backend", "current_backend", "resolve_backend",
           "is_exporting"]

Backend = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
_BACKENDS: dict[str, Backend] = {}
# Each module registers its backend(s) on import; imported on first use, so none is loaded for nothing.
_MODULES = ("reference", "chunked", "fused", "triton_scan", "cuda")
_modules_loaded = False
_selected = contextvars.ContextVar("medssm_scan_backend", default="auto")
_warned_fallback = False


def register_backend(name: str):
    """Decorator: make ``fn`` selectable as backend ``name``.

    A backend receives prepared inputs: float32/float64 tensors, ``B``/``C`` always grouped
    ``(batch, G, N, L)``, ``delta_bias`` and ``delta_softplus`` not yet applied.
    """

    def wrap(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn

    return wrap


def _backends() -> dict[str, Backend]:
    global _modules_loaded
    if not _modules_loaded:
        _modules_loaded = True
        for module in _MODULES:
            try:
                importlib.import_module(f"{__package__}.{module}")
            except (ImportError, OSError):  # e.g. numba/llvmlite missing: "auto" warns and uses chunked
                pass
    return _BACKENDS


def available_backends() -> list[str]:
    """The backends that can run here."""
    return sorted(_backends())


def get_backend(name: str) -> Backend:
    return _backends()[name]


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run every scan inside the block (in this thread) with backend ``name`` (``"auto"``: per device)."""
    if name != "auto" and name not in _backends():
        raise ValueError(f"unknown or unavailable scan backend {name!r}; available here: "
                         f"{', '.join(available_backends())} (or auto)")
    token = _selected.set(name)
    try:
        yield name
    finally:
        _selected.reset(token)


def current_backend() -> str:
    """The backend :func:`use_backend` selected here (``"auto"`` outside any block)."""
    return _selected.get()


def is_exporting() -> bool:
    """True while ``torch.jit`` traces or ``torch.onnx`` exports: only plain torch ops may run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def resolve_backend(backend: str, u: torch.Tensor) -> str:
    """The concrete backend ``backend`` stands for, for tensors like ``u``."""
    global _warned_fallback
    if backend == "auto":
        backend = current_backend()
    if backend != "auto":
        if backend not in _backends():
            raise ValueError(f"unknown or unavailable scan backend {backend!r}; available here: "
                             f"{', '.join(available_backends())}")
        return backend
    exporting = is_exporting()
    if u.device.type == "cuda" and not exporting:
        preference = ("cuda", "triton", "chunked")
    elif u.device.type == "cpu" and not exporting:
        preference = ("fused", "chunked")
        if "fused" not in _backends() and not _warned_fallback:
            warnings.warn("medssm: the fused CPU scan (numba) could not be loaded; using the slower "
                          "'chunked' scan", RuntimeWarning, stacklevel=3)
            _warned_fallback = True
    else:
        preference = ("chunked",)
    return next((name for name in preference if name in _backends()), "reference")
