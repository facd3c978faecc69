"""The shared model tester: every registered model (``medssm.list_models()``), driven by its card:
output shape in every dimensionality it declares, gradients reaching every parameter, save/load
round trip, deterministic evaluation, and CUDA against the CPU where there is a GPU."""

import copy

import pytest
import torch

import medssm
from medssm.nets import build_for_data

MODELS = medssm.list_models()


def smallest_input(name: str, dims: int, batch: int = 2, channels: int = 2) -> tuple[int, ...]:
    """A small input the card allows, not cubic: side max(8, divisor), one axis twice as long."""
    side = max(8, medssm.get_model_card(name).size_divisor)
    spatial = (side, 2 * side) if dims == 2 else (2 * side, side, side)
    return (batch, channels, *spatial)


def build(name: str, shape: tuple[int, ...], classes: int = 3) -> torch.nn.Module:
    """The model for inputs of ``shape`` with ``classes`` outputs, by the card's argument names."""
    return build_for_data(name, spatial_dims=len(shape) - 2, in_channels=shape[1], num_classes=classes,
                                 patch_size=shape[2:])


def expected_output(name: str, shape: tuple[int, ...], classes: int = 3) -> tuple[int, ...]:
    if medssm.get_model_card(name).task == "segmentation":
        return (shape[0], classes, *shape[2:])
    return (shape[0], classes)


@pytest.mark.parametrize("name", MODELS)
def test_forward_in_every_dimensionality(name):
    for dims in medssm.get_model_card(name).spatial_dims:
        shape = smallest_input(name, dims)
        model = build(name, shape).eval()
        with torch.no_grad():
            out = model(torch.randn(*shape))
        assert tuple(out.shape) == expected_output(name, shape), shape
        assert torch.isfinite(out).all(), shape


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    shape = smallest_input(name, medssm.get_model_card(name).spatial_dims[0])
    model = build(name, shape).train()
    model(torch.randn(*shape)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_and_deterministic_eval(name, tmp_path):
    shape = smallest_input(name, medssm.get_model_card(name).spatial_dims[0], batch=1)
    model = build(name, shape).eval()
    x = torch.randn(*shape)
    medssm.save_model(model, tmp_path / "m")
    loaded = medssm.load_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", MODELS)
def test_cuda_matches_cpu(name, monkeypatch):
    """The same weights and input on CUDA (its scan backend) and on CPU: outputs and gradients agree."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions
    for dims in medssm.get_model_card(name).spatial_dims:
        shape = smallest_input(name, dims)
        model = build(name, shape).eval()
        x = torch.randn(*shape)
        results = []
        for device in ("cpu", "cuda"):
            m = copy.deepcopy(model).to(device)
            out = m(x.to(device))
            out.square().mean().backward()
            results.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}))
        (out_cpu, grads_cpu), (out_cuda, grads_cuda) = results
        assert (out_cuda - out_cpu).abs().max() <= 1e-4 * out_cpu.abs().max(), shape
        # Each gradient to 1e-3 of its own size, or of the largest one's: a bias before a
        # normalisation has a gradient that is zero but for rounding, on either device.
        floor = 1e-3 * max(g.abs().max() for g in grads_cpu.values())
        for n, g in grads_cpu.items():
            assert (grads_cuda[n] - g).abs().max() <= max(1e-3 * g.abs().max(), floor), (shape, n)
