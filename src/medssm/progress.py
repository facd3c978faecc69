"""Showing that long work is under way: one line per stage, with the time it took.

Example:
    >>> with stage("tracing the graph"):          # prints "tracing the graph ... done in 12.3 s"
    ...     torch.onnx.export(...)
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["stage"]


@contextmanager
def stage(what: str, enabled: bool = True) -> Iterator[None]:
    """Print ``what ...`` (to stderr) before the block and ``done in N s`` after it (``failed`` if it raises)."""
    if not enabled:
        yield
        return
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
