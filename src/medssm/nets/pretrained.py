"""Load checkpoints written by the authors' code into medssm's networks.

``load_pretrained(model, path)`` reads a file with ``torch.load(..., weights_only=True)`` (nothing
else is ever unpickled), finds the state dict inside the known containers, strips the prefixes that
wrappers add and loads strictly (the authors' module names are medssm's, so no key is renamed):

- LightM-UNet: an nnU-Net v2 checkpoint (``checkpoint_final.pth`` / ``checkpoint_best.pth``), a dict
  whose ``network_weights`` are the network's state dict, keys prefixed ``_orig_mod.`` when the
  trainer compiled the network or ``module.`` when it ran DDP;
- SegMamba: the ``.pt`` its trainer writes (a plain ``model.state_dict()``; also accepted inside a
  ``model`` / ``state_dict`` / ``module`` dict, keys possibly prefixed ``module.``);
- MedMamba: the ``.pth`` its ``train.py`` writes (``net.state_dict()``).

nnU-Net checkpoints also hold the training log (numpy floats) and ``init_args`` (a
``torch.device``); the numpy scalar and array types are allowed for ``weights_only`` loading
(nothing that can run code).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn

from ..files import read_torch

__all__ = ["extract_state_dict", "load_pretrained", "read_checkpoint"]

# Where each known container keeps the weights, tried in this order.
CONTAINER_KEYS = ("network_weights", "state_dict", "model_state_dict", "model", "module", "net", "weights")
# Prefixes added by wrappers: torch.compile, DistributedDataParallel / DataParallel, Lightning-style modules.
PREFIXES = ("_orig_mod.", "module.", "model.", "net.")


def _numpy_safe_globals() -> list:
    """numpy types an nnU-Net training log pickles (scalars, arrays, dtypes); none can run code."""
    import numpy as np

    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    allowed = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return allowed


def read_checkpoint(path: str | os.PathLike) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, numpy scalars and arrays allowed."""
    try:
        return read_torch(path, "PyTorch checkpoint", _numpy_safe_globals())
    except ValueError as e:
        raise ValueError(f"{e}. medssm loads no pickled code; if you trust the file, re-save just its state dict: "
                         "torch.save(torch.load(path, weights_only=False)[...].state_dict(), 'weights.pth')") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The state dict inside ``checkpoint`` (a state dict or a known container), prefixes stripped."""
    state = checkpoint
    for _ in range(3):  # containers may nest, e.g. {"model": {"state_dict": ...}}
        if _is_state_dict(state):
            break
        if not isinstance(state, Mapping):
            raise ValueError(f"the checkpoint holds a {type(state).__name__}, not a state dict")
        inner = next((state[k] for k in CONTAINER_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            keys = ", ".join(map(repr, list(state)[:10]))
            raise ValueError(f"no state dict found in the checkpoint: its top-level keys are {keys}; "
                             f"expected a state dict or one under {', '.join(CONTAINER_KEYS)}")
        state = inner
    if not _is_state_dict(state):
        raise ValueError("no state dict (a mapping of names to tensors) found in the checkpoint")
    state = dict(state)
    changed = True
    while changed:  # e.g. "module._orig_mod." from DDP around a compiled network
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the authors' checkpoint at ``path`` into ``model`` (in place) and return ``model``.

    Args:
        model: a medssm network built with the checkpoint's sizes (e.g.
            ``create_model("lightm_unet_3d", in_channels=1, out_channels=3)``).
        path: an nnU-Net v2 ``.pth`` (LightM-UNet), SegMamba's ``.pt``, MedMamba's ``.pth``, or any
            file holding a state dict directly or under a known key.
        strict: every key must match (default). ``strict=False`` loads the matching keys and still
            fails on shape mismatches.

    Raises:
        ValueError: the file cannot be read weights-only, holds no state dict, or its keys or shapes
            do not fit ``model`` (the message lists missing, unexpected and mismatched keys).

    Example:
        >>> net = medssm.create_model("lightm_unet_3d", in_channels=1, out_channels=3)
        >>> load_pretrained(net, "nnUNet_results/.../fold_0/checkpoint_final.pth")  # doctest: +SKIP
    """
    state = extract_state_dict(read_checkpoint(path))
    # Checked before anything is copied, so a checkpoint that does not fit leaves the model as it
    # was (torch's strict load copies every tensor that fits, then raises).
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if mismatched or (strict and (missing or unexpected)):
        def listing(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "") if items else ""

        raise ValueError(f"{path} does not fit {type(model).__name__}: "
                         + listing("missing from the checkpoint", missing)
                         + listing("unexpected in the checkpoint", unexpected)
                         + listing("shape mismatches", mismatched)
                         + "\n  (build the model with the checkpoint's sizes: channels, classes, init_filters/dims, depths)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
    return model
