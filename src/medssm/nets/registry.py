"""One factory for every network: ``create_model(name, **kwargs)``, ``list_models()``, and saving a
model as safetensors plus a JSON of its name and arguments (the timm registry pattern)."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..files import atomic_path

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override its defaults.

    The model remembers how it was made (``model.medssm_config``), so :func:`save_model` can
    write it and :func:`load_model` can rebuild it.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}")
    model = _MODELS[name](**kwargs)
    model.medssm_config = {"name": name, "kwargs": kwargs}
    return model


def save_model(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (name, arguments, ``extra``) into ``directory``,
    each atomically. The model must come from :func:`create_model`."""
    from safetensors.torch import save_file

    config = getattr(model, "medssm_config", None)
    if config is None:
        raise ValueError("save_model needs a model built by medssm.create_model (it records name and arguments)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_path(directory / "model.json") as tmp:
        tmp.write_text(json.dumps({**config, **(extra or {})}, indent=2))
    return directory


def load_model(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_model` and load its weights (strictly)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for f in ("model.json", "model.safetensors"):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"{directory / f}: missing; not a saved medssm model")
    config = json.loads((directory / "model.json").read_text())
    model = create_model(config["name"], **config.get("kwargs", {}))
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device=device), strict=True)
    return model.to(device)
