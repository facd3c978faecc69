"""The No-Mamba ablations: every Mamba mixer is the identity, everything else is the full model's."""

import pytest
import torch

import medssm
from medssm.nets.medmamba import SS2D
from medssm.ssm import Mamba

ABLATIONS = [n for n in medssm.list_models() if medssm.get_model_card(n).ablation_of]


def test_the_four_ablations_are_registered():
    assert sorted(ABLATIONS) == ["lightm_unet_2d_nomamba", "lightm_unet_3d_nomamba", "medmamba_t_nomamba",
                                 "segmamba_3d_nomamba"]


@pytest.mark.parametrize("name", ABLATIONS)
def test_only_the_mixers_are_gone(name):
    card = medssm.get_model_card(name)
    full, ablation = medssm.create_model(card.ablation_of), medssm.create_model(name)
    assert card.task == medssm.get_model_card(card.ablation_of).task
    mixers = {prefix for prefix, m in full.named_modules() if isinstance(m, (Mamba, SS2D))}
    assert mixers and not any(isinstance(m, (Mamba, SS2D)) for m in ablation.modules())
    in_mixer = lambda key: any(key.startswith(p + ".") for p in mixers)  # noqa: E731
    kept = {k: tuple(v.shape) for k, v in full.state_dict().items() if not in_mixer(k)}
    assert {k: tuple(v.shape) for k, v in ablation.state_dict().items()} == kept
    mixer_parameters = sum(p.numel() for prefix in mixers for p in full.get_submodule(prefix).parameters())
    assert sum(p.numel() for p in ablation.parameters()) == sum(p.numel() for p in full.parameters()) - mixer_parameters


def test_the_lightm_unet_layer_without_mamba_is_its_formula():
    full = medssm.create_model("lightm_unet_2d_tiny")
    ablation = medssm.create_model("lightm_unet_2d_tiny", no_mamba=True)
    layer = ablation.down_layers[1][0][0]  # the first down RVM layer
    x = torch.randn(2, layer.norm.normalized_shape[0], 4, 6)
    t = x.flatten(2).transpose(1, 2)
    expected = layer.proj(layer.norm(layer.norm(t) + layer.skip_scale * t)).transpose(1, 2).reshape(2, -1, 4, 6)
    torch.testing.assert_close(layer(x), expected)
    assert sum(p.numel() for p in ablation.parameters()) < sum(p.numel() for p in full.parameters())
