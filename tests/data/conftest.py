"""Small copies of the real datasets, for tests that break or preprocess them."""

import json
import shutil
from pathlib import Path

import pytest


def copy_cases(root: Path, dest: Path, n: int, stride: int = 1) -> Path:
    """Copy dataset.json and ``n`` cases (every ``stride``-th) of the nnU-Net dataset ``root`` into ``dest``."""
    meta = json.loads((root / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (root / "labelsTr").iterdir() if p.name.endswith(ending))
    picked = cases[::stride][:n]
    for folder in ("imagesTr", "labelsTr"):
        (dest / folder).mkdir(parents=True)
    for case in picked:
        shutil.copy2(root / "labelsTr" / f"{case}{ending}", dest / "labelsTr")
        shutil.copy2(root / "imagesTr" / f"{case}_0000{ending}", dest / "imagesTr")
    meta["numTraining"] = len(picked)
    (dest / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dest


@pytest.fixture
def hippo_copy(data_root, tmp_path) -> Path:
    """Six real hippocampus cases (float32 and uint8 images among them)."""
    return copy_cases(data_root / "Dataset002_Hippocampus", tmp_path / "Dataset002_Hippocampus", 6, stride=7)


@pytest.fixture
def lung_copy(data_root, tmp_path) -> Path:
    """Four real lung X-ray cases, from both sources."""
    return copy_cases(data_root / "Dataset001_LungXray", tmp_path / "Dataset001_LungXray", 4, stride=187)
