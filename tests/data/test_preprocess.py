"""Preprocessing, its inverse, normalisation, and the cache."""

import dataclasses
import json
import os

import numpy as np
import pytest

from medssm.data import Geometry, read_image, write_image
from medssm.data.segmentation import NnUNetDataset, PatchSampler, make_plan, normalize, plan_dataset
from medssm.data.segmentation.preprocess import build_cache, load_cache, preprocess_case, revert_to_original


@pytest.fixture
def hippo(hippo_copy):
    ds = NnUNetDataset(hippo_copy)
    return ds, make_plan(ds, fingerprint=plan_dataset(ds))


def _padded_case(ds):
    """A real case inside a zero border (so cropping matters), with its geometry."""
    case = ds.load_case(ds.cases[1])
    pad = [(0, 0), (3, 1), (0, 4), (2, 2)]
    image = np.pad(case.image, pad)
    g = case.geometry
    return image, np.pad(case.label, pad[1:]), Geometry(g.spacing, g.origin, g.direction, image.shape[1:])


def _dice(a, b, k):
    return 2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))


def test_round_trip_without_resampling_is_exact(hippo):
    ds, plan = hippo
    image, label, geometry = _padded_case(ds)
    image_pp, label_pp, props = preprocess_case(image, geometry, plan, label)
    assert image_pp.dtype == np.float32 and label_pp.shape == image_pp.shape[1:] == tuple(props["shape_after_crop"])
    assert props["crop_box"][0] == [3, image.shape[1] - 1]
    assert abs(image_pp.mean()) < 1e-4 and abs(image_pp.std() - 1) < 1e-3  # per-case z-score
    assert np.array_equal(revert_to_original(label_pp, props, is_label=True), label)
    json.dumps(props)


def test_round_trip_with_resampling_returns_original_grid(hippo, tmp_path):
    ds, plan = hippo
    plan = dataclasses.replace(plan, target_spacing=[1.5, 0.75, 1.25])
    image, label, geometry = _padded_case(ds)
    image_pp, label_pp, props = preprocess_case(image, geometry, plan, label)
    crop = np.array(props["shape_after_crop"])
    assert props["shape_after_resample"] == [int(round(n * 1.0 / t)) for n, t in zip(crop, plan.target_spacing)]
    assert label_pp.shape == tuple(props["shape_after_resample"])
    back = revert_to_original(label_pp, props, is_label=True)
    assert back.shape == label.shape and all(_dice(back, label, k) > 0.85 for k in (1, 2))
    probabilities = np.stack([label_pp == k for k in range(3)]).astype(np.float32)  # (3, *S')
    reverted = revert_to_original(probabilities, props)
    assert reverted.shape == (3, *label.shape)
    assert reverted[0, 0, 0, 0] == 1.0 and reverted[1:, 0, 0, 0].sum() == 0  # outside the crop: background
    assert np.mean(reverted.argmax(0) == label) > 0.97
    # Written with the saved geometry, the prediction lands exactly where the input was.
    source = ds.image_files(ds.cases[1])[0]
    _, original_geometry = read_image(source)
    out = write_image(back[3:-1, :-4, 2:-2], Geometry.from_dict({**props["geometry"],
                                                                  "shape": original_geometry.shape}), tmp_path / "p.nii.gz")
    assert read_image(out)[1] == original_geometry
    with pytest.raises(ValueError, match="not on the preprocessed grid"):
        revert_to_original(label, props, is_label=True)


def test_normalisation_schemes():
    x = np.array([[-2000.0, 0.0, 40.0, 3000.0]], dtype=np.float32)
    ct = normalize(x, "CT", {"mean": 40.0, "std": 10.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0})
    assert ct.tolist() == [[-14.0, -4.0, 0.0, 16.0]]
    mask = np.array([[False, True, True, False]])
    z = normalize(x, "ZScore", mask=mask)
    assert z[0, 0] == 0 and z[0, 3] == 0 and np.allclose(z[0, 1:3], [-1, 1])
    assert np.allclose(normalize(np.array([0, 255, 51]), "rgb_to_0_1"), [0, 1, 0.2])
    assert np.allclose(normalize(x, "rescale_to_0_1")[0, [0, 3]], [0, 1])
    with pytest.raises(ValueError, match="CT normalisation needs"):
        normalize(x, "CT")


def test_cache_is_built_once_and_redone_when_stale(hippo, tmp_path):
    ds, plan = hippo
    cache_dir = tmp_path / "cache"
    paths = build_cache(ds, plan, cache_dir, progress=False, cases=ds.cases[:3])
    assert list(paths) == ds.cases[:3]
    times = {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    build_cache(ds, plan, cache_dir, progress=False, cases=ds.cases[:3])
    assert {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == times  # nothing redone
    source = ds.image_files(ds.cases[0])[0]
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    build_cache(ds, dataclasses.replace(plan, normalization=["noNorm"]), cache_dir, progress=False, cases=ds.cases[:1])
    assert paths[ds.cases[0]].stat().st_mtime_ns != times[paths[ds.cases[0]]]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary files left
    cache = load_cache(paths)
    entry = cache[ds.cases[1]]
    assert entry["image"].dtype == np.float32 and entry["label"].dtype == np.int16
    for k, where in entry["class_locations"].items():
        assert k in (1, 2) and len(where) and np.all(entry["label"][tuple(where.T)] == k)


def test_sampler_reads_the_cache_build_cache_returns(hippo, tmp_path):
    ds, plan = hippo
    paths = build_cache(ds, plan, tmp_path / "cache", progress=False, cases=ds.cases[:2])
    assert paths.load(ds.cases[0]) is paths.load(ds.cases[0])  # read once
    batch = next(PatchSampler(paths, list(paths), plan.patch_size, 3, seed=0))
    assert batch["image"].shape == (3, 1, *plan.patch_size) and (batch["label"][2] > 0).any()


def test_corrupt_cache_entries_are_rebuilt_with_a_warning(hippo, tmp_path):
    """A truncated entry and one with a flipped bit are rebuilt from the raw data by build_cache (one
    warning each, naming the file); the sound entry is kept; load_cache names a corrupt file it is given."""
    ds, plan = hippo
    cases = ds.cases[:3]
    paths = build_cache(ds, plan, tmp_path / "cache", progress=False, cases=cases)
    sound = load_cache(paths)
    truncated, flipped, kept = (paths[c] for c in cases)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the image array
    flipped.write_bytes(bytes(data))
    kept_time = kept.stat().st_mtime_ns
    with pytest.warns(UserWarning) as record:
        rebuilt = load_cache(build_cache(ds, plan, tmp_path / "cache", progress=False, cases=cases))
    messages = [str(w.message) for w in record if "cache" in str(w.message)]
    assert len(messages) == 2 and str(truncated) in messages[0] and str(flipped) in messages[1]
    assert "rebuilding" in messages[0] and kept.stat().st_mtime_ns == kept_time
    for case in cases:
        assert np.array_equal(rebuilt[case]["image"], sound[case]["image"])
        assert np.array_equal(rebuilt[case]["label"], sound[case]["label"])
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{flipped}: unreadable cache entry"):
        load_cache({cases[1]: flipped})
