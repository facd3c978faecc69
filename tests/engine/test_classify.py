"""End to end on small real subsets of PneumoniaMNIST and BreastMNIST with the tiny MedMamba:
train a few steps, predict, evaluate; the CLI's routing; exact resume; a 3D run; clear errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medssm.cli import main
from medssm.engine.classification import ClassifierTrainConfig, train_classifier
from medssm.inference.classification import ClassifierPredictConfig, predict_classifier
from medssm.metrics.evaluate_classification import ClassifierEvaluateConfig, evaluate_classifier

from ..subsets import medmnist_subset

TINY = dict(model="medmamba_tiny", batch_size=8, iterations_per_epoch=2, progress=False)
COUNTS = {"train": 24, "val": 12, "test": 16}


@pytest.fixture(scope="module")
def subsets(data_root, tmp_path_factory):
    """Small real subsets of the two MedMNIST files (both classes in every split), same names."""
    folder = tmp_path_factory.mktemp("medmnist")
    for name in ("pneumoniamnist", "breastmnist"):
        medmnist_subset(data_root, name, folder / f"{name}.npz", COUNTS)
    return folder


def _cfg(data, out, **kw):
    return ClassifierTrainConfig(data=str(data), out=str(out), **{**TINY, "epochs": 1, **kw})


def test_pneumonia_cli_train_predict_evaluate(subsets, tmp_path):
    npz = subsets / "pneumoniamnist.npz"
    run = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--out", str(run), "--model", "medmamba_tiny", "--epochs", "1",
                 "--batch-size", "8", "--iterations-per-epoch", "2", "--no-progress"]) == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "classification" and meta["classes"] == ["normal", "pneumonia"]
    assert meta["input_size"] == 28 and json.loads((run / "checkpoints" / "best" / "model.json").read_text())["epoch"] == 1
    assert {"log.csv", "log.json", "curves.png", "config.json", "splits.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    # predict and evaluate find the classification task from the run's model.json and the .csv
    pred = tmp_path / "pred.csv"
    assert main(["predict", "-m", str(run), "-i", str(npz), "-o", str(pred), "--no-progress"]) == 0
    rows = list(csv.DictReader(pred.open()))
    assert len(rows) == COUNTS["test"] and rows[0]["path"] == "pneumoniamnist.npz:test/0"
    assert set(rows[0]) == {"path", "label", "label_name", "target", "prob_normal", "prob_pneumonia"}
    p = np.array([[float(r["prob_normal"]), float(r["prob_pneumonia"])] for r in rows])
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    assert main(["evaluate", str(pred), "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    from sklearn.metrics import roc_auc_score

    targets = np.array([int(r["target"]) for r in rows])
    assert m["n"] == COUNTS["test"] and len(m["per_class"]) == 2
    assert m["auc"] == pytest.approx(roc_auc_score(targets, p[:, 1]), abs=1e-12)
    assert m["acc"] == pytest.approx(np.mean((p[:, 1] > 0.5) == targets), abs=1e-12)
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ev" / "roc.png").is_file()


def test_breast_options_and_reference_evaluation(subsets, tmp_path):
    npz = subsets / "breastmnist.npz"
    run = train_classifier(_cfg(npz, tmp_path / "run", epochs=2, optimizer="adamw", weight_decay=0.05,
                                schedule="cosine", warmup_epochs=1, label_smoothing=0.1, class_weights="balanced",
                                input_size=32, crop_scale=(0.5, 1.0), vflip=True))
    log = json.loads((run / "log.json").read_text())
    # per step: a linear warm-up over epoch 1 to the full rate, then a cosine down to 0 over epoch 2
    assert [r["epoch"] for r in log] == [1, 2] and log[0]["lr"] == pytest.approx(1e-4) and log[1]["lr"] < 1e-9
    assert {"train_loss", "val_loss", "val_acc", "val_auc"} <= set(log[0])
    pred = predict_classifier(ClassifierPredictConfig(model=str(run), input=str(npz), split="val",
                                                      output=str(tmp_path / "p"), progress=False))
    assert pred == tmp_path / "p" / "predictions.csv"
    m = evaluate_classifier(ClassifierEvaluateConfig(predictions=str(pred), reference=str(npz), split="val",
                                                     out=str(tmp_path / "ev")))
    assert m["n"] == COUNTS["val"] and set(m) >= {"acc", "auc", "f1", "precision", "sensitivity", "specificity"}
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train_classifier(_cfg(npz, run))
    # labels the model cannot have are refused before anything is written
    with np.load(npz) as z:
        Image.fromarray(z["test_images"][0]).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,label,split\na.png,0,test\na.png,3,test\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 3: label 3 is out of range for 2 classes"):
        predict_classifier(ClassifierPredictConfig(model=str(run), input=str(tmp_path / "labels.csv"),
                                                   output=str(tmp_path / "x.csv"), progress=False))
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_is_exact(subsets, tmp_path, ema):
    # On CPU, to the bit; on CUDA, cuDNN's and the scan's atomic sums reorder additions between runs.
    npz = subsets / "breastmnist.npz"
    kw = dict(limit=8, ema=ema, device="cpu")
    straight = train_classifier(_cfg(npz, tmp_path / "a", epochs=2, **kw))
    half = train_classifier(_cfg(npz, tmp_path / "b", epochs=1, **kw))
    resumed = train_classifier(_cfg(npz, tmp_path / "b", epochs=2, resume=True, **kw))
    assert resumed == half
    for ckpt in ("checkpoints/last", "checkpoints/best"):  # with --ema, best holds the average
        a, b = (load_file(str(r / ckpt / "model.safetensors")) for r in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((r / "log.json").read_text()) for r in (straight, resumed))
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["val_auc"] for r in la] == [r["val_auc"] for r in lb]
    kept = load_file(str(straight / "checkpoints" / "best" / "model.safetensors"))
    last = load_file(str(straight / "checkpoints" / "last" / "model.safetensors"))
    if ema:  # the kept model is the average, not the trained weights
        assert any(not torch.equal(kept[k], last[k]) for k in kept)
    else:
        with pytest.raises(ValueError, match=r"these options differ from its config.json: --ema 0.9 \(the run: 0.0\)"):
            train_classifier(_cfg(npz, tmp_path / "b", epochs=3, limit=8, ema=0.9, resume=True))


def test_3d_volumes(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 4)[:, None]
    vols = rng.integers(0, 100, (8, 12, 12, 12), dtype=np.uint8)
    vols[labels[:, 0] == 1, 3:9, 3:9, 3:9] += 120  # a bright cube marks class 1
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", vols), ("labels", labels))}
    np.savez(tmp_path / "cubes3d.npz", **arrays)
    run = train_classifier(_cfg(tmp_path / "cubes3d.npz", tmp_path / "run", batch_size=4))
    meta = json.loads((run / "model.json").read_text())
    assert meta["spatial_dims"] == 3 and meta["kwargs"]["spatial_dims"] == 3 and meta["input_size"] == 12
    pred = predict_classifier(ClassifierPredictConfig(model=str(run), input=str(tmp_path / "cubes3d.npz"),
                                                      output=str(tmp_path / "pred.csv"), progress=False))
    assert len(list(csv.DictReader(pred.open()))) == 8


def test_predict_normalises_as_the_run_records(subsets, tmp_path):
    """The input normalisation comes from the model's card into model.json, and prediction reads it back."""
    npz = subsets / "pneumoniamnist.npz"
    run = train_classifier(_cfg(npz, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    assert meta["normalize"] == {"mean": 0.5, "std": 0.5}  # medmamba_tiny's card: MedMamba's [-1, 1]

    def predicted(name):
        out = predict_classifier(ClassifierPredictConfig(model=str(run), input=str(npz), output=str(tmp_path / name),
                                                         progress=False))
        return np.array([[float(r["prob_normal"]), float(r["prob_pneumonia"])] for r in csv.DictReader(out.open())])

    as_trained = predicted("a.csv")
    (run / "model.json").write_text(json.dumps({**meta, "normalize": {"mean": 0.0, "std": 1.0}}))
    other = predicted("b.csv")
    from medssm.runs import load_run

    with np.load(npz) as z:
        x = torch.from_numpy(z["test_images"][:1].astype(np.float32) / 255)[:, None]  # (1, 1, 28, 28) in [0, 1]
    with torch.no_grad():
        expected = torch.softmax(load_run(run).load_model()(x), 1).numpy()[0]
    assert np.allclose(other[0], expected, atol=1e-5) and not np.allclose(as_trained, other, atol=1e-3)


def test_a_budgeted_classifier_keeps_to_its_plan(subsets, tmp_path):
    npz = subsets / "breastmnist.npz"
    run = train_classifier(ClassifierTrainConfig(data=str(npz), out=str(tmp_path / "run"), model="medmamba_tiny",
                                                 budget="8s", over_budget=True, progress=False))
    from medssm.runs import load_run

    budget, log = load_run(run).budget, load_run(run).log
    batch = budget.candidate.batch_size
    assert len(log) == budget.epochs and budget.actual_s > 0
    assert sum("val_auc" in r for r in log) == budget.validations
    state = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    steps = state["scheduler"]["last_epoch"]
    assert budget.samples == steps * batch and state["scheduler"]["lr_lambdas"][0]["total_steps"] == steps
    assert budget.iterations(budget.epochs) <= -(-COUNTS["train"] // batch)  # an epoch is at most one pass
