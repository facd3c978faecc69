"""Export any medssm network to ONNX and prove the file computes what PyTorch computes.

``export_onnx(model, "model.onnx")`` traces the network with a pure-PyTorch selective scan, writes
an opset >= 17 graph with a dynamic batch axis and (for every registered architecture) dynamic
spatial axes, then runs the file in onnxruntime (CPU) on random inputs, at the traced size and at
a second size and batch, and raises :class:`ExportParityError` if any output's norm-wise relative
error ``||ort - torch||_2 / ||torch||_2`` exceeds ``rtol`` (default 1e-4), or its shape differs from
PyTorch's. The file only appears at its path once that check has passed.

``medssm export RUN_OR_MODEL --onnx out.onnx`` does the same from the command line
(:class:`ExportConfig`, :func:`export_cli`).

The network is traced with the ``chunked`` scan (``medssm.ssm.chunked``): its graph holds at any
sequence length and its memory is bounded by channel blocks. The graph is written by PyTorch's
TorchScript-based exporter (``dynamo=False``); the ``torch.export`` path needs ``onnxscript``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..extras import require
from ..files import atomic_path, guard_outputs
from ..nets.registry import create_model, get_model_card, list_models, parse_model_kwargs
from ..runs import load_run
from ..progress import stage
from ..ssm import use_backend

__all__ = ["ExportConfig", "ExportParityError", "ExportResult", "export_cli", "export_onnx", "load_for_export",
           "onnx_parity", "size_rule"]

EXPORT_BACKEND = "chunked"  # its traced graph holds at any length
MIN_OPSET = 17


class ExportParityError(ValueError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance (a one-line error: the
    command line reports it with exit code 2)."""


def _movedim_symbolic(g, self, source, destination):
    """``aten::movedim`` as one Transpose. The stock TorchScript symbolic writes negative axes
    (e.g. ``movedim(-1, 1)``) into the permutation as they are, which onnxruntime rejects."""
    from torch.onnx import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(self)
    if rank is None:
        raise RuntimeError("movedim on a tensor of unknown rank cannot be exported")
    src, dst = ([int(d) % rank for d in torch.as_tensor(symbolic_helper._maybe_get_const(v, "t")).reshape(-1).tolist()]
                for v in (source, destination))
    rest = [d for d in range(rank) if d not in src]
    perm = [-1] * rank
    for s_, d_ in zip(src, dst):
        perm[d_] = s_
    free = iter(rest)
    perm = [p if p >= 0 else next(free) for p in perm]
    return self if perm == list(range(rank)) else g.op("Transpose", self, perm_i=perm)


def _normalized(g, x, rows: int, eps, weight, bias, opset: int):
    """``x`` (B, C, *S) normalised over each of ``rows`` equal parts of its (C, *S) values (0: one
    per channel), then ``* weight + bias`` per channel; mean and variance (of the centred values)
    accumulated in float64.

    Replaces onnxruntime's InstanceNormalization, which the stock exporter uses for instance and
    group norms: its float32 statistics lose precision on large spatial sizes (at 64^3 a group
    norm's output was ~100x further from float64 than PyTorch's, enough to fail a full-size
    LightM-UNet 3D's check)."""
    from onnx import TensorProto
    from torch.onnx import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(x)
    if rank is None:
        raise RuntimeError("a normalisation of a tensor of unknown rank cannot be exported")
    const = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.long))  # noqa: E731

    def mean(t):  # over the last axis, kept
        if opset >= 18:
            return g.op("ReduceMean", t, const([-1]), keepdims_i=1)
        return g.op("ReduceMean", t, axes_i=[-1], keepdims_i=1)

    parts = g.op("Reshape", x, const([0, rows, -1]))  # (B, rows, C*S/rows)
    wide = g.op("Cast", parts, to_i=TensorProto.DOUBLE)
    centred = g.op("Sub", wide, mean(wide))
    variance = mean(g.op("Mul", centred, centred))
    eps_ = g.op("Constant", value_t=torch.tensor(float(eps), dtype=torch.float64))
    y = g.op("CastLike", g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, eps_))), x)
    y = g.op("Reshape", y, g.op("Shape", x))
    per_channel = const([-1] + [1] * (rank - 2))  # (C, 1, ..., 1) broadcasts against (B, C, *S)
    if not symbolic_helper._is_none(weight):
        y = g.op("Mul", y, g.op("Reshape", weight, per_channel))
    if not symbolic_helper._is_none(bias):
        y = g.op("Add", y, g.op("Reshape", bias, per_channel))
    return y


