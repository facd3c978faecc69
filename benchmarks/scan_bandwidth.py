"""The Triton selective scan's effective memory bandwidth, against the GPU's peak.

Effective bandwidth = the bytes the scan must move at the least, over its time. At the least, float32:

- forward (``no_grad``): read ``u, delta, z`` (batch x dim x L each), ``B, C`` (batch x N x L each),
  ``A`` (dim x N), ``D`` and ``delta_bias`` (dim each), and write the output (batch x dim x L):
  ``4 BDL + 2 BNL + DN + 2D`` floats;
- forward + backward: that forward, then a backward that reads the same inputs and the output's
  gradient once and writes every input's gradient once: ``11 BDL + 6 BNL + 3 DN + 6 D`` floats in
  all. The forward's chunk checkpoints and the backward's recomputation are not counted: they are
  the kernel's choice, not the problem's.

The peak is a device-to-device copy of 1 GiB measured in the same run (bytes read plus bytes
written), and the vendor's datasheet figure where the card is known (H100 SXM 3.35 TB/s, H200
4.8 TB/s). Times are ``triton.testing.do_bench`` medians (L2 flushed before each call); the rate
of state updates (batch x dim x L x N per second) is given beside the bandwidth, since a
sequential scan may be bound by its per-step latency rather than by memory. A slice of the
forward output is compared with the ``chunked`` backend.

    python benchmarks/scan_bandwidth.py [--json PATH]     # on a GPU
    TRITON_INTERPRET=1 python benchmarks/scan_bandwidth.py --tiny   # tiny shapes, Triton's interpreter on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from medssm.ssm import available_backends, selective_scan

SHAPES = [(2, 1536, 4096, 16), (8, 768, 16384, 16)]  # (batch, dim, L, N)
TINY_SHAPES = [(1, 8, 40, 4), (2, 16, 70, 4)]
DATASHEET_TBS = {"H200": 4.8, "H100 80GB HBM3": 3.35, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9,
                 "A100-SXM4-80GB": 2.039, "A100 80GB PCIe": 1.935, "A100-SXM4-40GB": 1.555}


def minimum_bytes(batch: int, dim: int, length: int, n: int, backward: bool) -> int:
    """Bytes (float32) the scan must read and write at the least; see the module docstring."""
    bdl, bnl, dn = batch * dim * length, batch * n * length, dim * n
    floats = 4 * bdl + 2 * bnl + dn + 2 * dim
    if backward:
        floats += 7 * bdl + 4 * bnl + 2 * dn + 4 * dim
    return 4 * floats


def datasheet_tbs(name: str) -> float | None:
    return next((v for k, v in DATASHEET_TBS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a check of the script; on CPU, interpreted)")
    parser.add_argument("--json", default="benchmarks/results/scan_bandwidth.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    if "triton" not in available_backends():
        raise SystemExit("the triton scan backend is not available here (no Triton, or on CPU without TRITON_INTERPRET=1)")

    if cuda:
        from triton.testing import do_bench

        def seconds(fn) -> float:
            return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    else:
        def seconds(fn) -> float:
            fn()
            times = []
            for _ in range(2):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

    result = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "rows": []}
    if cuda:  # the copy ceiling: 1 GiB copied, counted as read plus written
        a = torch.randn(2**28, device=device)
        b = torch.empty_like(a)
        copy_s = seconds(lambda: b.copy_(a))
        result["copy_tbs"] = 2 * a.numel() * 4 / copy_s / 1e12
        del a, b
    result["datasheet_tbs"] = datasheet_tbs(name)

    def write() -> None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    peaks = [(k, result.get(k)) for k in ("copy_tbs", "datasheet_tbs") if result.get(k)]
    print(f"device: {name}; torch {torch.__version__}; peak: "
          + (", ".join(f"{k.split('_')[0]} {v:.2f} TB/s" for k, v in peaks) or "none known (CPU)"), flush=True)
    print(f"{'(batch, D, L, N)':<24}{'pass':<10}{'ms':>9}{'min GB':>9}{'eff TB/s':>10}"
          + "".join(f"{'% ' + k.split('_')[0]:>11}" for k, _ in peaks) + f"{'G upd/s':>10}", flush=True)
    for batch, dim, length, n in (TINY_SHAPES if args.tiny else SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
        inputs = dict(u=rand(batch, dim, length), delta=rand(batch, dim, length) - 1,
                      A=-torch.rand(dim, n, device=device) - 0.5, B=rand(batch, n, length), C=rand(batch, n, length),
                      D=rand(dim), z=rand(batch, dim, length), delta_bias=rand(dim))
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        grad = rand(batch, dim, length)
        row = {"shape": [batch, dim, length, n]}
        try:
            def forward():
                with torch.no_grad():
                    return selective_scan(**inputs, delta_softplus=True, backend="triton")

            def both():
                out = selective_scan(**leaves, delta_softplus=True, backend="triton")
                torch.autograd.grad(out, list(leaves.values()), grad)

            # a slice checked against chunked: channels and batches are independent in the forward
            out = forward()
            k = min(dim, 64)
            part = {key: (v[:1, :k] if key in ("u", "delta", "z") else v[:k] if key in ("A", "D", "delta_bias")
                          else v[:1]) for key, v in inputs.items()}
            with torch.no_grad():
                ref = selective_scan(**part, delta_softplus=True, backend="chunked")
            row["max_relative_difference_vs_chunked"] = ((out[:1, :k] - ref).abs().max() / ref.abs().max()).item()
            del out, ref
            for label, fn, backward in (("forward", forward, False), ("fwd+bwd", both, True)):
                t = seconds(fn)
                moved = minimum_bytes(batch, dim, length, n, backward)
                cell = {"ms": 1e3 * t, "minimum_bytes": moved, "effective_tbs": moved / t / 1e12,
                        "state_updates_per_s": batch * dim * length * n / t}
                for key, peak in peaks:
                    cell[f"fraction_of_{key.split('_')[0]}"] = cell["effective_tbs"] / peak
                row[label] = cell
                print(f"{str((batch, dim, length, n)):<24}{label:<10}{cell['ms']:>9.3f}{moved / 1e9:>9.3f}"
                      f"{cell['effective_tbs']:>10.3f}"
                      + "".join(f"{100 * cell['fraction_of_' + key.split('_')[0]]:>10.1f}%" for key, _ in peaks)
                      + f"{cell['state_updates_per_s'] / 1e9:>10.1f}", flush=True)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            print(f"{str((batch, dim, length, n)):<24}{row['error']}", flush=True)
        print(f"{'':<24}forward vs chunked (first batch, {min(dim, 64)} channels): max relative difference "
              f"{row.get('max_relative_difference_vs_chunked', float('nan')):.1e}", flush=True)
        result["rows"].append(row)
        write()  # after every shape: a later failure keeps the earlier rows
        del inputs, leaves, grad
        if cuda:
            torch.cuda.empty_cache()
    write()
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
