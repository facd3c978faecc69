"""MedMNIST files: the real 2D sets, MD5 checks, file names, 3D volumes, malformed files, transforms."""

import io
import shutil

import numpy as np
import pytest
import torch

from medssm.data.classification import ClassificationDataset, open_classification_data, random_flip, random_resized_crop
from medssm.data.classification.medmnist import (MEDMNIST, MedMNISTSource, medmnist_file, medmnist_path, medmnist_url, open_medmnist,
                                  parse_name, verify_md5)


@pytest.mark.parametrize("name,counts,classes", [
    ("pneumoniamnist", (4708, 524, 624), ["normal", "pneumonia"]),
    ("breastmnist", (546, 78, 156), ["malignant", "normal, benign"]),
])
def test_real_files(data_root, name, counts, classes):
    root = data_root / "medmnist"
    verify_md5(root / f"{name}.npz", MEDMNIST[name][3][0])  # the table's MD5 is the official file's
    for split, n in zip(("train", "val", "test"), counts):
        src = open_medmnist(name, split, root=root)
        assert len(src) == n and src.classes == classes and src.spatial_dims == 2 and src.in_chans == 1
        x = src.load(0)
        assert x.shape == (1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert set(np.unique(src.labels)) == {0, 1}
    assert src.name(3) == f"{name}.npz:test/3"
    both = open_classification_data(root / f"{name}.npz", "all")
    assert len(both) == sum(counts) and both.name(counts[0]) == f"{name}.npz:val/0"


def test_md5_mismatch_names_the_file(data_root, tmp_path):
    bad = tmp_path / "breastmnist.npz"
    shutil.copy(data_root / "medmnist" / "breastmnist.npz", bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="breastmnist.npz: MD5 .* does not match"):
        verify_md5(bad, MEDMNIST["breastmnist"][3][0])


def test_names_urls_and_missing_files(tmp_path):
    assert parse_name("breastmnist_64.npz") == ("breastmnist", 64) and parse_name("foo.npz") is None
    assert medmnist_file("pneumoniamnist", 224) == "pneumoniamnist_224.npz"
    assert medmnist_url("organmnist3d", 64).startswith("https://zenodo.org/records/10519652/files/organmnist3d_64.npz")
    with pytest.raises(ValueError, match="sizes 28, 64"):
        medmnist_file("nodulemnist3d", 128)
    with pytest.raises(FileNotFoundError, match="download"):  # never fetched unless asked
        medmnist_path("dermamnist", 64, root=tmp_path)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _mnist_arrays(images, labels):
    return {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", images), ("labels", labels))}


def test_malformed_npz_errors(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        MedMNISTSource(junk)
    imgs, labels = np.zeros((4, 28, 28), np.uint8), np.zeros((4, 1), np.uint8)
    arrays = _mnist_arrays(imgs, labels)
    del arrays["val_labels"]
    with pytest.raises(ValueError, match="nolabels.npz: missing array 'val_labels'"):
        MedMNISTSource(_write_npz(tmp_path / "nolabels.npz", **arrays), "val")
    arrays = _mnist_arrays(imgs, np.zeros((3, 1), np.uint8))
    with pytest.raises(ValueError, match="short.npz: train_images has 4 samples but train_labels has 3"):
        MedMNISTSource(_write_npz(tmp_path / "short.npz", **arrays))
    arrays = _mnist_arrays(np.zeros((4, 28), np.uint8), labels)
    with pytest.raises(ValueError, match="flat.npz: train_images has shape"):
        MedMNISTSource(_write_npz(tmp_path / "flat.npz", **arrays))


def test_label_out_of_range(tmp_path):
    labels = np.array([[0], [1], [5], [0]], np.uint8)
    path = _write_npz(tmp_path / "pneumoniamnist.npz", **_mnist_arrays(np.zeros((4, 28, 28), np.uint8), labels))
    with pytest.raises(ValueError, match=r"pneumoniamnist.npz: train label 5 at index 2 is out of range for 2 "
                                         r"classes \(0..1\)"):
        MedMNISTSource(path)


def test_labels_of_every_split_are_checked_against_the_classes(data_root, tmp_path):
    """A known dataset's table fixes the classes, and every split of the file is checked when any is
    opened; a file of unknown name takes max + 1 classes, none of which may be empty."""
    with np.load(data_root / "medmnist" / "breastmnist.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_labels"][12] = 7
    named = _write_npz(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"breastmnist.npz: test label 7 at index 12 is out of range for 2 classes "
                                         r"\(0..1\)"):
        MedMNISTSource(named, "train")
    unnamed = _write_npz(tmp_path / "mine.npz", **arrays)
    with pytest.raises(ValueError, match=r"mine.npz: test label 7 at index 12 makes 8 classes, but classes "
                                         r"2, 3, 4, 5, 6 have no sample in train, val or test"):
        MedMNISTSource(unnamed, "train")
    arrays["test_labels"][12] = 1
    arrays["train_labels"][arrays["train_labels"] == 1] = 2  # classes 0, 1, 2, class 1 only in val and test
    train = MedMNISTSource(_write_npz(tmp_path / "three.npz", **arrays), "train")
    assert train.classes == ["0", "1", "2"] and set(train.labels.tolist()) == {0, 2}


def test_3d_volumes(tmp_path):
    rng = np.random.default_rng(0)
    vols = rng.integers(0, 255, (6, 12, 14, 16), dtype=np.uint8)
    path = _write_npz(tmp_path / "vols.npz", **_mnist_arrays(vols, np.array([[0], [1], [2]] * 2)))
    src = MedMNISTSource(path, "test")
    assert src.spatial_dims == 3 and src.in_chans == 1 and src.native_size == (12, 14, 16)
    assert src.classes == ["0", "1", "2"] and src.load(1).shape == (1, 12, 14, 16)
    ds = ClassificationDataset(src, 16, train=True)
    x, y, i = ds[2]
    assert x.shape == (1, 16, 16, 16) and y == 2 and i == 2 and -1 <= x.min() and x.max() <= 1


def test_rgb_layout(tmp_path):
    imgs = np.zeros((4, 28, 28, 3), np.uint8)
    imgs[..., 0] = 255
    src = MedMNISTSource(_write_npz(tmp_path / "rgb.npz", **_mnist_arrays(imgs, np.zeros((4, 1), np.uint8))))
    assert src.spatial_dims == 2 and src.in_chans == 3 and src.load(0)[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    grey = ClassificationDataset(src, 28, in_chans=1)[0][0]  # RGB -> grey by luminance
    assert grey.shape == (1, 28, 28) and grey[0, 0, 0].item() == pytest.approx(0.299 * 2 - 1, abs=1e-6)


@pytest.mark.parametrize("shape,size", [((1, 28, 28), (20, 20)), ((2, 9, 12, 10), (8, 8, 8))])
def test_random_resized_crop_and_flip(shape, size):
    x = torch.rand(shape)
    a = random_resized_crop(x, size, generator=torch.Generator().manual_seed(3))
    b = random_resized_crop(x, size, generator=torch.Generator().manual_seed(3))
    assert a.shape == (shape[0], *size) and torch.equal(a, b)
    full = random_resized_crop(x, shape[1:], scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, x)  # the whole image at its own size is the identity
    flipped = random_flip(x, [-1], p=1.0)
    assert torch.equal(flipped, x.flip(-1))


class _FakeResponse(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self


@pytest.mark.parametrize("corrupt", [False, True])
def test_download_checks_md5_before_keeping_the_file(data_root, tmp_path, monkeypatch, corrupt):
    """The download path with urlopen replaced by the local file: nothing leaves the machine."""
    from medssm.data.classification import medmnist

    payload = (data_root / "medmnist" / "breastmnist.npz").read_bytes()
    payload = payload[:-10] + b"0123456789" if corrupt else payload
    urls = []
    monkeypatch.setattr(medmnist.urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or _FakeResponse(payload))
    if corrupt:
        with pytest.raises(ValueError, match="MD5 .* does not match"):
            medmnist_path("breastmnist", 28, root=tmp_path, download=True)
        assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    else:
        path = medmnist_path("breastmnist", 28, root=tmp_path, download=True)
        assert path == tmp_path / "breastmnist.npz" and len(open_medmnist("breastmnist", "val", root=tmp_path)) == 78
    assert urls == ["https://zenodo.org/records/10519652/files/breastmnist.npz?download=1"]


def test_nan_and_inf_in_float_npz(tmp_path):
    """A float .npz is checked once when it is opened: the error names the file, split, index and counts."""
    images = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32)
    arrays = _mnist_arrays(images, np.array([[0], [1], [0], [1]], np.uint8))
    arrays["val_images"] = images.copy()
    arrays["val_images"][2, 0, :2] = np.nan
    arrays["val_images"][2, 5, 5] = -np.inf
    path = _write_npz(tmp_path / "floats.npz", **arrays)
    train = MedMNISTSource(path, "train")
    assert np.allclose(train.load(3)[0], images[3])
    with pytest.raises(ValueError, match=r"floats.npz: val image at index 2 has 2 NaN and 1 Inf values"):
        MedMNISTSource(path, "val")
    with pytest.raises(ValueError, match=r"floats.npz: val image at index 2 has 2 NaN and 1 Inf values"):
        MedMNISTSource(path, "all")
