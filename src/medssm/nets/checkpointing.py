"""Activation checkpointing as a runtime switch: :func:`set_checkpointing` (as MONAI's
``use_checkpoint`` for SwinUNETR, for every network of the library and MONAI's baselines).

A checkpointed block keeps only its input for the backward; its activations are recomputed in the
backward, block by block, so a training step keeps about one block's activations at a time, for
about one more forward pass of compute. The gradients are those of the plain network (the same
operations run again on the same values; random draws, e.g. drop path, are replayed; batch norm's
running statistics are updated once, not twice).

How a network runs is not what it is: like the scan backend (:func:`medssm.ssm.use_backend`),
checkpointing is not a constructor argument and is not written to ``model.json``; it is switched on
a built model, and acts only in training mode with gradients enabled (outside export and tracing).
In evaluation or under ``torch.no_grad()`` a block costs one attribute check more.

The blocks, by kind (``blocks=``; the outermost of those chosen, never one inside another; a
network's last block, which the backward would recompute at once, stays plain):

- LightM-UNet: Mamba: every residual vision Mamba layer; encoder: every ResMambaBlock (two Mamba
  layers with their norms); decoder: every ResUpBlock but the last (it runs last);
- SegMamba: Mamba: every tri-orientated Mamba layer; encoder: every gated spatial convolution
  (GSC) and skip MLP; decoder: every residual block (``encoder1..5``, ``decoder2..5``; ``decoder1`` runs last);
- MedMamba: Mamba: every SS2D; encoder: every SS-Conv-SSM block;
- MONAI networks: every outermost MONAI building block (a class of ``monai.networks.blocks``:
  ``ResBlock``, ``ResidualUnit``, ``Convolution``, ``UnetResBlock``, ``UnetrUpBlock``,
  ``TransformerBlock`` ...; ResNet's ``ResNetBlock``); a module with MONAI's own ``use_checkpoint``
  (SwinUNETR's Swin transformer) checkpoints itself through that flag, which the switch turns on
  only in training with gradients. Covers SegResNet, UNet, DynUNet, UNETR, SwinUNETR, ResNet.
  MONAI's blocks count as encoder and decoder blocks. A network with none of these blocks is
  refused with a one-line error.

The Mamba layers keep much memory for little compute: SegMamba at 2 x 64^3 (fp32, 2 threads,
``benchmarks/models.py --sizes``), checkpointing them alone took the step's peak RSS from 5.11 to
4.10 GiB for 1.05x the time, every block to 2.91 GiB for 1.35x (docs/explanation/3d-at-size.md).

Example:
    >>> model = medssm.create_model("segmamba_3d", in_channels=4, out_channels=4)
    >>> blocks = medssm.nets.set_checkpointing(model)        # names of the checkpointed blocks
    >>> medssm.nets.set_checkpointing(model, blocks="mamba")  # only the Mamba layers
    >>> medssm.nets.set_checkpointing(model, enabled=False)  # back to plain
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..devices import routing_conv3d
from ..ssm.backends import is_exporting
from ..ssm.fused_mamba import saving_for_recompute

__all__ = ["set_checkpointing", "checkpointing_enabled", "checkpoint_blocks", "checkpointed", "runs_last", "KINDS"]

KINDS = ("mamba", "encoder", "decoder")  # what a block is: a Mamba layer, an encoder block, a decoder block
_FLAG = "_medssm_checkpointing"  # instance attribute of a medssm block: checkpoint it
_RUNS_LAST = "_medssm_runs_last"  # instance attribute: the network's last block, never checkpointed
_MONAI_FORWARD = "_medssm_checkpoint_forward"  # instance attribute: the forward a MONAI block had before
_RESNET_BLOCKS = ("ResNetBlock", "ResNetBottleneck")  # monai.networks.nets.resnet's blocks


def runs_last(block: nn.Module) -> nn.Module:
    """Mark the block a network runs last before its output: :func:`set_checkpointing` leaves it plain.
    The backward starts with it, so a checkpointed last block would be recomputed at once, for no
    memory saved (its activations would be alive at that moment either way)."""
    block.__dict__[_RUNS_LAST] = True
    return block


def checkpointing_active(module: nn.Module) -> bool:
    """Whether a block switched on runs checkpointed now: training, gradients on, not exporting."""
    return module.training and torch.is_grad_enabled() and not is_exporting()


def checkpointed(kind: str) -> Callable[[Callable], Callable]:
    """Decorator for the ``forward`` of a medssm block of ``kind`` (one of :data:`KINDS`) that
    :func:`set_checkpointing` may switch on."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorate(forward: Callable) -> Callable:
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            if self.__dict__.get(_FLAG) and checkpointing_active(self):
                return run_checkpointed(self, functools.partial(forward, self), *args, **kwargs)
            return forward(self, *args, **kwargs)

        wrapper.medssm_checkpoint_kind = kind
        return wrapper

    return decorate


