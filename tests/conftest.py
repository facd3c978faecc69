"""Shared test set-up: deterministic seeds, 1 thread per worker, the real data root and small copies of it
(never changed in place: a test that changes one copies it first)."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _fill_freed_memory(value: float) -> None:
    for size in (2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24):
        for _ in range(3):
            block = torch.full((size,), value)
            del block


@pytest.fixture
def fill_freed_memory():
    """``fill(value)`` leaves ``value`` in the memory the allocator hands out next (what an
    uninitialised read would then see)."""
    return _fill_freed_memory


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``MEDSSM_DATA`` (CI sets it to ../shared/data); the real data must be there."""
    root = Path(os.environ.get("MEDSSM_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not (root / "Dataset001_LungXray" / "dataset.json").is_file():
        pytest.fail(f"real data not found at {root}: set MEDSSM_DATA to the shared data folder")
    return root


@pytest.fixture(scope="session")
def lung(data_root, tmp_path_factory) -> Path:
    """The first 6 lung X-ray cases at 64², as an nnU-Net raw dataset."""
    from .subsets import lung_subset

    return lung_subset(data_root, tmp_path_factory.mktemp("lung") / "Dataset001_LungXray", n=6, size=64)


@pytest.fixture(scope="session")
def pneumonia(data_root, tmp_path_factory) -> Path:
    """24/12/16 real PneumoniaMNIST images of both classes, as a .npz of the official layout."""
    from .subsets import medmnist_subset

    return medmnist_subset(data_root, "pneumoniamnist", tmp_path_factory.mktemp("mnist") / "pneumoniamnist.npz",
                           {"train": 24, "val": 12, "test": 16})


@pytest.fixture(scope="session")
def browser_path() -> str:
    """The operating system's Chromium for the tests in a real browser (tests/browser.py); they skip
    with the reason where there is none."""
    from .browser import chromium_path

    path = chromium_path()
    if not path:
        pytest.skip("no Chromium: scripts/test.sh installs Debian's chromium where apt-get can (or set "
                    "MEDSSM_CHROMIUM to a Chromium or Chrome)")
    return path
