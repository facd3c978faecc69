"""MONAI: the networks inside sliding_window_inference, named by ``_target_`` in bundle configs, and
the example bundle in examples/monai_bundle parsed and run on real lung X-rays."""

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference

import medssm

BUNDLE = Path(__file__).resolve().parents[2] / "examples" / "monai_bundle" / "configs" / "inference.json"


@pytest.mark.parametrize("name, kwargs, image, roi", [
    ("lightm_unet_2d_tiny", {"in_channels": 1, "out_channels": 3}, (2, 1, 100, 90), (64, 48)),
    ("segmamba_tiny", {"in_channels": 1, "out_channels": 2}, (1, 1, 40, 20, 16), (32, 16, 16)),
])
def test_sliding_window_inference(name, kwargs, image, roi):
    net = medssm.create_model(name, **kwargs).eval()
    x = torch.randn(*image)
    with torch.no_grad():
        tiled = sliding_window_inference(x, roi, 2, net, overlap=0.5, mode="gaussian")
        assert tiled.shape == (image[0], kwargs["out_channels"], *image[2:]) and torch.isfinite(tiled).all()
        # One window covering the whole (divisible) image is the plain forward pass (up to float32
        # rounding: the window runs one image at a time, the reference the whole batch).
        crop = x[(..., *(slice(0, r) for r in roi))]
        whole, ref = sliding_window_inference(crop, roi, 1, net, overlap=0.0), net(crop)
        torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_networks_are_bundle_targets():
    parser = ConfigParser({
        "by_class": {"_target_": "medssm.nets.segmamba.SegMamba", "spatial_dims": 2, "in_channels": 1,
                     "out_channels": 2, "depths": [1, 1, 1, 1], "feature_size": [8, 16, 24, 32], "hidden_size": 32},
        "by_name": {"_target_": "medssm.create_model", "name": "medmamba_tiny", "in_chans": 1, "num_classes": 4},
    })
    seg, cls = parser.get_parsed_content("by_class"), parser.get_parsed_content("by_name")
    assert isinstance(seg, medssm.nets.SegMamba) and isinstance(cls, medssm.nets.MedMamba)
    with torch.no_grad():
        assert seg.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
        assert cls.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 4)


def test_example_bundle_parses_loads_weights_and_runs(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("MEDSSM_DATA", str(data_root))
    parser = ConfigParser()
    parser.read_config(BUNDLE)
    parser.read_meta(BUNDLE.with_name("metadata.json"))
    assert parser["network_def"]["_target_"] == "medssm.nets.lightm_unet.LightMUNet"
    trained = medssm.create_model("lightm_unet_2d", in_channels=1, out_channels=2, init_filters=8)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    parser["network_def"]["init_filters"] = 8  # a small network keeps the test short
    parser["checkpoint"] = str(tmp_path / "model.pt")
    parser["datalist"] = "$[{'image': f} for f in sorted(glob.glob(@dataset_dir + '/imagesTr/*_0000.png'))[:1]]"
    parser.parse()
    assert len(parser.get_parsed_content("datalist")) == 1
    parser.get_parsed_content("initialize")
    net = parser.get_parsed_content("network")
    assert all(torch.equal(v.cpu(), trained.state_dict()[k]) for k, v in net.state_dict().items())  # on CUDA if there is one
    parser.get_parsed_content("run")
    lines = [l for l in capsys.readouterr().out.splitlines() if "lung fraction" in l]
    assert [l.split()[0] for l in lines] == ["CHNCXR_0001_0_0000.png"]
    # The printed fraction is that of the network's own argmax on the image, computed here without the
    # bundle (an all-background answer, or a post-processing that lost the prediction, would differ).
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(parser.get_parsed_content("datalist")[0]["image"]), np.float32))
    image = ((image - image.min()) / (image.max() - image.min())).T  # MONAI's PNG reader: (x, y), scaled to 0..1
    with torch.no_grad():
        logits = sliding_window_inference(image[None, None].to(next(net.parameters()).device),
                                          parser["inferer"]["roi_size"], 1, net, overlap=parser["inferer"]["overlap"],
                                          mode=parser["inferer"].get("mode", "constant"))
    assert float(lines[0].split()[-1]) == pytest.approx(float((logits.argmax(1) == 1).float().mean()), abs=1e-3)
