"""Image folders and CSVs made from real MedMNIST images: layout, splits, grey/RGB, clear errors."""

import numpy as np
import pytest
from PIL import Image

from medssm.data.classification import open_classification_data
from medssm.data.classification.folders import CsvSource, ImageFolderSource, UnlabelledImages


@pytest.fixture(scope="module")
def pneumonia(data_root):
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        return {k: z[k] for k in z.files}


def _tree(root, arrays, splits=("train", "test"), n=10, names=("normal", "pneumonia")):
    for split in splits:
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0]
        for c, cname in enumerate(names):
            d = root / split / cname
            d.mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[:n]:
                Image.fromarray(imgs[i]).save(d / f"{split}_{i:04d}.png")
    return root


def test_image_folder_layout_and_val_split(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia)
    train = open_classification_data(root, "train", val_fraction=0.2, seed=0)
    val = open_classification_data(root, "val", val_fraction=0.2, seed=0)
    test = open_classification_data(root, "test")
    assert isinstance(train, ImageFolderSource) and train.classes == ["normal", "pneumonia"]
    assert (len(train), len(val), len(test)) == (16, 4, 20)
    assert sorted(np.bincount(val.labels).tolist()) == [2, 2]  # stratified
    assert not {train.name(i) for i in range(len(train))} & {val.name(i) for i in range(len(val))}
    again = open_classification_data(root, "val", val_fraction=0.2, seed=0)
    assert [again.name(i) for i in range(len(again))] == [val.name(i) for i in range(len(val))]
    x = train.load(0)
    assert x.shape == (1, 28, 28) and train.in_chans == 1 and train.spatial_dims == 2
    raw = np.asarray(Image.open(test.name(5)), dtype=np.float32) / 255
    assert np.allclose(test.load(5)[0], raw)


def test_rgb_detected(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, n=3)
    img = pneumonia["train_images"][0]
    Image.fromarray(np.stack([img, img // 2, img // 3], -1)).save(root / "train" / "normal" / "colour.jpg")
    src = ImageFolderSource(root, "train", val_fraction=0.0)
    assert src.in_chans == 3 and src.load(0).shape == (3, 28, 28)


def test_empty_class_folder(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, n=3)
    (root / "train" / "effusion").mkdir()
    with pytest.raises(ValueError, match=r"train/effusion: empty class folder"):
        open_classification_data(root, "train")


def test_unknown_class_in_test_split(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, n=3)
    (root / "test" / "covid").mkdir()
    Image.fromarray(pneumonia["test_images"][0]).save(root / "test" / "covid" / "a.png")
    with pytest.raises(ValueError, match="class 'covid' is not one of"):
        open_classification_data(root, "test")


def test_csv(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, splits=("train",), n=6)
    files = sorted((root / "train").rglob("*.png"))
    lines = ["path,label,split"] + [f"{f.relative_to(tmp_path)},{f.parent.name},{'test' if k % 4 == 0 else 'train'}"
                                    for k, f in enumerate(files)]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    train = open_classification_data(tmp_path / "all.csv", "train")
    test = open_classification_data(tmp_path / "all.csv", "test")
    assert isinstance(train, CsvSource) and train.classes == ["normal", "pneumonia"]
    assert len(train) + len(test) == 12 and len(test) == 3
    assert train.labels[0] == ["normal", "pneumonia"].index(train.paths[0].parent.name)
    # integer labels without a header or split column: val split comes from the rows
    (tmp_path / "idx.csv").write_text("".join(f"{f.relative_to(tmp_path)},{int(f.parent.name == 'pneumonia')}\n"
                                              for f in files))
    assert open_classification_data(tmp_path / "idx.csv", "train", val_fraction=0.5).classes == ["0", "1"]
    assert len(open_classification_data(tmp_path / "idx.csv", "val", val_fraction=0.5)) == 6
    assert len(open_classification_data(tmp_path / "idx.csv", "test")) == 12  # no split column: all rows


def test_csv_label_out_of_range_and_missing_file(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, splits=("train",), n=2)
    files = sorted((root / "train").rglob("*.png"))
    (tmp_path / "neg.csv").write_text(f"path,label\n{files[0]},0\n{files[1]},-1\n")
    with pytest.raises(ValueError, match=r"neg.csv, line 3: label -1 is out of range"):
        CsvSource(tmp_path / "neg.csv")
    (tmp_path / "big.csv").write_text(f"path,label\n{files[0]},0\n{files[1]},2\n")
    with pytest.raises(ValueError, match=r"big.csv, line 3: label 2 is out of range for 2 classes"):
        CsvSource(tmp_path / "big.csv", classes=["normal", "pneumonia"])  # e.g. a trained model's classes
    rows = [f"{f},{int(f.parent.name == 'pneumonia')}" for f in files]
    (tmp_path / "gap.csv").write_text("path,label\n" + "\n".join(rows[:3] + [f"{files[3]},3"]) + "\n")
    with pytest.raises(ValueError, match=r"gap.csv, line 5: label 3 makes 4 classes, but class 2 has no sample in any row"):
        CsvSource(tmp_path / "gap.csv")  # a binary CSV with one mistyped label must not train 4 classes
    (tmp_path / "gone.csv").write_text(f"path,label\n{files[0]},0\nnowhere.png,1\n")
    with pytest.raises(FileNotFoundError, match=r"gone.csv, line 3: .*nowhere.png does not exist"):
        CsvSource(tmp_path / "gone.csv")


def test_unlabelled_images_and_volumes(tmp_path, pneumonia):
    root = _tree(tmp_path / "xr", pneumonia, splits=("test",), n=2)
    src = open_classification_data(root / "test" / "normal", "test")
    assert isinstance(src, UnlabelledImages) and len(src) == 2 and not src.has_labels
    vol = tmp_path / "vol" / "case.npy"
    vol.parent.mkdir()
    np.save(vol, np.stack([pneumonia["test_images"][0]] * 8))
    one = open_classification_data(vol, "test")
    assert one.spatial_dims == 3 and one.load(0).shape == (1, 8, 28, 28)


def test_nan_and_inf_images_are_refused(tmp_path, pneumonia):
    """Float volumes and float TIFFs with NaN/Inf raise, naming the file and the counts, when loaded."""
    image = pneumonia["train_images"][0].astype(np.float32)
    volume = np.stack([image] * 4)
    broken = volume.copy()
    broken[0, 0, :3] = np.nan
    broken[1, 1, 1] = np.inf
    (tmp_path / "vols").mkdir()
    np.save(tmp_path / "vols" / "a_sound.npy", volume)
    np.save(tmp_path / "vols" / "b_broken.npy", broken)
    volumes = UnlabelledImages(tmp_path / "vols")
    assert np.isfinite(volumes.load(0)).all()
    with pytest.raises(ValueError, match=r"b_broken.npy: 3 NaN and 1 Inf values"):
        volumes.load(1)
    (tmp_path / "tifs").mkdir()
    Image.fromarray(image).save(tmp_path / "tifs" / "a_sound.tif")
    Image.fromarray(broken[0]).save(tmp_path / "tifs" / "b_broken.tif")  # a 32-bit float TIFF
    images = UnlabelledImages(tmp_path / "tifs")
    assert images.load(0).shape == (1, 28, 28) and np.isfinite(images.load(0)).all()
    with pytest.raises(ValueError, match=r"b_broken.tif: 3 NaN and 0 Inf values"):
        images.load(1)
