"""Classification metrics against scikit-learn on random labels; plots and the evaluate command."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medssm.metrics.classification import (classification_metrics, confusion_matrix, plot_confusion_matrix, plot_roc,
                                           predict_labels, roc_auc, roc_curve, roc_curves)
from medssm.metrics.evaluate_classification import ClassifierEvaluateConfig, evaluate_classifier, evaluate_predictions


def _random(n, k, seed, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    if ties:  # coarse scores: many ties, as from a saturated model
        p = np.round(p, 1) + 1e-9
        p /= p.sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_sklearn(k, ties):
    y, p = _random(300, k, seed=k, ties=ties)
    m = classification_metrics(y, p)
    pred = (p[:, 1] > 0.5).astype(int) if k == 2 else p.argmax(1)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    ref_auc = skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(ref_auc, abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    cm = skm.confusion_matrix(y, pred, labels=range(k))
    assert np.array_equal(np.asarray(m["confusion_matrix"]), cm)
    recall = skm.recall_score(y, pred, average=None, labels=range(k), zero_division=0)
    f1 = skm.f1_score(y, pred, average=None, labels=range(k), zero_division=0)
    for i, c in enumerate(m["per_class"]):
        neg = y != i
        specificity = ((pred != i) & neg).sum() / neg.sum()
        assert c["sensitivity"] == pytest.approx(recall[i]) and c["f1"] == pytest.approx(f1[i])
        assert c["specificity"] == pytest.approx(specificity)
        assert c["auc"] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
        assert c["support"] == int((y == i).sum())
    assert m["specificity"] == pytest.approx(np.mean([c["specificity"] for c in m["per_class"]]))


def test_roc_curve_and_auc_match_sklearn_with_ties():
    y, p = _random(200, 2, seed=7, ties=True)
    fpr, tpr, thr = roc_curve(y == 1, p[:, 1])
    rf, rt, rth = skm.roc_curve(y, p[:, 1], drop_intermediate=False)
    assert np.allclose(fpr, rf) and np.allclose(tpr, rt) and np.allclose(thr[1:], rth[1:])
    assert roc_auc(y == 1, p[:, 1]) == pytest.approx(skm.auc(rf, rt))
    assert np.isnan(roc_auc(np.ones(5, bool), np.arange(5.0)))


def test_medmnist_binary_threshold_and_confusion():
    p = np.array([[0.5, 0.5], [0.4, 0.6], [0.9, 0.1]])
    assert predict_labels(p).tolist() == [0, 1, 0]  # p[:, -1] > 0.5, as medmnist.Evaluator
    assert confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist() == [[1, 0], [1, 1]]


def test_label_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match="label 3 is out of range for 3 classes"):
        classification_metrics([0, 1, 3], np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        classification_metrics([0, 1], np.full((3, 2), 0.5))


def test_plots_and_evaluate_command(tmp_path):
    y, p = _random(60, 3, seed=1)
    classes = ["a", "b", "c"]
    for f in (plot_confusion_matrix(confusion_matrix(y, p.argmax(1), 3), classes, tmp_path / "cm.png"),
              plot_roc(y, p, classes, tmp_path / "roc.png")):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = evaluate_predictions(y, p, classes, tmp_path / "ev")
    assert {f.name for f in (tmp_path / "ev").iterdir()} == {"metrics.json", "confusion_matrix.png", "roc.png"}
    # the CLI form reads a predictions CSV with a target column
    rows = ["path,label,label_name,target,prob_a,prob_b,prob_c"]
    rows += [f"img{i}.png,{p[i].argmax()},x,{y[i]},{p[i, 0]:.17g},{p[i, 1]:.17g},{p[i, 2]:.17g}" for i in range(len(y))]
    (tmp_path / "pred.csv").write_text("\n".join(rows) + "\n")
    m2 = evaluate_classifier(ClassifierEvaluateConfig(predictions=str(tmp_path / "pred.csv")))
    assert m2["auc"] == pytest.approx(m["auc"]) and m2["acc"] == pytest.approx(m["acc"])
    assert (tmp_path / "pred_evaluation" / "roc.png").is_file()
    rows[1] = rows[1].replace(f",{y[0]},", ",7,", 1)
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="bad.csv.*img0.png.*label 7 is out of range"):
        evaluate_classifier(ClassifierEvaluateConfig(predictions=str(tmp_path / "bad.csv")))


def test_roc_curves_leave_unknown_findings_out_and_one_finding_is_multi_label():
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 2, (40, 2)), rng.random((40, 2))
    unknown = y.copy()
    unknown[:10, 0] = -1  # finding 0 unknown in ten samples: a ROC over the other thirty, not a positive
    (i0, fpr, tpr, auc0), (i1, _, _, auc1) = roc_curves(unknown, p)
    expected_fpr, expected_tpr, _ = roc_curve(y[10:, 0] == 1, p[10:, 0])
    assert (i0, i1) == (0, 1) and auc0 == roc_auc(y[10:, 0] == 1, p[10:, 0]) and auc1 == roc_auc(y[:, 1] == 1, p[:, 1])
    np.testing.assert_array_equal(fpr, expected_fpr)
    np.testing.assert_array_equal(tpr, expected_tpr)
    # one finding (a CSV with one --label-columns column): (N, 1) beside (N, 1) is multi-label, scored as such
    m = classification_metrics(y[:, :1], p[:, :1], ["effusion"])
    assert m["multi_label"] and m["auc"] == roc_auc(y[:, 0] == 1, p[:, 0])
    assert [c[0] for c in roc_curves(y[:, :1], p[:, :1])] == [0]
    # class indices as (N, 1) beside (N, K) stay single-label
    assert classification_metrics(y[:, :1], np.stack([1 - p[:, 0], p[:, 0]], 1))["auc"] == m["auc"]
