"""Training-step time and peak GPU memory of 3D networks at SegMamba's size: 128³, 4 input channels,
4 classes, batch 2, Dice + CE loss, AdamW (clipping at 12, as medssm trains), in ``--precision``.

Rows: SegMamba without and with activation checkpointing, MONAI SwinUNETR (feature size 48) with
``use_checkpoint`` off and on, MONAI SegResNet with 32 initial filters. SegMamba's checkpointing is
switched on with ``medssm.nets.set_checkpointing`` (a runtime switch, not a constructor argument)
where medssm has it, else with ``checkpointing=True`` where medssm's constructor names that argument (the
registered constructor, the model's class or ``create_model``, read with ``inspect.signature``);
elsewhere its row says "n/a". Peak memory is ``torch.cuda.max_memory_allocated`` from before the
model is built to the end of its steps (weights, gradients, AdamW's state and activations). An
out-of-memory error ends its row only. The JSON is rewritten after every row.

    python benchmarks/step_3d.py [--precision bf16] [--repeats 5] [--json PATH]
    python benchmarks/step_3d.py --tiny     # segmamba_tiny and small MONAI nets at 32³ (SwinUNETR 64³), batch 1, fp32 on a CPU
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

import medssm
from medssm.engine.loop import train_step
from medssm.engine.losses import make_loss
from medssm.labels import LabelSet


def names_argument(fn, argument: str) -> bool:
    """Whether ``fn``'s signature names ``argument`` itself (a bare ``**kwargs`` does not count)."""
    try:
        return argument in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def medssm_checkpointing(name: str, model: torch.nn.Module | None = None) -> bool:
    """Whether medssm's ``name`` takes ``checkpointing=``: its registered constructor, its class
    (when a model built without it is at hand) or ``create_model`` names the argument."""
    from medssm.nets import registry

    places = [medssm.create_model]
    entry = getattr(registry, "_MODELS", {}).get(name)
    if entry:
        places.append(entry[0])
    if model is not None:
        places.append(type(model))
    return any(names_argument(fn, "checkpointing") for fn in places)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks at 32³ (SwinUNETR 64³), batch 1 (a check of the script)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=None, help="timed steps after 2 warm-ups (default 5; tiny 1)")
    parser.add_argument("--json", default="benchmarks/results/step_3d.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (1 if args.tiny else 5)
    size, batch = ((32,) * 3, 1) if args.tiny else ((128,) * 3, 2)
    warmups = 1 if args.tiny else 2
    precision = "fp32" if args.tiny and not cuda else args.precision  # bf16 is slow on most CPUs
    segmamba = "segmamba_tiny" if args.tiny else "segmamba_3d"
    swin_features = 12 if args.tiny else 48
    segresnet_filters = 8 if args.tiny else 32
    common = dict(spatial_dims=3, in_channels=4, out_channels=4)
    # label, model name, its arguments, how checkpointing is asked for ("medssm", "monai" or None: the
    # network has none), checkpointing on or off
    rows_to_run = [
        ("SegMamba", segmamba, {}, "medssm", False),
        ("SegMamba", segmamba, {}, "medssm", True),
        (f"SwinUNETR-{swin_features}", "monai:SwinUNETR", {"feature_size": swin_features, "depths": (1, 1, 1, 1)}
         if args.tiny else {"feature_size": swin_features}, "monai", False),
        (f"SwinUNETR-{swin_features}", "monai:SwinUNETR", {"feature_size": swin_features, "depths": (1, 1, 1, 1)}
         if args.tiny else {"feature_size": swin_features}, "monai", True),
        (f"SegResNet-{segresnet_filters}", "monai:SegResNet", {"init_filters": segresnet_filters}, None, False),
    ]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "tiny": args.tiny, "precision": precision, "input": [batch, 4, *size], "classes": 4,
              "loss": "Dice + CE (medssm's dice_ce)", "optimizer": "AdamW lr 1e-4 wd 1e-5, grad clip 12",
              "timed_steps": repeats, "rows": []}

    def write() -> None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))

    print(f"device: {result['device']}; torch {torch.__version__}; input {tuple(result['input'])}, 4 classes, "
          f"{precision}, Dice+CE, AdamW; median of {repeats} steps after {warmups} warm-up(s)", flush=True)
    print(f"{'model':<16}{'checkpointing':<16}{'params M':>10}{'step ms':>10}{'min ms':>10}{'peak GiB':>10}", flush=True)
    inputs = {}

    def batch_of(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and labels (one pair per size, made once)."""
        shape = (64,) * 3 if args.tiny and name == "monai:SwinUNETR" else size  # 32 halves to 1³: no instance norm
        if shape not in inputs:
            inputs[shape] = (torch.randn(batch, 4, *shape, device=device),
                             torch.randint(0, 4, (batch, 1, *shape), device=device))
        return inputs[shape]

    loss_fn = make_loss("dice_ce", LabelSet.classes(4))
    supported = None  # medssm's checkpointing, found out on the first SegMamba row
    for label, name, kwargs, kind, checkpointing in rows_to_run:
        row = {"model": label, "name": name, "kwargs": dict(kwargs),
               "checkpointing": checkpointing if kind else "none in this network"}
        switch = kind == "medssm" and checkpointing and hasattr(medssm.nets, "set_checkpointing")
        if switch:
            row["note"] = "medssm.nets.set_checkpointing(model)"
        elif kind == "medssm":
            if supported is None:
                supported = medssm_checkpointing(name)
            if supported:
                kwargs = {**kwargs, "checkpointing": checkpointing}
            elif checkpointing:
                row["checkpointing"] = "n/a"
                row["note"] = "medssm's constructor takes no checkpointing argument here"
        elif kind == "monai":
            kwargs = {**kwargs, "use_checkpoint": checkpointing}
        row["kwargs"] = dict(kwargs)
        if row["checkpointing"] != "n/a":
            model = optimizer = None
            failed = None
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                torch.manual_seed(0)
                model = medssm.create_model(name, **common, **kwargs).to(device).train()
                if switch:
                    medssm.nets.set_checkpointing(model)
                if kind == "medssm" and supported is False and medssm_checkpointing(name, model):
                    supported = True  # the class names it though the registry did not show it: next row asks
                row["parameters"] = sum(p.numel() for p in model.parameters())
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
                x, labels = batch_of(name)
                row["input"] = list(x.shape)
                times = []
                for i in range(warmups + repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    loss = train_step(model, x, labels, loss_fn, optimizer, grad_clip=12.0, device=device,
                                      precision=precision)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= warmups:
                        times.append(time.perf_counter() - start)
                row.update(step_ms=1e3 * statistics.median(times), min_step_ms=1e3 * min(times), loss=loss)
                if cuda:
                    row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            except torch.OutOfMemoryError as e:
                failed = f"out of memory ({str(e).splitlines()[0][:160]})"
            except Exception as e:  # a network that does not build or run here: said, the rest measured
                failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if failed:
                row["error"] = failed
                if cuda:
                    row["peak_allocated_gib_before_error"] = torch.cuda.max_memory_allocated() / 2**30
            del model, optimizer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        result["rows"].append(row)
        write()
        ckpt = str(row["checkpointing"]) if kind else "-"
        if "step_ms" in row:
            peak = f"{row['peak_allocated_gib']:>10.2f}" if "peak_allocated_gib" in row else f"{'-':>10}"
            print(f"{label:<16}{ckpt:<16}{row['parameters'] / 1e6:>10.2f}{row['step_ms']:>10.1f}"
                  f"{row['min_step_ms']:>10.1f}{peak}", flush=True)
        else:
            print(f"{label:<16}{ckpt:<16}{row.get('error') or row.get('note')}", flush=True)
    write()
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
