"""Image reading and writing keep values and geometry; bad writes leave nothing behind."""

import numpy as np
import pytest
import SimpleITK as sitk

from medssm.data.io import Geometry, ImageFileError, read_channels, read_image, write_image


def test_nifti_round_trip_keeps_geometry(data_root, tmp_path):
    src = data_root / "Dataset002_Hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    array, geometry = read_image(src)
    assert geometry.shape == array.shape and geometry.origin == (1.0, -1.0, -1.0)  # numpy (z, y, x) order
    moved = Geometry((2.0, 1.5, 0.5), (3.0, -2.0, 7.0), geometry.direction, geometry.shape)
    for ending in (".nii.gz", ".nrrd", ".mha"):
        out = write_image(array, moved, tmp_path / f"x{ending}")
        back, g = read_image(out)
        assert np.array_equal(back, array) and g.matches(moved)
    itk = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    assert itk.GetSpacing() == (0.5, 1.5, 2.0)  # SimpleITK's order is reversed


def test_png_grey_and_rgb(data_root, tmp_path):
    grey, g = read_image(data_root / "Dataset001_LungXray" / "imagesTr" / "CHNCXR_0001_0_0000.png")
    assert grey.dtype == np.uint8 and grey.shape == (256, 256) and len(g.spacing) == 2
    rgb = sitk.GetImageFromArray(np.stack([grey, grey // 2, grey // 3], -1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    array, g = read_image(tmp_path / "rgb.png")
    assert array.shape == (3, 256, 256) and g.shape == (256, 256)
    assert np.array_equal(array[1], grey // 2)
    assert read_channels(data_root / "Dataset001_LungXray" / "labelsTr" / "CHNCXR_0001_0.png")[0].shape == (1, 256, 256)
    write_image(np.int64(grey > 100), g, tmp_path / "mask.png")
    assert np.array_equal(read_image(tmp_path / "mask.png")[0], grey > 100)


def test_bad_writes_leave_nothing(tmp_path):
    g = Geometry.default((8, 8))
    with pytest.raises(ImageFileError, match="0..65535"):
        write_image(np.full((8, 8), -3), g, tmp_path / "neg.png")
    with pytest.raises(ImageFileError, match="integers only"):
        write_image(np.full((8, 8), 0.5), g, tmp_path / "prob.png")
    with pytest.raises(ImageFileError, match="unsupported file type"):
        write_image(np.zeros((8, 8)), g, tmp_path / "x.foo")
    with pytest.raises(ImageFileError, match="does not match geometry"):
        write_image(np.zeros((8, 9)), g, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_nan_in_nifti_survives_reading(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3], array[0, 0, 0] = np.nan, np.inf
    back, _ = read_image(write_image(array, Geometry.default(array.shape), tmp_path / "nan.nii.gz"))
    assert np.isnan(back[1, 2, 3]) and np.isinf(back[0, 0, 0])


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ImageFileError, match="broken.nii.gz: unreadable"):
        read_image(tmp_path / "broken.nii.gz")
