"""``report.html``: one self-contained page per evaluation, comparison and quickstart, written from the
files of the folder it describes (never from a trainer's internals).

:func:`write_html_report` looks at what the folder holds and writes ``FOLDER/report.html``:

- a segmentation evaluation (``summary.json`` + ``metrics.csv`` of ``medssm evaluate``; a quickstart's
  ``report/`` is one, with ``timings.json``): the metric table per class, what was evaluated, when and
  with which run (``predictions.json`` of ``medssm predict``), the training curves of that run, a
  sortable, filterable table of the cases, and a viewer of each case: the image with the reference
  (outlined) and the prediction (filled) overlaid, 3D cases in axial, coronal and sagittal planes
  with a slice slider, drawn in the image's spacing;
- a classification evaluation (``metrics.json`` + ``cases.csv``): the metrics per class, the
  confusion matrix, ROC curves per class and a table of the samples;
- a comparison (``compare.json`` of ``medssm compare``): one row per model, the score chart, the
  validation score against training time, and the same case of every model side by side
  (segmentation) or each model's confusion matrix and ROC curves (classification).

The page works offline from the file system in any current browser: its script, style and data are
inline (the images as 8-bit volumes, deflated, decoded by the browser's ``DecompressionStream``);
nothing is fetched. Class and region names and the metrics per class are read from the files, never
assumed. The viewer and charts are the small script ``html_assets/report.js`` (no library).

Example:
    >>> write_html_report("runs/lung/eval")       # -> runs/lung/eval/report.html
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import json
import math
import os
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from ..files import atomic_path, read_json

__all__ = ["write_html_report", "render_page", "encode_volume", "labels_to_bits", "canonical_axes",
           "MAX_SIDE_2D", "MAX_SIDE_3D"]

# A case is shown at most this many pixels along an axis (larger ones are shown every n-th voxel,
# the spacing multiplied by n; the metrics are always computed at full resolution).
MAX_SIDE_2D = 1024
MAX_SIDE_3D = 256
MAX_CLASSES = 32  # overlay bits per voxel
ROC_POINTS = 400  # at most this many points of a ROC curve are drawn


# ----------------------------------------------------------------------------------------------
# Volumes for the viewer.


def canonical_axes(direction) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(order, flips)`` that bring an array (numpy order) to the closest canonical orientation:
    array axis ``i`` of ``array.transpose(order)`` runs along physical axis ``i`` (numpy order, LPS:
    z towards superior, y towards posterior, x towards the patient's left), flipped where ``flips[i]``.
    The identity when the direction matrix does not name one array axis per physical axis."""
    d = np.asarray(direction, dtype=float)
    n = len(d)
    order = [int(np.argmax(np.abs(d[i]))) for i in range(n)]  # the array axis closest to physical axis i
    if sorted(order) != list(range(n)):
        return tuple(range(n)), (False,) * n
    return tuple(order), tuple(bool(d[i, order[i]] < 0) for i in range(n))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Stretched to its 0.5..99.5 percentiles (all channels together), in 0..255."""
    image = image.astype(np.float32)
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    out = np.clip((np.nan_to_num(image, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.rint(out).astype(np.uint8)


def _med_residuals(slices: np.ndarray) -> np.ndarray:
    """The residuals of the median edge detector of LOCO-I / JPEG-LS along the last two axes (what
    deflate then compresses best); report.js inverts it. 0 stands for a neighbour outside the slice."""
    a = slices.astype(np.int16)
    left, up, upleft = np.zeros_like(a), np.zeros_like(a), np.zeros_like(a)
    left[..., :, 1:], up[..., 1:, :], upleft[..., 1:, 1:] = a[..., :, :-1], a[..., :-1, :], a[..., :-1, :-1]
    lo, hi = np.minimum(left, up), np.maximum(left, up)
    guess = np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))
    return ((a - guess) & 255).astype(np.uint8)


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)).decode("ascii")


def labels_to_bits(labels: np.ndarray, classes: list[tuple[str, int | list[int]]]) -> np.ndarray:
    """One bit per class (or region) per voxel: bit ``k`` is set where the label map holds the value
    (or one of the values) of ``classes[k]``. Regions may overlap; so may the bits."""
    dtype = np.uint8 if len(classes) <= 8 else np.uint16 if len(classes) <= 16 else np.uint32
    bits = np.zeros(labels.shape, dtype)
    for k, (_, values) in enumerate(classes[:MAX_CLASSES]):
        bits |= np.isin(labels, np.atleast_1d(values)).astype(dtype) << dtype(k)
    return bits


def encode_volume(image: np.ndarray | None, spacing, direction, labels: dict[str, np.ndarray],
                  classes: list[tuple[str, int | list[int]]]) -> dict:
    """What the viewer shows of one case: the image (grey ``(*S)``, or ``(C, *S)`` of which a 2D RGB
    one is shown in colour and any other by its first channel) as 8-bit slices, and each label map
    (reference, predictions) as class bits; 3D cases in the closest canonical orientation; at most
    ``MAX_SIDE_*`` voxels along an axis. Everything deflated and base64-encoded."""
    first = next(iter(labels.values()))
    dims = first.ndim
    if dims not in (2, 3):
        raise ValueError(f"the viewer shows 2D and 3D label maps, got shape {first.shape}")
    channels = 1
    if image is not None:
        image = np.asarray(image)
        if image.ndim == dims + 1:
            colour = dims == 2 and image.shape[0] in (3, 4)
            image, channels = (image[:3], 3) if colour else (image[0], 1)
        if image.shape[-dims:] != first.shape:
            image, channels = None, 1
    spacing = [float(s) for s in spacing]
    order, flips = (0, 1, 2), (False, False, False)
    if dims == 3:
        order, flips = canonical_axes(direction)

        def orient(a):  # spatial axes are the last three
            lead = a.ndim - 3
            a = a.transpose(*range(lead), *(lead + o for o in order))
            return a[(Ellipsis, *(slice(None, None, -1) if f else slice(None) for f in flips))]

        spacing = [spacing[o] for o in order]
    else:
        def orient(a):
            return a[..., None, :, :]  # one slice: (1, H, W)

        spacing = [1.0, *spacing]
    stride = max(1, math.ceil(max(first.shape) / (MAX_SIDE_3D if dims == 3 else MAX_SIDE_2D)))
    cut = (Ellipsis, *(slice(None, None, stride),) * dims)
    labels = {k: orient(np.asarray(v)[cut]) for k, v in labels.items()}
    shape = list(next(iter(labels.values())).shape)
    spacing = [spacing[0] * (stride if dims == 3 else 1), spacing[1] * stride, spacing[2] * stride]
    bits = {k: labels_to_bits(v, classes) for k, v in labels.items()}
    fg = np.argwhere(next(iter(bits.values())) > 0)
    centre = ((fg.min(0) + fg.max(0)) // 2) if len(fg) else np.array(shape) // 2
    out = {"dims": dims, "shape": shape, "spacing": spacing, "stride": stride, "centre": [int(c) for c in centre],
           "order": list(order), "flips": list(flips), "file_shape": list(first.shape), "channels": channels,
           "bits": str(next(iter(bits.values())).dtype), "image": None,
           "labels": {k: _pack(v) for k, v in bits.items()}}
    if image is not None:
        pixels = orient(_to_uint8(image[cut]))  # (Z, Y, X) or (3, 1, H, W)
        out["image"] = _pack(_med_residuals(pixels))
    return out


# ----------------------------------------------------------------------------------------------
# Reading the folders.


def _number(text):
    if text is None or text == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return text
    return None if math.isnan(v) else v


def _clean(x):
    """NaN and infinities -> None; numpy numbers -> Python ones (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _number(v) if k not in ("case", "class", "path", "label_name") else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def _when(path: Path, recorded: str | None = None) -> str:
    if recorded:
        return recorded
    return _dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")


def _run_of(summary: dict):
    """The training run that made the predictions, as ``predict`` recorded it; None when unknown or gone."""
    from ..runs import load_run

    source = summary.get("predictions") or {}
    if not source.get("run"):
        return None
    try:
        return load_run(source["run"])
    except (FileNotFoundError, ValueError):
        return None


def _training_charts(log: list[dict]) -> list[dict]:
    """Every numeric column of a training log against the epoch: losses in one chart, the rest
    (validation scores) in another, as the run's curves.png draws them."""
    numeric = [k for k in dict.fromkeys(k for r in log for k in r)
               if k != "epoch" and all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in log)
               and any(isinstance(r.get(k), (int, float)) for r in log)]
    numeric = [c for c in numeric if not any(w in c for w in ("lr", "time", "step", "nonfinite"))]
    charts = []
    for title, cols in (("loss", [c for c in numeric if "loss" in c]),
                        ("validation", [c for c in numeric if "loss" not in c])):
        series = [{"name": c, "points": [[r["epoch"], r[c]] for r in log if isinstance(r.get(c), (int, float))
                                         and math.isfinite(r[c]) and "epoch" in r]} for c in cols]
        series = [s for s in series if s["points"]]
        if series:
            charts.append({"title": title, "kind": "line", "x": "epoch", "y": title, "series": series})
    return charts


