"""Planning on both real datasets, overrides, and the JSON round trip."""

import numpy as np
import pytest

from medssm.data.segmentation import Fingerprint, NnUNetDataset, Plan, make_plan, parse_overrides, plan_dataset, scheme_for_channel
from medssm.data.segmentation.plan import _target_spacing


@pytest.fixture(scope="module")
def planned(data_root):
    """Fingerprints of every 10th case of each real dataset."""
    out = {}
    for name in ("Dataset001_LungXray", "Dataset002_Hippocampus"):
        ds = NnUNetDataset(data_root / name)
        out[name] = ds, plan_dataset(ds, cases=ds.cases[::10])
    return out


def test_plan_lung(planned, tmp_path):
    ds, fp = planned["Dataset001_LungXray"]
    plan = make_plan(ds, divisor=16, fingerprint=fp)
    assert (plan.spatial_dims, plan.num_channels, plan.num_classes) == (2, 1, 2)
    assert plan.target_spacing == [1.0, 1.0] and plan.median_shape == [256, 256]
    assert plan.patch_size == [256, 256] and 2 <= plan.batch_size <= 1024 * 2**20 // (256 * 256 * 1500)
    assert plan.normalization == ["ZScore"] and plan.use_mask_for_norm == [False]
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan


def test_plan_hippocampus(planned):
    ds, fp = planned["Dataset002_Hippocampus"]
    plan = make_plan(ds, fingerprint=fp)
    assert plan.spatial_dims == 3 and plan.num_classes == 3 and plan.target_spacing == [1.0, 1.0, 1.0]
    assert all(p % 8 == 0 and p >= m for p, m in zip(plan.patch_size, plan.median_shape))
    assert 30 <= plan.median_shape[0] <= 40 and plan.patch_size[1] == 56
    small = make_plan(ds, fingerprint=fp, memory_budget_mb=40)
    assert np.prod(small.patch_size) * 2 * 1500 <= 40 * 2**20 and small.batch_size == 2


def test_overrides_and_derived_values(planned):
    ds, fp = planned["Dataset002_Hippocampus"]
    coarse = make_plan(ds, fingerprint=fp, target_spacing=[2.0, 2.0, 2.0])
    assert coarse.median_shape[1] < 30 and coarse.patch_size == [-(-m // 8) * 8 for m in coarse.median_shape]
    fixed = make_plan(ds, fingerprint=fp, **parse_overrides(["patch_size=16,16,16", "normalization=CT"]))
    assert fixed.patch_size == [16, 16, 16] and fixed.normalization == ["CT"] and fixed.batch_size > coarse.batch_size
    assert make_plan(ds, fingerprint=fp, batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="unknown plan fields \\['patch'\\]"):
        make_plan(ds, fingerprint=fp, patch=[8, 8, 8])
    with pytest.raises(ValueError, match="multiples of divisor 8"):
        make_plan(ds, fingerprint=fp, patch_size=[12, 16, 16])
    with pytest.raises(ValueError, match="normalization 'Zscore' unknown"):
        make_plan(ds, fingerprint=fp, normalization="Zscore")


def test_fingerprint_measures_foreground(planned, tmp_path):
    ds, fp = planned["Dataset002_Hippocampus"]
    props = fp.intensity_properties[0]
    assert props["percentile_00_5"] <= props["median"] <= props["percentile_99_5"] and props["std"] > 0
    assert Fingerprint.load(fp.save(tmp_path / "fp.json")) == fp


def test_normalisation_by_channel_name():
    assert [scheme_for_channel(n) for n in ("CT", "ct", "MRI", "X-ray", "noNorm", "rgb_to_0_1", "T2")] == \
        ["CT", "CT", "ZScore", "ZScore", "noNorm", "rgb_to_0_1", "ZScore"]


def test_anisotropic_target_spacing():
    spacings = np.array([[5.0, 0.8, 0.8]] * 8 + [[3.0, 0.8, 0.8]] * 2)
    shapes = np.array([[20, 400, 400]] * 10)
    assert _target_spacing(spacings, shapes).tolist() == [3.0, 0.8, 0.8]  # 10th percentile on the thick axis
    assert _target_spacing(spacings, np.array([[200, 400, 400]] * 10)).tolist() == [5.0, 0.8, 0.8]


def test_parse_overrides():
    assert parse_overrides(["patch_size=[64, 64]", "batch_size=4", "normalization=CT,noNorm", "crop_to_nonzero=false"]) == \
        {"patch_size": [64, 64], "batch_size": 4, "normalization": ["CT", "noNorm"], "crop_to_nonzero": False}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["patch_size"])
