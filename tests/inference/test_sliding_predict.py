"""Sliding window (Gaussian blending, mirror TTA) and predict's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from medssm.inference.segmentation import PredictConfig, plan_outputs
from medssm.inference.sliding import mirror_axes_sets, sliding_window_probabilities, window_batch


class Identityish(torch.nn.Module):
    """Logits that depend on position only through the input: a 1x1 conv (equivariant to flips)."""

    def __init__(self, k: int = 3, dims: int = 2):
        super().__init__()
        self.conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(1, k, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dims", [2, 3])
def test_probabilities_sum_to_one_and_match_a_full_pass(dims):
    model = Identityish(dims=dims).eval()
    shape = (20, 37) if dims == 2 else (9, 13, 11)
    image = torch.randn(1, *shape)
    probs = sliding_window_probabilities(model, image, (8,) * dims, overlap=0.5)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape))
    with torch.no_grad():
        full = model(image[None]).softmax(1)[0]
    torch.testing.assert_close(probs, full, atol=1e-5, rtol=1e-5)  # pointwise model: blending changes nothing
    mirrored = sliding_window_probabilities(model, image, (8,) * dims, mirror=True)
    torch.testing.assert_close(mirrored, full, atol=1e-5, rtol=1e-5)


def test_windows_are_batched_up_to_64_cubed_voxels_and_the_training_batch():
    assert window_batch((16, 32, 16), 7) == 7 and window_batch((16, 32, 16), 64) == 32  # 8192 voxels a window
    assert window_batch((128, 128, 128), 2) == 1 and window_batch((64, 64), 16) == 16
    assert window_batch((512, 512), 4) == 1  # at least one window
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    image = torch.randn(1, 21, 30, 17)  # 3 x 3 x 3 windows of 8 x 12 x 8: batches of 7 leave a last one of 6
    one, seven = (sliding_window_probabilities(net, image, (8, 12, 8), batch_size=b) for b in (1, 7))
    torch.testing.assert_close(seven, one, atol=1e-6, rtol=1e-5)


def test_smaller_than_patch_and_mirror_sets():
    probs = sliding_window_probabilities(Identityish().eval(), torch.randn(1, 5, 6), (16, 16))
    assert probs.shape == (3, 5, 6)
    assert len(mirror_axes_sets(2)) == 4 and len(mirror_axes_sets(3)) == 8 and mirror_axes_sets(3)[0] == ()
    with pytest.raises(ValueError, match="expected \\(C, \\*spatial\\)"):
        sliding_window_probabilities(Identityish().eval(), torch.randn(5, 6), (16, 16))


def test_never_writes_into_the_input_folder(tmp_path):
    (tmp_path / "a_0000.png").write_bytes(b"")
    with pytest.raises(ValueError, match="must not be an input"):
        plan_outputs(PredictConfig(input=str(tmp_path), output=str(tmp_path), model="x"))
    with pytest.raises(ValueError, match="inside or around"):
        plan_outputs(PredictConfig(input=str(tmp_path), output=str(tmp_path / "sub"), model="x"))


def test_existing_outputs_need_overwrite(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    for c in ("a", "b"):
        (inp / f"{c}_0000.nii.gz").write_bytes(b"")
    (out / "b.nii.gz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        plan_outputs(PredictConfig(input=str(inp), output=str(out), model="x"))
    jobs = plan_outputs(PredictConfig(input=str(inp), output=str(out), model="x", overwrite=True))
    assert {c: [o.name for o in outs] for c, (_, outs) in jobs.items()} == {"a": ["a.nii.gz"], "b": ["b.nii.gz"]}
    assert (out / "b.nii.gz").read_bytes() == b"old"
    jobs = plan_outputs(PredictConfig(input=str(inp), output=str(out), model="x", skip_existing=True))
    assert list(jobs) == ["a"]  # b's output exists and is complete (written atomically)
    with pytest.raises(ValueError, match="exclude each other"):
        plan_outputs(PredictConfig(input=str(inp), output=str(out), model="x", skip_existing=True, overwrite=True))
    with pytest.raises(ValueError, match="zz"):
        plan_outputs(PredictConfig(input=str(inp), output=str(out), model="x", overwrite=True, cases=("zz",)))


def test_predict_needs_a_trained_run(tmp_path):
    from medssm.inference.segmentation import predict

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.json").write_text(json.dumps({"task": "segmentation", "name": "lightm_unet_2d_tiny",
                                                              "plan": {}}))
    with pytest.raises(FileNotFoundError, match="no trained model"):
        predict(PredictConfig(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        predict(PredictConfig(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tmp_path / "run"), batch_size=0))
