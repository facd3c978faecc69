"""Model cost on CPU: parameters, MACs, forward latency, training-step time and peak memory.

Each case runs in its own subprocess (clean memory, fixed thread count). Rows:

- 2D, 1x1x256x256 and 3D, 1x1x64x64x64: LightM-UNet beside MONAI's UNet, SegResNet, SwinUNETR, UNETR;
- 3D, 1x4x64x64x64: SegMamba beside SwinUNETR and UNETR (when ``segmamba_3d`` is registered);
- 2D classification, Bx3x224x224: MedMamba-T beside ResNet-18 (MONAI's ``resnet18``: timm is not
  importable here), as images/s (when ``medmamba_t`` is registered).

Memory: "peak tensor MiB" is the most bytes of tensor storage alive at once among the tensors created
during the measured call (weights, inputs and, for training, the optimiser state that already exists
are not counted), tracked by ``medssm.nets.info.LiveTensorBytes`` (a TorchDispatchMode); "RSS MiB" is
the peak resident set size of the case's subprocess (``ru_maxrss``: interpreter, libraries and
weights included). MACs come from ``medssm.nets.info.count_macs`` (FlopCounterMode; selective-scan
FLOPs are reported apart, analytically).

    python benchmarks/models.py [--quick] [--threads 2] [--only lightm]

prints one table and writes benchmarks/results/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from timing import median_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"

# key -> (group, label, builder, input shape, task); builders are "family:args" strings run in the case process.
SEG_2D, SEG_3D = (1, 1, 256, 256), (1, 1, 64, 64, 64)
CASES = {
    "lightm_unet_2d": ("seg 2D 1x1x256x256", "LightM-UNet", 'medssm:lightm_unet_2d:{"in_channels": 1, "out_channels": 2}', SEG_2D),
    "unet_2d": ("seg 2D 1x1x256x256", "UNet (MONAI, 16-256, 2 res units)", "monai:unet:2", SEG_2D),
    "segresnet_2d": ("seg 2D 1x1x256x256", "SegResNet (MONAI, 32 filters)", "monai:segresnet:2", SEG_2D),
    "swinunetr_2d": ("seg 2D 1x1x256x256", "SwinUNETR (MONAI, feature 48)", "monai:swinunetr:2", SEG_2D),
    "unetr_2d": ("seg 2D 1x1x256x256", "UNETR (MONAI, ViT-B/16)", "monai:unetr:2", SEG_2D),
    "lightm_unet_3d": ("seg 3D 1x1x64^3", "LightM-UNet", 'medssm:lightm_unet_3d:{"in_channels": 1, "out_channels": 2}', SEG_3D),
    "unet_3d": ("seg 3D 1x1x64^3", "UNet (MONAI, 16-256, 2 res units)", "monai:unet:3", SEG_3D),
    "segresnet_3d": ("seg 3D 1x1x64^3", "SegResNet (MONAI, 32 filters)", "monai:segresnet:3", SEG_3D),
    "swinunetr_3d": ("seg 3D 1x1x64^3", "SwinUNETR (MONAI, feature 48)", "monai:swinunetr:3", SEG_3D),
    "unetr_3d": ("seg 3D 1x1x64^3", "UNETR (MONAI, ViT-B/16)", "monai:unetr:3", SEG_3D),
    "segmamba_3d": ("seg 3D 1x4x64^3", "SegMamba", "medssm:segmamba_3d:{}", (1, 4, 64, 64, 64)),
    "swinunetr_3d_4ch": ("seg 3D 1x4x64^3", "SwinUNETR (MONAI, feature 48)", "monai:swinunetr:3", (1, 4, 64, 64, 64)),
    "unetr_3d_4ch": ("seg 3D 1x4x64^3", "UNETR (MONAI, ViT-B/16)", "monai:unetr:3", (1, 4, 64, 64, 64)),
    "medmamba_t": ("cls 2D Bx3x224x224", "MedMamba-T", "medssm:medmamba_t:{\"num_classes\": 6}", (8, 3, 224, 224)),
    "resnet18": ("cls 2D Bx3x224x224", "ResNet-18 (MONAI resnet18; timm not importable)", "monai:resnet18:2",
                 (8, 3, 224, 224)),
}
# Companion rows shown only beside a model that may not be registered yet.
COMPANION_OF = {"swinunetr_3d_4ch": "segmamba_3d", "unetr_3d_4ch": "segmamba_3d", "resnet18": "medmamba_t"}


def build(spec: str, shape: tuple[int, ...]):
    """The model a case names; MONAI models take in/out channels from the input shape (2 or 4 classes)."""
    family, name, arg = spec.split(":", 2)
    if family == "medssm":
        import medssm

        return medssm.create_model(name, **json.loads(arg))
    in_ch, out_ch = shape[1], max(2, shape[1])
    from monai.networks import nets

    dims = int(arg)
    if name == "unet":
        return nets.UNet(dims, in_ch, out_ch, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    if name == "segresnet":
        return nets.SegResNet(dims, init_filters=32, in_channels=in_ch, out_channels=out_ch)
    if name == "swinunetr":
        return nets.SwinUNETR(in_channels=in_ch, out_channels=out_ch, feature_size=48, spatial_dims=dims)
    if name == "unetr":
        return nets.UNETR(in_ch, out_ch, img_size=shape[2:], feature_size=16, spatial_dims=dims)
    if name == "resnet18":
        return nets.resnet18(spatial_dims=dims, n_input_channels=in_ch, num_classes=6)
    raise ValueError(f"unknown case builder {spec!r}")


def run_case(key: str, threads: int, repeats: int) -> dict:
    """Measure one case in this process."""
    import torch
    import torch.nn.functional as F

    from medssm.nets.info import count_macs, count_parameters, peak_activation_bytes, peak_tensor_bytes

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    group, label, spec, shape = CASES[key]
    model = build(spec, shape)
    x = torch.randn(*shape)
    classify = group.startswith("cls")
    macs, scan_flops = count_macs(model, x)

    def forward():
        with torch.no_grad():
            model(x)

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    target = torch.randint(0, 6, (shape[0],)) if classify else None

    def train_step():
        optimiser.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        labels = target if classify else torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]))
        F.cross_entropy(out, labels).backward()
        optimiser.step()


    model.eval()
    forward_s = median_seconds(forward, repeats)
    forward_peak = peak_activation_bytes(model, x)
    model.train()
    train_s = median_seconds(train_step, repeats)
    train_peak = peak_tensor_bytes(train_step)
    batch = shape[0]
    return {
        "key": key, "group": group, "model": label, "input": list(shape), "threads": threads,
        "params": count_parameters(model), "macs": macs, "scan_flops": scan_flops,
        "forward_s": forward_s, "train_step_s": train_s,
        "forward_images_per_s": batch / forward_s, "train_images_per_s": batch / train_s,
        "forward_peak_tensor_bytes": forward_peak, "train_peak_tensor_bytes": train_peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def table(rows: list[dict]) -> str:
    header = (f"{'case':<20} {'model':<48} {'params':>11} {'GMACs':>8} {'scan GF':>8} {'fwd s':>7} {'train s':>8} "
              f"{'img/s fwd':>9} {'img/s trn':>9} {'fwd MiB':>8} {'train MiB':>9} {'RSS MiB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['group']:<20} {r['model']:<48} failed: {r['error']}")
            continue
        mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
        lines.append(
            f"{r['group']:<20} {r['model']:<48} {r['params']:>11,} {r['macs'] / 1e9:>8.2f} {r['scan_flops'] / 1e9:>8.2f} "
            f"{r['forward_s']:>7.2f} {r['train_step_s']:>8.2f} {r['forward_images_per_s']:>9.2f} "
            f"{r['train_images_per_s']:>9.2f} {mib(r['forward_peak_tensor_bytes']):>8} "
            f"{mib(r['train_peak_tensor_bytes']):>9} {mib(r['peak_rss_bytes']):>8}")
    return "\n".join(lines)


def selected_cases(only: str | None) -> list[str]:
    """Cases whose medssm model (or the model they stand beside) is registered, filtered by ``only``."""
    import medssm

    registered = set(medssm.list_models())

    def needs(key: str) -> str | None:
        family, name, _ = CASES[key][2].split(":", 2)
        return COMPANION_OF.get(key, name if family == "medssm" else None)

    return [k for k in CASES if needs(k) in registered | {None} and (not only or only in k)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions after one warm-up (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one timed repetition per measure")
    parser.add_argument("--only", help="run only cases whose key contains this text (e.g. lightm, 3d)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print its JSON
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.case:
        print(json.dumps(run_case(args.case, args.threads, repeats)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for key in selected_cases(args.only):
        group, label = CASES[key][:2]
        print(f"running {key} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", key, "--threads", str(args.threads),
                               "--repeats", str(repeats)], capture_output=True, text=True, env=env)
        if proc.returncode:
            rows.append({"key": key, "group": group, "model": label, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": args.threads, "repeats": repeats, "rows": rows}, indent=2))
    print(f"\nwritten {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