def _symbolics(opset: int) -> dict:
    from torch.onnx import symbolic_helper, symbolic_opset9

    def instance_norm(g, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
        if not symbolic_helper._maybe_get_const(use_input_stats, "b"):  # running statistics: stock export
            return symbolic_opset9.instance_norm(g, x, weight, bias, running_mean, running_var, use_input_stats,
                                                 momentum, eps, cudnn_enabled)
        return _normalized(g, x, 0, symbolic_helper._maybe_get_const(eps, "f"), weight, bias, opset)

    def group_norm(g, x, num_groups, weight, bias, eps, cudnn_enabled):
        return _normalized(g, x, symbolic_helper._maybe_get_const(num_groups, "i"),
                           symbolic_helper._maybe_get_const(eps, "f"), weight, bias, opset)

    return {"aten::movedim": _movedim_symbolic, "aten::instance_norm": instance_norm, "aten::group_norm": group_norm}


@contextlib.contextmanager
def _export_symbolics(opset: int):
    """Our symbolic functions, registered for the duration of one export only."""
    symbolics = _symbolics(opset)
    for name, fn in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


# ----------------------------------------------------------------------------------------------
# Which input sizes a network takes.


@dataclasses.dataclass(frozen=True)
class SizeRule:
    """Spatial sizes of a network: ``divisor`` every size must be a multiple of; ``default`` example
    size; ``trace`` the size to trace at (one that takes every data-dependent branch, e.g. padding);
    ``segmentation``: the output keeps the input's spatial axes."""

    spatial_dims: int
    divisor: int
    default: tuple[int, ...]
    trace: tuple[int, ...] | None
    segmentation: bool


def size_rule(model: nn.Module) -> SizeRule:
    """The :class:`SizeRule` of a network built by :func:`medssm.create_model`, from its card."""
    config = getattr(model, "medssm_config", None)
    if config is None:
        raise ValueError(f"cannot tell the input sizes of {type(model).__name__}: it was not built by "
                         "medssm.create_model (pass input_size with the batch and channel axes to export it)")
    card = get_model_card(config["name"])
    dims = int(config["kwargs"].get("spatial_dims", card.spatial_dims[0]))
    segmentation = card.task == "segmentation"
    if segmentation:  # a small example: the axes are dynamic, the traced size does not matter
        default = tuple(-(-s // card.size_divisor) * card.size_divisor for s in ((64, 64) if dims == 2 else (32,) * 3))
    else:
        default = card.input_size if dims == len(card.input_size) else (card.input_size[0] // 4,) * dims
    trace = (card.trace_size,) * dims if card.trace_size else None
    return SizeRule(dims, card.size_divisor, default, trace, segmentation)


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}: pass input_size with them")


# ----------------------------------------------------------------------------------------------
# Export and parity.


@dataclasses.dataclass
class ExportResult:
    path: Path
    input_shape: tuple[int, ...]
    dynamic_axes: dict[str, dict[int, str]]
    checks: list[dict]  # one per checked input: shape, rel_error, max_abs_error, ...
    opset: int
    seconds: float

    @property
    def rel_error(self) -> float:
        """The largest norm-wise relative error of the checks (0 when unchecked)."""
        return max((c["rel_error"] for c in self.checks), default=0.0)


def _random_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def onnx_parity(session, model: nn.Module, x: torch.Tensor) -> dict:
    """Run ``x`` through an onnxruntime ``session`` and ``model``. ``rel_error`` is the norm-wise
    relative error ``||ort - torch||_2 / ||torch||_2``; the largest element-wise error is reported too."""
    import numpy as np

    with torch.no_grad():
        ref = model(x).float().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        return {"shape": tuple(x.shape), "output_shape": tuple(got.shape), "max_abs_error": math.inf,
                "rel_error": math.inf, "error": f"output shape {got.shape}, PyTorch gives {ref.shape}"}
    diff = got.astype(np.float64) - ref
    abs_err = float(np.max(np.abs(diff))) if ref.size else 0.0
    norm = float(np.linalg.norm(ref))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else (0.0 if abs_err == 0 else math.inf)
    if not np.isfinite(got).all():
        rel = math.inf
    return {"shape": tuple(x.shape), "output_shape": tuple(got.shape), "max_abs_error": abs_err,
            "max_abs_error_over_max_output": abs_err / float(np.max(np.abs(ref))) if norm > 0 else abs_err,
            "rel_error": rel}


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads; default torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] | None = None,
                batch_size: int = 1, opset: int = MIN_OPSET, dynamic_batch: bool = True,
                dynamic_spatial: bool = True, rtol: float = 1e-4, check: bool = True,
                check_size: Sequence[int] | None = None, reference_backend: str | None = None,
                progress: bool = False) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` and check it against PyTorch in onnxruntime.

    Args:
        model: a medssm network (any ``nn.Module`` taking one image tensor works if ``input_size``
            gives the full shape).
        path: the ``.onnx`` file; written atomically, and only once the parity check has passed.
        input_size: spatial size of the example input (e.g. ``(256, 256)``), or a full
            ``(B, C, *S)`` shape; default: the family's usual size (64² / 32³ for the
            segmentation networks, 224² for MedMamba).
        batch_size: batch of the example input.
        opset: ONNX opset, at least 17.
        dynamic_batch, dynamic_spatial: mark the batch / spatial axes dynamic. Every registered
            architecture supports both; with ``dynamic_spatial`` the check also runs at a second size.
        rtol: largest allowed norm-wise relative error ``||ort - torch|| / ||torch||`` of every check.
            (Element-wise errors of random-weight networks reach ~1e-4 of the largest output where
            a normalisation divides by a small spread: both runtimes round, the net amplifies.)
        check: run the onnxruntime parity check (needs ``onnxruntime``).
        check_size: spatial size of the second check (default: each size plus the size divisor).
        reference_backend: scan backend of the PyTorch side of the check (default: the one in use,
            i.e. what the model computes when it is run normally).
        progress: print each stage (tracing, each check) with the time it took.

    Returns:
        :class:`ExportResult` with the checks' errors.

    Raises:
        ExportParityError: an output differs by more than ``rtol`` (nothing is written).
        ValueError: bad arguments (opset < 17, a size the network cannot take, ...).

    Example:
        >>> net = medssm.create_model("lightm_unet_2d", in_channels=1, out_channels=2)
        >>> export_onnx(net, "lightm_unet.onnx", input_size=(256, 256)).rel_error  # doctest: +SKIP
        3.1e-07
    """
    require("onnx", "export", "ONNX export")
    if check:
        require("onnxruntime", "export", "The ONNX parity check")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")
    if rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the output file must end in .onnx")
    start = time.perf_counter()
    rule = size_rule(model) if input_size is None or len(input_size) <= 3 else None
    if input_size is not None and len(input_size) > 3:  # a full (B, C, *S) shape
        shape = tuple(int(s) for s in input_size)
        spatial_dims = len(shape) - 2
        try:
            rule = size_rule(model)
        except ValueError:
            rule = SizeRule(spatial_dims, 1, shape[2:], None, True)
    else:
        spatial = tuple(int(s) for s in (input_size or rule.default))
        if len(spatial) != rule.spatial_dims:
            raise ValueError(f"{type(model).__name__} is {rule.spatial_dims}D: input_size needs {rule.spatial_dims} "
                             f"spatial sizes, got {spatial}")
        shape = (batch_size, _in_channels(model), *spatial)
    spatial = shape[2:]
    if any(s < 1 for s in shape):
        raise ValueError(f"input shape {shape} has an empty axis")
    if hasattr(model, "check_input_size"):
        model.check_input_size(shape)  # a clear error naming the sizes that work
    trace_shape = shape if (rule.trace is None or not dynamic_spatial) else (*shape[:2], *rule.trace)
    if check_size is None:
        check_size = tuple(s + rule.divisor * (1 if rule.divisor > 1 else 5) for s in spatial)
    check_shape = ((shape[0] + 1) if dynamic_batch else shape[0], shape[1],
                   *(check_size if dynamic_spatial else spatial))

    names = [f"dim{i}" for i in range(len(spatial))]
    in_axes = ({0: "batch"} if dynamic_batch else {}) | ({2 + i: n for i, n in enumerate(names)} if dynamic_spatial else {})
    def reference():  # the PyTorch side of the check
        return use_backend(reference_backend) if reference_backend else contextlib.nullcontext()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference():
            probe = model(_random_input(trace_shape, 0))
        out_axes = {0: "batch"} if dynamic_batch else {}
        if dynamic_spatial and probe.dim() == len(shape) and tuple(probe.shape[2:]) == tuple(trace_shape[2:]):
            out_axes |= {2 + i: n for i, n in enumerate(names)}
        dynamic_axes = {"input": in_axes, "logits": out_axes}
        with atomic_path(path) as tmp:
            with stage(f"tracing {type(model).__name__} at {trace_shape}", progress), use_backend(EXPORT_BACKEND), \
                    _export_symbolics(opset), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python shape checks seen by the tracer
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", message=".*Constant folding.*")
                warnings.filterwarnings("ignore", message=".*instance_norm' is set to train=True.*")  # no running stats: same
                torch.onnx.export(model, (_random_input(trace_shape, 0),), str(tmp), dynamo=False,
                                  opset_version=opset, input_names=["input"], output_names=["logits"],
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
            checks = []
            if check:
                session = ort_session(tmp)
                inputs = [shape] + ([check_shape] if check_shape != shape else [])
                with reference():
                    for seed, s in enumerate(inputs, start=1):
                        with stage(f"checking onnxruntime against PyTorch at {s}", progress):
                            checks.append(onnx_parity(session, model, _random_input(s, seed)))
                bad = [c for c in checks if not c["rel_error"] <= rtol]
                if bad:
                    lines = "; ".join(f"input {c['shape']}: {c.get('error') or 'relative error %.3g' % c['rel_error']}"
                                      for c in bad)
                    hint = (" (the spatial size is dynamic: if only the second size fails, export with "
                            "dynamic_spatial=False / --no-dynamic-spatial)") if dynamic_spatial and len(inputs) > 1 else ""
                    raise ExportParityError(f"ONNX export of {type(model).__name__} does not match PyTorch within "
                                            f"rtol={rtol:g}: {lines}{hint}; {path} was not written")
    finally:
        model.train(was_training)
    return ExportResult(path, shape, dynamic_axes, checks, opset, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Command line.


def load_for_export(source: str | os.PathLike, model_kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """A model from a registered name (random weights), a training run (its best checkpoint) or a
    saved model folder. Returns ``(model, description)``."""
    if Path(source).is_dir():
        if model_kwargs:
            raise ValueError("--model-kwargs only apply to a registered model name, not to a saved model or run")
        run = load_run(source)
        return run.load_model("best"), str(run.checkpoint("best"))
    try:
        get_model_card(str(source))
    except ValueError:
        raise ValueError(f"{source!r} is neither a run or saved model folder nor a registered model; registered: "
                         f"{', '.join(list_models())}") from None
    return create_model(str(source), **(model_kwargs or {})).eval(), f"{source} (random weights)"


@dataclasses.dataclass
class ExportConfig:
    """Export a registered model, a saved model folder or a training run to ONNX, then check the
    file against PyTorch with onnxruntime (fails if they differ by more than --rtol)."""

    model: str = dataclasses.field(metadata={"positional": True,
                                             "help": "registered model name, saved model folder, or training run folder"})
    onnx: str = dataclasses.field(metadata={"help": "output .onnx file"})
    input_size: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata={"help": "spatial size of the example input, e.g. 256 256 (default: the family's)"})
    batch_size: int = dataclasses.field(default=1, metadata={"help": "batch of the example input"})
    opset: int = dataclasses.field(default=MIN_OPSET, metadata={"help": f"ONNX opset (>= {MIN_OPSET})"})
    dynamic_batch: bool = dataclasses.field(default=True, metadata={"help": "dynamic batch axis"})
    dynamic_spatial: bool = dataclasses.field(default=True, metadata={"help": "dynamic spatial axes"})
    rtol: float = dataclasses.field(default=1e-4, metadata={"help": "largest allowed ||ort-torch||/||torch||"})
    scan_backend: str = dataclasses.field(default="auto", metadata={
        "help": "scan backend of the PyTorch side of the check (the graph itself always uses chunked)"})
    progress: bool = dataclasses.field(default=True, metadata={"help": "print each stage and its time"})
    check: bool = dataclasses.field(default=True, metadata={"help": "run the onnxruntime parity check"})
    model_kwargs: str = dataclasses.field(
        default="", metadata={"help": "JSON arguments for a registered model name, e.g. '{\"out_channels\": 3}'"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing .onnx file"})


def export_cli(cfg: ExportConfig) -> int:
    guard_outputs([Path(cfg.onnx)], [Path(cfg.model)] if Path(cfg.model).exists() else [], overwrite=cfg.overwrite)
    model, what = load_for_export(cfg.model, parse_model_kwargs(cfg.model_kwargs))
    with use_backend(cfg.scan_backend):
        result = export_onnx(model, cfg.onnx, cfg.input_size, cfg.batch_size, cfg.opset, cfg.dynamic_batch,
                             cfg.dynamic_spatial, cfg.rtol, cfg.check, progress=cfg.progress)
    axes = ", ".join(f"{i}:{n}" for i, n in result.dynamic_axes["input"].items()) or "none"
    print(f"exported {what} -> {result.path} (opset {result.opset}, input {result.input_shape}, dynamic axes {axes}) "
          f"in {result.seconds:.1f} s")
    for c in result.checks:
        print(f"  onnxruntime vs PyTorch at {c['shape']}: relative error {c['rel_error']:.3g} (<= {cfg.rtol:g}), "
              f"largest element error {c['max_abs_error']:.3g}")
    return 0
