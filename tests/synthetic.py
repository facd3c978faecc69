"""Datasets made by script for the tests and the measurements of labels beyond integer classes: a region
version of an nnU-Net dataset, a four-channel 3D set with three nested tumour-like regions (BraTS's
form), and a multi-label set in ChestMNIST's layout. Nothing here is drawn by hand; every set is a
function of its arguments and seed.

    python -m tests.synthetic hippocampus-regions OUT     # the whole hippocampus set, as regions
    python -m tests.synthetic brats-like OUT --cases 20
    python -m tests.synthetic chestmnist-like OUT.npz
    python -m tests.synthetic vessels-like OUT --cases 20   # DRIVE-like: thin vessels on 584 x 565 RGB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

HIPPOCAMPUS_REGIONS = {"labels": {"background": 0, "hippocampus": [1, 2], "posterior": 2},
                       "regions_class_order": [1, 2]}
# nnU-Net's BraTS conversion: 1 oedema, 2 non-enhancing tumour (necrosis), 3 enhancing tumour.
BRATS_REGIONS = {"labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": 3},
                 "regions_class_order": [1, 2, 3]}
BRATS_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}


def region_version(source: Path, dest: Path, regions: dict, cases: int | None = None) -> Path:
    """``source`` (an nnU-Net raw dataset) with ``regions`` (its dataset.json ``labels`` and
    ``regions_class_order``) instead of its labels: images and label files copied (the first
    ``cases`` of the sorted cases, or all), the label files unchanged."""
    meta = json.loads((source / "dataset.json").read_text())
    ending = meta["file_ending"]
    names = sorted(p.name[: -len(ending)] for p in (source / "labelsTr").iterdir() if p.name.endswith(ending))
    names = names[:cases] if cases else names
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in names:
        for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            shutil.copy(image, dest / "imagesTr")
        shutil.copy(source / "labelsTr" / f"{case}{ending}", dest / "labelsTr")
    (dest / "dataset.json").write_text(json.dumps({**meta, **regions, "numTraining": len(names)}, indent=1))
    return dest


LUNG_REGIONS = {"labels": {"background": 0, "lungs": [1, 2], "right lung": 2}, "regions_class_order": [1, 2]}


def lung_regions(lung: Path, dest: Path) -> Path:
    """A 2D region dataset made of a lung X-ray set (nnU-Net layout, label 1 = lung): the lung in the
    image's right half (the patient's left) stays 1, the other becomes 2; regions: both lungs [1, 2]
    and the patient's right lung, 2."""
    from PIL import Image

    shutil.copytree(lung / "imagesTr", dest / "imagesTr")
    (dest / "labelsTr").mkdir(parents=True)
    for path in sorted((lung / "labelsTr").glob("*.png")):
        label = np.asarray(Image.open(path)).copy()
        label[:, : label.shape[1] // 2][label[:, : label.shape[1] // 2] == 1] = 2
        Image.fromarray(label.astype(np.uint8)).save(dest / "labelsTr" / path.name)
    meta = json.loads((lung / "dataset.json").read_text())
    (dest / "dataset.json").write_text(json.dumps({**meta, **LUNG_REGIONS}, indent=1))
    return dest


def brats_like(dest: Path, cases: int = 6, shape=(40, 48, 40), seed: int = 0) -> Path:
    """A four-channel 3D nnU-Net dataset in BraTS's form: a brain (an ellipsoid; zero outside, so cropping
    to nonzero shrinks the image and nnU-Net normalises inside the mask) holding a tumour of three nested
    parts, oedema around a core around an enhancing rim, each visible in its own sequences: T1 darker in
    the core, T1ce bright on the enhancing rim, T2 and FLAIR bright in the oedema. Labels as nnU-Net's
    BraTS conversion (1 oedema, 2 necrosis, 3 enhancing); regions whole, core, enhancing."""
    import SimpleITK as sitk
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.asarray(shape, dtype=np.float32)[:, None, None, None] / 2
    for i in range(cases):
        radii = np.asarray(shape, dtype=np.float32)[:, None, None, None] * rng.uniform(0.36, 0.44, (3, 1, 1, 1))
        brain = (((grid - centre) / radii) ** 2).sum(0) < 1
        at = centre + rng.uniform(-0.15, 0.15, (3, 1, 1, 1)) * np.asarray(shape)[:, None, None, None]
        distance = np.sqrt((((grid - at) / rng.uniform(0.8, 1.25, (3, 1, 1, 1))) ** 2).sum(0))
        size = rng.uniform(5, 8)
        label = np.zeros(shape, np.uint8)
        label[(distance < 2 * size) & brain] = 1  # oedema
        label[distance < 1.2 * size] = 3  # enhancing rim ...
        label[distance < 0.8 * size] = 2  # ... around necrosis
        tissue = {"T1": (600, {1: 520, 2: 300, 3: 450}), "T1ce": (650, {1: 600, 2: 350, 3: 1300}),
                  "T2": (400, {1: 900, 2: 1000, 3: 700}), "FLAIR": (350, {1: 800, 2: 500, 3: 600})}
        for c, (name, (base, by_label)) in enumerate(tissue.items()):
            image = np.full(shape, base, np.float32) * rng.uniform(0.9, 1.1)
            for value, intensity in by_label.items():
                image[label == value] = intensity
            image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 25, shape)
            image = np.where(brain, np.clip(image, 1, None), 0).astype(np.float32)  # zero outside the brain
            sitk.WriteImage(sitk.GetImageFromArray(image), str(dest / "imagesTr" / f"brats_{i:03d}_{c:04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(dest / "labelsTr" / f"brats_{i:03d}.nii.gz"))
    (dest / "dataset.json").write_text(json.dumps({"channel_names": BRATS_CHANNELS, **BRATS_REGIONS,
                                                   "numTraining": cases, "file_ending": ".nii.gz"}, indent=1))
    return dest


def vessels_like(dest: Path, cases: int = 20, shape=(584, 565), seed: int = 0) -> Path:
    """A 2D nnU-Net dataset shaped like DRIVE's retinal photographs: RGB PNGs of 584 x 565 (a bright disc
    of retina on black), with a tree of vessels 1-3 pixels wide drawn darker, as label 1 (structures that
    vanish when the image is downsampled)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) / (0.47 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2 < 1
    for i in range(cases):
        label = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(label)
        for _ in range(rng.integers(6, 10)):  # vessels leave the optic disc and wander outwards
            x, y, angle = w * 0.35 + rng.normal(0, 8), h / 2 + rng.normal(0, 8), rng.uniform(0, 2 * np.pi)
            width = int(rng.integers(2, 4))
            for _ in range(60):
                angle += rng.normal(0, 0.25)
                nx, ny = x + 6 * np.cos(angle), y + 6 * np.sin(angle)
                draw.line([(x, y), (nx, ny)], fill=1, width=width)
                x, y = nx, ny
                if rng.random() < 0.04:
                    width = max(1, width - 1)
        vessels = np.asarray(label).astype(bool) & disc
        rgb = np.stack([np.full(shape, 170.0), np.full(shape, 80.0), np.full(shape, 40.0)], -1)
        rgb[vessels] *= 0.55
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255) * disc[..., None]
        Image.fromarray(rgb.astype(np.uint8)).save(dest / "imagesTr" / f"retina_{i:03d}_0000.png")
        Image.fromarray(vessels.astype(np.uint8)).save(dest / "labelsTr" / f"retina_{i:03d}.png")
    (dest / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"},
                                                   "labels": {"background": 0, "vessel": 1}, "numTraining": cases,
                                                   "file_ending": ".png"}, indent=1))
    return dest


def chestmnist_like(path: Path, counts=None, seed: int = 0) -> Path:
    """A .npz in ChestMNIST's exact layout: ``{train,val,test}_images`` (N, 28, 28) uint8 and
    ``{split}_labels`` (N, 14) uint8 of 0/1, 14 findings each drawn with its own prevalence and
    visible as a faint blob at its own place (so a model can learn them; several per image)."""
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 64, "val": 32, "test": 32}
    places = rng.integers(4, 24, (14, 2))
    prevalence = np.linspace(0.12, 0.5, 14)
    yy, xx = np.mgrid[:28, :28]
    arrays = {}
    for split, n in counts.items():
        labels = (rng.random((n, 14)) < prevalence).astype(np.uint8)
        labels[np.arange(n), np.arange(n) % 14] = 1  # every finding present in every split
        images = rng.normal(90, 20, (n, 28, 28))
        for k, (y, x) in enumerate(places):
            images += labels[:, k, None, None] * 60 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 6.0)
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("hippocampus-regions", "brats-like", "chestmnist-like", "vessels-like"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=None)
    args = parser.parse_args()
    if args.what == "hippocampus-regions":
        source = Path(os.environ.get("MEDSSM_DATA", "../shared/data")) / "Dataset002_Hippocampus"
        region_version(source, args.out, HIPPOCAMPUS_REGIONS, args.cases)
    elif args.what == "brats-like":
        brats_like(args.out, args.cases or 6)
    elif args.what == "vessels-like":
        vessels_like(args.out, args.cases or 20)
    else:
        chestmnist_like(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