def _run_facts(run, source: dict) -> list[list]:
    facts = [["run", str(run.path) if run else source.get("run", "unknown")]]
    if run is not None:
        recipe = run.description.get("recipe") or {}
        facts += [["model", run.model_name], ["checkpoint", source.get("checkpoint", "best")]]
        if recipe:
            facts.append(["recipe", recipe.get("source") or recipe.get("name") or ""])
    if "mirror" in source:
        facts.append(["mirrored prediction", "yes" if source["mirror"] else "no"])
    if source.get("created"):
        facts.append(["predicted", source["created"]])
    return facts


def _classes_of(summary: dict, rows: list[dict]) -> list[tuple[str, int | list[int]]]:
    """(name, label value or values) of every class or region evaluated, in the evaluation's order."""
    recorded = summary.get("classes") or summary.get("labels") or {}
    names = list(dict.fromkeys(r["class"] for r in rows))
    out = []
    for name in names:
        if name in recorded:
            out.append((name, recorded[name]))
        elif name.startswith("label_") and name[len("label_"):].isdigit():
            out.append((name, int(name[len("label_"):])))
    return out


def _files_section(folder: Path, extra: list[tuple[str, str]] = ()) -> dict:
    """Links to what else the folder holds (relative: opening one is the reader's click, not a fetch)."""
    items = [[name, name] for name in ("report.md", "summary.json", "metrics.csv", "metrics.json", "cases.csv",
                                       "compare.json", "timings.json", "log.csv", "curves.png", "scores.png",
                                       "confusion_matrix.png", "roc.png") if (folder / name).is_file()]
    if (folder / "overlays").is_dir():
        items.append(["overlays/ (one PNG per case)", "overlays/"])
    return {"type": "links", "title": "Files", "items": items + [list(e) for e in extra]}


