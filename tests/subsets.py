"""Small real subsets of the shared data sets, for end-to-end tests (copied, never modified in place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


LUNG = "Dataset001_LungXray"
HIPPO = "Dataset002_Hippocampus"


def lung_subset(data_root: Path, dest: Path, n: int = 6, size: int = 64) -> Path:
    """The first ``n`` lung cases (sorted), downsized to ``size``² PNGs, as an nnU-Net raw dataset."""
    from PIL import Image

    src = data_root / LUNG
    meta = json.loads((src / "dataset.json").read_text())
    cases = sorted(p.name[: -len("_0000.png")] for p in (src / "imagesTr").glob("*_0000.png"))[:n]
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in cases:
        Image.open(src / "imagesTr" / f"{case}_0000.png").resize((size, size), Image.BILINEAR).save(
            dest / "imagesTr" / f"{case}_0000.png")
        Image.open(src / "labelsTr" / f"{case}.png").resize((size, size), Image.NEAREST).save(
            dest / "labelsTr" / f"{case}.png")
    (dest / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(cases)}, indent=1))
    return dest


def hippocampus_subset(data_root: Path, dest: Path, n: int = 5) -> Path:
    """The first ``n`` hippocampus volumes (sorted), copied as they are (about 36x50x36)."""
    src = data_root / HIPPO
    meta = json.loads((src / "dataset.json").read_text())
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))[:n]
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in cases:
        shutil.copy(src / "imagesTr" / f"{case}_0000.nii.gz", dest / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{case}.nii.gz", dest / "labelsTr")
    (dest / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(cases)}, indent=1))
    return dest


def medmnist_subset(data_root: Path, name: str, dest: Path, counts: dict[str, int]) -> Path:
    """``counts[split]`` real images of ``name``.npz per split, the first of each of the two classes in
    equal shares, as a .npz of the official layout at ``dest``."""
    import numpy as np

    with np.load(data_root / "medmnist" / f"{name}.npz") as z:
        arrays = {}
        for split, n in counts.items():
            y = z[f"{split}_labels"][:, 0]
            idx = np.sort(np.r_[np.flatnonzero(y == 0)[: n // 2], np.flatnonzero(y == 1)[: n - n // 2]])
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, **arrays)
    return dest


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to check that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
