"""``medssm evaluate PRED REF``: per case and per class Dice, IoU and HD95, a CSV, a summary JSON,
overlay PNGs and ``report.html`` (metrics, cases, and a viewer of each case: :mod:`.html_report`).

Example:
    medssm evaluate runs/lung/predictions ../shared/data/Dataset001_LungXray/labelsTr -o runs/lung/evaluation
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from ..files import atomic_path, read_json
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
        "help": "dataset.json or a training run naming the labels (default: REF/../dataset.json, "
                "else the label values found)"})
    images: str | None = dataclasses.field(default=None, metadata={
        "help": "folder of the images, for the overlays (default: beside REF, imagesTs for labelsTs, imagesTr "
                "for labelsTr)"})
    overlays: bool = dataclasses.field(default=True, metadata={"help": "write overlay PNGs"})
    max_overlays: int = dataclasses.field(default=0, metadata={"help": "at most this many overlays (0: all)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing evaluation"})
    html: bool = dataclasses.field(default=True, metadata={
        "help": "write report.html: the metrics, a sortable table of the cases and a viewer of each"})
    progress: bool = True


def label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{case: path}`` for every image file in ``folder`` (case = file name without its ending)."""
    from ..data.io import ImageFileError, file_ending

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            try:
                out[p.name[: -len(file_ending(p))]] = p
            except ImageFileError:
                continue
    return out


def read_label_names(path: str | os.PathLike | None, ref: Path) -> dict[str, int] | None:
    """Label names (``labels``) from a dataset.json, a training run, or REF/../dataset.json."""
    from ..runs import load_run

    p = Path(path) if path else ref.parent / "dataset.json"
    if p.is_dir() and not (p / "dataset.json").is_file():
        labels = load_run(p).description.get("labels")  # a training run (or one of its checkpoints)
    elif p.is_file() or p.is_dir():
        labels = read_json(p / "dataset.json" if p.is_dir() else p, "dataset description").get("labels")
    elif path:
        raise FileNotFoundError(f"{p}: not found")
    else:
        return None
    if isinstance(labels, dict):
        return {str(k): int(v) for k, v in labels.items() if k != "ignore"}
    if path:
        raise ValueError(f"{p}: no 'labels' mapping in it")
    return None


def images_beside(ref: Path) -> Path | None:
    """The image folder of a label folder: ``imagesTs`` beside ``labelsTs``, ``imagesTr`` beside
    ``labelsTr`` (any ``labelsXx``); None for another name."""
    return ref.parent / ("images" + ref.name[len("labels"):]) if ref.name.startswith("labels") else None


def first_channel_files(folder: Path | None) -> dict[str, Path]:
    """``{case: image}`` of an image folder: ``{case}_0000{ending}`` (an nnU-Net channel file) or
    ``{case}{ending}``; empty when there is no folder."""
    if folder is None or not folder.is_dir():
        return {}
    files = label_files(folder)
    plain = {name: path for name, path in files.items() if not name.endswith("_0000")}
    return {**plain, **{name[: -len("_0000")]: path for name, path in files.items() if name.endswith("_0000")}}


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate every case of PRED against REF; returns the output folder. Nothing is written when a
    prediction has no reference or a different shape (the error names the file)."""
    from tqdm import tqdm

    from ..data.io import read_image

    pred_dir, ref_dir = Path(cfg.pred), Path(cfg.ref)
    out = Path(cfg.out) if cfg.out else pred_dir.with_name(pred_dir.name + "_evaluation")
    preds, refs = label_files(pred_dir), label_files(ref_dir)
    if not preds:
        raise FileNotFoundError(f"{pred_dir}: no predicted label maps in it")
    missing = [c for c in preds if c not in refs]
    if missing:
        raise FileNotFoundError(f"{ref_dir}: no reference for {len(missing)} prediction(s): {', '.join(missing[:10])}")
    if out.resolve() in (pred_dir.resolve(), ref_dir.resolve()):
        raise ValueError(f"{out}: the output folder must differ from the prediction and reference folders")
    if (out / "summary.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'summary.json'} exists; pass --overwrite to replace it")
    labels = read_label_names(cfg.labels, ref_dir)
    if cfg.images and not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"{cfg.images}: not a folder (--images)")
    images = Path(cfg.images) if cfg.images else images_beside(ref_dir)
    image_files = first_channel_files(images) if cfg.overlays else {}
    without_image, drawn = [], 0

    rows, classes = [], {}
    for case in tqdm(preds, desc="evaluate", unit="case", disable=not cfg.progress):
        pred, pred_geometry = read_image(preds[case])
        ref, ref_geometry = read_image(refs[case])
        if pred.shape != ref.shape:
            raise ValueError(f"{preds[case]}: shape {pred.shape} differs from the reference {refs[case]} {ref.shape}")
        case_labels = labels or {f"label_{int(v)}": int(v) for v in np.unique(ref) if v > 0}
        classes.update({name: v for name, v in case_labels.items() if int(v) > 0})
        for name, m in case_metrics(pred, ref, case_labels, ref_geometry.spacing).items():
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
    summary = {**summarize(rows), "pred": str(pred_dir), "ref": str(ref_dir), "labels": labels,
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
    print(f"{len(preds)} cases: Dice {mean['dice']:.4f}  IoU {mean['iou']:.4f}  HD95 {mean['hd95']:.3f}  -> {out}")
    if cfg.html:
        print(f"report: {write_html_report(out)}")
    return out


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
