"""Classification metrics in the MedMNIST v2 convention, in plain numpy, with PNG plots.

* **ACC**: binary tasks threshold the probability of the last class at 0.5 (``p[:, -1] > 0.5``,
  as ``medmnist.Evaluator`` does); more classes take the arg-max.
* **AUC**: binary tasks use the probability of the last class; more classes average the
  one-vs-rest AUC of every class (macro), which is ``roc_auc_score(..., multi_class="ovr")``.
* Per class: precision, sensitivity (recall), specificity, F1 and AUC (one-vs-rest); averaged:
  their unweighted (macro) means. A class that is never predicted has precision 0 (scikit-learn's
  ``zero_division=0``); a class absent from the labels has no AUC (NaN, left out of the mean).
* **Multi-label** (labels ``(N, K)`` of 0/1, one sigmoid probability per finding, as ChestMNIST):
  each finding is a binary task at 0.5; ACC is the mean of the findings' accuracies and AUC the
  mean of their AUCs (``medmnist.Evaluator``'s getACC and getAUC for multi-label); per finding the
  same metrics as per class above, and their macro means.

Examples:
    >>> y = np.array([0, 1, 1, 0]); p = np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])
    >>> m = classification_metrics(y, p)
    >>> m["acc"], m["auc"]
    (0.5, 0.5)
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_path
from ..figures import pyplot, save_figure

__all__ = ["roc_auc", "roc_curve", "predict_labels", "confusion_matrix", "classification_metrics", "multi_label_metrics",
           "write_predictions", "read_predictions",
           "plot_confusion_matrix", "plot_roc", "roc_curves", "format_metrics"]


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # a single score column: probability of the positive class
        p = np.stack([1 - p, p], axis=1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"labels must be (N,) and probabilities (N, K); got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        bad = int(y[(y < 0) | (y >= p.shape[1])][0])
        raise ValueError(f"label {bad} is out of range for {p.shape[1]} classes (0..{p.shape[1] - 1})")
    return y.astype(np.int64), p


def _multi_label(y_true, probs) -> bool:
    """Findings ``(N, K)`` beside one probability each (K may be 1); class indices may come as ``(N, 1)``."""
    return np.ndim(y_true) == 2 and np.shape(y_true) == np.shape(probs)


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (Mann-Whitney U, ties
    counted half). NaN when only one class is present."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rank(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), one point per distinct score from
    the highest down, starting at (0, 0) with threshold +inf (scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``)."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], positive[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] else np.full(len(tps), np.nan)
        fpr = fps / fps[-1] if fps[-1] else np.full(len(fps), np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def predict_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted classes: ``p[:, -1] > threshold`` for two classes, the arg-max otherwise."""
    p = np.asarray(probs)
    if p.shape[1] == 2:
        return (p[:, -1] > threshold).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: rows are the true class, columns the predicted one."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def classification_metrics(y_true, probs, class_names: Sequence[str] | None = None,
                           threshold: float = 0.5) -> dict:
    """Every metric of the module docstring for labels ``(N,)`` and probabilities ``(N, K)``.

    Returns a JSON-able dict: ``acc``, ``auc``, the macro ``precision``, ``sensitivity``,
    ``specificity``, ``f1``, ``balanced_acc``, ``log_loss`` (the mean negative log-probability of the
    true class), ``n``, ``confusion_matrix`` and ``per_class`` (a list
    of dicts with ``class``, ``support``, ``precision``, ``sensitivity``, ``specificity``, ``f1``,
    ``auc``).
    """
    if _multi_label(y_true, probs):
        return multi_label_metrics(y_true, probs, class_names, threshold)
    y, p = _check(y_true, probs)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns")
    pred = predict_labels(p, threshold)
    cm = confusion_matrix(y, pred, k)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    precision, sensitivity, specificity = _div(tp, tp + fp), _div(tp, tp + fn), _div(tn, tn + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    class_auc = np.array([roc_auc(y == i, p[:, i]) for i in range(k)])
    if k == 2:
        auc = roc_auc(y == 1, p[:, 1])
    else:
        defined = ~np.isnan(class_auc)
        if not defined.all() and defined.any():
            warnings.warn(f"AUC: classes {[names[i] for i in np.flatnonzero(~defined)]} have no samples "
                          "(or only those); left out of the mean", stacklevel=2)
        auc = float(np.mean(class_auc[defined])) if defined.any() else float("nan")
    per_class = [{"class": names[i], "support": int(cm[i].sum()), "precision": float(precision[i]),
                  "sensitivity": float(sensitivity[i]), "specificity": float(specificity[i]),
                  "f1": float(f1[i]), "auc": float(class_auc[i])} for i in range(k)]
    return {
        "n": int(len(y)), "num_classes": k,
        "acc": float((pred == y).mean()), "auc": float(auc),
        "log_loss": float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)))),
        "precision": float(precision.mean()), "sensitivity": float(sensitivity.mean()),
        "specificity": float(specificity.mean()), "f1": float(f1.mean()),
        "balanced_acc": float(sensitivity[cm.sum(axis=1) > 0].mean()),
        "confusion_matrix": cm.tolist(), "per_class": per_class,
    }


