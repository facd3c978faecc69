"""Threads of the numba kernels that run on numba's own pool (the causal and depthwise convolutions;
the fused scan runs on torch's OpenMP team instead): as many as torch's, one launch at a time."""

from __future__ import annotations

import os
import threading

import numba
import torch

__all__ = ["KERNEL_LOCK", "use_torch_threads"]

# Numba's OpenMP layer leaves its threads spinning after each call, starving torch's own threads;
# the workqueue layer's threads sleep.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# The workqueue layer aborts the process when two Python threads launch parallel kernels at once.
KERNEL_LOCK = threading.Lock()


def use_torch_threads() -> None:
    """Let numba's parallel kernels run as many threads as torch (``torch.set_num_threads``)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
