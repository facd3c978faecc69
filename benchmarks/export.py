"""ONNX export of every registered model at its full size: export time, parity, and CPU latency of
onnxruntime against PyTorch (forward, batch 1, no gradients), and the case's peak memory.

Each model runs in its own subprocess (clean memory, fixed thread count): it is exported with
``medssm.export.export_onnx`` (dynamic batch and spatial size, parity checked at the export size
and at a second size and batch), then both runtimes are timed on the same input: median of
``--repeats`` calls after one warm-up. PyTorch runs the model as users do (``scan_backend="auto"``:
the fused CPU scan); onnxruntime runs the exported graph (pure-PyTorch scan, CPU execution provider).

    python benchmarks/export.py [--quick] [--threads 2] [--only lightm] [--repeats 5]

prints one table and writes benchmarks/results/export.json. ``--quick`` uses the tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"

# name -> (model kwargs, spatial input size); input channels come from the kwargs.
FULL = {
    "lightm_unet_2d": ({"in_channels": 1, "out_channels": 2}, (256, 256)),
    "lightm_unet_3d": ({"in_channels": 1, "out_channels": 2}, (64, 64, 64)),
    "segmamba_2d": ({"in_channels": 1, "out_channels": 2}, (256, 256)),
    "segmamba_3d": ({"in_channels": 4, "out_channels": 4}, (64, 64, 64)),
    "medmamba_t": ({"in_chans": 3, "num_classes": 6}, (224, 224)),
    "medmamba_s": ({"in_chans": 3, "num_classes": 6}, (224, 224)),
    "medmamba_b": ({"in_chans": 3, "num_classes": 6}, (224, 224)),
}
QUICK = {
    "lightm_unet_2d_tiny": ({}, (64, 64)),
    "lightm_unet_3d_tiny": ({}, (32, 32, 32)),
    "segmamba_tiny": ({"in_channels": 1}, (32, 32, 32)),
    "medmamba_tiny": ({"in_chans": 3, "num_classes": 6}, (224, 224)),
}


def run_case(name: str, kwargs: dict, size: tuple[int, ...], repeats: int) -> dict:
    """Export one model and time both runtimes (runs inside the case's subprocess)."""
    import torch

    import medssm
    from medssm.export.onnx import export_onnx, ort_session

    torch.manual_seed(0)  # the same random weights on every run
    model = medssm.create_model(name, **kwargs).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        result = export_onnx(model, path, size)
        size_mb = path.stat().st_size / 2**20
        session = ort_session(path)
        x = torch.randn(result.input_shape, generator=torch.Generator().manual_seed(0))


        with torch.no_grad():
            t_torch = median_seconds(lambda: model(x), repeats)
        t_ort = median_seconds(lambda: session.run(None, {"input": x.numpy()}), repeats)
    return {"model": name, "input": list(result.input_shape), "params": sum(p.numel() for p in model.parameters()),
            "export_s": result.seconds, "onnx_mb": size_mb, "rel_error": result.rel_error,
            "checked": [list(c["shape"]) for c in result.checks], "torch_ms": 1e3 * t_torch, "ort_ms": 1e3 * t_ort,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # export, checks and timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    parser.add_argument("--only", default="", help="run the models whose name contains this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    cases = QUICK if args.quick else FULL

    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        kwargs, size = cases[args.case]
        print("RESULT " + json.dumps(run_case(args.case, kwargs, size, args.repeats)))
        return 0

    import medssm

    registered = set(medssm.list_models())
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in cases:
        if args.only not in name or name not in registered:
            continue
        cmd = [sys.executable, __file__, "--case", name, "--threads", str(args.threads), "--repeats", str(args.repeats)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"model": name, "error": err})
            print(f"{name}: FAILED: {err}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))

    header = f"{'model':<22} {'input':<18} {'params':>11} {'export s':>9} {'ONNX MB':>8} {'rel err':>9} " \
             f"{'PyTorch ms':>11} {'ORT ms':>9} {'ORT/PyTorch':>11} {'peak MB':>8}"
    print(f"ONNX export on CPU, {args.threads} threads, median of {args.repeats} (batch 1, no gradients)")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<22} FAILED: {r['error']}")
            continue
        shape = "x".join(map(str, r["input"]))
        print(f"{r['model']:<22} {shape:<18} {r['params']:>11,} {r['export_s']:>9.1f} {r['onnx_mb']:>8.1f} "
              f"{r['rel_error']:>9.1e} {r['torch_ms']:>11.1f} {r['ort_ms']:>9.1f} {r['ort_ms'] / r['torch_ms']:>11.2f} {r['peak_rss_mb']:>8.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "quick": args.quick, "rows": rows},
                              indent=2))
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
