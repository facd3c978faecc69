"""Selective-scan benchmark: ``reference``, ``chunked``, ``fused`` and mambapy's ``pscan``, one run.

Prints one table and writes ``benchmarks/results/scan.json``. float32, 2 threads, best and median
of ``--repeats`` runs (the table shows the best: on a shared machine it is the least disturbed);
forward under ``torch.no_grad()``, forward+backward with every input requiring grad; peak
memory = rise of the resident set over one run (Linux), measured in a child process whose
allocator hands large blocks back to the system on free (``MALLOC_MMAP_THRESHOLD_``), so that
the times, taken here with the default allocator, do not pay for fresh pages on every call. Every time is also
given as a multiple of the **arithmetic floor** measured in the same run: per element of
batch*D*L*N, 1 exp + 6 flops forward and 2 exps + 26 flops forward+backward, an exp counted as
12 flops, at this machine's float32 matmul rate (a 1024^2 matmul). The ``torch.exp`` floor (the
exps at ``torch.exp``'s measured rate, the flops at the matmul rate) is printed beside it: it
depends on one library's exp and is below the fused kernel's own exp rate on some machines. For
the ``fused`` scan the table also gives its speed-up on 2 threads over 1 thread
(``torch.set_num_threads``), measured in the same run.

    python benchmarks/scan.py [--repeats 5] [--only fused] [--out benchmarks/results/scan.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numba
import torch
import torch.nn.functional as F

from medssm.ssm import selective_scan
from timing import call_seconds

SHAPES = [(1, 128, 4096, 16), (1, 256, 1024, 16), (1, 512, 256, 16), (1, 64, 32768, 16), (8, 384, 196, 16)]
IMPLEMENTATIONS = ["reference", "chunked", "fused", "pscan"]
THREADS = 2
SCALED = ("fused",)  # implementations also timed on one thread
EXP_FLOPS = 12  # an exp, as flops, in the arithmetic floor
WORK = {"fwd": (1, 6), "fwd_bwd": (2, 26)}  # (exps, flops) per element of batch*D*L*N
REFERENCE_MAX_LENGTH = 8192  # the sequential loop costs ~20 us a step: skipped above this


def memory_kib() -> tuple[int, int]:
    """(current, peak) resident set of this process in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def reset_peak_memory() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so the next run's peak shows
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}  # large tensors mmap'd, unmapped on free


def floors_ms(elements: int, rates: dict[str, float]) -> dict[str, float]:
    """The arithmetic floor ("fwd", "fwd_bwd") and the torch.exp one ("exp_fwd", "exp_fwd_bwd"), ms."""
    floors = {}
    for mode, (exps, flops) in WORK.items():
        floors[mode] = elements * (exps * EXP_FLOPS + flops) / rates["flop_per_s"] * 1e3
        floors[f"exp_{mode}"] = elements * (exps / rates["exp_per_s"] + flops / rates["flop_per_s"]) * 1e3
    return floors


def best_seconds(fn, repeats: int = 20) -> float:
    return min(call_seconds(fn, repeats))


def measure_floor_rates() -> dict[str, float]:
    """Throughput of torch.exp (elements/s, float32, in cache) and of float32 matmul (flop/s)."""
    x, y = torch.randn(1 << 18), torch.empty(1 << 18)
    exp_rate = x.numel() / best_seconds(lambda: torch.exp(x, out=y))
    a, b, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    flop_rate = 2 * 1024**3 / best_seconds(lambda: torch.mm(a, b, out=c))
    return {"exp_per_s": exp_rate, "flop_per_s": flop_rate}


def make_inputs(batch, dim, length, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length) * 0.5 - 3,
                A=-torch.arange(1.0, n + 1).repeat(dim, 1), B=r(batch, n, length), C=r(batch, n, length),
                D=r(dim), z=r(batch, dim, length), delta_bias=r(dim) * 0.1)


def medssm_call(backend):
    def call(t):
        return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                              delta_softplus=True, backend=backend)

    return call, lambda kw: kw


def pscan_call():
    """mambapy 1.2.0's selective scan (its MambaBlock.selective_scan) with the same softplus, D, z."""
    from medssm.extras import require

    pscan = require("mambapy.pscan", "bench", "Measuring mambapy's pscan").pscan  # only when pscan is measured

    def call(t):
        delta = F.softplus(t["delta"] + t["delta_bias"])  # (B, L, D)
        delta_a = torch.exp(delta.unsqueeze(-1) * t["A"])  # (B, L, D, N)
        bx = delta.unsqueeze(-1) * t["B"].unsqueeze(2) * t["u"].unsqueeze(-1)
        hs = pscan(delta_a, bx)
        y = (hs @ t["C"].unsqueeze(-1)).squeeze(3) + t["D"] * t["u"]
        return y * F.silu(t["z"])

    def native_layout(kw):  # mambapy works in (B, L, D): transposed before timing
        return {k: (v.transpose(1, 2).contiguous() if v.dim() == 3 else v) for k, v in kw.items()}

    return call, native_layout


def make_step(call, inputs, backward: bool):
    """One timed call. The backward starts from a fixed output gradient made once, so that only the
    scan's own work is timed (not a ``.sum()`` and the copy of its expanded gradient)."""
    grad = []

    def step():
        if backward:
            leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
            out = call(leaves)
            if not grad:
                grad.append(torch.ones_like(out))
            out.backward(grad[0])
        else:
            with torch.no_grad():
                call(inputs)

    return step


