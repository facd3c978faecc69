"""The probe list: bad input and faults a new user meets, through the CLI as they would, on small copies
of the real data. Each probe says what must hold: a one-line error naming the file (exit 2, or 1 for an
OS error), nothing lost, nothing overwritten, nothing silent."""

from __future__ import annotations

import errno
import json
import sys
import time

import numpy as np
import pytest
import torch

import medssm
from medssm.cli import main
from medssm.nets import registry
from medssm.runs import RunBusyError, claim_run, load_run

from .subsets import tree_snapshot

SEG = ["--model", "lightm_unet_2d_tiny", "--epochs", "1", "--iterations-per-epoch", "2", "--val-every", "1",
       "--patch-size", "64", "64", "--batch-size", "2", "--no-progress"]
CLS = ["--model", "medmamba_tiny", "--epochs", "1", "--batch-size", "8", "--iterations-per-epoch", "2", "--no-progress"]


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


# ---------------------------------------------------------------------------------------------- round three
# The third round of probes: what was silently wrong, what was a raw traceback, what stuck.


def copy_run(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_extending_a_finished_run_trains_the_added_epochs_with_a_restarted_schedule(lung, seg_run, tmp_path, capsys):
    from safetensors.torch import load_file

    run = copy_run(seg_run, tmp_path)
    before = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    capsys.readouterr()
    assert main(["train", "-d", str(lung), "-o", str(run), *SEG, "--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "training to epoch 3 instead of 1" in out and "warm restart" in out
    log = load_run(run).log
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[1]["lr"] > 0  # the added epochs learn
    after = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert load_run(run).description["recipe"]["epochs"] == 3  # the records say what was trained


def test_options_that_cannot_change_on_resume_are_refused_and_the_records_kept(lung, seg_run, tmp_path, capsys):
    run = copy_run(seg_run, tmp_path)
    records = {f: (run / f).read_bytes() for f in ("config.json", "model.json", "plan.json")}
    for option in (["--patch-size", "32", "32"], ["--lr", "0.5"], ["--target-spacing", "2", "2"]):
        args = ["train", "-d", str(lung), "-o", str(run), "--model", "lightm_unet_2d_tiny", *option, "--resume",
                "--no-progress"]
        assert main(args) == 2
        err = error_of(capsys)
        assert "--resume continues the run as it was configured" in err and option[0] in err
    assert all((run / f).read_bytes() == b for f, b in records.items())
    # Left out, they are the run's: it resumes (and has nothing left to train).
    assert main(["train", "-d", str(lung), "-o", str(run), "--resume", "--no-progress"]) == 0
    assert all((run / f).read_bytes() == b for f, b in records.items())


def test_compare_keys_its_results_by_their_settings_and_runs_what_was_not_run(lung, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "-d", str(lung), "--models", "lightm_unet_2d_tiny", "-o", str(out), "--recipe", "short",
            "--no-progress"]
    assert main([*base, "--budget", "1s"]) == 0  # too short, and no --over-budget: not run
    assert "not run" in (out / "report.md").read_text()
    assert json.loads((out / "models" / "lightm_unet_2d_tiny" / "result.json").read_text())["status"] == "not run"
    capsys.readouterr()
    assert main([*base, "--budget", "1s", "--over-budget"]) == 0  # not complete: run now
    assert "complete, not run again" not in capsys.readouterr().out
    row = json.loads((out / "models" / "lightm_unet_2d_tiny" / "result.json").read_text())
    assert row["status"] == "complete" and row["settings"]["budget"] == "1s"
    assert main([*base, "--budget", "5m"]) == 2  # another budget: not the old result under the new header
    assert "compared with other settings" in error_of(capsys)
    assert main(["compare", "-d", str(lung), "--models", ",", "-o", str(tmp_path / "c2")]) == 2
    assert "no models given" in error_of(capsys) and not (tmp_path / "c2").exists()


def test_evaluate_refuses_undeclared_values_another_geometry_and_missing_predictions(lung, tmp_path, capsys):
    import SimpleITK as sitk

    pred = tmp_path / "pred"
    pred.mkdir()
    refs = sorted((lung / "labelsTr").glob("*.png"))
    for r in refs:
        (pred / r.name).write_bytes(r.read_bytes())
    ev = ["evaluate", str(pred), str(lung / "labelsTr"), "--no-progress", "--no-overlays"]
    assert main([*ev, "-o", str(tmp_path / "e0")]) == 0
    bad = sitk.GetArrayFromImage(sitk.ReadImage(str(refs[0])))
    bad[0, 0] = 5
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(pred / refs[0].name))
    assert main([*ev, "-o", str(tmp_path / "e1")]) == 2
    assert f"{pred / refs[0].name}: label values 5 are not declared" in error_of(capsys)
    image = sitk.ReadImage(str(refs[0]))
    image.SetSpacing((2.0, 2.0))
    sitk.WriteImage(image, str(pred / refs[0].name).replace(".png", ".nrrd"))
    (pred / refs[0].name).unlink()
    nrrd_ref = tmp_path / "refs"
    nrrd_ref.mkdir()
    for r in refs:
        sitk.WriteImage(sitk.ReadImage(str(r)), str(nrrd_ref / r.name.replace(".png", ".nrrd")))
        if r != refs[0]:
            sitk.WriteImage(sitk.ReadImage(str(r)), str(pred / r.name.replace(".png", ".nrrd")))
            (pred / r.name).unlink()
    ev = ["evaluate", str(pred), str(nrrd_ref), "--no-progress", "--no-overlays"]
    assert main([*ev, "-o", str(tmp_path / "e2")]) == 2
    assert "spacing (2, 2) differs from the reference's (1, 1)" in error_of(capsys)
    assert main([*ev, "-o", str(tmp_path / "e3"), "--ignore-geometry"]) == 0
    (pred / refs[1].name.replace(".png", ".nrrd")).unlink()
    assert main([*ev, "-o", str(tmp_path / "e4")]) == 2
    assert "no prediction for 1 of 6 reference(s)" in error_of(capsys) and not (tmp_path / "e4").exists()
    assert main([*ev, "-o", str(tmp_path / "e5"), "--ignore-geometry", "--allow-missing"]) == 0
    summary = json.loads((tmp_path / "e5" / "summary.json").read_text())
    assert summary["n_cases"] == 5 and summary["n_missing"] == 1 and summary["missing"] == [refs[1].name[:-4]]


def test_classification_evaluate_refuses_missing_predictions_and_nan(cls_run, pneumonia, tmp_path, capsys):
    pred = tmp_path / "p.csv"
    assert main(["predict", "-m", str(cls_run), "-i", str(pneumonia), "-o", str(pred), "--no-progress"]) == 0
    lines = pred.read_text().splitlines()
    few = tmp_path / "few.csv"
    few.write_text("\n".join(lines[:4]) + "\n")
    args = ["evaluate", str(few), "-r", str(pneumonia), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "e1")]) == 2
    assert "no prediction for 13 of 16 samples" in error_of(capsys)
    assert main([*args, "-o", str(tmp_path / "e2"), "--allow-missing"]) == 0
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["n_missing"] == 13
    cells = lines[1].split(",")
    cells[-1] = "nan"
    (tmp_path / "nan.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    assert main(["evaluate", str(tmp_path / "nan.csv"), "-o", str(tmp_path / "e3")]) == 2
    assert "nan.csv, line 2: malformed row (a probability is not a number in [0, 1]" in error_of(capsys)


@pytest.mark.parametrize("args,says", [
    (["--budget="], "--budget: expected a duration"),
    (["--patch-size", "0", "0"], "--patch-size must be at least 1, got 0 0"),
    (["--model-kwargs", '{"init_filters": 1000000000}'], "too large to build"),
    (["--model-kwargs", '{"no_such_argument": 1}'], "unexpected keyword argument 'no_such_argument'"),
])
def test_bad_options_are_one_line_errors_and_leave_no_folder(lung, tmp_path, capsys, args, says):
    run = tmp_path / "run"
    assert main(["train", "-d", str(lung), "-o", str(run), "--model", "lightm_unet_2d_tiny", "--no-progress",
                 *args]) == 2
    assert says in error_of(capsys) and not run.exists()


def test_an_unknown_argument_in_model_json_names_the_file(seg_run, lung, tmp_path, capsys):
    run = copy_run(seg_run, tmp_path)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "kwargs": {**meta["kwargs"], "bogus": 3}}))
    assert main(["predict", "-m", str(run), "-i", str(lung / "imagesTr"), "-o", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    assert f"{run / 'model.json'}: lightm_unet_2d_tiny: " in error_of(capsys)
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "unexpected keyword argument 'bogus'" in error_of(capsys)


def test_export_parity_failure_is_one_line_and_an_existing_file_is_kept(tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"mine")
    args = ["export", "medmamba_tiny", "--onnx", str(onnx), "--model-kwargs", '{"in_chans": 1, "num_classes": 2}',
            "--input-size", "28", "28", "--no-dynamic-spatial", "--no-progress"]
    assert main(args) == 2
    assert "--overwrite" in error_of(capsys) and onnx.read_bytes() == b"mine"
    assert main([*args, "--overwrite", "--rtol", "1e-30"]) == 2
    assert "does not match PyTorch" in error_of(capsys) and onnx.read_bytes() == b"mine"


def test_predict_lists_every_unreadable_input_before_writing_or_skips_them(seg_run, lung, tmp_path, capsys):
    import shutil

    inp = tmp_path / "in"
    shutil.copytree(lung / "imagesTr", inp)
    cases = sorted(inp.glob("*.png"))
    for bad in (cases[1], cases[4]):
        bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["predict", "-m", str(seg_run), "-i", str(inp), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(cases[1]) in err and str(cases[4]) in err and not out.exists()
    assert main(["predict", "-m", str(seg_run), "-i", str(inp), "-o", str(out), "--skip-bad", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(cases[1]) in err and str(cases[4]) in err
    assert len(list(out.glob("*.png"))) == 4


def test_an_output_that_is_a_file_is_said_to_be_one(lung, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    for args in (["train", "-d", str(lung), "-o", str(target), *SEG],
                 ["quickstart", "--data", str(lung), "-o", str(target)],
                 ["evaluate", str(lung / "labelsTr"), str(lung / "labelsTr"), "-o", str(target)]):
        assert main(args) == 2
        assert "is a file, not a folder" in error_of(capsys)
    assert target.read_text() == "x"


def test_a_lock_held_by_another_program_names_that_program(tmp_path):
    import fcntl
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("process 1 on nowhere since 2020-01-01 00:00:00")  # an old medssm's record
    holder = subprocess.Popen(["flock", str(run / ".lock"), "sleep", "30"])
    try:
        for _ in range(200):  # until flock(1) holds it
            with open(run / ".lock") as fd:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
            time.sleep(0.05)
        with pytest.raises(RunBusyError) as err, claim_run(run):
            pass
        assert f"in use by process {holder.pid} (flock {run / '.lock'} sleep 30)" in str(err.value)
    finally:
        holder.kill()
