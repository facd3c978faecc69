"""Splits match nnU-Net's (scikit-learn's shuffled KFold on the sorted cases) and ignore file order."""

import json
import random

import pytest
from sklearn.model_selection import KFold

from medssm.data.segmentation import make_splits, read_or_make_splits, save_splits


def test_matches_sklearn_kfold_on_sorted_cases(data_root):
    cases = sorted(p.name[:-7] for p in (data_root / "Dataset002_Hippocampus" / "labelsTr").glob("*.nii.gz"))
    splits = make_splits(cases)
    expected = [{"train": [cases[i] for i in tr], "val": [cases[i] for i in va]}
                for tr, va in KFold(5, shuffle=True, random_state=12345).split(cases)]
    assert splits == expected
    assert sorted(c for s in splits for c in s["val"]) == cases


def test_independent_of_file_system_order():
    cases = [f"case_{i:03d}" for i in range(23)]
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)
    assert make_splits(shuffled, 5, seed=7) == make_splits(cases, 5, seed=7)
    assert make_splits(cases, 5, seed=7) != make_splits(cases, 5, seed=8)
    with pytest.raises(ValueError, match="cannot make 5 folds of 3"):
        make_splits(cases[:3])


def test_read_or_make_then_save(tmp_path):
    cases = [f"c{i}" for i in range(10)]
    path = tmp_path / "splits.json"
    made = read_or_make_splits(path, cases)
    assert made == make_splits(cases) and not path.exists()  # made, not written
    save_splits(path, made)
    assert json.loads(path.read_text()) == made
    custom = [{"train": ["c1", "c2"], "val": ["c3"]}]
    path.write_text(json.dumps(custom))
    assert read_or_make_splits(path, cases) == custom  # a saved split wins
    path.write_text(json.dumps([{"train": ["c1", "zz"], "val": []}]))
    with pytest.raises(ValueError, match=r"not in the dataset: \['zz'\]"):
        read_or_make_splits(path, cases)
