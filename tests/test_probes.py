"""The probe list: bad input and faults a new user meets, through the CLI as they would, on small copies
of the real data. Each probe says what must hold: a one-line error naming the file (exit 2, or 1 for an
OS error), nothing lost, nothing overwritten, nothing silent."""

from __future__ import annotations

import errno
import json
import sys

import numpy as np
import pytest
import torch

import medssm
from medssm.cli import main
from medssm.nets import registry
from medssm.runs import claim_run, load_run

from .subsets import lung_subset, medmnist_subset, tree_snapshot

SEG = ["--model", "lightm_unet_2d_tiny", "--epochs", "1", "--iterations-per-epoch", "2", "--val-every", "1",
       "--patch-size", "64", "64", "--batch-size", "2", "--no-progress"]
CLS = ["--model", "medmamba_tiny", "--epochs", "1", "--batch-size", "8", "--iterations-per-epoch", "2", "--no-progress"]


@pytest.fixture(scope="module")
def lung(data_root, tmp_path_factory):
    return lung_subset(data_root, tmp_path_factory.mktemp("lung") / "Dataset001_LungXray", n=6, size=64)


@pytest.fixture(scope="module")
def pneumonia(data_root, tmp_path_factory):
    """24/12/16 real PneumoniaMNIST images of both classes, as a .npz of the official layout."""
    return medmnist_subset(data_root, "pneumoniamnist", tmp_path_factory.mktemp("medmnist") / "pneumoniamnist.npz",
                           {"train": 24, "val": 12, "test": 16})


