"""Where a model runs, in which precision and on how many CPU threads: ``--device``, ``--precision``
and ``--threads``, for training and prediction.

``--device auto`` picks CUDA, then MPS, then the CPU. ``--precision bf16|fp16`` runs the network
under :func:`torch.autocast` (the selective scan still computes in float32: it turns autocast off
for itself); fp32 is plain float32. fp16 needs a GPU and a gradient scaler, bf16 needs neither;
on the CPU only bf16 is offered (CPU autocast in fp16 is slow and many CPU kernels lack it). On a
CPU, bf16 pays where the CPU computes in bfloat16 itself (AVX512-BF16 or AMX): convolutions and GEMMs
run in bf16 there (oneDNN), while the scan and the Mamba layers' causal conv stay float32; elsewhere
bf16 is emulated and slower than fp32, and :func:`check_precision` warns.

On the CPU, bf16 autocast also runs a 3D convolution whose input is shallower than its kernel along
the first spatial axis in float32 (:func:`conv3d`): there oneDNN's bfloat16 weight gradient reads
uninitialised memory (torch 2.13; relative errors up to 1e36 or NaN, depending on what the memory
held), which the deepest level of a 3D U-Net meets when a patch is 32 voxels deep. A checkpointed
block recomputed in the backward runs under the same routing (:func:`routing_conv3d`).

``--threads N`` (:func:`cpu_threads`) sets torch's intra-op threads, which numba's kernels follow.
:func:`keep_freed_memory` stops glibc from returning freed memory to the system between steps.

Example:
    >>> device = resolve_device("auto")
    >>> check_precision("bf16", device)
    >>> with autocast(device, "bf16"):
    ...     logits = model(x)
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["PRECISIONS", "resolve_device", "check_precision", "autocast", "conv3d", "routing_conv3d",
           "cpu_has_native_bf16", "cpu_threads", "keep_freed_memory", "available_memory", "resident_memory",
           "peak_memory"]

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
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("--precision bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); bf16 is "
                      "emulated here and usually slower than fp32", RuntimeWarning, stacklevel=2)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 itself (AVX512-BF16 or AMX), as oneDNN reports it."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (None: as they are); numba's kernels
    follow torch's count on every call. Yields the count in force.

    On a machine whose cores are shared with other work, fewer threads than cores avoid the waits
    of threads that cannot all run at once (see docs/how-to/distributed.md)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc (Linux) to keep freed memory for reuse instead of handing it back to the system:
    large blocks come from the heap rather than a fresh ``mmap`` (threshold 1 GiB) and the heap is
    never trimmed. Each step of a training loop then reuses the last step's pages instead of faulting
    in new ones (~1-10 µs per 4 KiB page, the most on VMs; a LightM-UNet step at 256² faults in
    300-400 MiB). The process keeps its peak memory until it exits. Returns whether it was applied
    (False off glibc). Affects the whole process, so only the command line calls it, for itself."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_memory() -> int:
    """Bytes this process holds in memory now (its resident set; 0 where unknown)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_memory(children: bool = False) -> int:
    """The most bytes this process (or, with ``children``, the largest of its finished child processes)
    has held in memory so far (the peak resident set)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (no-op for fp32); on the CPU in bf16 every
    3D convolution in it goes through :func:`conv3d`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=PRECISIONS[precision]))
    if device.type == "cpu" and precision == "bf16":
        stack.enter_context(_SafeConv3d())
    return stack


def routing_conv3d() -> contextlib.AbstractContextManager:
    """What :func:`autocast` does to 3D convolutions on the CPU in bf16, if it does it here: the
    context a recomputation in the backward (activation checkpointing) needs to repeat the forward."""
    routed = any(isinstance(mode, _SafeConv3d) for mode in torch.overrides._get_current_function_mode_stack())
    return _SafeConv3d() if routed else contextlib.nullcontext()


def _bf16_weight_gradient_is_wrong(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN would compute this 3D convolution's weight gradient in bfloat16 on an input
    shallower than the kernel (wrong in torch 2.13, see the module's docstring)."""
    return (x.dim() == 5 and x.device.type == "cpu" and x.shape[2] < weight.shape[2]
            and (x.dtype == torch.bfloat16 or weight.dtype == torch.bfloat16
                 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)))


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv3d``, in float32 (the result in bfloat16) where its bfloat16 weight gradient would be wrong."""
    if not _bf16_weight_gradient_is_wrong(x, weight):
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    with torch.autocast("cpu", enabled=False):
        out = F.conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding,
                       dilation, groups)
    return out.to(torch.bfloat16)


class _SafeConv3d(TorchFunctionMode):
    """Routes ``F.conv3d`` through :func:`conv3d` (any model's, MONAI's included)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return (conv3d if func is F.conv3d else func)(*args, **(kwargs or {}))
