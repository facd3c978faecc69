"""load_pretrained: the authors' checkpoint containers (nnU-Net v2 .pth for LightM-UNet, SegMamba's
.pt, MedMamba's .pth), built to the authors' key layout, load weights-only and strictly."""

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

import medssm
from medssm.nets.pretrained import extract_state_dict, load_pretrained


def _source_and_target(name, **kwargs):
    torch.manual_seed(1)
    source = medssm.create_model(name, **kwargs)
    torch.manual_seed(2)
    target = medssm.create_model(name, **kwargs)
    return source, target


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module."])
def test_lightm_unet_nnunet_v2_checkpoint(tmp_path, prefix):
    source, target = _source_and_target("lightm_unet_2d_tiny", in_channels=1, out_channels=2)
    weights = OrderedDict((prefix + k, v) for k, v in source.state_dict().items())
    # What nnU-Net v2's nnUNetTrainer.save_checkpoint writes.
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)], "ema_fg_dice": [np.float32(0.5)],
                    "epoch_end_timestamps": [1.0], "lrs": [np.float64(1e-4)]},
        "_best_ema": np.float64(0.55),
        "current_epoch": 3,
        "init_args": {"plans": {"dataset_name": "Dataset001_LungXray"}, "configuration": "2d", "fold": 0,
                      "dataset_json": {"labels": {"background": 0, "lung": 1}}, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainerLightMUNet",
        "inference_allowed_mirroring_axes": (0, 1),
    }
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    assert load_pretrained(target, tmp_path / "checkpoint_final.pth") is target
    _assert_same_weights(source, target)


@pytest.mark.parametrize("container", ["plain", "model", "state_dict"])
def test_segmamba_checkpoint(tmp_path, container):
    source, target = _source_and_target("segmamba_tiny", in_channels=4, out_channels=4)
    state = source.state_dict()
    assert any(k.startswith("vit.stages.0.0.mamba.conv1d_b") for k in state)  # the authors' layout
    saved = state if container == "plain" else {container: {"module." + k: v for k, v in state.items()}, "epoch": 7}
    torch.save(saved, tmp_path / "final_model_0.8841.pt")
    load_pretrained(target, tmp_path / "final_model_0.8841.pt")
    _assert_same_weights(source, target)


def test_medmamba_checkpoint_and_output(tmp_path):
    source, target = _source_and_target("medmamba_tiny", in_chans=3, num_classes=6)
    torch.save(source.state_dict(), tmp_path / "MedMambaNet.pth")  # MedMamba's train.py
    load_pretrained(target, tmp_path / "MedMambaNet.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    source, _ = _source_and_target("lightm_unet_2d_tiny", in_channels=1, out_channels=2)
    state = source.state_dict()
    state.pop("conv_final.2.1.conv.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    target = medssm.create_model("lightm_unet_2d_tiny", in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match=r"(?s)w.pth does not fit.*missing from the checkpoint \(1\): "
                                         r"conv_final.2.1.conv.bias.*unexpected.*extra.weight"):
        load_pretrained(target, tmp_path / "w.pth")
    other = medssm.create_model("lightm_unet_2d_tiny", in_channels=1, out_channels=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    torch.save(source.state_dict(), tmp_path / "w2.pth")
    with pytest.raises(ValueError, match="(?s)w2.pth does not fit.*shape mismatches.*conv_final"):
        load_pretrained(other, tmp_path / "w2.pth")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was half-loaded
    # Not strict: matching keys load, a missing one is tolerated.
    load_pretrained(target, tmp_path / "w.pth", strict=False)
    assert torch.equal(target.state_dict()["convInit.0.conv.weight"], source.state_dict()["convInit.0.conv.weight"])


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    model = medssm.create_model("medmamba_tiny")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": model.state_dict(), "x": _Evil()}, f)
    torch.save({"state_dict": model.state_dict(), "x": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(ValueError, match="weights-only"):
            load_pretrained(model, tmp_path / name)
    assert "must never run" not in capsys.readouterr().out


def test_bad_files(tmp_path):
    model = medssm.create_model("medmamba_tiny")
    with pytest.raises(FileNotFoundError):
        load_pretrained(model, tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(model, tmp_path / "text.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        load_pretrained(model, tmp_path / "nostate.pth")


def test_extract_strips_nested_prefixes():
    t = torch.zeros(1)
    assert extract_state_dict({"model": {"module._orig_mod.a.b": t}}) == {"a.b": t}
    assert set(extract_state_dict({"a": t, "module.b": t})) == {"a", "module.b"}  # only a shared prefix goes
