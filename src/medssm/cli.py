"""``medssm`` command line: a thin layer over the Python API.

Every command is a config dataclass plus the function that takes it; the dataclass's fields become
the command's options (``--field-name``), so every value is overridable from the command line and
the same config object can be built in Python. ``train``, ``predict`` and ``evaluate`` serve both
segmentation and classification: the task is taken from the dataset, the model or the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from pathlib import Path

from .devices import keep_freed_memory
from .extras import MissingDependency
from .files import describe_os_error

# (command, task) -> "module:ConfigDataclass:function"; task None for commands that have one form.
HANDLERS: dict[tuple[str, str | None], str] = {
    ("train", "segmentation"): "medssm.engine.segmentation:TrainConfig:train",
    ("predict", "segmentation"): "medssm.inference.segmentation:PredictConfig:predict",
    ("evaluate", "segmentation"): "medssm.metrics.evaluate_segmentation:EvaluateConfig:evaluate",
    ("train", "classification"): "medssm.engine.classification:ClassifierTrainConfig:train_classifier",
    ("predict", "classification"): "medssm.inference.classification:ClassifierPredictConfig:predict_classifier",
    ("evaluate", "classification"): "medssm.metrics.evaluate_classification:ClassifierEvaluateConfig:evaluate_classifier",
    ("info", None): "medssm.nets.info:InfoConfig:print_info",
    ("models", None): "medssm.nets.info:ModelsConfig:models_table",
    ("export", None): "medssm.export.onnx:ExportConfig:export_cli",
    ("quickstart", None): "medssm.workflows.quickstart:QuickstartConfig:quickstart",
    ("compare", None): "medssm.workflows.compare:CompareConfig:compare",
    ("demo", None): "medssm.cli:DemoConfig:demo",
}
# Commands that train or predict, for which the CLI keeps freed memory (medssm.devices.keep_freed_memory).
TRAINING_COMMANDS = ("train", "predict", "compare", "quickstart")
HELP = {
    "train": "train a model (segmentation on an nnU-Net dataset, or classification)",
    "predict": "predict with a trained run",
    "evaluate": "score predictions against references",
    "info": "a model's card, true parameter count, MACs, scan FLOPs and memory",
    "models": "the registered models and their cards, as a table",
    "export": "export a model or run to ONNX and check parity with onnxruntime",
    "quickstart": "train, predict and evaluate on the bundled lung X-ray set, with a report",
    "compare": "train several models with the same time budget, evaluate them alike, report",
    "demo": "build a model and run one forward pass",
}


@dataclasses.dataclass
class DemoConfig:
    """Build a registered model and run one forward pass on random input."""

    model: str = "lightm_unet_2d_tiny"
    input_size: tuple[int, ...] = (1, 1, 64, 64)


def demo(cfg: DemoConfig) -> None:
    import torch

    from .nets import create_model

    model = create_model(cfg.model).eval()
    with torch.no_grad():
        out = model(torch.randn(*cfg.input_size))
    params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model}: {params:,} parameters; input {tuple(cfg.input_size)} -> output {tuple(out.shape)}")


def detect_task(command: str, argv: list[str]) -> str:
    """Which task ``argv`` is about: ``--task``, else the run's, else the model's card, else the data's."""
    pre = argparse.ArgumentParser(add_help=False)
    for flags in (("--task",), ("-d", "--data"), ("--model",), ("-m", "--run"), ("-i", "--input")):
        pre.add_argument(*flags)
    pre.add_argument("positional", nargs="*")
    known, _ = pre.parse_known_args(argv)
    if known.task:
        return known.task
    from .nets.registry import get_model_card
    from .runs import load_run

    for given in filter(None, (known.run, known.model)):
        if Path(given).is_dir():
            return load_run(given).task
    if known.model:
        return get_model_card(known.model).task
    from .data.classification import classification_format

    if any(classification_format(c) for c in filter(None, (known.data, known.input, *known.positional))):
        return "classification"
    return "segmentation"


def _resolve(spec: str):
    module, config, function = spec.split(":")
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, function)


