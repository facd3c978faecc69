#!/usr/bin/env bash
# medssm on one GPU in under 8 minutes: the Triton selective scan beside `chunked` (forward, and
# forward + backward), then LightM-UNet and SegResNet-32 training steps and forwards (2D and 3D, fp32
# and bf16 autocast). Prints tables and writes benchmarks/results/gpu.json (or --json PATH).
#
#   bash benchmarks/gpu.sh                 # on a fresh H100/H200 with PyTorch, Triton and numba installed
#   bash benchmarks/gpu.sh --tiny          # tiny sizes; without a GPU, Triton's interpreter on CPU tensors
#
# Nothing is downloaded: a package the machine lacks (MONAI, for SegResNet) is installed from the wheels
# in $MEDSSM_WHEELS (default benchmarks/wheels/), made beforehand on a machine where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d benchmarks/wheels monai==1.6.1
# Without MONAI the SegResNet rows say so and the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${MEDSSM_WHEELS:-benchmarks/wheels}
site=${TMPDIR:-/tmp}/medssm-gpu-site
if ! python3 -c "import monai" 2>/dev/null && compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="src:$site${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " == *" --tiny "* ]] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export TRITON_INTERPRET=1  # before Triton is imported: its kernels then run on CPU tensors
fi
exec timeout 470 python3 - "$@" <<'PY'
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import medssm
from medssm.devices import autocast
from medssm.engine.loop import train_step
from medssm.engine.losses import make_loss
from medssm.labels import LabelSet
from medssm.nets import build_for_data
from medssm.ssm import available_backends, resolve_backend, selective_scan

parser = argparse.ArgumentParser(description="medssm GPU benchmark")
parser.add_argument("--tiny", action="store_true", help="tiny sizes (a check of the script; on CPU, interpreted)")
parser.add_argument("--json", default="benchmarks/results/gpu.json")
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
repeats = 1 if args.tiny else 10
print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}; "
      f"torch {torch.__version__}; scan backends here: {', '.join(available_backends())}", flush=True)


