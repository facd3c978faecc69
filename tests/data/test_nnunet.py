"""Reading nnU-Net raw datasets and their integrity check, on the real data and broken copies of it."""

import json

import numpy as np
import pytest

from medssm.data import Geometry
from medssm.data.segmentation import DatasetError, NnUNetDataset, find_cases, make_plan, plan_dataset, read_case_images, verify_dataset
from medssm.data.io import read_image, write_image
from medssm.data.segmentation.preprocess import build_cache


def test_real_lung_dataset(data_root):
    ds = NnUNetDataset(data_root / "Dataset001_LungXray")
    assert len(ds.cases) == 563 and ds.cases == sorted(ds.cases)
    assert (ds.num_classes, ds.spatial_dims, ds.channel_names, ds.file_ending) == (2, 2, {"0": "X-ray"}, ".png")
    assert ds.test_cases() == []
    case = ds.load_case(ds.cases[-1])
    assert case.image.dtype == np.float32 and case.image.shape == (1, 256, 256)
    assert case.label.shape == (256, 256) and set(np.unique(case.label)) == {0, 1}


def test_real_hippocampus_dataset_verifies(data_root):
    ds = verify_dataset(data_root / "Dataset002_Hippocampus")
    assert len(ds.cases) == 208 and (ds.num_classes, ds.spatial_dims) == (3, 3)
    dtypes = {read_image(ds.image_files(c)[0])[0].dtype for c in ds.cases[:8]}
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.float32)}  # both dtypes are read
    case = ds.load_case("hippocampus_001")
    assert case.image.dtype == np.float32 and case.image.shape[1:] == case.label.shape
    assert case.geometry.spacing == (1.0, 1.0, 1.0)


def _rewrite(path, fn):
    """Read ``path``, change its array with ``fn(array, geometry) -> (array, geometry)``, write it back."""
    array, geometry = read_image(path)
    array, geometry = fn(array, geometry)
    write_image(array, geometry, path)


def _break_missing_label(ds, case):
    ds.label_file(case).unlink()
    return ds.label_file(case), "missing label"


def _break_missing_channel(ds, case):
    meta = json.loads((ds.root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "MRI", "1": "T2"}
    (ds.root / "dataset.json").write_text(json.dumps(meta))
    for other in ds.cases:
        if other != case:
            src = ds.image_files(other)[0]
            (src.parent / src.name.replace("_0000", "_0001")).write_bytes(src.read_bytes())
    return ds.root / "imagesTr" / f"{case}_0001.nii.gz", "missing channel 1"


def _break_shape(ds, case):
    _rewrite(ds.label_file(case), lambda a, g: (a[1:], Geometry(g.spacing, g.origin, g.direction, a[1:].shape)))
    return ds.label_file(case), "label shape"


def _break_geometry(ds, case):
    _rewrite(ds.label_file(case), lambda a, g: (a, Geometry((2.0, 1.0, 1.0), g.origin, g.direction, g.shape)))
    return ds.label_file(case), "label spacing (1, 1, 2) differs from the image's (1, 1, 1)"


def _break_label_values(ds, case):
    def add_seven(a, g):
        a = a.copy()
        a.flat[0] = 7
        return a, g
    _rewrite(ds.label_file(case), add_seven)
    return ds.label_file(case), "label values [7] not declared"


def _break_nan(ds, case):
    def add_nan(a, g):
        a = a.astype(np.float32)
        a.flat[5] = np.nan
        a.flat[6] = np.inf
        return a, g
    _rewrite(ds.image_files(case)[0], add_nan)
    return ds.image_files(case)[0], "1 NaN and 1 Inf"


def _break_unreadable(ds, case):
    ds.image_files(case)[0].write_bytes(b"not an image at all")
    return ds.image_files(case)[0], "unreadable"


BREAKAGES = [_break_missing_label, _break_missing_channel, _break_shape, _break_geometry, _break_label_values,
             _break_nan, _break_unreadable]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_integrity_error_names_case_file_and_problem(hippo_copy, tmp_path, breakage):
    ds = NnUNetDataset(hippo_copy)
    fingerprint = plan_dataset(ds)  # measured while the data was still sound
    bad = ds.cases[2]
    path, problem = breakage(ds, bad)
    plan = make_plan(NnUNetDataset(hippo_copy), fingerprint=fingerprint,
                     intensity_properties=fingerprint.intensity_properties[0])
    with pytest.raises(DatasetError) as err:
        verify_dataset(hippo_copy)
    message = str(err.value)
    assert str(path) in message and problem in message and f"case {bad}" in message
    assert {case for case, _, _ in err.value.problems} == {bad}
    # Preprocessing stops at the bad case and writes nothing for it (cases before it are fine).
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError):
        build_cache(NnUNetDataset(hippo_copy), plan, cache, progress=False)
    written = sorted(p.name for p in cache.iterdir())
    assert written == sorted(f"{c}.{e}" for c in ds.cases[:2] for e in ("npz", "json"))