def _field_type(tp):
    """(element type, is_sequence, is_bool) for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), True, False
    if tp is bool:
        return bool, False, True
    return tp, False, False


def add_config_arguments(parser, config_cls, exclude: tuple[str, ...] = ()) -> None:
    """One option per field of ``config_cls`` but those in ``exclude`` (``--field-name``;
    ``metadata={"flags": (...)}`` or ``{"positional": True}`` to change that). Help comes from
    ``metadata["help"]``, with the default added."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in exclude:
            continue
        elem, seq, is_bool = _field_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs = {"help": _with_default(f, is_bool), "dest": f.name}
        if is_bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            kwargs.update(type=elem if elem in (int, float) else str, default=argparse.SUPPRESS)
            if seq:
                kwargs["nargs"] = "+"
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(f.name, **kwargs)
            continue
        flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
        parser.add_argument(*flags, required=required, **kwargs)


def _with_default(f: dataclasses.Field, is_bool: bool) -> str:
    text = f.metadata.get("help", "")
    if f.default is dataclasses.MISSING or f.default is None or "default" in text:
        return text
    value = ("on" if f.default else "off") if is_bool else " ".join(map(str, f.default)) \
        if isinstance(f.default, tuple) else f.default
    return f"{text} (default: {value})".strip()


def task_help(command: str) -> str:
    """The help of a command with a form per task: the options both forms share (same flags, default
    and help), then each task's own, with defaults."""
    forms = {task: _resolve(spec)[0] for (c, task), spec in HANDLERS.items() if c == command and task}

    def described(cls):
        return {f.name: (f.metadata.get("flags"), f.default, f.metadata.get("help")) for f in dataclasses.fields(cls)}

    fields = {task: described(cls) for task, cls in forms.items()}
    first = next(iter(fields.values()))
    shared = [n for n, d in first.items() if all(f.get(n) == d for f in fields.values())]
    head = argparse.ArgumentParser(prog=f"medssm {command}", description=(
        f"{HELP[command]}. The task is taken from the data, the model or the run (--task to say it); the "
        "options both tasks share are listed first, then each task's own."))
    head.add_argument("--task", choices=sorted(forms), help="segmentation or classification")
    add_config_arguments(head.add_argument_group("both tasks"), next(iter(forms.values())),
                         exclude=tuple(n for n in first if n not in shared))
    parts = [head.format_help()]
    for task, cls in forms.items():
        own = argparse.ArgumentParser(prog=f"medssm {command} --task {task}", add_help=False)
        add_config_arguments(own.add_argument_group(f"{task} only"), cls, exclude=tuple(shared))
        parts.append(own.format_help())
    return "\n".join(parts)


def config_from_args(config_cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    hints = typing.get_type_hints(config_cls)
    for name, v in values.items():
        if isinstance(v, list) and typing.get_origin(_strip_optional(hints[name])) is tuple:
            values[name] = tuple(v)
    return config_cls(**values)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = sorted({c for c, _ in HANDLERS})
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="medssm", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for c in commands:
            sub.add_parser(c, help=HELP.get(c, ""))
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(commands)}")
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    two_forms = (command, None) not in HANDLERS
    if two_forms and {"-h", "--help"} & set(rest) and "--task" not in rest:
        print(task_help(command))
        return 0
    try:
        task = detect_task(command, rest) if two_forms else None
        config_cls, function = _resolve(HANDLERS[(command, task)])
        parser = argparse.ArgumentParser(prog=f"medssm {command}", description=(config_cls.__doc__ or "").strip())
        if task is not None:
            parser.add_argument("--task", choices=sorted({t for c, t in HANDLERS if c == command}),
                                help="segmentation or classification (default: taken from the data, model or run)")
        add_config_arguments(parser, config_cls)
        args = parser.parse_args(rest)
        if command in TRAINING_COMMANDS:
            keep_freed_memory()  # reuse each step's pages rather than fault in fresh ones (this process only)
        result = function(config_from_args(config_cls, args))
    except (ValueError, FileNotFoundError, FileExistsError, MissingDependency) as e:  # say what, no traceback
        print(f"medssm {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions ...: the file and the reason, no traceback
        print(f"medssm {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