def peak_mib(step) -> float:
    """Rise of the resident set over one call (after a warm-up call)."""
    step()
    reset_peak_memory()
    rss, _ = memory_kib()
    step()
    return (memory_kib()[1] - rss) / 1024


def cases(implementations):
    """(shape, implementation name, call, inputs) of every measured case."""
    for shape in SHAPES:
        kw = make_inputs(*shape)
        for name in implementations:
            if name == "reference" and shape[2] > REFERENCE_MAX_LENGTH:
                yield shape, name, None, None
                continue
            call, layout = pscan_call() if name == "pscan" else medssm_call(name)
            yield shape, name, call, layout(kw)


def measure_peaks(implementations) -> dict[str, float]:
    """Peak MiB of every case and mode, keyed "shape|impl|mode" (run in the child process)."""
    peaks = {}
    for shape, name, call, inputs in cases(implementations):
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            if call is not None:
                peaks[f"{shape}|{name}|{mode}"] = peak_mib(make_step(call, inputs, backward))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=IMPLEMENTATIONS,
                        help="measure only these implementations")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scan.json"))
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)  # the memory child
    args = parser.parse_args()
    implementations = [name for name in IMPLEMENTATIONS if name in args.only]
    torch.set_num_threads(THREADS)
    if args.peaks_only:
        print(json.dumps(measure_peaks(implementations)))
        return
    child = subprocess.run([sys.executable, __file__, "--peaks-only", "--only", *implementations],
                           env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True, check=True)
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    rates = measure_floor_rates()
    rows = []
    for shape, name, call, inputs in cases(implementations):
        floor_ms = floors_ms(shape[0] * shape[1] * shape[2] * shape[3], rates)
        row = {"shape": shape, "impl": name, **{f"floor_{mode}_ms": ms for mode, ms in floor_ms.items()}}
        rows.append(row)
        if call is None:
            row["skipped"] = f"L > {REFERENCE_MAX_LENGTH}: the sequential loop would take minutes"
            continue
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            step = make_step(call, inputs, backward)
            times = call_seconds(step, args.repeats)
            row[f"{mode}_ms"], row[f"{mode}_median_ms"] = min(times) * 1e3, statistics.median(times) * 1e3
            row[f"{mode}_peak_mib"] = peaks[f"{shape}|{name}|{mode}"]
            row[f"{mode}_x_floor"] = row[f"{mode}_ms"] / floor_ms[mode]
            if name in SCALED:
                torch.set_num_threads(1)
                row[f"{mode}_1_thread_ms"] = min(call_seconds(step, args.repeats)) * 1e3
                torch.set_num_threads(THREADS)
                row[f"{mode}_threads_speedup"] = row[f"{mode}_1_thread_ms"] / row[f"{mode}_ms"]
        if name == "pscan":
            for r in rows:
                if r["shape"] == shape and "fwd_ms" in r:
                    r["fwd_speedup_vs_pscan"] = row["fwd_ms"] / r["fwd_ms"]
    print_table(rows, rates)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": THREADS, "torch": torch.__version__,
               "numba": numba.__version__, "load_average_1min": os.getloadavg()[0], **rates}
    Path(args.out).write_text(json.dumps({"machine": machine, "results": rows}, indent=1))
    print(f"\nwritten {args.out}")


def print_table(rows, rates) -> None:
    print(f"floor rates: float32 matmul {rates['flop_per_s'] / 1e9:.0f} GFLOP/s, torch.exp "
          f"{rates['exp_per_s'] / 1e9:.2f} G/s; {THREADS} threads; 1-min load average {os.getloadavg()[0]:.1f}")
    header = ("| (batch, D, L, N) | impl | fwd ms (best) | fwd ×floor | fwd+bwd ms (best) | fwd+bwd ×floor "
              f"| fwd {THREADS} threads vs 1 | fwd+bwd {THREADS} threads vs 1 "
              "| peak MiB fwd | peak MiB fwd+bwd | fwd speed-up vs pscan |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    blank = lambda r, key, fmt: format(r[key], fmt) if key in r else ""  # noqa: E731
    shown = set()
    for r in rows:
        shape = "(" + ", ".join(map(str, r["shape"])) + ")"
        if shape not in shown:
            shown.add(shape)
            print(f"| {shape} | floor | {r['floor_fwd_ms']:.2f} | 1 | {r['floor_fwd_bwd_ms']:.2f} | 1 | | | | | |")
            print(f"| {shape} | torch.exp floor | {r['floor_exp_fwd_ms']:.2f} "
                  f"| {r['floor_exp_fwd_ms'] / r['floor_fwd_ms']:.1f} | {r['floor_exp_fwd_bwd_ms']:.2f} "
                  f"| {r['floor_exp_fwd_bwd_ms'] / r['floor_fwd_bwd_ms']:.1f} | | | | | |")
        if "skipped" in r:
            print(f"| {shape} | {r['impl']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        print(f"| {shape} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_x_floor']:.1f} | {r['fwd_bwd_ms']:.1f} "
              f"| {r['fwd_bwd_x_floor']:.1f} | {blank(r, 'fwd_threads_speedup', '.2f')} "
              f"| {blank(r, 'fwd_bwd_threads_speedup', '.2f')} | {r['fwd_peak_mib']:.0f} "
              f"| {r['fwd_bwd_peak_mib']:.0f} | {blank(r, 'fwd_speedup_vs_pscan', '.1f')} |")


if __name__ == "__main__":
    main()
