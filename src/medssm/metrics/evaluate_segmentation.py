"""``medssm evaluate PRED REF``: per case and per structure (each class, or each region) Dice, IoU and
HD95, a CSV, a summary JSON, overlay PNGs and ``report.html`` (metrics, cases, and a viewer
of each case: :mod:`.html_report`).

What is scored comes from the labels: dataset.json's (``--labels``, default REF/../dataset.json) or
a run's, its classes or its nnU-Net regions; ``--regions REGIONS.json`` scores regions of any
label maps, so an integer-label model's predictions are scored the BraTS way too. Every check comes
before anything is written: a reference without prediction (unless ``--allow-missing``), a
prediction without reference, label values the labels do not declare, and another shape, spacing,
origin or direction than the reference's (unless ``--ignore-geometry``) are errors naming the file.

Example:
    medssm evaluate runs/lung/predictions ../shared/data/Dataset001_LungXray/labelsTr -o runs/lung/evaluation
    medssm evaluate preds labelsTr --regions regions.json     # {"whole tumour": [1, 2, 3], "tumour core": [2, 3], ...}
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from ..data.io import first_channel_files, images_beside, label_files
from ..files import atomic_path, read_json
from ..labels import LabelError, LabelSet
from .html_report import write_html_report
from .segmentation import case_metrics, summarize


@dataclasses.dataclass
class EvaluateConfig:
    """Score predicted label maps against reference label maps (matched by file name)."""

    pred: str = dataclasses.field(metadata={"positional": True, "help": "folder of predicted label maps"})
    ref: str = dataclasses.field(metadata={"positional": True, "help": "folder of reference label maps"})
    out: str | None = dataclasses.field(default=None, metadata={
        "flags": ("-o", "--out"), "help": "output folder (default: PRED_evaluation beside PRED)"})
    labels: str | None = dataclasses.field(default=None, metadata={
        "help": "dataset.json or a training run naming the labels, classes or regions (default: REF/../dataset.json, "
                "else the label values found)"})
    regions: str | None = dataclasses.field(default=None, metadata={
        "help": "a JSON of regions to score, {name: [label values], ...} (or a dataset.json with regions): label maps "
                "of any model are scored per region, the union of its labels"})
    cases: tuple[str, ...] | None = dataclasses.field(default=None, metadata={
        "help": "score only these cases (default: every reference)"})
    allow_missing: bool = dataclasses.field(default=False, metadata={
        "help": "score the references that have a prediction, warn about the others and count them in the summary "
                "(default: a reference without prediction is an error)"})
    ignore_geometry: bool = dataclasses.field(default=False, metadata={
        "help": "score a prediction whose spacing, origin or direction differ from its reference's"})
    images: str | None = dataclasses.field(default=None, metadata={
        "help": "folder of the images, for the overlays (default: beside REF, imagesTs for labelsTs, imagesTr "
                "for labelsTr)"})
    overlays: bool = dataclasses.field(default=True, metadata={"help": "write overlay PNGs"})
    max_overlays: int = dataclasses.field(default=0, metadata={"help": "at most this many overlays (0: all)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing evaluation"})
    html: bool = dataclasses.field(default=True, metadata={
        "help": "write report.html: the metrics, a sortable table of the cases and a viewer of each"})
    progress: bool = True


def read_labels(path: str | os.PathLike | None, ref: Path, regions: str | None = None) -> LabelSet | None:
    """What to score: ``regions`` (a JSON of ``{name: [values]}``, or a dataset.json with regions), else
    the labels of a dataset.json, a training run, or REF/../dataset.json; None when there is none."""
    from ..runs import load_run

    if regions:
        found = read_json(regions, "regions")
        declared = found.get("labels", found)
        return LabelSet.from_json({"background": 0, **declared}, found.get("regions_class_order"), str(regions),
                                  scoring=True)
    p = Path(path) if path else ref.parent / "dataset.json"
    if p.is_dir() and not (p / "dataset.json").is_file():
        plan = load_run(p).plan  # a training run (or one of its checkpoints)
        return plan.label_set
    if p.is_file() or p.is_dir():
        meta = read_json(p / "dataset.json" if p.is_dir() else p, "dataset description")
        if "labels" not in meta:
            raise ValueError(f"{p}: no 'labels' mapping in it")
        return LabelSet.from_json(meta["labels"], meta.get("regions_class_order"), str(p))
    if path:
        raise FileNotFoundError(f"{p}: not found")
    return None


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate every case of PRED against REF; returns the output folder. Nothing is written when a
    check fails (see the module docstring)."""
    from tqdm import tqdm

    from ..data.io import read_image

    pred_dir, ref_dir = Path(cfg.pred), Path(cfg.ref)
    out = Path(cfg.out) if cfg.out else pred_dir.with_name(pred_dir.name + "_evaluation")
    preds, refs = label_files(pred_dir), label_files(ref_dir)
    if cfg.cases:
        unknown = [c for c in cfg.cases if c not in refs]
        if unknown:
            raise FileNotFoundError(f"{ref_dir}: no reference for case(s) {', '.join(unknown[:10])} (--cases)")
        refs = {c: refs[c] for c in cfg.cases}
        preds = {c: p for c, p in preds.items() if c in refs}
    if not preds:
        raise FileNotFoundError(f"{pred_dir}: no predicted label maps in it" + (" for --cases" if cfg.cases else ""))
    without_ref = [c for c in preds if c not in refs]
    if without_ref:
        raise FileNotFoundError(f"{ref_dir}: no reference for {len(without_ref)} prediction(s): "
                                f"{', '.join(without_ref[:10])}")
    missing = [c for c in refs if c not in preds]
    if missing and not cfg.allow_missing:
        raise FileNotFoundError(f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference(s): "
                                f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
                                + "; predict them, choose the cases with --cases, or pass --allow-missing")
    if out.resolve() in (pred_dir.resolve(), ref_dir.resolve()):
        raise ValueError(f"{out}: the output folder must differ from the prediction and reference folders")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder (the evaluation's folder); choose another --out")
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'summary.json'} exists; pass --overwrite to replace it")
    try:
        labels = read_labels(cfg.labels, ref_dir, cfg.regions)
    except LabelError as e:
        raise ValueError(str(e)) from None
    if cfg.images and not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"{cfg.images}: not a folder (--images)")
    images = Path(cfg.images) if cfg.images else images_beside(ref_dir)
    image_files = first_channel_files(images) if cfg.overlays else {}
    cases = {}
    for case in tqdm(preds, desc="read and check", unit="case", disable=not cfg.progress, leave=False):
        cases[case] = check_pair(preds[case], refs[case], labels, cfg.ignore_geometry)
    if missing:
        print(f"warning: {len(missing)} of {len(refs)} reference(s) have no prediction and are not scored: "
              f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""), file=sys.stderr)

    rows, without_image, drawn, classes = [], [], 0, {}
    for case, (pred, ref, spacing) in tqdm(cases.items(), desc="evaluate", unit="case", disable=not cfg.progress):
        structures = labels.structures if labels else {f"label_{int(v)}": int(v) for v in np.unique(ref) if v > 0}
        classes.update(structures)
        for name, m in case_metrics(pred, ref, structures, spacing).items():
            rows.append({"case": case, "class": name, **{k: m[k] for k in ("dice", "iou", "hd95", "n_pred", "n_ref")}})
        if cfg.overlays and (cfg.max_overlays <= 0 or drawn < cfg.max_overlays):
            from .overlays import save_overlay

            image = read_image(image_files[case])[0].astype(np.float32) if case in image_files else None
            if image is not None and image.shape[-pred.ndim:] != pred.shape:
                image = None
            if image is None:
                without_image.append(case)
            drawn += 1
            dice = [r["dice"] for r in rows if r["case"] == case]
            save_overlay(out / "overlays" / f"{case}.png", image, ref, pred,
                         title=f"{case}  Dice {np.mean(dice):.3f}" if dice else case)

    if without_image:
        where = (f"in {images}" + ("" if images.is_dir() else " (no such folder)") if images
                 else f"(no images folder: {ref_dir.name} is not a labels* folder)")
        print(f"overlays: no image of the same shape for {len(without_image)} of {drawn} cases {where}; drawn "
              "without it (pass --images FOLDER)")
    summary = {**summarize(rows), "pred": str(pred_dir), "ref": str(ref_dir),
               "labels": labels.to_dict() if labels else None,
               "structures": "regions" if labels and labels.has_regions else "classes",
               "n_missing": len(missing), "missing": missing,
               "classes": classes, "images": str(images.resolve()) if images and images.is_dir() else None,
               "predictions": read_json(pred_dir / "predictions.json", "prediction record")
               if (pred_dir / "predictions.json").is_file() else None,
               "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "metrics": {"dice": "MONAI compute_dice", "iou": "MONAI compute_iou",
                           "hd95": "MONAI compute_hausdorff_distance(percentile=95), in the images' spacing units",
                           "empty": "absent from both: 1/1/0; absent from one: 0/0/NaN (NaN left out of means)"}}
    write_csv(out / "metrics.csv", rows)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(_json_safe(summary), indent=2))
    mean = summary["mean"]
    print(f"{len(cases)} cases: Dice {mean['dice']:.4f}  IoU {mean['iou']:.4f}  HD95 {mean['hd95']:.3f}"
          + (f" ({len(missing)} reference(s) without prediction not scored)" if missing else "") + f"  -> {out}")
    if cfg.html:
        print(f"report: {write_html_report(out)}")
    return out