def multi_label_metrics(y_true, probs, names: Sequence[str] | None = None, threshold: float = 0.5) -> dict:
    """The metrics of findings ``(N, K)`` of 0/1 and their probabilities ``(N, K)`` (see the module
    docstring): ``acc``, ``auc``, the macro ``precision``, ``sensitivity``, ``specificity``, ``f1``,
    ``log_loss`` (the mean binary cross-entropy), ``n``, ``multi_label`` and ``per_class`` (each
    finding's ``support`` (positives), ``acc``, ...)."""
    y, p = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or len(y) == 0:
        raise ValueError(f"findings must be (N, K) and probabilities (N, K) with N > 0; got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label findings must be 0 or 1")
    k = y.shape[1]
    names = list(names) if names is not None else [str(i) for i in range(k)]
    y, pred = y.astype(bool), p > threshold
    tp, fp = (y & pred).sum(0), (~y & pred).sum(0)
    fn, tn = (y & ~pred).sum(0), (~y & ~pred).sum(0)
    precision, sensitivity, specificity = _div(tp, tp + fp), _div(tp, tp + fn), _div(tn, tn + fp)
    f1, acc = _div(2 * tp, 2 * tp + fp + fn), (y == pred).mean(0)
    auc = np.array([roc_auc(y[:, i], p[:, i]) for i in range(k)])
    defined = ~np.isnan(auc)
    if not defined.all() and defined.any():
        warnings.warn(f"AUC: findings {[names[i] for i in np.flatnonzero(~defined)]} are present in every sample or "
                      "in none; left out of the mean", stacklevel=2)
    per_class = [{"class": names[i], "support": int(tp[i] + fn[i]), "acc": float(acc[i]),
                  "precision": float(precision[i]), "sensitivity": float(sensitivity[i]),
                  "specificity": float(specificity[i]), "f1": float(f1[i]), "auc": float(auc[i])} for i in range(k)]
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return {"n": int(len(y)), "num_classes": k, "multi_label": True, "acc": float(acc.mean()),
            "auc": float(auc[defined].mean()) if defined.any() else float("nan"),
            "log_loss": float(-np.mean(np.where(y, np.log(q), np.log(1 - q)))),
            "precision": float(precision.mean()), "sensitivity": float(sensitivity.mean()),
            "specificity": float(specificity.mean()), "f1": float(f1.mean()), "per_class": per_class}


def format_metrics(m: dict) -> str:
    """A small text table: the averages, then one row per class."""
    lines = [f"n={m['n']}  ACC {m['acc']:.4f}  AUC {m['auc']:.4f}  F1 {m['f1']:.4f}  precision "
             f"{m['precision']:.4f}  sensitivity {m['sensitivity']:.4f}  specificity {m['specificity']:.4f}"]
    width = max(8, *(len(c["class"]) for c in m["per_class"]))
    acc = m.get("multi_label", False)  # a finding has its own accuracy; a class does not
    lines.append(f"{'finding' if acc else 'class':<{width}}  {'positive' if acc else 'support'}  "
                 + ("   acc  " if acc else "") + "precision  sensitivity  specificity      f1     auc")
    for c in m["per_class"]:
        lines.append(f"{c['class']:<{width}}  {c['support']:>{8 if acc else 7}}  " + (f"{c['acc']:.4f}  " if acc else "")
                     + f"{c['precision']:>9.4f}  {c['sensitivity']:>11.4f}  {c['specificity']:>11.4f}  {c['f1']:>6.4f}  "
                     f"{c['auc']:>6.4f}")
    return "\n".join(lines)


