"""What a model costs: true parameter count, conv/linear MACs, analytic scan FLOPs, peak memory.

Every measure works on CPU and for any ``nn.Module``:

- parameters: ``sum(p.numel())`` over all parameters, Mamba weights included;
- MACs: multiply-accumulates of convolutions and matrix products (linear layers, attention),
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one forward, with the
  selective scans' own arithmetic left out;
- scan FLOPs: the analytic count of every ``selective_scan`` call (:func:`medssm.ssm.count_scan_flops`);
- memory kept for the backward: the bytes of the tensors autograd saves (:func:`saved_tensor_bytes`);
- peak memory: the most bytes of tensor storage alive at once among the tensors created while a
  function runs (weights and inputs excluded), tracked by a ``TorchDispatchMode``
  (:class:`LiveTensorBytes`). Memory a backend allocates outside PyTorch (a compiled kernel's
  workspace) is not seen.

``medssm info MODEL --input-size ...`` prints all four (:func:`print_info`).
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..progress import stage
from ..ssm import count_scan_flops
from .registry import create_model, get_model_card, parse_model_kwargs

DEFAULT_SPATIAL = {2: (224, 224), 3: (64, 64, 64)}


def count_parameters(model: nn.Module) -> int:
    """Every parameter's element count (what a checkpoint holds), Mamba weights included."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(conv/matmul MACs, selective-scan FLOPs) of one forward of ``model`` on ``x`` (eval, no_grad)."""
    model.eval()
    with torch.no_grad(), count_scan_flops(compute=False) as scans, FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2, sum(scans)


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storage created inside the mode and still alive; ``peak`` is the
    most at any time. Storages that existed before (weights, inputs, views of them) are not counted.

    >>> with LiveTensorBytes() as mem:
    ...     model(x)
    >>> mem.peak  # bytes
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # storage id -> bytes counted (0: existed before)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._see(t, count=False)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t, count=True)
        return out

    def _see(self, t: torch.Tensor, count: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        nbytes = storage.nbytes() if count else 0
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage alive at once among those created while ``fn()`` runs
    (its result included until it is dropped)."""
    with LiveTensorBytes() as mem:
        fn()
    return mem.peak


def saved_tensor_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages autograd keeps for the backward while ``fn()`` runs (as
    ``torch.autograd.graph.saved_tensors_hooks`` sees them), those of ``exclude`` (weights, the input)
    left out. Under activation checkpointing a checkpointed block contributes only its inputs.

    >>> kept = saved_tensor_bytes(lambda: model(x).sum(), exclude=[*model.parameters(), x])
    """
    known = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(sizes.values())


def peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak tensor memory of one forward pass (eval, no_grad), weights and input excluded."""
    model.eval()
    with torch.no_grad():
        return peak_tensor_bytes(lambda: model(x))


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    """The full (B, C, *S) input shape: ``input_size`` in full, or only its spatial sizes (batch 1 and
    the model's input channels added), or ``None`` for :func:`default_input_size`."""
    default = default_input_size(model)
    if not input_size:
        return default
    size = tuple(int(s) for s in input_size)
    dims = len(default) - 2
    if len(size) == dims:
        return (1, default[1], *size)
    if len(size) != dims + 2:
        raise ValueError(f"{type(model).__name__} is {dims}D: give the input size as {dims} spatial sizes or as "
                         f"B C and {dims} spatial sizes, got {size}")
    if size[1] != default[1]:
        raise ValueError(f"{type(model).__name__} takes {default[1]} input channel(s), the input size {size} has "
                         f"{size[1]}")
    return size


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(1, C, *S): C from the model's first convolution; S the card's input size for a registered
    model, else 224x224 or 64^3."""
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if conv is None:
        raise ValueError("cannot guess an input size for a model without 2D/3D convolutions: give input_size")
    dims = 3 if isinstance(conv, nn.Conv3d) else 2
    config = getattr(model, "medssm_config", None)
    spatial = get_model_card(config["name"]).input_size if config else ()
    return (1, conv.in_channels, *(spatial if len(spatial) == dims else DEFAULT_SPATIAL[dims]))


def build_for_input(name: str, input_size: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """The registered model ``name`` shaped for ``input_size``: its length sets the dimensionality and,
    for a full (B, C, *S) shape, C the input channels (an argument that says otherwise is an error)."""
    card = get_model_card(name)
    size = tuple(int(s) for s in input_size or ())
    implied = {}
    if len(size) in (2, 3, 4, 5):
        implied["spatial_dims"] = len(size) - (2 if len(size) > 3 else 0)
    if len(size) in (4, 5):
        implied["in_channels" if card.task == "segmentation" else "in_chans"] = size[1]
    clash = {k: (kwargs[k], v) for k, v in implied.items() if k in kwargs and kwargs[k] != v}
    if clash:
        raise ValueError(f"input size {size} and the model arguments disagree: "
                         + ", ".join(f"{k}={a} vs {b} from the input size" for k, (a, b) in clash.items()))
    return create_model(name, **{**implied, **kwargs})


@dataclass
class ModelInfo:
    """What one forward of a model on one input size costs."""

    name: str
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    parameters: int
    macs: int
    scan_flops: int
    peak_activation_bytes: int

    @property
    def flops(self) -> int:
        """2 x MACs + scan FLOPs."""
        return 2 * self.macs + self.scan_flops

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}

    def __str__(self) -> str:
        g = lambda n: f"{n / 1e9:,.2f} G" if n >= 1e9 else f"{n / 1e6:,.2f} M"  # noqa: E731
        return "\n".join([
            f"{self.name}: input {self.input_size} -> output {self.output_size}",
            f"  parameters              {self.parameters:>16,}   (every weight, Mamba included)",
            f"  conv + linear MACs      {g(self.macs):>16}   (multiply-accumulates, FlopCounterMode)",
            f"  selective-scan FLOPs    {g(self.scan_flops):>16}   (analytic, 9 per batch*channel*token*state)",
            f"  total FLOPs             {g(self.flops):>16}   (2 x MACs + scan FLOPs)",
            f"  peak activation memory  {self.peak_activation_bytes / 2**20:>14,.1f} MiB   "
            "(one forward, eval, no_grad; tensors alive at once)",
        ])


def model_info(model: nn.Module | str, input_size: Sequence[int] | None = None, name: str | None = None,
               progress: bool = False, **model_kwargs) -> ModelInfo:
    """Measure ``model`` (a module, or a registered name built with ``model_kwargs``) on a random
    input of ``input_size`` ((B, C, *S), or only the spatial sizes; default :func:`default_input_size`);
    ``progress`` prints each measurement with its time (a 3D model at full size takes minutes).

    Example:
        >>> info = model_info("lightm_unet_2d", (1, 1, 256, 256))
        >>> info.parameters, info.macs, info.scan_flops, info.peak_activation_bytes
    """
    if isinstance(model, str):
        with stage(f"building {model}", progress):
            name, model = model, build_for_input(model, input_size, **model_kwargs)
    input_size = resolve_input_size(model, input_size)
    x = torch.randn(*input_size)
    with stage(f"counting MACs and scan FLOPs at {input_size}", progress):
        macs, scan_flops = count_macs(model, x)
    outputs = []
    with stage("measuring the peak activation memory of a forward pass", progress), torch.no_grad():
        peak = peak_tensor_bytes(lambda: outputs.append(tuple(model.eval()(x).shape)))
    return ModelInfo(name=name or type(model).__name__, input_size=input_size, output_size=outputs[0],
                     parameters=count_parameters(model), macs=macs, scan_flops=scan_flops, peak_activation_bytes=peak)


@dataclass
class InfoConfig:
    """Print a registered model's card, then its true parameter count, conv/linear MACs,
    selective-scan FLOPs and peak activation memory of one forward pass."""

    model: str = field(metadata={"positional": True, "help": "registered model name (see medssm.list_models())"})
    input_size: tuple[int, ...] = field(default=(), metadata={
        "help": "input shape B C *S or spatial sizes only, e.g. 1 1 256 256 or 256 256 (default: the card's)"})
    model_kwargs: str = field(default="{}", metadata={
        "help": "model arguments as JSON, e.g. '{\"in_channels\": 3, \"out_channels\": 2}'"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})
    progress: bool = field(default=True, metadata={"help": "print each measurement and its time (on stderr)"})


def print_info(cfg: InfoConfig) -> ModelInfo:
    """``medssm info``: the card, then the measures on ``cfg.input_size`` (a table, or JSON)."""
    import dataclasses
    import json

    card = get_model_card(cfg.model)
    info = model_info(cfg.model, cfg.input_size or None, progress=cfg.progress, **parse_model_kwargs(cfg.model_kwargs))
    if cfg.json:
        print(json.dumps({"card": dataclasses.asdict(card), **info.as_dict()}, indent=2, default=str))
    else:
        print(f"{card}\n\n{info}")
    return info


@dataclass
class ModelsConfig:
    """List the registered models with their cards, as a Markdown table."""

    task: str | None = field(default=None, metadata={"help": "segmentation or classification (default: both)"})
    spatial_dims: int | None = field(default=None, metadata={"help": "2 or 3 (default: both)"})
    pattern: str = field(default="*", metadata={"help": "shell-style name pattern, e.g. 'lightm*'"})


def models_table(cfg: ModelsConfig) -> str:
    """``medssm models``: one row per registered model matching ``cfg``: its card and recipe."""
    from .registry import list_models

    rows = ["| name | task | dims | size divisor | default input | recipe | ablation of |", "|" + "---|" * 7]
    for name in list_models(cfg.pattern, task=cfg.task, spatial_dims=cfg.spatial_dims):
        c, r = get_model_card(name), get_model_card(name).recipe
        optimiser = f"{r.optimizer} {r.lr:g}" + (f", wd {r.weight_decay:g}" if r.weight_decay else "") + (
            f", momentum {r.momentum:g}" + (" Nesterov" if r.nesterov else "") if r.momentum else "")
        steps = f"{r.epochs} x {r.iterations_per_epoch}" if r.iterations_per_epoch else f"{r.epochs} epochs"
        rows.append(f"| `{name}` | {c.task} | {', '.join(f'{d}D' for d in c.spatial_dims)} | {c.size_divisor} | "
                    f"{c.in_channels} x {' x '.join(map(str, c.input_size))} | {optimiser}, {r.schedule}, {r.loss}, "
                    f"{steps}{', mirror TTA' if r.mirror_tta else ''} | {c.ablation_of or ''} |")
    print("\n".join(rows))
    return "\n".join(rows)


__all__ = ["ModelInfo", "model_info", "count_parameters", "count_macs", "peak_activation_bytes", "saved_tensor_bytes",
           "peak_tensor_bytes", "LiveTensorBytes", "default_input_size", "resolve_input_size", "build_for_input",
           "InfoConfig", "print_info", "ModelsConfig", "models_table"]