def seconds(fn, repeats: int = repeats) -> float:
    """Median wall time of ``repeats`` calls after two warm-ups (compilation, autotuning), synchronised."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- the scan: float32, with D, the z gate, delta_bias and softplus, as the Mamba layers call it ---
SCANS = [(1, 8, 100, 4), (2, 16, 64, 4)] if args.tiny else [
    (1, 64, 65536, 16), (1, 128, 16384, 16), (1, 256, 4096, 16), (1, 512, 1024, 16),  # LightM-UNet 2D, 256²
    (1, 64, 262144, 16),  # LightM-UNet 3D, 64³, first level
    (8, 384, 196, 16),  # MedMamba-T's third stage, 8 images
]
scan_rows = []
print("\nscan (fp32), ms      " + "".join(f"{b + ' fwd':>14}{b + ' fwd+bwd':>18}" for b in ("triton", "chunked"))
      + f"{'triton vs chunked':>19}", flush=True)
for batch, dim, length, n in SCANS:
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    inputs = dict(u=rand(batch, dim, length), delta=rand(batch, dim, length) - 1, A=-torch.rand(dim, n, device=device) - 0.5,
                  B=rand(batch, n, length), C=rand(batch, n, length), D=rand(dim), z=rand(batch, dim, length),
                  delta_bias=rand(dim))
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    grad = rand(batch, dim, length)
    row = {"shape": [batch, dim, length, n]}
    for backend in ("triton", "chunked"):
        if backend not in available_backends():
            row[backend] = None
            continue

        def forward():
            with torch.no_grad():
                selective_scan(**inputs, delta_softplus=True, backend=backend)

        def both():
            out = selective_scan(**leaves, delta_softplus=True, backend=backend)
            torch.autograd.grad(out, list(leaves.values()), grad)

        row[backend] = {"forward_ms": 1e3 * seconds(forward), "forward_backward_ms": 1e3 * seconds(both)}
    if row["triton"] and row["chunked"]:  # the two agree (float32): largest difference over the largest value
        with torch.no_grad():
            a, b = (selective_scan(**inputs, delta_softplus=True, backend=k) for k in ("triton", "chunked"))
        row["max_relative_difference"] = ((a - b).abs().max() / b.abs().max()).item()
    scan_rows.append(row)
    cells = "".join(f"{r['forward_ms']:>14.2f}{r['forward_backward_ms']:>18.2f}" if r else f"{'-':>14}{'-':>18}"
                    for r in (row["triton"], row["chunked"]))
    print(f"{str((batch, dim, length, n)):<21}{cells}{row.get('max_relative_difference', float('nan')):>19.1e}", flush=True)

# --- models: one training step (DiceCE + AdamW, clipping at 12) and an eval forward; the scan backend is
# "auto" (mamba_ssm's kernel where installed, else Triton; on a CPU without a GPU the fused CPU path) ---
MODELS = [  # label, model name, kwargs, input shape
    ("LightM-UNet 2D", "lightm_unet_2d_tiny" if args.tiny else "lightm_unet_2d", {}, (2, 1, 32, 32) if args.tiny else (8, 1, 256, 256)),
    ("SegResNet-32 2D", "monai:SegResNet", {"init_filters": 8 if args.tiny else 32}, (2, 1, 32, 32) if args.tiny else (8, 1, 256, 256)),
    ("LightM-UNet 3D", "lightm_unet_3d_tiny" if args.tiny else "lightm_unet_3d", {}, (1, 1, 16, 16, 16) if args.tiny else (2, 1, 64, 64, 64)),
    ("SegResNet-32 3D", "monai:SegResNet", {"init_filters": 8 if args.tiny else 32}, (1, 1, 16, 16, 16) if args.tiny else (2, 1, 64, 64, 64)),
]
model_rows = []
print(f"\nmodels (scan backend: {resolve_backend('auto', torch.empty(0, device=device))})")
print("model                input                 " + "".join(f"{p + ' step ms':>16}{p + ' fwd ms':>15}" for p in ("fp32", "bf16")), flush=True)
for label, name, kwargs, shape in MODELS:
    row = {"model": label, "name": name, "input": list(shape)}
    try:
        torch.manual_seed(0)
        model = build_for_data(name, spatial_dims=len(shape) - 2, in_channels=shape[1], num_classes=2, **kwargs).to(device)
    except Exception as e:  # MONAI missing: say so, measure the rest
        row["error"] = f"{type(e).__name__}: {e}"
        model_rows.append(row)
        print(f"{label:<21}{str(shape):<22}not measured: {row['error']}", flush=True)
        continue
    x = torch.randn(*shape, device=device)
    labels = torch.randint(0, 2, (shape[0], 1, *shape[2:]), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    loss = make_loss("dice_ce", LabelSet.classes(2))
    for precision in ("fp32", "bf16"):
        def step():
            model.train()
            train_step(model, x, labels, loss, optimizer, grad_clip=12.0, device=device, precision=precision)

        def forward():
            model.eval()
            with torch.no_grad(), autocast(device, precision):
                model(x)

        row[precision] = {"train_step_ms": 1e3 * seconds(step, max(1, repeats // 2)),
                          "forward_ms": 1e3 * seconds(forward, max(1, repeats // 2))}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    model_rows.append(row)
    print(f"{label:<21}{str(shape):<22}" + "".join(f"{row[p]['train_step_ms']:>16.1f}{row[p]['forward_ms']:>15.1f}"
                                                  for p in ("fp32", "bf16")), flush=True)
    del model, optimizer

by_label = {r["model"]: r for r in model_rows if "error" not in r}
for dims in ("2D", "3D"):
    mamba, cnn = by_label.get(f"LightM-UNet {dims}"), by_label.get(f"SegResNet-32 {dims}")
    if mamba and cnn:
        print(f"LightM-UNet / SegResNet-32 {dims}: step " + ", ".join(
            f"{p} {mamba[p]['train_step_ms'] / cnn[p]['train_step_ms']:.2f}x" for p in ("fp32", "bf16")))
Path(args.json).parent.mkdir(parents=True, exist_ok=True)
Path(args.json).write_text(json.dumps({"device": str(device), "tiny": args.tiny, "torch": torch.__version__,
                                       "scan": scan_rows, "models": model_rows}, indent=2))
print(f"\nwritten {args.json}")
PY
