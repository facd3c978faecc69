"""One factory for every network: ``create_model(name, **kwargs)``, ``list_models()``, each model's
card (``get_model_card``), and saving a model as safetensors plus a JSON of its name and arguments
(the timm registry pattern).

Example:
    >>> medssm.list_models(task="segmentation", spatial_dims=3)
    >>> net = medssm.create_model("lightm_unet_3d", in_channels=1, out_channels=3)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch.nn as nn

from ..devices import available_memory
from ..files import read_json, read_safetensors, write_file, write_json
from .cards import ModelCard

__all__ = ["register_model", "get_model_card", "list_models", "create_model", "build_for_data",
           "parse_model_kwargs", "save_model", "load_model"]

_MODELS: dict[str, tuple[Callable[..., nn.Module], ModelCard]] = {}
# "prefix:" -> a function that registers an unlisted name of that family on first use (monai:CLASS).
_FAMILIES: dict[str, Callable[[str], None]] = {}
# Arguments model.json files of earlier releases may hold that are no longer part of a model.
RETIRED_KWARGS = ("scan_backend",)


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, **card):
    """Decorator: register a constructor under its function name (or ``name``) with a :class:`ModelCard`
    made of ``card`` (the description defaults to the docstring's first line).

    >>> @register_model(task="segmentation", spatial_dims=(2,), size_divisor=8, input_size=(256, 256))
    ... def my_net(in_channels=1, out_channels=2): ...
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        description = card.pop("description", None) or (fn.__doc__ or "").strip().splitlines()[0]
        _MODELS[key] = (fn, ModelCard(name=key, description=description, **card))
        return fn

    return wrap(fn) if fn is not None else wrap


def register_family(prefix: str, register: Callable[[str], None]) -> None:
    """Let ``register(name)`` register unlisted names ``prefix:...`` when first asked for."""
    _FAMILIES[prefix] = register


def _entry(name: str) -> tuple[Callable[..., nn.Module], ModelCard]:
    prefix, sep, _ = name.partition(":")
    if name not in _MODELS and sep and prefix in _FAMILIES:
        _FAMILIES[prefix](name)
    if name not in _MODELS:
        families = "".join(f" (or {p}:NAME)" for p in _FAMILIES)
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}{families}")
    return _MODELS[name]


def get_model_card(name: str) -> ModelCard:
    """The :class:`ModelCard` of the registered model ``name`` (``monai:CLASS`` included)."""
    return _entry(name)[1]


def list_models(pattern: str = "*", *, task: str | None = None, spatial_dims: int | None = None) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` whose card has ``task`` and takes
    ``spatial_dims`` (each filter optional), sorted."""
    return sorted(n for n, (_, card) in _MODELS.items() if fnmatch.fnmatch(n, pattern)
                  and (task is None or card.task == task)
                  and (spatial_dims is None or spatial_dims in card.spatial_dims))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override its defaults.

    ``spatial_dims`` may be given to any model: it must be one its card lists (a model of one
    dimensionality does not need it). The model remembers how it was made (``model.medssm_config``),
    so :func:`save_model` can write it and :func:`load_model` can rebuild it.
    """
    fn, card = _entry(name)
    kwargs = {k: v for k, v in kwargs.items() if k not in RETIRED_KWARGS}
    dims = kwargs.get("spatial_dims")
    if dims is not None:
        if dims not in card.spatial_dims:
            others = list_models(task=card.task, spatial_dims=dims)
            raise ValueError(f"{name} takes {' or '.join(f'{d}D' for d in card.spatial_dims)} input, not "
                             f"spatial_dims={dims}; {dims}D {card.task} models: {', '.join(others) or 'none'}")
        if len(card.spatial_dims) == 1:
            kwargs.pop("spatial_dims")
    try:
        _check_size(name, fn, kwargs)
        model = fn(**kwargs)
    except TypeError as e:  # an argument the model does not take: one line, not the constructor's traceback
        raise ValueError(f"{name}: {str(e).splitlines()[0]}") from None
    model.medssm_config = {"name": name, "kwargs": kwargs}
    return model


def _check_size(name: str, fn: Callable[..., nn.Module], kwargs: dict) -> None:
    """Refuse a model whose weights alone would not fit in this machine's free memory (a width of 10^9
    asked for by mistake would otherwise fault in memory until the system kills the process): it is
    built first on PyTorch's ``meta`` device, which allocates nothing. A model that cannot be built
    there is not checked."""
    import torch

    try:
        with torch.device("meta"):
            probe = fn(**kwargs)
    except TypeError:
        raise
    except RuntimeError as e:
        if "overflow" in str(e):  # a tensor of more elements than memory can address
            raise ValueError(f"{name} with {kwargs}: too large to build ({str(e).splitlines()[0][:120]})") from None
        return  # some constructors copy data, which meta tensors do not hold
    except Exception:  # noqa: BLE001 - as above
        return
    need = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    free = available_memory()
    if free is not None and need > free:
        raise ValueError(f"{name} with {kwargs}: its weights alone need {need / 2**30:.1f} GiB; this machine has "
                         f"{free / 2**30:.1f} GiB free")


def build_for_data(name: str, *, spatial_dims: int, in_channels: int, num_classes: int,
                   patch_size: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """The model ``name`` for data of ``spatial_dims`` with ``in_channels`` and ``num_classes``:
    MONAI's argument names for a segmentation card, timm's for a classification card; ``patch_size``
    goes to models that lay themselves out for it. ``kwargs`` override."""
    card = get_model_card(name)
    if card.task == "segmentation":
        args = {"in_channels": in_channels, "out_channels": num_classes}
    else:
        args = {"in_chans": in_channels, "num_classes": num_classes}
    if card.adapts_to_patch and patch_size is not None:
        args["patch_size"] = tuple(int(s) for s in patch_size)
    return create_model(name, **{"spatial_dims": spatial_dims, **args, **kwargs})


def parse_model_kwargs(value: str | dict | None) -> dict:
    """Model arguments given as a dict or as JSON text (``'{"init_filters": 16}'``, the CLI's
    ``--model-kwargs``); anything else is a clear error."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs is not valid JSON ({e}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"init_filters\": 16}}', got {value!r}")
    return parsed


def save_model(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (name, arguments, ``extra``) into ``directory``,
    each atomically. The model must come from :func:`create_model`."""
    from safetensors.torch import save

    config = getattr(model, "medssm_config", None)
    if config is None:
        raise ValueError("save_model needs a model built by medssm.create_model (it records name and arguments)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # a tensor held under two names (DynUNet's skips) is written twice
        v = v.detach().contiguous().cpu()
        state[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    weights = save(state)  # bytes: written by Python, so a failed write raises (naming the file)
    write_file(directory / "model.safetensors", lambda f: f.write(weights))
    write_json(directory / "model.json", {**config, **(extra or {})}, default=_json_default)
    return directory


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_model(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_model` and load its weights (strictly)."""
    directory = Path(directory)
    config = read_json(directory / "model.json", "model description")
    model = create_model(config["name"], **config.get("kwargs", {}))
    model.load_state_dict(read_safetensors(directory / "model.safetensors", device=device), strict=True)
    return model.to(device)