def plot_confusion_matrix(cm, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Counts and row-normalised shading of a confusion matrix, as a PNG."""
    plt = pyplot()
    cm = np.asarray(cm)
    k = len(cm)
    rates = _div(cm, cm.sum(axis=1, keepdims=True))
    size = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    labels = [n if len(n) <= 14 else n[:13] + "…" for n in class_names]
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return save_figure(fig, path)


def roc_curves(targets, probs) -> list[tuple[int, np.ndarray, np.ndarray, float]]:
    """``(index, false-positive rates, true-positive rates, AUC)`` of each curve a ROC figure shows: the
    positive class of two classes, each class against the rest, or each finding of multi-label targets
    ``(N, K)`` over the samples where it is known (not -1). Classes or findings present in every sample
    or in none have no curve."""
    if _multi_label(targets, probs):
        targets, p = np.asarray(targets), np.asarray(probs, dtype=np.float64)
        known, positives = (targets >= 0).T, (targets == 1).T
        shown = range(p.shape[1])
    else:
        y, p = _check(targets, probs)
        known, positives = np.ones((p.shape[1], len(y)), bool), [y == i for i in range(p.shape[1])]
        shown = [1] if p.shape[1] == 2 else range(p.shape[1])
    curves = []
    for i in shown:
        positive, score = positives[i][known[i]], p[known[i], i]
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, score)
        curves.append((i, fpr, tpr, roc_auc(positive, score)))
    return curves


def plot_roc(y_true, probs, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """The ROC curves of :func:`roc_curves` as a PNG."""
    plt = pyplot()
    curves = roc_curves(y_true, probs)
    fig, ax = plt.subplots(figsize=(5, 5) if len(curves) <= 8 else (7, 6))
    for i, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, label=f"{class_names[i]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_predictions(path: str | os.PathLike, names: list[str], probs: np.ndarray, classes: list[str],
                      targets: np.ndarray | None = None) -> Path:
    """Write the predictions CSV (atomically); see the module docstring for its columns. ``targets``
    ``(N, K)`` (or ``probs`` of a multi-label model with ``targets`` None) make a multi-label CSV:
    pass ``targets`` of -1 for unknown findings."""
    multi = targets is not None and np.ndim(targets) == 2
    buf = io.StringIO()
    w = csv.writer(buf)
    if multi:
        w.writerow(["path", "findings"] + [f"target_{c}" for c in classes] + [f"prob_{c}" for c in classes])
        for i, name in enumerate(names):
            found = ";".join(c for c, v in zip(classes, probs[i]) if v > 0.5)
            w.writerow([name, found] + ["" if t < 0 else int(t) for t in targets[i]] + [f"{v:.6g}" for v in probs[i]])
    else:
        pred = predict_labels(probs)
        w.writerow(["path", "label", "label_name", "target"] + [f"prob_{c}" for c in classes])
        for i, name in enumerate(names):
            t = "" if targets is None or targets[i] < 0 else int(targets[i])
            w.writerow([name, int(pred[i]), classes[pred[i]], t] + [f"{v:.6g}" for v in probs[i]])
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def read_predictions(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, probabilities (N, K), targets with -1 where absent: (N,) or, multi-label, (N, K), class or
    finding names) of a predictions CSV. A row with a probability that is not a finite number in [0, 1]
    is malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions CSV")
    rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{path}: not a predictions CSV (expected a header with path and prob_<class> columns)")
    head = rows[0]
    multi = "findings" in head
    prob_cols = [i for i, h in enumerate(head) if h.startswith("prob_")]
    if len(prob_cols) < (1 if multi else 2):
        raise ValueError(f"{path}: needs one prob_<class> column per class (at least 2), found {len(prob_cols)}")
    classes = [head[i][len("prob_"):] for i in prob_cols]
    ip = head.index("path")
    target_cols = ([head.index(f"target_{c}") if f"target_{c}" in head else None for c in classes] if multi
                   else [head.index("target") if "target" in head else None])
    names, probs, targets = [], [], []
    for n, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        try:
            names.append(r[ip])
            row = [float(r[i]) for i in prob_cols]
            if not all(0.0 <= v <= 1.0 for v in row):  # NaN fails too
                raise ValueError(f"a probability is not a number in [0, 1]: {[r[i] for i in prob_cols]}")
            probs.append(row)
            cells = [r[i].strip() if i is not None else "" for i in target_cols]
            found = [int(c) if c != "" else -1 for c in cells]
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}, line {n}: malformed row ({e})") from None
        targets.append(found if multi else found[0])
    return names, np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64), classes
