"""Model cost on CPU: training step, forward and peak memory of medssm's networks beside CNNs, fp32 and bf16.

Rows (each case in its own subprocess, with the thread count fixed for torch and numba alike):

- seg 2D, 1x1x256x256: LightM-UNet beside MONAI's SegResNet (32 and 16 filters) and UNet (32-256);
- seg 3D, 1x1x64^3: LightM-UNet beside the same three CNNs in 3D;
- seg 3D, 1x4x64^3: SegMamba (its ratios are to SegResNet-32 3D on one channel: the input
  channels change only its first convolution);
- cls 2D, 8x3x224x224: MedMamba-T beside MONAI's ResNet-18.

"train s" is one real training step (``medssm.engine.loop.train_step``: forward under autocast for
bf16, Dice + CE for segmentation or CE for classification, backward, clipping at 12, AdamW), median
of ``--repeats`` after two warm-up steps, "cpu s" the CPU time of all the process's threads in a step
(median); "fwd s" one eval forward without gradient. Memory: "peak
MiB" is the most tensor storage alive at once among the tensors a step or forward creates
(``medssm.nets.info.LiveTensorBytes``), "RSS MiB" the case process's peak resident set (every
precision measured in it). "x ref" columns divide by the group's reference CNN measured in the
same run (SegResNet-32, or ResNet-18).

    python benchmarks/models.py [--threads 2] [--precision fp32 bf16] [--only lightm_unet_2d segresnet32_2d]
    python benchmarks/models.py --busy            # the same with one competing busy process
    python benchmarks/models.py --keep-freed-memory   # glibc keeps freed memory (medssm.devices.keep_freed_memory)
    python benchmarks/models.py --profile lightm_unet_2d [--precision fp32]   # self CPU time by group, 1 thread
    python benchmarks/models.py --depthwise       # depthwise convs: PyTorch's against medssm's kernels

Writes benchmarks/results/models.json (or models_profile.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import median_seconds

RESULTS = Path(__file__).resolve().parent / "results"

SEG_2D, SEG_3D, SEG_3D_4, CLS_2D = (1, 1, 256, 256), (1, 1, 64, 64, 64), (1, 4, 64, 64, 64), (8, 3, 224, 224)
# key -> (group, label, model name, model kwargs, input shape); the first case of a group is its reference.
CASES = {
    "segresnet32_2d": ("seg 2D 1x1x256^2", "SegResNet-32 (MONAI)", "monai:SegResNet", {"init_filters": 32}, SEG_2D),
    "segresnet16_2d": ("seg 2D 1x1x256^2", "SegResNet-16 (MONAI)", "monai:SegResNet", {"init_filters": 16}, SEG_2D),
    "unet_2d": ("seg 2D 1x1x256^2", "UNet (MONAI, 32-256, 2 res units)", "monai:UNet", {}, SEG_2D),
    "lightm_unet_2d": ("seg 2D 1x1x256^2", "LightM-UNet", "lightm_unet_2d", {}, SEG_2D),
    "segresnet32_3d": ("seg 3D 1x1x64^3", "SegResNet-32 (MONAI)", "monai:SegResNet", {"init_filters": 32}, SEG_3D),
    "segresnet16_3d": ("seg 3D 1x1x64^3", "SegResNet-16 (MONAI)", "monai:SegResNet", {"init_filters": 16}, SEG_3D),
    "unet_3d": ("seg 3D 1x1x64^3", "UNet (MONAI, 32-256, 2 res units)", "monai:UNet", {}, SEG_3D),
    "lightm_unet_3d": ("seg 3D 1x1x64^3", "LightM-UNet", "lightm_unet_3d", {}, SEG_3D),
    "segmamba_3d": ("seg 3D 1x1x64^3", "SegMamba (4 input channels)", "segmamba_3d", {}, SEG_3D_4),
    "resnet18": ("cls 2D 8x3x224^2", "ResNet-18 (MONAI)", "monai:resnet18", {}, CLS_2D),
    "medmamba_t": ("cls 2D 8x3x224^2", "MedMamba-T", "medmamba_t", {}, CLS_2D),
}
BUSY = "while True: pass"


def build(key: str):
    import medssm
    from medssm.nets import build_for_data

    _, _, name, kwargs, shape = CASES[key]
    task = medssm.get_model_card(name).task
    return build_for_data(name, spatial_dims=len(shape) - 2, in_channels=shape[1], num_classes=classes(task),
                          **kwargs), task


def classes(task: str) -> int:
    return 6 if task == "classification" else 2


def step_parts(key: str, precision: str):
    """(model, input, one training step, one eval forward) of ``key`` in ``precision``."""
    import torch
    import torch.nn.functional as F

    from medssm.devices import autocast
    from medssm.engine.losses import make_loss
    from medssm.labels import LabelSet
    from medssm.engine.loop import train_step

    torch.manual_seed(0)
    model, task = build(key)
    shape = CASES[key][4]
    x = torch.randn(*shape)
    labels = torch.randint(0, classes(task), (shape[0],) if task == "classification" else (shape[0], 1, *shape[2:]))
    loss_fn = F.cross_entropy if task == "classification" else make_loss("dice_ce", LabelSet.classes(classes(task)))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    cpu = torch.device("cpu")

    def train():
        model.train()
        train_step(model, x, labels, loss_fn, optimiser, grad_clip=12.0, device=cpu, precision=precision)

    def forward():
        model.eval()
        with torch.no_grad(), autocast(cpu, precision):
            model(x)

    return model, x, train, forward


def set_up_process(threads: int) -> None:
    """torch's threads, and glibc's allocator as ``medssm train`` sets it when asked (``--keep-freed-memory``)."""
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("BENCH_KEEP_FREED_MEMORY") == "1":
        from medssm.devices import keep_freed_memory

        keep_freed_memory()


def run_case(key: str, precisions: list[str], repeats: int) -> dict:
    """Measure one case in this process (threads already set by the parent's environment)."""
    import torch

    from medssm.nets.info import count_macs, count_parameters, peak_tensor_bytes

    set_up_process(int(os.environ["OMP_NUM_THREADS"]))
    group, label, name, _, shape = CASES[key]
    row = {"key": key, "group": group, "model": label, "input": list(shape), "threads": torch.get_num_threads()}
    for precision in precisions:
        model, x, train, forward = step_parts(key, precision)
        if "params" not in row:
            row["params"] = count_parameters(model)
            row["macs"], row["scan_flops"] = count_macs(model, x)
        train()  # warm-ups: kernels compiled or loaded, optimiser state made, the heap grown
        train()
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            train()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        row[precision] = {
            "forward_s": median_seconds(forward, repeats),
            "train_step_s": statistics.median(walls),
            "train_cpu_s": statistics.median(cpus),  # CPU time of all the process's threads
            "forward_peak_bytes": peak_tensor_bytes(forward),
            "train_peak_bytes": peak_tensor_bytes(train),
        }
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def add_ratios(rows: list[dict], precisions: list[str]) -> None:
    """``train_x_ref`` and ``forward_x_ref`` of every row: its time over its group's reference's."""
    references = {}
    for row in rows:
        if "error" not in row:
            references.setdefault(row["group"], row)
    segresnet3d = next((r for r in rows if r["key"] == "segresnet32_3d" and "error" not in r), None)
    for row in rows:
        ref = segresnet3d if row["key"] == "segmamba_3d" else references.get(row["group"])
        for p in precisions:
            if "error" in row or ref is None or p not in row or p not in ref:
                continue
            row[p]["train_x_ref"] = row[p]["train_step_s"] / ref[p]["train_step_s"]
            row[p]["forward_x_ref"] = row[p]["forward_s"] / ref[p]["forward_s"]
    if "bf16" in precisions and "fp32" in precisions:
        for row in rows:
            if "error" not in row:
                row["bf16_speedup"] = row["fp32"]["train_step_s"] / row["bf16"]["train_step_s"]


def table(rows: list[dict], precisions: list[str]) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    header = f"{'group':<17} {'model':<34} {'params':>11} {'GMACs':>7} {'scan GF':>7} {'RSS MiB':>8}"
    for p in precisions:
        header += (f" | {p + ' train s':>12} {'x ref':>5} {'cpu s':>6} {'fwd s':>6} {'x ref':>5} {'train MiB':>9} "
                   f"{'fwd MiB':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['group']:<17} {r['model']:<34} failed: {r['error']}")
            continue
        line = (f"{r['group']:<17} {r['model']:<34} {r['params']:>11,} {r['macs'] / 1e9:>7.2f} "
                f"{r['scan_flops'] / 1e9:>7.2f} {mib(r['peak_rss_bytes']):>8}")
        for p in precisions:
            m = r[p]
            line += (f" | {m['train_step_s']:>12.3f} {m.get('train_x_ref', float('nan')):>5.2f} {m['train_cpu_s']:>6.2f} "
                     f"{m['forward_s']:>6.3f} "
                     f"{m.get('forward_x_ref', float('nan')):>5.2f} {mib(m['train_peak_bytes']):>9} "
                     f"{mib(m['forward_peak_bytes']):>7}")
        lines.append(line)
    return "\n".join(lines)


# --- profile: self CPU time of one training step, by group ---

GROUPS = (  # (group, substrings of event names), first match wins
    ("selective scan", ("selective_scan", "FusedScan")),
    ("Mamba inner (fused path)", ("mamba_inner", "MambaInner")),
    ("causal conv1d", ("causal_conv", "CausalDepthwiseConv1d")),
    ("matmul (projections)", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")),
    ("convolutions", ("convolution", "conv_depthwise", "conv2d", "conv3d", "upsample")),
    ("norms", ("norm",)),
    ("optimizer", ("_foreach", "Optimizer", "clip_grad")),
    ("layout copies", ("copy_", "clone", "contiguous", "aten::cat", "aten::stack", "flip", "_to_copy",
                       "permute", "index")),
    ("allocation and fill", ("aten::empty", "aten::zeros", "aten::fill_", "aten::zero_", "resize_")),
    ("loss", ("cross_entropy", "nll_loss", "softmax", "one_hot")),
    ("elementwise and activations", ("aten::",)),
)


def profile_case(key: str, precision: str, steps: int, threads: int) -> dict:
    """Self CPU time of ``steps`` training steps of ``key``, summed per group (with several threads, an
    op's self time is the wall time its calling thread spends in it)."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    from medssm.ssm import backends

    set_up_process(threads)
    for name in backends.available_backends():  # label the scan's forward (a numba call, no aten op)
        def labelled(*args, _scan=backends.get_backend(name), **kwargs):
            with record_function("selective_scan forward"):
                return _scan(*args, **kwargs)
        backends.register_backend(name)(labelled)
    _, _, train, _ = step_parts(key, precision)
    train()
    train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train()
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    ops: dict[str, float] = {}
    for event in prof.key_averages():
        group = next((g for g, keys in GROUPS if any(k in event.key for k in keys)), "other (Python, autograd)")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6 / steps
        ops[event.key] = event.self_cpu_time_total / 1e6 / steps
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    return {"key": key, "precision": precision, "threads": threads, "steps": steps, "wall_s_per_step": wall / steps,
            "groups_s": dict(sorted(totals.items(), key=lambda kv: -kv[1])), "top_ops_s": dict(top)}


def profile_table(result: dict) -> str:
    total = sum(result["groups_s"].values())
    lines = [f"{result['key']} {result['precision']}, {result['threads']} thread(s): {result['wall_s_per_step']:.3f} s a step under the "
             f"profiler, {total:.3f} s of it in profiled events", f"{'group':<30} {'s':>7} {'share':>6}"]
    lines += [f"{g:<30} {s:>7.3f} {100 * s / total:>5.1f}%" for g, s in result["groups_s"].items()]
    lines += ["", "top events by self CPU time:"] + [f"  {k[:70]:<70} {s:>7.3f}" for k, s in result["top_ops_s"].items()]
    return "\n".join(lines)


# --- depthwise convolutions: PyTorch's (NCDHW and channels-last) against medssm's kernels ---

DEPTHWISE_SHAPES = [(1, 32, 256, 256), (1, 64, 128, 128), (1, 32, 64, 64, 64), (1, 64, 32, 32, 32), (1, 128, 16, 16, 16)]


def depthwise_table(repeats: int) -> tuple[str, list[dict]]:
    """Forward and forward+backward ms of a 3x3(x3) depthwise conv at LightM-UNet's decoder shapes."""
    import torch
    import torch.nn as nn

    from medssm.nets.depthwise import depthwise_conv

    torch.manual_seed(0)
    rows = []
    for shape in DEPTHWISE_SHAPES:
        channels, dims = shape[1], len(shape) - 2
        conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(channels, channels, 3, padding=1, groups=channels)
        row = {"shape": list(shape)}
        for name, layout, run in (("torch", torch.contiguous_format, conv),
                                  ("torch channels-last", torch.channels_last_3d if dims == 3 else torch.channels_last, conv),
                                  ("medssm", torch.contiguous_format, lambda x: depthwise_conv(conv, x))):
            x = torch.randn(*shape).to(memory_format=layout).requires_grad_()
            grad = torch.randn(*shape).to(memory_format=layout)

            def forward():
                with torch.no_grad():
                    run(x)

            def both():
                torch.autograd.grad(run(x), (x, conv.weight, conv.bias), grad)

            row[name] = {"forward_ms": 1e3 * median_seconds(forward, repeats),
                         "forward_backward_ms": 1e3 * median_seconds(both, repeats)}
        rows.append(row)
    names = ("torch", "torch channels-last", "medssm")
    lines = [f"{'shape':<22}" + "".join(f" | {n + ' fwd':>24} {'fwd+bwd':>8}" for n in names)]
    for r in rows:
        lines.append(f"{'x'.join(map(str, r['shape'])):<22}" + "".join(
            f" | {r[n]['forward_ms']:>24.1f} {r[n]['forward_backward_ms']:>8.1f}" for n in names))
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads (default 2; 1 with --profile)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--only", nargs="+", help="case keys to run (default: all)", choices=list(CASES))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every case process keeps freed memory for reuse (medssm.devices.keep_freed_memory)")
    parser.add_argument("--busy", action="store_true", help="run beside one busy process (python -c 'while True: pass')")
    parser.add_argument("--profile", metavar="CASE", choices=list(CASES),
                        help="profile CASE's training step (1 thread) instead: self CPU time by group")
    parser.add_argument("--depthwise", action="store_true",
                        help="instead: a 3x3(x3) depthwise conv at LightM-UNet's shapes, PyTorch's against medssm's (ms)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print its JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.precision, args.repeats)))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    threads = args.threads or (1 if args.profile else 2)
    if args.depthwise:
        import torch

        torch.set_num_threads(threads)
        text, rows = depthwise_table(args.repeats)
        print(f"{threads} threads; median of {args.repeats}; ms\n{text}")
        (RESULTS / "models_depthwise.json").write_text(json.dumps({"threads": threads, "rows": rows}, indent=2))
        return 0
    # numba's pool is sized from NUMBA_NUM_THREADS at start-up: fix it with torch's.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "NUMBA_NUM_THREADS": str(threads), "BENCH_KEEP_FREED_MEMORY": str(int(args.keep_freed_memory))}
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    try:
        if args.profile:
            code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import models; "
                    f"print(json.dumps(models.profile_case({args.profile!r}, {args.precision[0]!r}, {args.repeats}, {threads})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["busy"], result["keep_freed_memory"] = args.busy, args.keep_freed_memory
            print(profile_table(result))
            (RESULTS / "models_profile.json").write_text(json.dumps(result, indent=2))
            return 0
        rows = []
        for key in args.only or list(CASES):
            group, label = CASES[key][:2]
            print(f"running {key} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--case", key, "--repeats", str(args.repeats),
                                   "--precision", *args.precision], capture_output=True, text=True, env=env)
            if proc.returncode:
                rows.append({"key": key, "group": group, "model": label,
                             "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        if busy is not None:
            busy.kill()
    add_ratios(rows, args.precision)
    print(f"{threads} threads{', one busy process beside' if args.busy else ''}"
          f"{', freed memory kept' if args.keep_freed_memory else ''}; median of {args.repeats}")
    print(table(rows, args.precision))
    (RESULTS / "models.json").write_text(json.dumps({"threads": threads, "busy": args.busy, "repeats": args.repeats,
                                                     "keep_freed_memory": args.keep_freed_memory, "rows": rows},
                                                    indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
