"""medssm.nets.info: parameter count, MACs, analytic scan FLOPs, peak tensor memory, the CLI."""

import json

import pytest
import torch
import torch.nn as nn

import medssm
from medssm.cli import main
from medssm.nets.info import (count_macs, count_parameters, default_input_size, model_info,
                              peak_activation_bytes, peak_tensor_bytes, resolve_input_size)
from medssm.ssm import Mamba


def test_macs_of_a_conv_and_a_linear_are_exact():
    h, w = 6, 5
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * h * w, 10))
    macs, scan = count_macs(model, torch.randn(2, 3, h, w))
    assert macs == 2 * (8 * h * w * 3 * 9 + 8 * h * w * 10)
    assert scan == 0


@pytest.mark.parametrize("d_model, length", [(8, 12), (20, 7)])
def test_mamba_macs_leave_the_scan_to_the_analytic_count(d_model, length):
    layer = Mamba(d_model)
    d, r, n, k = layer.d_inner, layer.dt_rank, layer.d_state, layer.d_conv
    macs, scan = count_macs(layer, torch.randn(3, length, d_model))
    per_token = d_model * 2 * d + d * (r + 2 * n) + r * d + d * d_model
    causal_conv = (length + k - 1) * d * k  # padded on both sides, then cut to the first L outputs
    assert macs == 3 * (length * per_token + causal_conv)
    assert scan == 9 * 3 * d * length * n


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    assert peak_tensor_bytes(lambda: (torch.ones(1000) * 2).sum()) == 8000
    assert peak_tensor_bytes(lambda: [torch.ones(250) for _ in range(3)]) == 3000

    def chain():
        x = torch.ones(1000)
        for _ in range(5):
            x = x + 1  # the old x dies once the new one exists
        return x

    assert peak_tensor_bytes(chain) == 8000


def test_peak_activation_excludes_weights_and_input():
    layer = nn.Linear(100, 50, bias=False)
    x = torch.randn(4, 100)
    assert peak_activation_bytes(layer, x) == 4 * 50 * 4  # the output only: not the weight or its transpose


def test_model_info_of_a_registered_model():
    info = model_info("lightm_unet_2d_tiny", (1, 2, 16, 16), in_channels=2, out_channels=3)
    model = medssm.create_model("lightm_unet_2d_tiny", in_channels=2, out_channels=3)
    assert info.parameters == count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert info.output_size == (1, 3, 16, 16)
    # 11 Mamba layers, (width C, tokens), d_inner = 2C, N = 16: two per ResMambaBlock, and each down
    # RVM scans at the finer level with the narrower width: 3 x (8, 256), 3 x (16, 64), 3 x (32, 16), 2 x (64, 4)
    tokens_x_width = 3 * 8 * 256 + 3 * 16 * 64 + 3 * 32 * 16 + 2 * 64 * 4
    assert info.scan_flops == 9 * 2 * tokens_x_width * 16
    assert info.macs > 0 and info.flops == 2 * info.macs + info.scan_flops
    assert info.peak_activation_bytes > 4 * 3 * 16 * 16  # more than the output alone


def test_input_size_in_full_or_spatial_only():
    model = medssm.create_model("lightm_unet_3d_tiny", in_channels=2)
    assert resolve_input_size(model, (16, 24, 32)) == (1, 2, 16, 24, 32)
    assert resolve_input_size(model, (3, 2, 16, 24, 32)) == (3, 2, 16, 24, 32)
    assert resolve_input_size(model, None) == default_input_size(model)
    with pytest.raises(ValueError, match="3D: give the input size as 3 spatial sizes"):
        resolve_input_size(model, (16, 24))


def test_default_input_size_follows_the_first_convolution():
    assert default_input_size(medssm.create_model("lightm_unet_3d_tiny", in_channels=4)) == (1, 4, 32, 32, 32)
    assert default_input_size(nn.Sequential(nn.Conv2d(3, 4, 1))) == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="input_size"):
        default_input_size(nn.Linear(3, 4))


def test_input_size_sets_the_channels_and_a_disagreeing_argument_is_an_error():
    info = model_info("lightm_unet_2d_tiny", (1, 3, 32, 32))
    assert info.input_size == (1, 3, 32, 32) and info.output_size == (1, 2, 32, 32)
    assert model_info("medmamba_tiny", (2, 1, 32, 32, 32), num_classes=3).output_size == (2, 3)
    with pytest.raises(ValueError, match="in_channels=1 vs 3"):
        model_info("lightm_unet_2d_tiny", (1, 3, 32, 32), in_channels=1)
    with pytest.raises(ValueError, match="not spatial_dims=3"):
        model_info("lightm_unet_2d_tiny", (32, 32, 32))


def test_cli_prints_json(capsys):
    assert main(["info", "lightm_unet_2d_tiny", "--input-size", "1", "1", "8", "16", "--model-kwargs", '{"out_channels": 4}',
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "lightm_unet_2d_tiny"
    assert out["output_size"] == [1, 4, 8, 16]
    assert out["parameters"] == count_parameters(medssm.create_model("lightm_unet_2d_tiny", out_channels=4))
    assert out["flops"] == 2 * out["macs"] + out["scan_flops"]
