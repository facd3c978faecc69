"""The segmentation losses against float64 references written here from their definitions (and MONAI's
Dice for regions), on fresh random inputs: classes (softmax) and regions (sigmoid), with an ignore label."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from medssm.engine.losses import make_loss
from medssm.labels import LabelSet

CLASSES = LabelSet({"background": 0, "a": 1, "b": 2})
REGIONS = LabelSet({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, (1, 2, 3))


def reference(logits, target, labels, name):
    """The loss by its definition, in float64."""
    x, t = logits.double(), target[:, 0].long()
    if labels.has_regions:
        onehot = torch.stack([torch.isin(t, torch.tensor(v)) for v in labels.structures.values()], 1).double()
        probs, ce = x.sigmoid(), F.binary_cross_entropy_with_logits(x, onehot)
    else:
        onehot = F.one_hot(t, x.shape[1]).movedim(-1, 1).double()[:, 1:]
        probs, ce = x.softmax(1)[:, 1:], F.cross_entropy(x, t)
    axes = (0, *range(2, x.ndim))
    dice = (2 * (probs * onehot).sum(axes) + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
    return {"dice_ce": ce + 1 - dice.mean(), "ce": ce, "dice": 1 - dice.mean()}[name]


@pytest.mark.parametrize("name", ["dice_ce", "ce", "dice"])
@pytest.mark.parametrize("labels,dims", [(CLASSES, 2), (CLASSES, 3), (REGIONS, 2), (REGIONS, 3)])
def test_losses_match_their_definitions(labels, dims, name):
    torch.manual_seed(dims * 10 + len(name))
    shape = (3, labels.channels, *([9] * dims))
    logits = torch.randn(shape, dtype=torch.float64) * 3
    target = torch.randint(0, max(labels.values) + 1, (3, 1, *shape[2:]))
    got = make_loss(name, labels)(logits.float(), target)
    torch.testing.assert_close(got.double(), reference(logits.float(), target, labels, name), rtol=1e-5, atol=1e-6)


def test_region_dice_is_monais_sigmoid_dice():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 12, 12), torch.randint(0, 4, (2, 1, 12, 12))
    onehot = torch.stack([torch.isin(target[:, 0], torch.tensor(v)) for v in REGIONS.structures.values()], 1).float()
    monai = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, onehot)
    torch.testing.assert_close(make_loss("dice", REGIONS)(logits, target), monai, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [CLASSES, REGIONS])
def test_ignored_voxels_count_in_neither_term_and_a_perfect_answer_costs_nothing(labels):
    with_ignore = LabelSet({**labels.labels, "ignore": 9}, labels.regions_class_order)
    torch.manual_seed(2)
    logits, target = torch.randn(2, labels.channels, 10, 10), torch.randint(0, max(labels.values) + 1, (2, 1, 10, 10))
    target[:, :, :3] = 9
    loss = make_loss("dice_ce", with_ignore)
    changed = logits.clone()
    changed[..., :3, :] = torch.randn_like(changed[..., :3, :]) * 10
    torch.testing.assert_close(loss(logits, target), loss(changed, target))
    kept = target.clone()
    kept[:, :, :3] = 0
    if labels.has_regions:
        perfect = torch.stack([torch.isin(kept[:, 0], torch.tensor(v)) for v in labels.structures.values()], 1)
    else:
        perfect = F.one_hot(kept[:, 0], labels.channels).movedim(-1, 1)
    assert loss(perfect.float() * 40 - 20, target) < 1e-4
