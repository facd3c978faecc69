"""Activation checkpointing (``medssm.nets.set_checkpointing``): the gradients of a checkpointed network
equal the plain network's in float64 on fresh random inputs, it keeps less for the backward, and it
costs nothing (no checkpoint is even entered) in evaluation or without gradients."""

import copy

import pytest
import torch
import torch.nn as nn

import medssm
from medssm.nets import checkpointing as checkpointing_module
from medssm.nets.baselines import monai_network
from medssm.nets import checkpointing_enabled, set_checkpointing
from medssm.nets.info import saved_tensor_bytes

TINY_SEGMAMBA = {"depths": (1, 1, 1, 1), "feature_size": (8, 16, 24, 32), "hidden_size": 32}
TINY_LIGHTM = {"init_filters": 8, "blocks_down": (1, 1, 1, 1)}
TINY_MEDMAMBA = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}

# name, model arguments, input shape
MEDSSM = [
    ("lightm_unet_2d_tiny", {"in_channels": 2, "out_channels": 3}, (2, 2, 16, 24)),
    ("lightm_unet_3d_tiny", {"in_channels": 2, "out_channels": 3}, (2, 2, 16, 8, 8)),
    ("lightm_unet_2d_nomamba", {"in_channels": 2, "out_channels": 3, **TINY_LIGHTM}, (2, 2, 16, 8)),
    ("lightm_unet_3d_nomamba", {"in_channels": 2, "out_channels": 3, **TINY_LIGHTM}, (1, 2, 8, 16, 8)),
    ("segmamba_tiny", {"in_channels": 2, "out_channels": 3}, (2, 2, 32, 16, 16)),
    ("segmamba_tiny", {"spatial_dims": 2, "in_channels": 2, "out_channels": 3}, (2, 2, 32, 48)),
    ("segmamba_3d_nomamba", {"in_channels": 2, "out_channels": 3, **TINY_SEGMAMBA}, (1, 2, 32, 16, 16)),
    ("medmamba_tiny", {"in_chans": 2, "num_classes": 3}, (2, 2, 36, 28)),  # drop path on: random draws replayed
    ("medmamba_tiny", {"in_chans": 2, "num_classes": 3, "spatial_dims": 3}, (2, 2, 16, 16, 12)),
    ("medmamba_t_nomamba", {"in_chans": 2, "num_classes": 3, **TINY_MEDMAMBA}, (2, 2, 32, 32)),
]
MONAI = [
    # 2D: its float64 convolutions are slow in 3D (the same blocks and use_checkpoint flags)
    ("monai:SwinUNETR", {"spatial_dims": 2, "in_channels": 2, "out_channels": 3, "feature_size": 12}, (1, 2, 64, 32)),
    ("monai:SegResNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 3}, (2, 2, 16, 16, 16)),
    ("monai:UNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "channels": (8, 16, 32, 64)},
     (2, 2, 16, 16, 16)),
    ("monai:DynUNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "patch_size": (16, 16, 16)},
     (2, 2, 16, 16, 16)),
    ("monai.UNETR", {"spatial_dims": 3, "in_channels": 2, "out_channels": 3, "img_size": (16, 16, 16),
                     "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, (2, 2, 16, 16, 16)),
    ("monai:resnet18", {"spatial_dims": 2, "in_chans": 2, "num_classes": 3}, (2, 2, 32, 32)),  # batch norm
]
CASES = MEDSSM + MONAI
IDS = [f"{name}-{len(shape) - 2}d" for name, _, shape in CASES]


def build(name: str, kwargs: dict, seed: int) -> nn.Module:
    """``monai.CLASS``: the MONAI class itself (not registered as ``monai:CLASS``, which would add a
    model without defaults to the registry other tests walk)."""
    torch.manual_seed(seed)
    if name.startswith("monai."):
        model = monai_network(name.split(".", 1)[1])(**kwargs)
    else:
        model = medssm.create_model(name, **kwargs)
    model = model.double().train()
    with torch.no_grad():  # off the initialisation, so that no term is trivially zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(output, parameter gradients, input gradient) of a random projection of the output."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path draws in both models
    out = model(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, x.grad


@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=IDS)
def test_gradients_equal_the_plain_networks(name, kwargs, shape):
    seed = sum(shape) + len(name)
    plain = build(name, kwargs, seed)
    checked = copy.deepcopy(plain)
    assert set_checkpointing(checked)
    assert checkpointing_enabled(checked) and not checkpointing_enabled(plain)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out, grads, grad_x = step(plain, x, seed)
    out_c, grads_c, grad_x_c = step(checked, x, seed)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_x_c, grad_x, rtol=1e-12, atol=1e-14)
    reached = [key for key, g in grads.items() if g is not None]  # (UNETR has unused cross-attention norms)
    assert reached == [key for key, g in grads_c.items() if g is not None] and len(reached) > 0.8 * len(grads)
    for key in reached:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-12, atol=1e-14, msg=key)
    for (key, a), b in zip(plain.named_buffers(), checked.buffers()):  # batch-norm statistics updated once
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=key)
    assert checked.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=IDS)
