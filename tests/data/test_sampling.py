"""Patch sampling: shapes, foreground oversampling, padding, determinism and exact resume."""

import numpy as np
import pytest
import torch

from medssm.data.segmentation import PatchSampler


def _cache():
    rng = np.random.default_rng(0)
    cache = {}
    for i, shape in enumerate([(40, 48, 36), (30, 50, 20), (12, 10, 8)]):
        label = np.zeros(shape, np.int16)
        label[2:4, 3:5, 1:3] = 1 + i % 2  # a tiny foreground blob
        cache[f"case_{i}"] = {"image": rng.normal(size=(2, *shape)).astype(np.float32), "label": label}
    return cache


def test_batches_have_the_promised_shapes_and_pad_small_cases():
    sampler = PatchSampler(_cache(), ["case_2"], [16, 16, 16], batch_size=3, seed=1)
    batch = next(sampler)
    assert batch["image"].shape == (3, 2, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.int64
    nonzero = (batch["image"][0, 0] != 0).sum().item()
    assert nonzero == 12 * 10 * 8  # the whole case, zero-padded around it


def test_a_third_of_each_batch_holds_foreground():
    sampler = PatchSampler(_cache(), ["case_0", "case_1"], [16, 16, 16], batch_size=3, seed=0)
    for _ in range(20):
        batch = next(sampler)
        assert (batch["label"][2] > 0).any()  # the last round(3 * 1/3) = 1 patch is forced
    never = PatchSampler(_cache(), ["case_0", "case_1"], [16, 16, 16], batch_size=3, oversample_foreground=0, seed=0)
    hits = sum(int((next(never)["label"] > 0).any()) for _ in range(20))
    assert hits < 20


def test_deterministic_independent_of_case_order_and_resumable():
    cache = _cache()
    a = PatchSampler(cache, ["case_0", "case_1", "case_2"], [8, 16, 8], batch_size=2, seed=5)
    b = PatchSampler(cache, ["case_2", "case_0", "case_1"], [8, 16, 8], batch_size=2, seed=5)
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["image"], y["image"]) and x["case"] == y["case"]
    state = a.state_dict()
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    expected = [next(a)["image"] for _ in range(3)]
    c = PatchSampler(cache, ["case_0", "case_1", "case_2"], [8, 16, 8], batch_size=2, seed=99)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(next(c)["image"], e) for e in expected)


def test_rejects_unknown_cases_and_wrong_dimensions():
    with pytest.raises(KeyError, match="nope"):
        PatchSampler(_cache(), ["nope"], [8, 8, 8], 2)
    with pytest.raises(ValueError, match="do not fit patch size"):
        PatchSampler(_cache(), ["case_0"], [8, 8], 2)