def test_every_bad_case_is_listed_at_once(lung_copy):
    ds = NnUNetDataset(lung_copy)
    first, second = ds.cases[0], ds.cases[-1]
    ds.label_file(first).unlink()
    ds.image_files(second)[0].write_bytes(b"\x89PNG broken")
    (lung_copy / "labelsTr" / "ghost_1.png").write_bytes(b"x")
    with pytest.raises(DatasetError) as err:
        verify_dataset(lung_copy)
    cases = {case for case, _, _ in err.value.problems}
    assert {first, second, "ghost_1"} <= cases
    assert "numTraining" not in str(err.value)


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 0, "a": 2},
                                                       "file_ending": ".xyz"}))
    with pytest.raises(DatasetError, match=r"consecutive from 0.*\n.*file_ending"):
        NnUNetDataset(tmp_path)
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        NnUNetDataset(tmp_path / "nowhere")


def test_find_cases_groups_channels_and_plain_files(tmp_path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = find_cases(tmp_path)
    assert list(found) == ["a", "b"] and [p.name for p in found["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("x.png", "y.png"):
        (plain / name).write_bytes(b"")
    assert {c: len(f) for c, f in find_cases(plain, ".png").items()} == {"x": 1, "y": 1}
    (tmp_path / "c_0001.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"c \(|channel files \[1\]"):
        find_cases(tmp_path)


def test_read_case_images_for_prediction(hippo_copy):
    found = find_cases(hippo_copy / "imagesTr", ".nii.gz")
    case, files = next(iter(found.items()))
    image, geometry = read_case_images(files, case)
    assert image.dtype == np.float32 and image.shape == (1, *geometry.shape)
    other = found[list(found)[1]][0]
    with pytest.raises(DatasetError, match="shape .* differs"):
        read_case_images([files[0], other], case)


def test_geometry_and_value_messages_in_itk_order(hippo_copy):
    """Spacing and origin are printed in ITK/NIfTI (x, y, z) order, the message says which of them
    differs, and label values read from a float file print as integers."""
    import SimpleITK as sitk

    ds = NnUNetDataset(hippo_copy)
    spaced, moved, floating = ds.cases[:3]
    # Geometry is in numpy (z, y, x) order: (1, 1, 2) is ITK spacing (2, 1, 1).
    _rewrite(ds.label_file(spaced), lambda a, g: (a, Geometry((1.0, 1.0, 2.0), g.origin, g.direction, g.shape)))
    assert sitk.ReadImage(str(ds.label_file(spaced))).GetSpacing() == (2.0, 1.0, 1.0)
    image_origin = sitk.ReadImage(str(ds.image_files(moved)[0])).GetOrigin()
    _rewrite(ds.label_file(moved), lambda a, g: (a, Geometry(g.spacing, g.origin[:2] + (g.origin[2] + 5,),
                                                             g.direction, g.shape)))
    _rewrite(ds.label_file(floating), lambda a, g: (np.where(a == 2, 7, a).astype(np.float32), g))
    with pytest.raises(DatasetError) as err:
        verify_dataset(hippo_copy)
    problems = {case: problem for case, _, problem in err.value.problems}
    assert "label spacing (2, 1, 1) differs from the image's (1, 1, 1) (x, y, z)" in problems[spaced]
    assert "origin" not in problems[spaced] and "direction" not in problems[spaced]
    x, y, z = (f"{v:g}" for v in image_origin)
    assert f"label origin ({float(x) + 5:g}, {y}, {z}) differs from the image's ({x}, {y}, {z})" in problems[moved]
    assert "spacing" not in problems[moved]
    assert "label values [7] not declared" in problems[floating]
    # Channel against channel (a prediction input): the second file's origin, named against the first's.
    first = ds.image_files(ds.cases[3])[0]
    second = first.with_name(first.name.replace("_0000", "_0001"))
    second.write_bytes(first.read_bytes())
    _rewrite(second, lambda a, g: (a, Geometry(g.spacing, g.origin[:2] + (g.origin[2] + 5,), g.direction, g.shape)))
    with pytest.raises(DatasetError) as err:
        read_case_images([first, second], ds.cases[3])
    expected = f"origin ({float(x) + 5:g}, {y}, {z}) differs from {first.name}'s ({x}, {y}, {z}) (x, y, z)"
    assert expected in str(err.value)


def test_truncated_rgb_file_is_reported_alone(lung_copy):
    """In a one-file RGB layout a truncated PNG is unreadable; its channels 1 and 2 were never files
    of their own, so they are not reported missing."""
    from PIL import Image

    meta = json.loads((lung_copy / "dataset.json").read_text())
    meta["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (lung_copy / "dataset.json").write_text(json.dumps(meta))
    ds = NnUNetDataset(lung_copy)
    for case in ds.cases:
        path = ds.image_files(case)[0]
        grey = np.asarray(Image.open(path))
        Image.fromarray(np.stack([grey, grey // 2, 255 - grey], axis=-1)).save(path)
    assert NnUNetDataset(lung_copy).load_case(ds.cases[0]).image.shape == (3, 256, 256)
    broken = ds.image_files(ds.cases[1])[0]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(DatasetError) as err:
        verify_dataset(lung_copy)
    assert [(case, path) for case, path, _ in err.value.problems] == [(ds.cases[1], str(broken))]
    assert "unreadable" in err.value.problems[0][2] and "missing channel" not in str(err.value)
