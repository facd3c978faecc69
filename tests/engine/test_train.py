"""End to end on small real subsets: train a tiny model a few iterations, resume exactly, refuse
broken data, predict (geometry kept) and evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from medssm.cli import main as cli
from medssm.data.segmentation.nnunet import DatasetError
from medssm.engine import trainer as trainer_mod
from medssm.engine.segmentation import TrainConfig, train
from medssm.metrics.segmentation import dice_of_masks
from medssm.nets import build_for_data
from medssm.runs import load_run

from ..subsets import hippocampus_subset, lung_subset, tree_snapshot


def lung_config(ds: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(ds), out=str(out), model="lightm_unet_2d_tiny", epochs=2, iterations_per_epoch=2,
                val_every=1, patch_size=(64, 64), batch_size=2, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def lung_run(lung, tmp_path_factory) -> Path:
    """A run that has learnt something of the lungs in its 12 steps (the recipe's rate is for 25,000)."""
    return train(lung_config(lung, tmp_path_factory.mktemp("runs") / "lung", iterations_per_epoch=6, lr=3e-3))


def test_run_layout(lung_run, lung):
    for f in ("plan.json", "splits.json", "model.json", "log.csv", "log.json", "curves.png",
              "checkpoints/best/model.safetensors", "checkpoints/best/model.json", "checkpoints/last/training_state.pt"):
        assert (lung_run / f).is_file(), f
    meta = json.loads((lung_run / "checkpoints" / "best" / "model.json").read_text())
    assert meta["task"] == "segmentation" and meta["name"] == "lightm_unet_2d_tiny"
    assert meta["labels"] == {"background": 0, "lung": 1} and meta["plan"]["patch_size"] == [64, 64]
    assert meta["recipe"]["optimizer"] == "adam" and meta["recipe"]["grad_clip"] == 12.0 and meta["recipe"]["lr"] == 3e-3
    splits = json.loads((lung_run / "splits.json").read_text())
    cases = sorted(p.name[:-9] for p in (lung / "imagesTr").glob("*.png"))
    assert len(splits) == 5 and sorted(c for s in splits for c in s["val"]) == cases
    log = json.loads((lung_run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    # The logged Dice of the last epoch is the Dice of checkpoints/last on the held-out fold.
    from medssm.data.segmentation.preprocess import load_cache
    from medssm.inference.sliding import sliding_window_probabilities

    run = load_run(lung_run)
    cache = load_cache({c: lung_run / "preprocessed" / f"{c}.npz" for c in splits[0]["val"]})
    model = run.load_model("last")
    dice = [dice_of_masks(sliding_window_probabilities(model, torch.as_tensor(cache[c]["image"]),
                                                       run.plan.patch_size).argmax(0).numpy()[None] == 1,
                          cache[c]["label"][None] == 1) for c in splits[0]["val"]]
    assert log[-1]["val_dice"] == pytest.approx(float(np.mean(dice)), abs=1e-6)


def test_predict_and_evaluate_cli(lung_run, lung, tmp_path, capsys):
    before = tree_snapshot(lung)
    pred = tmp_path / "pred"
    assert cli(["predict", "-i", str(lung / "imagesTr"), "-o", str(pred), "-m", str(lung_run), "--no-progress"]) == 0
    outs = sorted(pred.glob("*.png"))
    assert len(outs) == 6
    from medssm.data.io import read_image

    label, _ = read_image(outs[0])
    assert label.shape == (64, 64) and set(np.unique(label)) <= {0, 1}
    # An existing output is only replaced with --overwrite; nothing is touched otherwise.
    stamp = outs[0].stat().st_mtime_ns
    assert cli(["predict", "-i", str(lung / "imagesTr"), "-o", str(pred), "-m", str(lung_run), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert outs[0].stat().st_mtime_ns == stamp
    ev = tmp_path / "eval"
    assert cli(["evaluate", str(pred), str(lung / "labelsTr"), "-o", str(ev), "--no-progress"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_cases"] == 6 and set(summary["per_class"]) == {"lung"}
    # The mean Dice is that of the files, computed here independently; a model that predicted only
    # background (Dice 0) or only lung would fail.
    dice = []
    for out in outs:
        p, r = read_image(out)[0] == 1, read_image(lung / "labelsTr" / out.name)[0] == 1
        dice.append(2 * np.sum(p & r) / (np.sum(p) + np.sum(r)))
    assert summary["mean"]["dice"] == pytest.approx(np.mean(dice), abs=1e-6) and summary["mean"]["dice"] > 0
    assert all(set(np.unique(read_image(o)[0])) == {0, 1} for o in outs)
    assert len((ev / "metrics.csv").read_text().splitlines()) == 7
    assert len(list((ev / "overlays").glob("*.png"))) == 6
    assert tree_snapshot(lung) == before  # inputs untouched


def test_killed_and_resumed_run_matches_uninterrupted(lung, tmp_path, monkeypatch):
    # On CPU, to the bit; on CUDA, cuDNN's and the scan's atomic sums reorder additions between runs.
    whole = train(lung_config(lung, tmp_path / "whole", device="cpu"))
    real_step, calls = trainer_mod.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(lung_config(lung, tmp_path / "killed", device="cpu"))
    monkeypatch.setattr(trainer_mod, "train_step", real_step)
    with pytest.raises(FileExistsError, match="--resume"):
        train(lung_config(lung, tmp_path / "killed", device="cpu"))
    resumed = train(lung_config(lung, tmp_path / "killed", device="cpu", resume=True))
    a = load_file(str(whole / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    log_a = json.loads((whole / "log.json").read_text())
    log_b = json.loads((resumed / "log.json").read_text())
    assert [(r["epoch"], r["train_loss"], r["val_dice"]) for r in log_a] == \
           [(r["epoch"], r["train_loss"], r["val_dice"]) for r in log_b]


def test_train_refuses_broken_dataset_before_writing(lung, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lung, broken)
    (broken / "labelsTr" / sorted(p.name for p in (broken / "labelsTr").iterdir())[2]).unlink()
    before = tree_snapshot(broken)
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match="missing label file"):
        train(lung_config(broken, out))
    assert not out.exists()
    assert tree_snapshot(broken) == before


def test_hippocampus_3d_geometry_and_probabilities(data_root, tmp_path):
    ds = hippocampus_subset(data_root, tmp_path / "Dataset002_Hippocampus", n=5)
    run = train(TrainConfig(data=str(ds), out=str(tmp_path / "run"), model="lightm_unet_3d_tiny", epochs=1,
                            iterations_per_epoch=2, patch_size=(32, 32, 32), batch_size=2, val_cases=1,
                            progress=False))
    from medssm.inference.segmentation import PredictConfig, predict

    case = sorted((ds / "imagesTr").iterdir())[0]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(case, inp)
    out = predict(PredictConfig(input=str(inp), output=str(tmp_path / "out"), model=str(run), mirror=True,
                                save_probabilities=True, progress=False))
    name = case.name.replace("_0000", "")
    src, pred = sitk.ReadImage(str(case)), sitk.ReadImage(str(out / name))
    assert pred.GetSize() == src.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), src.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(pred.GetOrigin(), src.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(pred.GetDirection(), src.GetDirection(), atol=1e-6)
    with np.load(out / name.replace(".nii.gz", ".npz")) as f:
        probs = f["probabilities"]
    assert probs.shape == (3, *sitk.GetArrayFromImage(src).shape)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    assert (probs.argmax(0) == sitk.GetArrayFromImage(pred)).all()


def test_monai_baseline_through_the_same_factory():
    model = build_for_data("monai:SegResNet", spatial_dims=2, in_channels=1, num_classes=3, init_filters=8)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    assert model.medssm_config["kwargs"]["spatial_dims"] == 2
    with pytest.raises(ValueError, match="takes 3D input, not spatial_dims=2"):
        build_for_data("lightm_unet_3d_tiny", spatial_dims=2, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="no network"):
        build_for_data("monai:NoSuchNet", spatial_dims=2, in_channels=1, num_classes=2)


def test_quickstart_report_on_a_small_copy(lung, tmp_path):
    from medssm.workflows.quickstart import QuickstartConfig, quickstart

    report = quickstart(QuickstartConfig(data=str(lung), out=str(tmp_path / "qs"), model="lightm_unet_2d_tiny",
                                         epochs=1, iterations_per_epoch=1, target_spacing=1.0, patch_size=64,
                                         batch_size=2, val_cases=1, progress=False))
    for f in ("report.md", "summary.json", "metrics.csv", "curves.png", "log.csv", "timings.json"):
        assert (report / f).is_file(), f
    held_out = json.loads((tmp_path / "qs" / "run" / "splits.json").read_text())[0]["val"]
    assert sorted(p.stem for p in (report / "overlays").glob("*.png")) == held_out
    assert "Held-out fold" in (report / "report.md").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        quickstart(QuickstartConfig(data=str(lung), out=str(tmp_path / "qs"), model="lightm_unet_2d_tiny"))


def test_quickstart_does_its_fixed_work_on_a_slow_machine(lung, tmp_path, capsys, monkeypatch):
    """A slow clock makes the job take longer, and say so; it trains and evaluates as much. The idle
    reference is the default job's: it is named only for the default job."""
    from medssm import devices
    from medssm.engine import loop
    from medssm.workflows import quickstart as qs
    from medssm.workflows.quickstart import QuickstartConfig, quickstart

    monkeypatch.setattr(loop, "time_step", lambda *a, **k: (600.0, 0))  # a very slow (or busy) machine
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # precision "auto" picks fp32 there
    small = dict(data=str(lung), model="lightm_unet_2d_tiny", epochs=2, iterations_per_epoch=3, target_spacing=1.0,
                 patch_size=64, batch_size=2, val_cases=1, val_every=1, progress=False)
    monkeypatch.setattr(qs, "WORKLOAD", ())  # this small job stands for the default one
    report = quickstart(QuickstartConfig(out=str(tmp_path / "qs"), **small))
    out = capsys.readouterr().out
    assert "slower or busier: the job takes longer, it does not do less" in out and "idle 2-core CPU" in out
    assert "recipe short, fp32;" in out
    log = json.loads((tmp_path / "qs" / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    timings = json.loads((report / "timings.json").read_text())
    assert timings["iterations_per_epoch"] == 3 and timings["expected_min"] > 5
    held_out = json.loads((tmp_path / "qs" / "run" / "splits.json").read_text())[0]["val"]
    assert json.loads((report / "summary.json").read_text())["n_cases"] == len(held_out)
    monkeypatch.undo()
    monkeypatch.setattr(loop, "time_step", lambda *a, **k: (600.0, 0))
    quickstart(QuickstartConfig(out=str(tmp_path / "qs2"), **{**small, "epochs": 1, "val_every": 1}))
    out = capsys.readouterr().out  # another job than the default: no idle reference to compare with
    assert "expected" in out and "idle 2-core CPU" not in out and "slower or busier" not in out


def test_too_few_cases_for_five_folds_writes_nothing(data_root, tmp_path):
    ds = lung_subset(data_root, tmp_path / "three", n=3, size=32)
    with pytest.raises(ValueError, match="cannot make 5 folds of 3 cases"):
        train(lung_config(ds, tmp_path / "run", patch_size=(32, 32)))
    assert not (tmp_path / "run").exists()
