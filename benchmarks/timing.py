"""Timing shared by the benchmark scripts."""

import statistics
import time


def call_seconds(fn, repeats: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn``, after one warm-up call (it compiles
    kernels on first use and lets onnxruntime plan its own)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    """Median of :func:`call_seconds`."""
    return statistics.median(call_seconds(fn, repeats))
