"""Save the outputs of every medssm network on fixed weights and inputs, to hold later code to them.

Every registered medssm model (the ``monai:`` baselines are MONAI's code, not ours) is built in each
dimensionality its card declares; its weights are set from each tensor's *name and shape* alone
(a generator seeded by the name), so a change in the order parameters are created changes nothing,
and it runs in eval mode, one thread, in float64, on a seeded input of batch 2. (In float32, rounding
amplified through twenty random Mamba layers moves a full-size network's outputs by up to ~1e-3
whenever a sum is reassociated, a 2-D GEMM for a batched one; in float64 the same change moves
them by ~1e-12.) A strided sample of at most ``SAMPLES`` output values and the output's sum of
squares are kept per case (for a classifier also of its features before pooling), so the file
stays small.

    PYTHONPATH=src python tests/nets/make_reference_outputs.py   # rewrites reference_outputs.safetensors

(run from a checkout of the code to compare against, with its ``src`` on the path).

``tests/nets/test_reference_outputs.py`` compares today's outputs with the file. It was written from
the code at commit 7158869, before the fused Mamba path.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

import medssm
from medssm.nets import build_for_data

REFERENCE = Path(__file__).resolve().parent / "reference_outputs.safetensors"
SAMPLES = 1024
CLASSES = 2
IN_CHANNELS = 2


def cases() -> list[tuple[str, int]]:
    """(model name, spatial dims) for every medssm model and dimensionality its card declares."""
    return [(name, dims) for name in medssm.list_models() if ":" not in name
            for dims in medssm.get_model_card(name).spatial_dims]


def input_shape(name: str, dims: int) -> tuple[int, ...]:
    """Small, not cubic, the size divisor respected; 2D sides are not powers of two where the
    model takes any size (MedMamba pads)."""
    divisor = medssm.get_model_card(name).size_divisor
    if dims == 2:
        spatial = (24, 40) if divisor == 1 else (max(16, divisor), 2 * max(16, divisor))
    else:
        side = max(8, divisor)
        spatial = (2 * side, side, side) if divisor > 1 else (20, 12, 8)
    return (2, IN_CHANNELS, *spatial)


def seeded(name: str, shape: torch.Size) -> torch.Tensor:
    """Standard normal values that depend only on ``name`` and ``shape``."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator)


def set_weights(model: torch.nn.Module) -> None:
    """Every floating tensor of the state dict from its name: matrices at 1/sqrt(fan-in) (a kernel's
    fan-in is its input channels times its size, any other tensor's its last axis), norm scales,
    skip scales and BatchNorm variances near 1, other vectors near 0."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = seeded(key, tensor.shape)
            owner = model.get_submodule(key.rpartition(".")[0])
            if key.endswith("running_var"):
                value = 1 + 0.5 * noise.abs()
            elif tensor.dim() >= 2:
                fan_in = tensor[0].numel() if isinstance(owner, torch.nn.modules.conv._ConvNd) else tensor.shape[-1]
                value = noise / math.sqrt(fan_in)
            elif key.endswith((".weight", "skip_scale")):  # 1-D weights: the norms' scales
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            tensor.copy_(value)


def model_outputs(name: str, dims: int) -> dict[str, torch.Tensor]:
    """The model's float64 output on its seeded input (eval mode, no gradient), and for a classifier
    its features before pooling too (the logits alone are 2 numbers a sample)."""
    shape = input_shape(name, dims)
    model = build_for_data(name, spatial_dims=dims, in_channels=IN_CHANNELS, num_classes=CLASSES,
                           patch_size=shape[2:]).eval()
    set_weights(model)
    model.double()
    x = seeded(f"input:{name}:{dims}", shape).double()
    with torch.no_grad():
        outputs = {"output": model(x)}
        if hasattr(model, "forward_features"):
            outputs["features"] = model.forward_features(x)
    return outputs


def summary(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each output: a strided sample of at most ``SAMPLES`` values and the sum of squares."""
    kept = {}
    for part, tensor in outputs.items():
        flat = tensor.detach().flatten()
        step = max(1, -(-flat.numel() // SAMPLES))
        kept[f"{part}/sample"] = flat[::step].clone()
        kept[f"{part}/sum_squares"] = flat.square().sum().reshape(1)
    return kept


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors = {}
    for name, dims in cases():
        for part, value in summary(model_outputs(name, dims)).items():
            tensors[f"{name}/{dims}d/{part}"] = value
        print(f"{name} {dims}D: {tuple(input_shape(name, dims))}")
    save_file(tensors, REFERENCE)
    print(f"written {REFERENCE} ({REFERENCE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