def check_pair(pred_path: Path, ref_path: Path, labels: LabelSet | None, ignore_geometry: bool):
    """``(prediction, reference, spacing)`` of one case, read and checked: the same grid (shape always;
    spacing, origin and direction unless ``ignore_geometry``) and only declared label values."""
    from ..data.io import format_number, itk_axes, read_image

    pred, pred_geometry = read_image(pred_path)
    ref, ref_geometry = read_image(ref_path)
    if pred.shape != ref.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} {ref.shape}")
    differences = pred_geometry.differences(ref_geometry)
    if differences and not ignore_geometry:
        text = "; ".join(f"{what} {mine} differs from the reference's {theirs}" for what, mine, theirs in differences)
        raise ValueError(f"{pred_path}: {text} ({itk_axes(pred.ndim)}; reference {ref_path}); pass --ignore-geometry "
                         "to score it anyway")
    if labels is not None:
        for path, array in ((pred_path, pred), (ref_path, ref)):
            bad = sorted(set(np.unique(array).tolist()) - set(labels.values))
            if bad:
                raise ValueError(f"{path}: label values {', '.join(map(format_number, bad))} are not declared "
                                 f"(declared: {labels.values})")
    return pred, ref, ref_geometry.spacing


def write_csv(path: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["case"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def _json_safe(x):
    """NaN → None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