def test_keeps_less_for_the_backward(name, kwargs, shape):
    model = build(name, kwargs, 0).float()
    x = torch.randn(*shape)
    kept = lambda: saved_tensor_bytes(lambda: model(x).square().mean(), exclude=[*model.parameters(), x])  # noqa: E731
    plain = kept()
    set_checkpointing(model)
    assert kept() < 0.6 * plain  # 0.1-0.2 for most; the No-Mamba MedMamba at 32x32: 0.51


EVAL_CASES = [0, 4, 6, 8, 10, 11, 15]  # LightM-UNet, SegMamba, MedMamba, SwinUNETR (its own flag), SegResNet, ResNet


@pytest.mark.parametrize("name, kwargs, shape", [CASES[i] for i in EVAL_CASES], ids=[IDS[i] for i in EVAL_CASES])
def test_costs_nothing_in_evaluation_or_without_gradients(name, kwargs, shape, monkeypatch):
    model = build(name, kwargs, 1)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        want = model.eval()(x)
    set_checkpointing(model)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint entered")

    monkeypatch.setattr(checkpointing_module, "checkpoint", refuse)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)  # MONAI's own use_checkpoint
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want, rtol=0, atol=0)
    model.eval()(x).sum().backward()  # evaluation mode with gradients: not checkpointed either
    with torch.no_grad():
        model.train()(x)
    with pytest.raises(AssertionError, match="checkpoint entered"):
        model.train()(x)
    set_checkpointing(model, enabled=False)
    assert not checkpointing_enabled(model)
    model.train()(x)  # switched off: plain again


@pytest.mark.parametrize("blocks", ["mamba", ("encoder",), ("decoder", "mamba")])
@pytest.mark.parametrize("name, kwargs, shape", [CASES[i] for i in (1, 4, 7)], ids=[IDS[i] for i in (1, 4, 7)])
def test_blocks_of_some_kinds(name, kwargs, shape, blocks):
    """Only the Mamba layers (or encoder / decoder blocks): the same gradients; the plain path elsewhere."""
    if name.startswith("medmamba") and blocks == ("encoder",):
        blocks = ("decoder", "encoder")
    seed = len(str(blocks))
    plain = build(name, kwargs, seed)
    checked = copy.deepcopy(plain)
    names = set_checkpointing(checked, blocks=blocks)
    kinds = {checkpointing_module._kind(checked.get_submodule(n)) for n in names}
    assert kinds <= set((blocks,) if isinstance(blocks, str) else blocks)
    if blocks == "mamba":
        assert kinds == {"mamba"} and len(names) >= 4
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (out, grads, _), (out_c, grads_c, _) = step(plain, x, seed), step(checked, x, seed)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-14)
    for key, g in grads.items():
        torch.testing.assert_close(grads_c[key], g, rtol=1e-12, atol=1e-14, msg=key)
    assert set_checkpointing(checked, enabled=False) == names and not checkpointing_enabled(checked)


def test_a_network_without_mamba_layers_has_no_mamba_block():
    model = medssm.create_model("monai:SegResNet", spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="has no mamba block"):
        set_checkpointing(model, blocks="mamba")
    with pytest.raises(ValueError, match="blocks must be some of"):
        set_checkpointing(model, blocks="stage")


def test_not_part_of_the_model(tmp_path):
    """Nothing in the arguments, the state dict or model.json; a saved model loads without it."""
    model = medssm.create_model("segmamba_tiny", in_channels=1, out_channels=2)
    config = dict(model.medssm_config)
    state = model.state_dict()
    set_checkpointing(model)
    assert model.medssm_config == config and model.state_dict().keys() == state.keys()
    medssm.save_model(model, tmp_path / "m")
    assert "checkpoint" not in (tmp_path / "m" / "model.json").read_text()
    assert not checkpointing_enabled(medssm.load_model(tmp_path / "m"))


def test_a_copy_checkpoints_itself():
    """copy.deepcopy (EMA, compare) of a switched MONAI network: the copy's blocks run on the copy."""
    model = build("monai:SegResNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}, 2)
    set_checkpointing(model)
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 1, 16, 16, dtype=torch.float64)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.parameters())
    assert checkpointing_enabled(twin)


def test_unsupported_network_is_refused():
    with pytest.raises(ValueError, match="Sequential has no mamba or encoder or decoder block to checkpoint"):
        set_checkpointing(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