@pytest.fixture(scope="module")
def seg_run(lung, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seg"
    assert main(["train", "-d", str(lung), "-o", str(run), *SEG]) == 0
    return run


@pytest.fixture(scope="module")
def cls_run(pneumonia, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "cls"
    assert main(["train", "-d", str(pneumonia), "-o", str(run), *CLS]) == 0
    return run


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("medssm "), err
    return err[-1]


# ---------------------------------------------------------------------------------------------- 1, 8


def test_classification_predict_never_writes_over_its_input(cls_run, pneumonia, tmp_path, capsys):
    before = pneumonia.read_bytes()
    assert main(["predict", "-m", str(cls_run), "-i", str(pneumonia), "-o", str(pneumonia), "--no-progress"]) == 2
    assert "must not be an input" in error_of(capsys) and pneumonia.read_bytes() == before
    labels = tmp_path / "labels.csv"
    from PIL import Image

    (tmp_path / "images").mkdir()
    with np.load(pneumonia) as z:
        for i in range(3):
            Image.fromarray(z["test_images"][i]).save(tmp_path / "images" / f"{i}.png")
    labels.write_text("path,label\nimages/0.png,0\nimages/1.png,1\nimages/2.png,0\n")
    snapshot = tree_snapshot(tmp_path)
    for output in (labels, tmp_path / "images", tmp_path / "images" / "0.png"):
        source = labels if output != tmp_path / "images" else tmp_path / "images"
        assert main(["predict", "-m", str(cls_run), "-i", str(source), "-o", str(output), "--no-progress"]) == 2
        assert "must not be an input" in error_of(capsys)
    assert tree_snapshot(tmp_path) == snapshot


def test_classification_predict_existing_output_overwrite_and_skip(cls_run, pneumonia, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = ["predict", "-m", str(cls_run), "-i", str(pneumonia), "-o", str(out), "--no-progress"]
    assert main(args) == 0
    first = out.read_bytes()
    out.write_text("mine")
    assert main(args) == 2 and "--overwrite" in error_of(capsys) and out.read_text() == "mine"
    assert main([*args, "--skip-existing"]) == 0 and out.read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0 and out.read_bytes() == first


def test_segmentation_predict_skip_existing_finishes_an_interrupted_prediction(seg_run, lung, tmp_path):
    out = tmp_path / "pred"
    args = ["predict", "-m", str(seg_run), "-i", str(lung / "imagesTr"), "-o", str(out), "--no-progress"]
    assert main(args) == 0
    done = sorted(out.iterdir())
    for p in done[2:]:
        p.unlink()  # as if killed after two cases (outputs are atomic: what exists is complete)
    kept = {p.name: p.stat().st_mtime_ns for p in done[:2]}
    assert main([*args, "--skip-existing"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in done]
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())[:2]} == kept


# ---------------------------------------------------------------------------------------------- 2


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_a_run_folder_in_use_is_refused(task, lung, pneumonia, tmp_path, capsys):
    run = tmp_path / "run"
    data, opts = (lung, SEG) if task == "segmentation" else (pneumonia, CLS)
    with claim_run(run):  # another training process holds it
        assert main(["train", "-d", str(data), "-o", str(run), *opts]) == 2
    assert "in use by process" in error_of(capsys)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run was written


# ---------------------------------------------------------------------------------------------- 6


def _full_disk_at(monkeypatch, call: int):
    """Weights writes fail with ENOSPC from the ``call``-th on (1: the first checkpoint's)."""
    real, calls = registry.write_file, {"n": 0}

    def write_file(path, write):
        calls["n"] += 1
        if calls["n"] >= call:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(registry, "write_file", write_file)


@pytest.mark.parametrize("failing_call", [1, 2])  # checkpoints/last's weights, then checkpoints/best's
def test_a_failed_first_checkpoint_can_be_resumed_or_restarted(failing_call, lung, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train", "-d", str(lung), "-o", str(run), *SEG]
    with monkeypatch.context() as m:
        _full_disk_at(m, failing_call)
        assert main(args) == 1
    err = error_of(capsys)
    assert "No space left on device" in err and "checkpoints" in err and "Traceback" not in err
    assert main([*args, "--resume"]) == 0
    assert load_run(run).checkpoint("best").is_dir()
    if failing_call == 1:  # nothing to resume from: a plain restart is allowed too
        assert main(["train", "-d", str(lung), "-o", str(tmp_path / "again"), *SEG]) == 0


# ---------------------------------------------------------------------------------------------- 7


class _NotAllowed:
    """Pickled into a training state: weights-only loading must refuse it."""


@pytest.mark.parametrize("damage", ["truncated weights", "empty weights", "truncated state", "pickled state"])
def test_damaged_run_files_are_one_line_errors(damage, lung, seg_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    weights, state = run / "checkpoints" / "last" / "model.safetensors", run / "checkpoints" / "last" / "training_state.pt"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "truncated state":
        state.write_bytes(state.read_bytes()[:200])
    else:
        torch.save({"epoch": 1, "evil": _NotAllowed()}, state)
    if "weights" in damage:
        args = ["predict", "-m", str(run), "--checkpoint", "last", "-i", str(lung / "imagesTr"), "-o",
                str(tmp_path / "p"), "--no-progress"]
    else:
        args = ["train", "-d", str(lung), "-o", str(run), *SEG, "--epochs", "2", "--resume"]
    assert main(args) == 2
    err = error_of(capsys)
    assert str(weights if "weights" in damage else state) in err
    assert {"truncated weights": "damaged weights file", "empty weights": "empty file",
            "truncated state": "cannot be read", "pickled state": "weights-only"}[damage] in err


# ---------------------------------------------------------------------------------------------- 9


def test_export_without_onnx_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as if not installed
    assert main(["export", "lightm_unet_2d_tiny", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "pip install -c constraints.txt -e '.[export]'" in error_of(capsys)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------- 10, 11


def test_train_without_progress_prints_each_epoch_and_the_run(lung, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-d", str(lung), "-o", str(run), *SEG, "--epochs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert out[-1].startswith("done: best val dice") and out[-1].endswith(f"run in {run}")


def test_long_commands_show_their_stages(tmp_path, capsys):
    assert main(["info", "lightm_unet_2d_tiny", "--input-size", "32", "32"]) == 0
    err = capsys.readouterr().err
    assert "counting MACs" in err and "done in" in err
    assert main(["export", "lightm_unet_2d_tiny", "--onnx", str(tmp_path / "m.onnx"), "--input-size", "32", "32"]) == 0
    err = capsys.readouterr().err
    assert "tracing LightMUNet" in err and err.count("checking onnxruntime") == 2


@pytest.mark.parametrize("command", ["train", "predict", "evaluate"])
def test_help_lists_both_tasks_with_defaults(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "segmentation only" in text and "classification only" in text and "(default:" in text
    if command == "train":
        for option in ("--input-size", "--limit", "--iterations-per-epoch", "--patch-size", "--fold"):
            assert option in text, option


def test_evaluate_classification_takes_no_progress(cls_run, pneumonia, tmp_path, capsys):
    pred = tmp_path / "p.csv"
    assert main(["predict", "-m", str(cls_run), "-i", str(pneumonia), "-o", str(pred), "--no-progress"]) == 0
    assert main(["evaluate", str(pred), "-o", str(tmp_path / "ev"), "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------- 12


def test_info_input_channels_and_redundant_spatial_dims(capsys):
    assert main(["info", "lightm_unet_2d_tiny", "--input-size", "1", "3", "32", "32", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == [1, 3, 32, 32]
    assert isinstance(medssm.create_model("lightm_unet_2d", spatial_dims=2), torch.nn.Module)
    with pytest.raises(ValueError, match="takes 2D input, not spatial_dims=3"):
        medssm.create_model("lightm_unet_2d", spatial_dims=3)
