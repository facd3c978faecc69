"""Multi-label classification: ChestMNIST's layout and CSVs with a 0/1 column per finding, trained with
binary cross-entropy, scored per finding as MedMNIST's evaluator scores multi-label sets, predicted with a
probability column per finding."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score

from medssm.cli import main
from medssm.data.classification import finding_weights, open_classification_data
from medssm.data.classification.medmnist import MEDMNIST
from medssm.engine.classification import ClassificationTask
from medssm.engine.options import ClassifierTrainConfig
from medssm.metrics.classification import classification_metrics
from medssm.runs import load_run

from ..synthetic import chestmnist_like

TINY = ["--model", "medmamba_tiny", "--epochs", "1", "--batch-size", "8", "--iterations-per-epoch", "3", "--no-progress"]
FINDINGS = list(MEDMNIST["chestmnist"][2])


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    return chestmnist_like(tmp_path_factory.mktemp("chest") / "chestmnist.npz")


def test_metrics_are_medmnists_for_multi_label_on_fresh_data():
    rng = np.random.default_rng(7)
    y = (rng.random((60, 5)) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random((60, 5)) * 0.7, 0, 1)
    m = classification_metrics(y, p, list("abcde"))
    assert m["multi_label"] and [c["class"] for c in m["per_class"]] == list("abcde")
    # medmnist.Evaluator's getAUC / getACC for multi-label: the mean over findings of roc_auc_score and
    # of accuracy_score at 0.5.
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, i], p[:, i]) for i in range(5)]), abs=1e-12)
    assert m["acc"] == pytest.approx(np.mean([accuracy_score(y[:, i], p[:, i] > 0.5) for i in range(5)]), abs=1e-12)
    bce = -np.mean(y * np.log(p.clip(1e-12)) + (1 - y) * np.log((1 - p).clip(1e-12)))
    assert m["log_loss"] == pytest.approx(bce, rel=1e-9) and m["per_class"][0]["support"] == int(y[:, 0].sum())


def test_chestmnist_trains_predicts_and_is_scored_per_finding(chest, tmp_path, capsys):
    train = open_classification_data(chest, "train")
    assert train.multi_label and train.classes == FINDINGS and train.labels.shape == (64, 14)
    run = tmp_path / "run"
    assert main(["train", "-d", str(chest), "-o", str(run), *TINY]) == 0
    meta = load_run(run).description
    assert meta["multi_label"] is True and meta["classes"] == FINDINGS
    log = load_run(run).log[-1]
    assert {"val_auc", "val_acc", "val_loss"} <= set(log)
    pred = tmp_path / "pred.csv"
    assert main(["predict", "-m", str(run), "-i", str(chest), "-o", str(pred), "--no-progress"]) == 0
    rows = list(csv.DictReader(pred.open()))
    assert len(rows) == 32 and list(rows[0])[:2] == ["path", "findings"]
    assert [c for c in rows[0] if c.startswith("prob_")] == [f"prob_{f}" for f in FINDINGS]
    probs = np.array([[float(r[f"prob_{f}"]) for f in FINDINGS] for r in rows])
    assert rows[0]["findings"] == ";".join(f for f, v in zip(FINDINGS, probs[0]) if v > 0.5)
    with np.load(chest) as z:
        assert (np.array([[int(r[f"target_{f}"]) for f in FINDINGS] for r in rows]) == z["test_labels"]).all()
    capsys.readouterr()
    assert main(["evaluate", str(pred), "-o", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "finding" in printed and all(f in printed for f in FINDINGS)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with np.load(chest) as z:
        expected = classification_metrics(z["test_labels"], probs, FINDINGS)
    assert m["auc"] == pytest.approx(expected["auc"], abs=1e-5) and len(m["per_class"]) == 14
    assert (tmp_path / "ev" / "roc.png").is_file() and not (tmp_path / "ev" / "confusion_matrix.png").exists()


def write_csv_set(folder, header, rows):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(len(rows)):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
    text = ",".join(header) + "\n" + "".join(f"img/{i}.png," + ",".join(map(str, r)) + "\n" for i, r in enumerate(rows))
    (folder / "labels.csv").write_text(text)
    return folder / "labels.csv"


def test_a_csv_with_finding_columns_is_multi_label(tmp_path):
    rows = [[i % 2, (i // 2) % 2, 1 - i % 2, "train" if i < 12 else "val"] for i in range(16)]
    path = write_csv_set(tmp_path, ["path", "effusion", "mass", "nodule", "split"], rows)
    every = open_classification_data(path, "train")
    assert every.multi_label and every.classes == ["effusion", "mass", "nodule"] and len(every) == 12
    some = open_classification_data(path, "val", label_columns=("mass", "effusion"))
    assert some.classes == ["mass", "effusion"] and (some.labels[:, 1] == [r[0] for r in rows[12:]]).all()
    with pytest.raises(ValueError, match=r"no column 'edema' \(--label-columns\)"):
        open_classification_data(path, "train", label_columns=("edema",))
    bad = write_csv_set(tmp_path / "bad", ["path", "effusion", "mass"], [[0, 1], [2, 0]])
    with pytest.raises(ValueError, match=r"labels.csv, line 3: effusion is '2'; a finding is 0, 1 or empty"):
        open_classification_data(bad, "train")
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="image folders hold one class per image"):
        open_classification_data(tmp_path / "tree", "train", label_columns=("a",))


def test_rare_findings_weigh_more_and_single_label_options_are_refused(chest, tmp_path):
    labels = open_classification_data(chest, "train").labels
    weights = finding_weights("balanced", labels)
    torch.testing.assert_close(weights, torch.tensor((labels == 0).sum(0) / (labels == 1).sum(0), dtype=torch.float32))
    loss = ClassifierTrainConfig(data=str(chest), pos_weight="balanced").make_loss(labels, 14)
    assert isinstance(loss, torch.nn.BCEWithLogitsLoss) and torch.equal(loss.pos_weight, weights)
    with pytest.raises(ValueError, match="--class-weights apply to one class per sample; this data is multi-label"):
        ClassificationTask(ClassifierTrainConfig(data=str(chest), class_weights="balanced")).open(tmp_path / "run")
    with pytest.raises(ValueError, match="--pos-weight applies to multi-label data only"):
        ClassifierTrainConfig(data="x", pos_weight="balanced").make_loss(np.array([0, 1, 1]), 2)
