"""Augmentation keeps shapes and dtypes, moves labels with the image, and is seeded."""

import pytest
import torch

from medssm.data.segmentation.transforms import training_transforms


def _batch(spatial):
    label = torch.zeros(2, 1, *spatial, dtype=torch.int64)
    label[:, :, 4:10, 4:12] = 2
    return {"image": torch.randn(2, 1, *spatial) + label, "label": label, "case": ["a", "b"]}


@pytest.mark.parametrize("spatial", [(16, 24), (8, 16, 16)])
def test_shapes_dtypes_and_labels(spatial):
    augment = training_transforms(len(spatial), spatial, seed=3)
    batch = _batch(spatial)
    for _ in range(4):
        out = augment(batch)
        assert out["image"].shape == batch["image"].shape and out["image"].dtype == torch.float32
        assert out["label"].shape == batch["label"].shape and out["label"].dtype == torch.int64
        assert set(out["label"].unique().tolist()) <= {0, 2} and out["case"] == ["a", "b"]
        assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor  # no MetaTensor


def test_seeded_and_resumable():
    batch = _batch((16, 24))
    a, b = training_transforms(2, seed=7), training_transforms(2, seed=7)
    assert all(torch.equal(a(batch)["image"], b(batch)["image"]) for _ in range(3))
    state = a.state_dict()
    expected = [a(batch)["image"] for _ in range(3)]
    c = training_transforms(2, seed=0)
    c.load_state_dict(state)
    assert all(torch.equal(c(batch)["image"], e) for e in expected)
    assert not torch.equal(training_transforms(2, seed=8)(batch)["image"], training_transforms(2, seed=7)(batch)["image"])


def test_label_stays_aligned_with_image():
    batch = _batch((16, 24))
    batch["image"] = 3 * batch["label"].float() + 0.1 * torch.randn(2, 1, 16, 24)
    augment = training_transforms(2, seed=1)
    changed = False
    for _ in range(10):
        out = augment(batch)
        changed |= not torch.equal(out["label"], batch["label"])
        for image, label in zip(out["image"], out["label"]):
            if (label == 2).any() and (label == 0).any():
                assert image[label == 2].mean() > image[label == 0].mean() + 1
    assert changed


def test_slices_augmented_apart_equal_the_whole_batch():
    """What data-parallel ranks rely on: each augments its slice of the global batch (``first``
    its offset) and together they produce what one process makes of the whole batch."""
    label = torch.zeros(4, 1, 16, 24, dtype=torch.int64)
    label[:, :, 4:10, 4:12] = 1
    batch = {"image": torch.randn(4, 1, 16, 24) + label, "label": label}
    whole, ranks = training_transforms(2, seed=5), [training_transforms(2, seed=5) for _ in range(2)]
    for _ in range(3):
        expected = whole(batch)
        parts = [r({k: v[2 * i:2 * i + 2] for k, v in batch.items()}, first=2 * i) for i, r in enumerate(ranks)]
        for key in ("image", "label"):
            assert torch.equal(torch.cat([p[key] for p in parts]), expected[key])
    alike = {k: v[:1].repeat(4, 1, 1, 1) for k, v in batch.items()}  # four copies of one sample
    out = whole(alike)["image"]
    assert not all(torch.equal(out[0], o) for o in out[1:])  # are not all augmented alike
