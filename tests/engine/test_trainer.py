"""The one trainer: runs written before it still load, predict and resume; what it does once is done for
both tasks (the weight average, the resume message, the records); a score that is not a number never
makes a model "best"."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medssm.cli import main
from medssm.engine.classification import ClassifierTrainConfig, train_classifier
from medssm.engine.segmentation import TrainConfig, train
from medssm.runs import load_run

from ..subsets import medmnist_subset

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "runs_before_one_trainer"
OLD_SEG = ["--model", "lightm_unet_2d_tiny", "--model-kwargs", '{"init_filters": 4, "norm_groups": 2}', "--epochs", "2",
           "--iterations-per-epoch", "2", "--val-every", "1", "--patch-size", "64", "64", "--batch-size", "2",
           "--device", "cpu", "--no-progress"]
OLD_CLS = ["--model", "medmamba_tiny", "--model-kwargs", '{"dims": [8, 16, 32, 64]}', "--epochs", "2",
           "--batch-size", "8", "--iterations-per-epoch", "2", "--ema", "0.9", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_a_run_of_the_two_trainers_loads_predicts_and_resumes(task, lung, pneumonia, tmp_path, capsys):
    run = tmp_path / task
    shutil.copytree(OLD / task, run)
    before = {p: p.read_bytes() for p in (run / "model.json", run / "config.json")}
    epoch_1 = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert load_run(run).task == task and load_run(run).log[0]["epoch"] == 1
    if task == "segmentation":
        pred = tmp_path / "pred"
        assert main(["predict", "-i", str(lung / "imagesTr"), "-o", str(pred), "-m", str(run), "--no-progress"]) == 0
        assert len(list(pred.glob("*.png"))) == 6
        args, loss = ["train", "-d", str(lung), "-o", str(run), *OLD_SEG, "--resume"], 1.2867252230644226
    else:
        pred = tmp_path / "pred.csv"
        assert main(["predict", "-i", str(pneumonia), "-o", str(pred), "-m", str(run), "--no-progress"]) == 0
        assert len(list(csv.DictReader(pred.open()))) == 16
        args, loss = ["train", "-d", str(pneumonia), "-o", str(run), *OLD_CLS, "--resume"], 0.7125799059867859
    assert main(args) == 0
    log = load_run(run).log
    assert [r["epoch"] for r in log] == [1, 2]
    # Epoch 2 as the old trainer itself went on (sampler, augmentation, optimiser, EMA and generators restored).
    assert log[1]["train_loss"] == pytest.approx(loss, rel=1e-4)
    last = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert any(not torch.equal(last[k], epoch_1[k]) for k in last)
    assert all(p.read_bytes() == b for p, b in before.items())  # the records of what was trained stay


def test_resume_says_where_it_stands_alike_for_both_tasks(lung, pneumonia, tmp_path, capsys):
    seg = tmp_path / "seg"
    shutil.copytree(OLD / "segmentation", seg)
    cls = tmp_path / "cls"
    shutil.copytree(OLD / "classification", cls)
    capsys.readouterr()
    assert main(["train", "-d", str(lung), "-o", str(seg), *OLD_SEG, "--resume"]) == 0
    seg_out = capsys.readouterr().out
    assert main(["train", "-d", str(pneumonia), "-o", str(cls), *OLD_CLS, "--resume"]) == 0
    cls_out = capsys.readouterr().out
    assert f"resuming {seg} after epoch 1/2" in seg_out
    assert f"resuming {cls} after epoch 1/2 (best val auc 0.3056 at epoch 1)" in cls_out
    for out, name in ((seg_out, "lightm_unet_2d_tiny"), (cls_out, "medmamba_tiny")):
        assert f"{name}: " in out and " parameters on cpu; " in out


def test_segmentation_keeps_a_weight_average_too(lung, tmp_path):
    """--ema is the trainer's, not a task's: a segmentation run validates and keeps the average."""
    run = train(TrainConfig(data=str(lung), out=str(tmp_path / "run"), model="lightm_unet_2d_tiny", epochs=2,
                            iterations_per_epoch=2, val_every=2, patch_size=(64, 64), batch_size=2, ema=0.5,
                            progress=False, device="cpu"))
    best = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    last = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    state = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    average = state["extra"]["ema"]["weights"]
    assert state["extra"]["ema"]["updates"] == 4 and state["extra"]["best_epoch"] == 2  # validated once, at the end
    assert all(torch.equal(average[k], best[k]) for k in best)  # best holds the average ...
    assert any(not torch.equal(average[k], last[k]) for k in last if last[k].is_floating_point())  # ... not the weights


def test_a_score_that_is_not_a_number_never_makes_a_model_best(data_root, tmp_path, capsys):
    """A validation split of one class has no AUC: no epoch is "best" by it (and not by ACC instead);
    checkpoints/best is then the last model, and the log says the AUC is undefined."""
    path = medmnist_subset(data_root, "breastmnist", tmp_path / "breastmnist.npz", {"train": 16, "val": 8, "test": 4})
    with np.load(path) as z:
        arrays = dict(z)
    arrays["val_labels"][:] = 1  # one class only in val
    np.savez(path, **arrays)
    run = train_classifier(ClassifierTrainConfig(data=str(path), out=str(tmp_path / "run"), model="medmamba_tiny",
                                                 epochs=2, batch_size=8, iterations_per_epoch=1, progress=False))
    log = load_run(run).log
    assert all(r["val_auc"] is None or math.isnan(r["val_auc"]) for r in log)
    assert "(best)" not in capsys.readouterr().out
    state = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert state["extra"]["best_epoch"] == 0 and state["extra"]["best"] == -math.inf
    assert json.loads((run / "checkpoints" / "best" / "model.json").read_text())["epoch"] == 2


def test_checkpointing_trains_the_same_weights(lung, tmp_path, monkeypatch):
    """--checkpointing recomputes each block in the backward: the same gradients, so the same run."""
    from medssm.engine import trainer

    switched = []
    monkeypatch.setattr(trainer, "set_checkpointing", lambda m: switched.extend(trainer_switch(m)))
    runs = [train(TrainConfig(data=str(lung), out=str(tmp_path / str(c)), model="lightm_unet_2d_tiny", epochs=1,
                              iterations_per_epoch=2, val_every=1, patch_size=(64, 64), batch_size=2, checkpointing=c,
                              progress=False, device="cpu")) for c in (False, True)]
    plain, checkpointed = (load_file(str(r / "checkpoints" / "last" / "model.safetensors")) for r in runs)
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=0, atol=1e-6) for k in plain)
    assert switched  # the blocks of the trained network (and of none other: no budget here) were switched


def trainer_switch(model):
    from medssm.nets import set_checkpointing

    return set_checkpointing(model)
