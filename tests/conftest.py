"""Shared test set-up: deterministic seeds, 1 thread per worker, and the real data root."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``MEDSSM_DATA`` (CI sets it to ../shared/data); the real data must be there."""
    root = Path(os.environ.get("MEDSSM_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not (root / "Dataset001_LungXray" / "dataset.json").is_file():
        pytest.fail(f"real data not found at {root}: set MEDSSM_DATA to the shared data folder")
    return root