def _segmentation_cases(folder: Path) -> tuple[dict, list[dict], list, dict]:
    """(summary, metric rows, classes, files) of a segmentation evaluation folder."""
    from ..data.io import first_channel_files, label_files

    summary = read_json(folder / "summary.json", "evaluation summary")
    rows = _read_csv(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else []
    classes = _classes_of(summary, rows)

    def files(key, finder):
        p = summary.get(key)
        return finder(Path(p)) if p and Path(p).is_dir() else {}

    return summary, rows, classes, {"pred": files("pred", label_files), "ref": files("ref", label_files),
                                    "images": files("images", first_channel_files)}


def _read_case(case: str, files: dict, predictions: dict[str, dict], classes) -> tuple[dict | None, float]:
    """The viewer's volume of one case and the volume of one voxel (1.0 when the reference is missing)."""
    from ..data.io import read_image

    if case not in files["ref"]:
        return None, 1.0
    ref, geometry = read_image(files["ref"][case])
    labels = {"reference": ref}
    for name, pred_files in predictions.items():
        if case in pred_files:
            pred = read_image(pred_files[case])[0]
            if pred.shape == ref.shape:
                labels[name] = pred
    image = read_image(files["images"][case])[0] if case in files["images"] else None
    volume = encode_volume(image, geometry.spacing, geometry.direction, labels, classes)
    return volume, float(np.prod(geometry.spacing))


def _metric_table(summary: dict) -> dict:
    per_class = summary.get("per_class", {})
    keys = [k for k in ("dice", "iou", "hd95") if k in summary.get("mean", {})]
    names = {"dice": "Dice", "iou": "IoU", "hd95": "HD95"}
    columns = [{"label": "class"}, *[{"label": names[k], "digits": 3 if k == "hd95" else 4} for k in keys],
               {"label": "cases", "digits": 0}, {"label": "HD95 undefined", "digits": 0}]
    rows = [[name, *[m.get(k) for k in keys], m.get("n_cases"), m.get("n_hd95_undefined")]
            for name, m in per_class.items()]
    rows.append(["mean", *[summary["mean"].get(k) for k in keys], summary.get("n_cases"), None])
    return {"type": "table", "id": "metrics", "title": "Metrics", "columns": columns, "rows": rows, "half": True,
            "note": "Mean over cases per class; the last row is the mean over classes. HD95 in the images' "
                    "spacing units (mm for NIfTI, pixels for PNG); NaN values (a structure absent from one "
                    "side) are left out of the means and counted."}


def _case_rows(rows: list[dict], classes, voxel: dict[str, float], prefix: str = "") -> tuple[list[dict], list[dict]]:
    """Columns and one row per case: mean Dice, then Dice, IoU, HD95 and volumes per class."""
    several = len(classes) > 1
    columns = [{"key": "case", "label": "case"}, {"key": prefix + "dice", "label": "Dice (mean)", "digits": 4}]
    for name, _ in classes:
        label = (lambda m: f"{m} {name}") if several else (lambda m: m)
        columns += [{"key": f"{prefix}dice:{name}", "label": label("Dice"), "digits": 4, "hidden": not several},
                    {"key": f"{prefix}iou:{name}", "label": label("IoU"), "digits": 4},
                    {"key": f"{prefix}hd95:{name}", "label": label("HD95"), "digits": 2},
                    {"key": f"{prefix}vref:{name}", "label": label("ref vol"), "digits": 0,
                     "note": "reference volume: voxels x voxel volume (spacing units)"},
                    {"key": f"{prefix}vpred:{name}", "label": label("pred vol"), "digits": 0},
                    {"key": f"{prefix}dv:{name}", "label": label("Δvol %"), "digits": 1,
                     "note": "(prediction - reference) / reference volume"}]
    columns = [c for c in columns if not c.get("hidden")]
    by_case: dict[str, dict] = {}
    for r in rows:
        row = by_case.setdefault(r["case"], {"case": r["case"]})
        name, v = r["class"], voxel.get(r["case"], 1.0)
        row[f"{prefix}dice:{name}"], row[f"{prefix}iou:{name}"], row[f"{prefix}hd95:{name}"] = \
            r.get("dice"), r.get("iou"), r.get("hd95")
        if r.get("n_ref") is not None:
            row[f"{prefix}vref:{name}"] = r["n_ref"] * v
            row[f"{prefix}vpred:{name}"] = r["n_pred"] * v
            row[f"{prefix}dv:{name}"] = 100 * (r["n_pred"] - r["n_ref"]) / r["n_ref"] if r["n_ref"] else None
    for row in by_case.values():
        dice = [row.get(f"{prefix}dice:{n}") for n, _ in classes]
        dice = [d for d in dice if d is not None]
        row[prefix + "dice"] = float(np.mean(dice)) if dice else None
    return columns, list(by_case.values())


def _segmentation_page(folder: Path) -> tuple[str, list[dict], dict]:
    summary, rows, classes, files = _segmentation_cases(folder)
    source = summary.get("predictions") or {}
    run = _run_of(summary)
    volumes, voxel = {}, {}
    for case in dict.fromkeys(r["case"] for r in rows):
        volume, voxel[case] = _read_case(case, files, {"prediction": files["pred"]}, classes)
        if volume is not None:
            volumes[case] = volume
    what = [["predictions", summary.get("pred", "")], ["references", summary.get("ref", "")],
            ["images", summary.get("images") or "none (overlays drawn on black)"],
            ["cases", summary.get("n_cases")],
            ["regions" if summary.get("structures") == "regions" or summary.get("regions") else "classes",
             ", ".join(n for n, _ in classes)],
            ["evaluated", _when(folder / "summary.json", summary.get("created"))]]
    sections = [_metric_table(summary),
                {"type": "facts", "title": "What was evaluated", "items": what + _run_facts(run, source),
                 "half": True}]
    columns, case_rows = _case_rows(rows, classes, voxel)
    sections.append({"type": "cases", "id": "cases", "title": "Cases", "columns": columns, "rows": case_rows,
                     "sort": "dice", "viewer": {"panels": ["prediction"], "classes": _class_styles(classes)},
                     "note": "Click a column to sort, a case to view it: the reference outlined, the prediction "
                             "filled. 3D: scroll on a plane or move its slider to change the slice, click a "
                             "plane to move the other two there."})
    timings = folder / "timings.json"
    log = run.log if run is not None else (_read_csv(folder / "log.csv") if (folder / "log.csv").is_file() else [])
    charts = _training_charts(log)
    if charts:
        sections.append({"type": "charts", "id": "training", "title": "Training", "charts": charts,
                         "note": f"The run's log.csv ({len(log)} epochs); hover for the values."})
    if timings.is_file():
        t = read_json(timings, "timings")
        items = [[k[:-2].replace("_", " "), f"{v / 60:.1f} min"] for k, v in t.items()
                 if k.endswith("_s") and isinstance(v, (int, float))]
        if isinstance(t.get("expected_min"), (int, float)):
            items.append(["expected beforehand", f"{t['expected_min']:.1f} min"])
        sections.append({"type": "facts", "id": "time", "title": "Time", "items": items})
    sections.append(_files_section(folder))
    title = "medssm quickstart" if timings.is_file() else "medssm evaluate"
    mean = summary.get("mean", {}).get("dice")
    subtitle = f"{summary.get('n_cases')} cases" + (f", mean Dice {mean:.4f}" if isinstance(mean, float) else "")
    return f"{title}: {subtitle}", sections, volumes


def _class_styles(classes) -> list[dict]:
    from .overlays import COLOURS

    return [{"name": n, "colour": "#%02x%02x%02x" % tuple(int(c) for c in COLOURS[k % len(COLOURS)])}
            for k, (n, _) in enumerate(classes[:MAX_CLASSES])]


# ----------------------------------------------------------------------------------------------
# Classification.


def _roc_series(targets: np.ndarray, probs: np.ndarray, classes: list[str], name=None) -> list[dict]:
    """The chart series of :func:`medssm.metrics.classification.roc_curves`, each thinned to ``ROC_POINTS``."""
    from .classification import roc_curves

    series = []
    for i, fpr, tpr, auc in roc_curves(targets, probs):
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
        series.append({"name": f"{name or classes[i]} (AUC {auc:.3f})", "class": classes[i],
                       "points": [[round(float(fpr[j]), 5), round(float(tpr[j]), 5)] for j in keep]})
    return series


def _roc_chart(title: str, series: list[dict]) -> dict:
    return {"title": title, "kind": "line", "x": "false-positive rate (1 - specificity)",
            "y": "true-positive rate (sensitivity)", "series": series, "diagonal": True, "square": True,
            "xmin": 0, "xmax": 1, "ymin": 0, "ymax": 1}


def _read_scored(folder: Path):
    from .classification import read_predictions

    path = folder / "cases.csv"
    return read_predictions(path) if path.is_file() else None


def _classification_page(folder: Path) -> tuple[str, list[dict], dict]:
    m = read_json(folder / "metrics.json", "classification metrics")
    averages = [k for k in ("acc", "auc", "f1", "precision", "sensitivity", "specificity", "balanced_acc")
                if isinstance(m.get(k), (int, float))]
    sections = [{"type": "table", "id": "metrics", "title": "Metrics",
                 "columns": [{"label": k.replace("_", " ").upper() if len(k) <= 3 else k.replace("_", " "),
                              "digits": 4} for k in averages] + [{"label": "samples", "digits": 0}],
                 "rows": [[m[k] for k in averages] + [m.get("n")]], "half": True,
                 "note": "Averages over classes (macro), in the MedMNIST v2 convention."}]
    per_class = m.get("per_class") or []
    if per_class:
        keys = [k for k in dict.fromkeys(k for c in per_class for k in c) if k != "class"]
        sections.append({"type": "table", "id": "per-class", "title": "Per class",
                         "columns": [{"label": "class"}] + [{"label": k, "digits": 0 if k == "support" else 4}
                                                             for k in keys],
                         "rows": [[c.get("class")] + [c.get(k) for k in keys] for c in per_class]})
    classes = [c["class"] for c in per_class] or [str(i) for i in range(len(m.get("confusion_matrix", [])))]
    what = [["predictions", m.get("predictions", "")], ["reference", m.get("reference") or "the CSV's target column"],
            ["samples", m.get("n")], ["classes", ", ".join(classes)],
            ["evaluated", _when(folder / "metrics.json", m.get("created"))]]
    sections.insert(1, {"type": "facts", "title": "What was evaluated", "items": what, "half": True})
    if m.get("confusion_matrix"):
        sections.append({"type": "confusion", "id": "confusion", "title": "Confusion matrix",
                         "matrices": [{"title": "", "classes": classes, "matrix": m["confusion_matrix"]}]})
    scored = _read_scored(folder)
    if scored is not None:
        names, probs, targets, cls = scored
        series = _roc_series(targets, probs, cls)
        if series:
            sections.append({"type": "charts", "id": "roc", "title": "ROC",
                             "charts": [_roc_chart(f"ROC ({cls[1]})" if len(cls) == 2 and targets.ndim == 1
                                                   else "ROC per finding" if targets.ndim == 2 else "ROC per class",
                                                   series)]})
        sections.append(_samples_section(names, targets, cls, {"": probs}))
    sections.append(_files_section(folder))
    return f"medssm evaluate: {m.get('n')} samples, ACC {m.get('acc', float('nan')):.4f}, AUC " \
           f"{m.get('auc', float('nan')):.4f}", sections, {}


def _samples_section(names, targets, classes, probs_by_model: dict[str, np.ndarray]) -> dict:
    from .classification import predict_labels

    if targets.ndim == 2:  # multi-label: the findings present, those predicted (over 0.5), each probability
        columns = [{"key": "path", "label": "sample"}, {"key": "target", "label": "findings"}]
        rows = [{"path": n, "target": "; ".join(c for c, t in zip(classes, row) if t == 1)}
                for n, row in zip(names, targets)]
        for model, probs in probs_by_model.items():
            head = f"{model} " if model else ""
            columns.append({"key": f"{model}:pred", "label": f"{head}predicted"})
            columns += [{"key": f"{model}:p:{c}", "label": f"{head}p({c})", "digits": 4} for c in classes]
            for i, row in enumerate(rows):
                row[f"{model}:pred"] = "; ".join(c for c, v in zip(classes, probs[i]) if v > 0.5)
                row.update({f"{model}:p:{c}": float(probs[i, k]) for k, c in enumerate(classes)})
        return {"type": "cases", "id": "cases", "title": "Samples", "columns": columns, "rows": rows,
                "sort": "path", "viewer": None, "note": "Click a column to sort."}

    columns = [{"key": "path", "label": "sample"}, {"key": "target", "label": "true class"}]
    rows = [{"path": n, "target": classes[t] if 0 <= t < len(classes) else ""} for n, t in zip(names, targets)]
    for model, probs in probs_by_model.items():
        pred = predict_labels(probs)
        head = f"{model} " if model else ""
        columns += [{"key": f"{model}:pred", "label": f"{head}predicted"},
                    {"key": f"{model}:ptrue", "label": f"{head}p(true class)", "digits": 4}]
        if not model:
            columns += [{"key": f"p:{c}", "label": f"p({c})", "digits": 4} for c in classes]
        for i, row in enumerate(rows):
            row[f"{model}:pred"] = classes[pred[i]]
            row[f"{model}:ptrue"] = float(probs[i, targets[i]]) if 0 <= targets[i] < len(classes) else None
            if not model:
                row.update({f"p:{c}": float(probs[i, k]) for k, c in enumerate(classes)})
    return {"type": "cases", "id": "cases", "title": "Samples", "columns": columns, "rows": rows,
            "sort": columns[3]["key"], "viewer": None,
            "note": "Click a column to sort; the lowest probabilities of the true class first are the worst errors."}


# ----------------------------------------------------------------------------------------------
# A comparison.


def _compare_page(folder: Path) -> tuple[str, list[dict], dict]:
    from ..budget import BudgetPlan

    c = read_json(folder / "compare.json", "comparison")
    task, cfg, results = c.get("task"), c.get("config", {}), c.get("results", [])
    done = [r for r in results if r.get("status") == "complete"]
    metric = ("dice", "iou", "hd95") if task == "segmentation" else ("acc", "auc", "f1")
    sets = [s for s in ("held_out", "test") if any(s in r.get("scores", {}) for r in done)]
    columns = [{"label": "model"}] + [{"label": f"{s.replace('_', '-')} {m.upper() if m != 'dice' else 'Dice'}",
                                       "digits": 3 if m == "hd95" else 4} for s in sets for m in metric]
    columns += [{"label": label, "digits": digits} for label, digits in (
        ("train (min)", 1), ("steps", 0), ("epochs", 0), ("samples", 0), ("parameters", 0), ("GMACs", 2),
        ("step (s)", 3), ("batch", 0), ("peak fwd (MiB)", 0))] + [{"label": "status"}]
    rows = []
    for r in results:
        name = r["model"] + (f" (ablation of {r['ablation_of']})" if r.get("ablation_of") else "")
        if r.get("status") != "complete":
            rows.append([name] + [None] * (len(columns) - 2) + [f"not run: {r.get('reason', '')}"])
            continue
        cost, budget = r.get("cost", {}), BudgetPlan.from_dict(r["budget"]) if r.get("budget") else None
        rows.append([name] + [r["scores"].get(s, {}).get(m) for s in sets for m in metric]
                    + [r.get("train_s", 0) / 60, budget.steps if budget else None, budget.epochs if budget else None,
                       budget.samples if budget else None, cost.get("parameters"), cost.get("gmacs"),
                       cost.get("step_s"), cost.get("batch_size"), cost.get("peak_forward_mib"), "complete"])
    score = "dice" if task == "segmentation" else "auc"
    sections = [{"type": "table", "id": "models", "title": "Models", "columns": columns, "rows": rows,
                 "note": "Every model had the same data, split, pipeline and wall-clock budget on this machine; "
                         "samples is how many training samples that bought it; a step is what one took late in "
                         "training. Click a column to sort."},
                {"type": "facts", "title": "What was compared",
                 "items": [["data", cfg.get("data", "")], ["task", task], ["budget per model", cfg.get("budget")],
                           ["recipe", cfg.get("recipe") or "each model its own"]]
                          + ([["held-out fold", cfg.get("fold")]] if task == "segmentation" else [])
                          + [["compared", _when(folder / "compare.json", c.get("created"))]]}]
    label = "Dice" if score == "dice" else "AUC"
    charts = [{"title": f"held-out {label}" + (" and test" if "test" in sets else ""), "kind": "bar",
               "x": "model", "y": label, "categories": [r["model"] for r in done],
               "series": [{"name": s.replace("_", "-"), "values": [r["scores"].get(s, {}).get(score) for r in done]}
                          for s in sets]},
              {"title": f"validation {label} against training time", "kind": "line",
               "x": "training time (min, this machine)", "y": f"validation {label}",
               "series": [{"name": r["model"], "points": r.get("curve") or []} for r in done if r.get("curve")]},
              {"title": f"held-out {label} and training time", "kind": "scatter",
               "x": "training time (min)", "y": f"held-out {label}",
               "series": [{"name": r["model"],
                           "points": [[r.get("train_s", 0) / 60, r["scores"]["held_out"].get(score)]]}
                          for r in done if r["scores"].get("held_out", {}).get(score) is not None]}]
    sections.append({"type": "charts", "id": "charts", "title": "Scores and time", "charts": charts})
    volumes = {}
    if task == "segmentation" and done:
        section, volumes = _compare_cases(folder, done)
        if section:
            sections.append(section)
    elif done:
        sections += _compare_classification(folder, done)
    pages = {r["model"]: f"models/{r['model'].replace(':', '_')}/evaluation_held_out/report.html" for r in done}
    links = [(f"{model}: its evaluation page", page) for model, page in pages.items() if (folder / page).is_file()]
    sections.append(_files_section(folder, links))
    best = max(done, key=lambda r: r["scores"].get("held_out", {}).get(score) or -1, default=None)
    sub = f"{len(done)} models" + (f", best held-out {label} {best['model']}" if best else "")
    return f"medssm compare: {sub}", sections, volumes


def _compare_cases(folder: Path, done: list[dict]) -> tuple[dict | None, dict]:
    """The held-out cases of every model: one row per case, each model's Dice; the viewer shows the
    case's image and reference once and each model's prediction beside the others."""
    evaluations = {r["model"]: folder / "models" / r["model"].replace(":", "_") / "evaluation_held_out" for r in done}
    evaluations = {m: e for m, e in evaluations.items() if (e / "summary.json").is_file()}
    if not evaluations:
        return None, {}
    loaded = {m: _segmentation_cases(e) for m, e in evaluations.items()}
    first = next(iter(loaded.values()))
    summary, rows, classes, files = first
    predictions = {m: f["pred"] for m, (_, _, _, f) in loaded.items()}
    columns, table = [{"key": "case", "label": "case"}], {}
    for m, (_, m_rows, _, _) in loaded.items():
        columns.append({"key": f"{m}:dice", "label": f"{m} Dice", "digits": 4})
        for row in _case_rows(m_rows, classes, {}, prefix=f"{m}:")[1]:
            table.setdefault(row["case"], {"case": row["case"]})[f"{m}:dice"] = row[f"{m}:dice"]
    for row in table.values():
        scores = [row.get(f"{m}:dice") for m in loaded if row.get(f"{m}:dice") is not None]
        row["spread"] = max(scores) - min(scores) if scores else None
    columns.append({"key": "spread", "label": "spread (max - min)", "digits": 4,
                    "note": "how much the models disagree on this case"})
    volumes = {}
    for case in table:
        volume, _ = _read_case(case, files, predictions, classes)
        if volume is not None:
            volumes[case] = volume
    return {"type": "cases", "id": "cases", "title": "Held-out cases, model by model", "columns": columns,
            "rows": list(table.values()), "sort": columns[1]["key"],
            "viewer": {"panels": list(loaded), "classes": _class_styles(classes)},
            "note": "Click a case to see every model's prediction of it side by side (filled; the reference "
                    "outlined), at the same slice."}, volumes


def _compare_classification(folder: Path, done: list[dict]) -> list[dict]:
    matrices, scored = [], {}
    for r in done:
        e = folder / "models" / r["model"].replace(":", "_") / "evaluation_held_out"
        if (e / "metrics.json").is_file():
            m = read_json(e / "metrics.json", "classification metrics")
            classes = [c["class"] for c in m.get("per_class", [])]
            matrices.append({"title": r["model"], "classes": classes, "matrix": m.get("confusion_matrix", [])})
        s = _read_scored(e)
        if s is not None:
            scored[r["model"]] = s
    sections = []
    if matrices:
        sections.append({"type": "confusion", "id": "confusion", "title": "Confusion matrices (held-out)",
                         "matrices": matrices})
    if scored:
        names, _, targets, classes = next(iter(scored.values()))
        one = len(classes) == 2 and targets.ndim == 1  # one positive class
        by_class: dict[str, list] = {}
        for model, (_, probs, t, cls) in scored.items():
            for s in _roc_series(t, probs, cls, name=model):
                by_class.setdefault(s["class"], []).append(s)
        sections.append({"type": "charts", "id": "roc", "title": "ROC per class (held-out)",
                         "charts": [_roc_chart(f"ROC: {c}" + (" (positive class)" if one else "" if targets.ndim == 2
                                                              else " vs rest"), s) for c, s in by_class.items()]})
        same = all(len(p) == len(names) and t.tolist() == targets.tolist() for _, p, t, _ in scored.values())
        if same:
            sections.append(_samples_section(names, targets, classes, {m: p for m, (_, p, _, _) in scored.items()}))
    return sections


# ----------------------------------------------------------------------------------------------
# The page.


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("html_assets", name).read_text(encoding="utf-8")


def _script_json(data) -> str:
    """JSON safe inside a <script> element."""
    text = json.dumps(_clean(data), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(title: str, sections: list[dict], volumes: dict | None = None) -> str:
    """The HTML of one page: ``sections`` (see report.js for their types) and the viewer's volumes."""
    from html import escape

    from .. import __version__

    data = {"title": title, "sections": sections, "volumes": volumes or {},
            "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "generator": f"medssm {__version__}"}
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            # Nothing may be fetched: no connection, no frame, no form leaves the file.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src data: blob:; connect-src data: blob:\">\n"
            f"<title>{escape(title)}</title>\n<style>\n{_asset('report.css')}</style>\n</head>\n<body>\n"
            f"<noscript>This report draws its tables, charts and viewer with JavaScript.</noscript>\n"
            f"<script id=\"medssm-data\" type=\"application/json\">{_script_json(data)}</script>\n"
            f"<script>\n{_asset('report.js')}</script>\n</body>\n</html>\n")


def write_html_report(folder: str | os.PathLike) -> Path:
    """Write ``FOLDER/report.html`` for the comparison, segmentation evaluation (a quickstart's report
    folder included) or classification evaluation in ``folder``; returns its path."""
    folder = Path(folder)
    if (folder / "compare.json").is_file():
        title, sections, volumes = _compare_page(folder)
    elif (folder / "summary.json").is_file():
        title, sections, volumes = _segmentation_page(folder)
    elif (folder / "metrics.json").is_file():
        title, sections, volumes = _classification_page(folder)
    else:
        raise FileNotFoundError(f"{folder}: no compare.json, summary.json or metrics.json to report on")
    path = folder / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(render_page(title, sections, volumes), encoding="utf-8")
    return path
