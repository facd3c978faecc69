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

3D at size (``--sizes``): SegMamba, LightM-UNet 3D, MONAI's SwinUNETR (feature size 48), UNETR,
SegResNet-32 and DynUNet (nnU-Net's layout for the patch), 4 channels in and 4 classes out, at the
cube sides given. Each row runs in its own process (its peak RSS is the row's own, ``ru_maxrss``):
an eval forward without gradient, and a training step (Dice + CE, AdamW, clipping at 12, through
``medssm.engine.loop.train_step``) without and with activation checkpointing
(``medssm.nets.set_checkpointing``; MONAI's networks by their building blocks, SwinUNETR through its
``use_checkpoint``), in each ``--precision``; one warm-up, then the median of ``--repeats``. Rows
are merged into benchmarks/results/models_sizes.json (a row measured again replaces the old one,
``--fresh`` starts over), so the sweep can run in parts; the table and the figure
(models_sizes.png: step, forward and peak RSS against voxels) show every row in the file. "x swin"
divides by SwinUNETR's row in the same conditions.

    python benchmarks/models.py --sizes 64 96 --models segmamba swinunetr [--precision fp32 bf16]
    python benchmarks/models.py --sizes 128 --batch 2 --models segmamba --checkpointing on
    python benchmarks/models.py --profile segmamba swinunetr --sizes 64 --precision fp32   # one process, by group
"""

from __future__ import annotations

import argparse
import json
import os
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
        # two warm-ups: kernels compiled or loaded, optimiser state made, the heap grown
        walls, cpus = wall_and_cpu_seconds(train, repeats, warm_ups=2)
        row[precision] = {
            "forward_s": median_seconds(forward, repeats),
            "train_step_s": statistics.median(walls),
            "train_cpu_s": statistics.median(cpus),  # CPU time of all the process's threads
            "forward_peak_bytes": peak_tensor_bytes(forward),
            "train_peak_bytes": peak_tensor_bytes(train),
        }
    from medssm.devices import peak_memory

    row["peak_rss_bytes"] = peak_memory()
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
    ("convolution backward", ("convolution_backward",)),
    ("convolution, PyTorch's own kernel", ("slow_conv", "thnn_conv")),
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


# --- 3D at size: SegMamba, LightM-UNet 3D and MONAI's 3D networks at 64^3-128^3, one process per row ---

SIZE_MODELS = {  # key -> (label, registered model, arguments); 4 channels in, 4 classes out
    "segmamba": ("SegMamba", "segmamba_3d", {}),
    "lightm_unet_3d": ("LightM-UNet 3D", "lightm_unet_3d", {}),
    "swinunetr": ("SwinUNETR-48 (MONAI)", "monai:SwinUNETR", {"feature_size": 48}),
    "unetr": ("UNETR (MONAI)", "monai:UNETR", {}),  # img_size: the patch
    "segresnet32": ("SegResNet-32 (MONAI)", "monai:SegResNet", {"init_filters": 32}),
    "dynunet": ("DynUNet (MONAI, nnU-Net layout)", "monai:DynUNet", {}),  # laid out for the patch
}
SIZE_REFERENCE = "swinunetr"  # the ratios' denominator, measured at the same size, batch and precision
SIZES_JSON = RESULTS / "models_sizes.json"
SIZE_KEY = ("model", "size", "batch", "precision", "mode", "checkpointing", "blocks", "threads")
KINDS = ("decoder", "encoder", "mamba")  # medssm.nets.checkpointing.KINDS, sorted


def size_model(key: str, size: int):
    """The network ``key`` for 4-channel ``size``^3 patches and 4 classes."""
    from medssm.nets import build_for_data

    _, name, kwargs = SIZE_MODELS[key]
    kwargs = {**kwargs, **({"img_size": (size,) * 3} if key == "unetr" else {})}
    return build_for_data(name, spatial_dims=3, in_channels=4, num_classes=4, patch_size=(size,) * 3, **kwargs)


def size_step(key: str, size: int, batch: int, precision: str, mode: str, checkpointing: bool,
              blocks: list[str]):
    """(model, one training step or one eval forward) of ``key`` at ``size``^3, ``batch`` patches."""
    import torch

    from medssm.devices import autocast
    from medssm.engine.loop import train_step
    from medssm.engine.losses import make_loss
    from medssm.labels import LabelSet

    torch.manual_seed(0)
    model = size_model(key, size)
    x = torch.randn(batch, 4, size, size, size)
    cpu = torch.device("cpu")
    if mode == "forward":
        model.eval()

        def forward():
            with torch.no_grad(), autocast(cpu, precision):
                model(x)

        return model, forward
    if checkpointing:
        from medssm.nets import set_checkpointing

        set_checkpointing(model, blocks=blocks)
    labels = torch.randint(0, 4, (batch, 1, size, size, size))
    loss_fn = make_loss("dice_ce", LabelSet.classes(4))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    model.train()

    def train():
        train_step(model, x, labels, loss_fn, optimiser, grad_clip=12.0, device=cpu, precision=precision)

    return model, train


def wall_and_cpu_seconds(run, repeats: int, warm_ups: int = 1) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (all the process's threads) of ``repeats`` calls of ``run``, after
    ``warm_ups`` untimed ones."""
    for _ in range(warm_ups):
        run()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def run_size_row(spec: dict) -> dict:
    """Measure one row in this process: one warm-up, then ``repeats`` timed calls; the process's peak
    resident set at the end (the row's own: nothing else ran in this process)."""
    import torch

    from medssm.devices import cpu_has_native_bf16, peak_memory

    set_up_process(int(os.environ["OMP_NUM_THREADS"]))
    model, run = size_step(spec["model"], spec["size"], spec["batch"], spec["precision"], spec["mode"],
                           spec["checkpointing"], spec["blocks"])
    walls, cpus = wall_and_cpu_seconds(run, spec["repeats"], warm_ups=1)
    return {**spec, "label": SIZE_MODELS[spec["model"]][0], "voxels": spec["batch"] * spec["size"] ** 3,
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "seconds": statistics.median(walls), "min_seconds": min(walls), "cpu_seconds": statistics.median(cpus),
            "peak_rss_bytes": peak_memory(),
            "torch": torch.__version__, "native_bf16": cpu_has_native_bf16()}


def size_specs(args, threads: int) -> list[dict]:
    """The rows asked for: per model, size and precision a forward (eval, no gradient) and a training
    step without and with checkpointing (``--checkpointing``)."""
    specs = []
    for size in args.sizes:
        for key in args.models:
            for precision in args.precision:
                common = {"model": key, "size": size, "batch": args.batch, "precision": precision,
                          "repeats": args.repeats, "threads": threads, "blocks": sorted(args.checkpoint_blocks)}
                if not args.no_forward:
                    specs.append({**common, "mode": "forward", "checkpointing": False})
                for on in args.checkpointing:
                    specs.append({**common, "mode": "train", "checkpointing": on == "on"})
    return specs


def run_sizes(args, env: dict, threads: int) -> int:
    """Run each row in its own process; merge with the rows of earlier runs in models_sizes.json (a row
    measured again replaces its old one), then print the table and draw the figure."""
    unknown = [k for k in args.models if k not in SIZE_MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(SIZE_MODELS)}")
    rows = [] if args.fresh or not SIZES_JSON.exists() else json.loads(SIZES_JSON.read_text())["rows"]
    key = lambda r: tuple(str(r.get(k)) for k in SIZE_KEY)  # noqa: E731
    for spec in size_specs(args, threads):
        what = (f"{spec['model']} {spec['size']}^3 x{spec['batch']} {spec['precision']} {spec['mode']}"
                f"{' checkpointed' if spec['checkpointing'] else ''}")
        print(f"running {what} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--size-row", json.dumps(spec)], capture_output=True,
                                  text=True, env=env, timeout=args.timeout)
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
                row = {**spec, "error": f"exit {proc.returncode}{killed}: "
                                        f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        except subprocess.TimeoutExpired:
            row = {**spec, "error": f"longer than --timeout {args.timeout} s"}
        row.setdefault("label", SIZE_MODELS[spec["model"]][0])
        rows = [r for r in rows if key(r) != key(row)] + [row]
        SIZES_JSON.write_text(json.dumps({"rows": rows}, indent=2))  # after every row: a killed run keeps the rest
        if "error" in row:
            print(f"  {what}: failed: {row['error']}", file=sys.stderr, flush=True)
    print(sizes_table(rows))
    figure = sizes_figure(rows, RESULTS / "models_sizes.png")
    print(f"written {SIZES_JSON} and {figure}")
    return 0


def checkpointed(r: dict) -> bool | str:
    """A size row's checkpointing: False, True (every kind of block) or the kinds checkpointed ("mamba")."""
    if r["mode"] != "train" or not r["checkpointing"]:
        return False
    return True if sorted(r.get("blocks") or KINDS) == sorted(KINDS) else "+".join(r["blocks"])


def sizes_table(rows: list[dict]) -> str:
    """One line per model, size, batch, precision and checkpointing: training step (wall and CPU s),
    its peak RSS, the forward (eval, without checkpointing), and ratios to SwinUNETR's in the same
    conditions."""
    find = {(r["model"], r["size"], r["batch"], r["precision"], r["mode"], checkpointed(r), r["threads"]): r for r in rows}
    order = list(SIZE_MODELS)
    lines = [f"{'size':>5} {'batch':>5} {'thr':>3} {'model':<32} {'prec':<5} {'ckpt':<4} | {'step s':>7} {'x swin':>6} "
             f"{'cpu s':>7} {'RSS GiB':>7} {'x swin':>6} | {'fwd s':>7} {'x swin':>6} {'RSS GiB':>7}"]
    lines.append("-" * len(lines[0]))
    groups = sorted({(r["threads"], r["batch"], r["size"], r["precision"], r["model"], checkpointed(r)) for r in rows},
                    key=lambda g: (*g[:3], g[3] != "fp32", order.index(g[4]) if g[4] in order else 99, str(g[5])))
    for threads, batch, size, precision, model, on in groups:
        at = lambda m, mode, c: find.get((m, size, batch, precision, mode, c, threads))  # noqa: E731
        train, reference = at(model, "train", on), at(SIZE_REFERENCE, "train", on)
        forward, reference_fwd = None, None
        if not on:
            forward, reference_fwd = at(model, "forward", False), at(SIZE_REFERENCE, "forward", False)
        label = SIZE_MODELS.get(model, (model,))[0]
        mark = "off" if on is False else "on" if on is True else f"on ({on})"
        line = f"{size:>4}³ {batch:>5} {threads:>3} {label:<32} {precision:<5} {mark:<4} | "
        line += _cells(train, reference, ("seconds", "x", "cpu_seconds", "peak_rss_bytes", "x"), 42)
        line += " | " + _cells(forward, reference_fwd, ("seconds", "x", "peak_rss_bytes"), 23)
        lines.append(line)
    return "\n".join(lines)


def _cells(row: dict | None, reference: dict | None, fields: tuple[str, ...], width: int) -> str:
    """A row's values ("x": the previous value over the reference's), or why there are none."""
    if row is None:
        return f"{'':<{width}}"
    if "error" in row:
        return f"failed: {row['error']}"[:width].ljust(width)
    cells, last = [], None
    for field in fields:
        if field == "x":
            ok = reference is not None and "error" not in reference and last is not None
            cells.append(f"{row[last] / reference[last]:>6.2f}" if ok else f"{'-':>6}")
        else:
            value = row[field] / 2**30 if field == "peak_rss_bytes" else row[field]
            cells.append(f"{value:>7.2f}")
            last = field
    return " ".join(cells)


def sizes_figure(rows: list[dict], path: Path) -> Path:
    """Training step, forward and peak RSS against voxels a step (log-log), a column per precision;
    colour: model, dashed: checkpointed."""
    from medssm.figures import pyplot, save_figure

    plt = pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    good = [r for r in rows if "error" not in r]
    precisions = [p for p in ("fp32", "bf16") if any(r["precision"] == p for r in good)] or ["fp32"]
    panels = (("train", "seconds", "training step (s)"), ("forward", "seconds", "forward, eval (s)"),
              ("train", "peak_rss_bytes", "peak RSS, training (GiB)"))
    fig, axes = plt.subplots(len(panels), len(precisions), figsize=(5.5 * len(precisions), 10), squeeze=False)
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(SIZE_MODELS)}
    threads = sorted({r["threads"] for r in good})
    ticks = {r["voxels"]: f"{r['batch']}x{r['size']}³" if r["batch"] > 1 else f"{r['size']}³"
             for r in sorted(good, key=lambda r: r["voxels"])}
    for column, precision in enumerate(precisions):
        for row_index, (mode, field, title) in enumerate(panels):
            ax = axes[row_index][column]
            for key in SIZE_MODELS:
                for ckpt in (False, True):
                    points = sorted((r["voxels"], r[field]) for r in good if r["model"] == key and r["mode"] == mode
                                    and r["precision"] == precision and checkpointed(r) is ckpt)
                    if not points:
                        continue
                    xs, ys = zip(*points)
                    ys = [y / 2**30 for y in ys] if field == "peak_rss_bytes" else ys
                    ax.plot(xs, ys, "o-" if not ckpt else "s--", color=colours[key],
                            label=f"{SIZE_MODELS[key][0]}{', checkpointed' if ckpt else ''}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(ticks), list(ticks.values()))  # the measured inputs: 96³, 2x128³, ...
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("voxels a step (batch x size³)")
            ax.set_title(f"{title}, {precision}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"CPU, {', '.join(map(str, threads))} thread(s); 4 channels in and out; Dice + CE, AdamW; "
                 f"dashed: every block checkpointed", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    return save_figure(fig, path)


def profile_sizes(keys: list[str], size: int, batch: int, precision: str, threads: int) -> dict:
    """Self CPU time of one training step of each of ``keys`` at ``size``^3, all in this process (the same
    machine state for the ratios), by group."""
    from torch.profiler import ProfilerActivity, profile

    set_up_process(threads)
    result = {"size": size, "batch": batch, "precision": precision, "threads": threads, "models": {}}
    for key in keys:
        model, train = size_step(key, size, batch, precision, "train", False, [])
        train()
        start, cpu = time.perf_counter(), time.process_time()
        train()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train()
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            group = next((g for g, names in GROUPS if any(n in event.key for n in names)), "other (Python, autograd)")
            totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
        groups = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
        result["models"][key] = {"wall_s": wall, "cpu_s": cpu, "groups_s": groups}
        del model, train
    return result


def profile_sizes_table(result: dict) -> str:
    models = result["models"]
    keys = list(models)
    times = "  ".join(f"{k} {m['wall_s']:.2f} ({m['cpu_s']:.2f})" for k, m in models.items())
    lines = [f"one training step at {result['size']}³ x{result['batch']}, {result['precision']}, "
             f"{result['threads']} thread(s), in one process: wall s (cpu s)  {times}"]
    if len(keys) > 1:
        a, b = models[keys[0]], models[keys[-1]]
        lines.append(f"ratio {keys[0]} / {keys[-1]}: wall {a['wall_s'] / b['wall_s']:.2f}, "
                     f"cpu {a['cpu_s'] / b['cpu_s']:.2f}")
    groups = list(dict.fromkeys(g for m in models.values() for g in m["groups_s"]))
    lines.append(f"{'group (self CPU s, share)':<36}" + "".join(f"{k:>22}" for k in keys))
    for g in groups:
        cells = []
        for k in keys:
            total = sum(models[k]["groups_s"].values())
            v = models[k]["groups_s"].get(g, 0.0)
            cells.append(f"{v:>13.3f} {100 * v / total:>6.1f}%")
        lines.append(f"{g:<36}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def in_fresh_process(call: str, env: dict) -> dict | None:
    """``models.<call>`` run in a fresh interpreter: its JSON result, or None (its stderr shown) if it failed."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import models; "
            f"print(json.dumps(models.{call}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads (default 2; 1 with --profile)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--only", nargs="+", help="case keys to run (default: all)", choices=list(CASES))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="every case process keeps freed memory for reuse (medssm.devices.keep_freed_memory)")
    parser.add_argument("--busy", action="store_true", help="run beside one busy process (python -c 'while True: pass')")
    parser.add_argument("--profile", metavar="CASE", nargs="+",
                        help="profile CASE's training step (1 thread) instead: self CPU time by group; with --sizes, "
                             "the --models keys given here, in one process at the first size")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="3D at size: measure the --models at these cube sides (64 96 128), one process a row")
    parser.add_argument("--models", nargs="+", default=list(SIZE_MODELS), metavar="KEY",
                        help=f"with --sizes: which networks ({', '.join(SIZE_MODELS)}; default all)")
    parser.add_argument("--batch", type=int, default=1, help="with --sizes: patches a step (default 1)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="with --sizes: training steps without and/or with activation checkpointing")
    parser.add_argument("--checkpoint-blocks", nargs="+", default=["mamba", "encoder", "decoder"],
                        choices=["mamba", "encoder", "decoder"], help="with --sizes: the kinds of block checkpointed")
    parser.add_argument("--no-forward", action="store_true", help="with --sizes: training steps only")
    parser.add_argument("--timeout", type=float, default=None, help="with --sizes: seconds a row may take")
    parser.add_argument("--fresh", action="store_true",
                        help="with --sizes: forget the rows of earlier runs (default: merged into models_sizes.json)")
    parser.add_argument("--size-row", help=argparse.SUPPRESS)  # internal: measure one size row, print its JSON
    parser.add_argument("--depthwise", action="store_true",
                        help="instead: a 3x3(x3) depthwise conv at LightM-UNet's shapes, PyTorch's against medssm's (ms)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print its JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.precision, args.repeats)))
        return 0
    if args.size_row:
        print(json.dumps(run_size_row(json.loads(args.size_row))))
        return 0
    if args.profile and not args.sizes and (len(args.profile) > 1 or args.profile[0] not in CASES):
        parser.error(f"--profile takes one of {', '.join(CASES)}, or --models keys with --sizes")
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
        if args.profile and args.sizes:
            result = in_fresh_process(f"profile_sizes({args.profile!r}, {args.sizes[0]}, {args.batch}, "
                                      f"{args.precision[0]!r}, {threads})", env)
            if result is None:
                return 1
            print(profile_sizes_table(result))
            (RESULTS / "models_profile_sizes.json").write_text(json.dumps(result, indent=2))
            return 0
        if args.sizes:
            return run_sizes(args, env, threads)
        if args.profile:
            result = in_fresh_process(f"profile_case({args.profile[0]!r}, {args.precision[0]!r}, {args.repeats}, {threads})",
                                      env)
            if result is None:
                return 1
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