def run_checkpointed(block: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` under ``torch.utils.checkpoint`` (non-reentrant): only the inputs are kept,
    the rest recomputed in the backward (random state replayed, batch-norm statistics updated once)."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(_contexts, block), **kwargs)


def _contexts(block: nn.Module):
    return saving_for_recompute(), _recomputing(block, routing_conv3d())


@contextlib.contextmanager
def _recomputing(block: nn.Module, convolutions: contextlib.AbstractContextManager) -> Iterator[None]:
    """The recomputation's context: the fused Mamba layer saves as in the forward, 3D convolutions go
    where they went in the forward (``convolutions``: bf16's float32 detour on the CPU, which autocast's
    state alone does not restore), and batch norms in training mode get their running statistics back
    afterwards (they were updated by the forward)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    kept = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
    with saving_for_recompute(), convolutions:
        try:
            yield
        finally:
            with torch.no_grad():
                for m, buffers in zip(norms, kept):
                    for k, v in buffers.items():
                        getattr(m, k).copy_(v)


def _kind(module: nn.Module) -> str | None:
    """The kind of a medssm block, None for other modules."""
    return getattr(type(module).forward, "medssm_checkpoint_kind", None)


def _is_monai_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("monai.networks.blocks") or (
        cls.__module__ == "monai.networks.nets.resnet" and cls.__name__ in _RESNET_BLOCKS)


def _checkpoints_itself(module: nn.Module) -> bool:
    """A MONAI module with its own ``use_checkpoint`` flag (SwinUNETR's Swin transformer and its parts)."""
    return type(module).__module__.startswith("monai.") and isinstance(module.__dict__.get("use_checkpoint"), bool)


def _selected(module: nn.Module, blocks: tuple[str, ...]) -> bool:
    """Whether ``module`` is a block of one of the kinds ``blocks`` (MONAI's blocks count as encoder and
    decoder blocks: MONAI does not say which)."""
    kind = _kind(module)
    if kind is not None:
        return kind in blocks
    return ("encoder" in blocks or "decoder" in blocks) and (_checkpoints_itself(module) or _is_monai_block(module))


def checkpoint_blocks(model: nn.Module, blocks: Sequence[str] = KINDS) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks :func:`set_checkpointing` acts on: the outermost medssm blocks of the
    kinds ``blocks``, MONAI modules with their own ``use_checkpoint``, and MONAI building blocks."""
    blocks = _check_kinds(blocks)
    found, seen = [], set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # a module held twice (DynUNet's skip layers hold its stages again)
            return
        seen.add(id(module))
        if module.__dict__.get(_RUNS_LAST):
            return
        if _selected(module, blocks):
            found.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(_unwrap(model), "")
    return found


def _check_kinds(blocks: Sequence[str] | str) -> tuple[str, ...]:
    blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    unknown = [b for b in blocks if b not in KINDS]
    if unknown or not blocks:
        raise ValueError(f"set_checkpointing: blocks must be some of {', '.join(KINDS)}, got {blocks}")
    return blocks


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def set_checkpointing(model: nn.Module, enabled: bool = True, blocks: Sequence[str] = KINDS) -> list[str]:
    """Switch activation checkpointing on (or off) for the blocks of ``model`` that support it.

    Acts at run time only: nothing is added to the model's arguments, parameters or state dict. In
    training mode with gradients enabled, each block keeps only its input and recomputes the rest in
    the backward; in evaluation, under ``torch.no_grad()`` or while exporting, blocks run as usual.

    Args:
        model: a medssm network (``create_model``), a MONAI network, or either inside DDP.
        enabled: on (True) or off (False: every block of the model, whatever ``blocks``).
        blocks: which kinds of block: ``"mamba"`` (the Mamba layers: they keep the most memory for
            the least compute), ``"encoder"``, ``"decoder"`` (MONAI's blocks are both), or several;
            where one block holds another, the outer one is checkpointed.

    Returns:
        The names of the blocks switched on (module paths, e.g. ``vit.stages.0.1``); with
        ``enabled=False``, those switched off.

    Raises:
        ValueError: the network has no block of the kinds asked for.
    """
    blocks = _check_kinds(blocks)
    switched_off = []  # off first: a block of another kind, or inside a chosen one, runs plain
    for name, module in _unwrap(model).named_modules():
        if module.__dict__.pop(_FLAG, None) or _unpatch_monai(module):
            switched_off.append(name)
    if not enabled:
        return switched_off
    chosen = checkpoint_blocks(model, blocks)
    if not chosen:
        raise ValueError(f"set_checkpointing: {type(_unwrap(model)).__name__} has no {' or '.join(blocks)} block to "
                         f"checkpoint (medssm's networks and MONAI's, whose building blocks come from "
                         f"monai.networks.blocks, are supported; MONAI's count as encoder and decoder blocks)")
    for _, block in chosen:
        if _kind(block) is not None:
            block.__dict__[_FLAG] = True
        else:
            _patch_monai(block)
    return [name for name, _ in chosen]


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether :func:`set_checkpointing` switched any block of ``model`` on."""
    return any(m.__dict__.get(_FLAG) or _MONAI_FORWARD in m.__dict__ for m in _unwrap(model).modules())


def _patch_monai(block: nn.Module) -> None:
    """Give a MONAI block an instance ``forward`` that checkpoints it when active (its class is untouched;
    ``copy.deepcopy`` rebinds the method to the copy)."""
    if _MONAI_FORWARD in block.__dict__:
        return
    block.__dict__[_MONAI_FORWARD] = block.__dict__.get("forward")  # None: the class's forward
    block.forward = types.MethodType(_own_flag_forward if _checkpoints_itself(block) else _checkpointed_forward, block)


def _unpatch_monai(block: nn.Module) -> bool:
    """Undo :func:`_patch_monai`; whether there was anything to undo."""
    if _MONAI_FORWARD not in block.__dict__:
        return False
    previous = block.__dict__.pop(_MONAI_FORWARD)
    del block.forward
    if previous is not None:
        block.forward = previous
    if _checkpoints_itself(block):
        _set_own_flags(block, False)
    return True


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = self.__dict__[_MONAI_FORWARD] or functools.partial(type(self).forward, self)
    if checkpointing_active(self):
        return run_checkpointed(self, forward, *args, **kwargs)
    return forward(*args, **kwargs)


def _own_flag_forward(self: nn.Module, *args, **kwargs):
    """MONAI's own ``use_checkpoint``, on only while checkpointing is active (MONAI's flag alone would
    also checkpoint in evaluation)."""
    _set_own_flags(self, checkpointing_active(self))
    forward = self.__dict__[_MONAI_FORWARD] or functools.partial(type(self).forward, self)
    return forward(*args, **kwargs)


def _set_own_flags(module: nn.Module, value: bool) -> None:
    for m in module.modules():
        if isinstance(m.__dict__.get("use_checkpoint"), bool):
            m.use_checkpoint = value
