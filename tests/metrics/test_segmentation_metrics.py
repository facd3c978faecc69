"""Dice, IoU, HD95 on known shapes; empty-structure conventions; overlays; evaluate's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssm.engine.losses import DiceCELoss, SoftDiceLoss, make_loss
from medssm.engine.schedules import make_scheduler, poly_factor
from medssm.nets import get_model_card
from medssm.metrics.evaluate_segmentation import EvaluateConfig, evaluate
from medssm.metrics.overlays import overlay_panels, save_overlay
from medssm.metrics.segmentation import case_metrics, dice_per_class, summarize


def squares():
    ref = np.zeros((40, 40), np.uint8)
    ref[10:20, 10:20] = 1  # 100 px
    pred = np.zeros_like(ref)
    pred[10:20, 15:25] = 1  # 100 px, 50 overlap
    return pred, ref


def test_known_values():
    pred, ref = squares()
    m = case_metrics(pred, ref, {"background": 0, "a": 1}, spacing=(2.0, 1.0))["a"]
    assert m["dice"] == pytest.approx(0.5) and m["iou"] == pytest.approx(50 / 150)
    assert m["hd95"] == pytest.approx(5.0)  # the shift is along axis 1 (spacing 1)
    m2 = case_metrics(pred.T, ref.T, {"a": 1}, spacing=(2.0, 1.0))["a"]
    assert m2["hd95"] == pytest.approx(10.0)  # now along axis 0 (spacing 2)
    assert dice_per_class(torch.from_numpy(pred), torch.from_numpy(ref), 2) == [pytest.approx(0.5)]


def test_empty_conventions_and_summary():
    z = np.zeros((8, 8), np.uint8)
    one = z.copy()
    one[2:4, 2:4] = 1
    assert case_metrics(z, z, {"a": 1})["a"] | {} == {"n_pred": 0, "n_ref": 0, "dice": 1.0, "iou": 1.0, "hd95": 0.0}
    miss = case_metrics(z, one, {"a": 1})["a"]
    assert miss["dice"] == 0 and math.isnan(miss["hd95"])
    rows = [{"case": "x", "class": "a", "dice": 0.0, "iou": 0.0, "hd95": math.nan},
            {"case": "y", "class": "a", "dice": 1.0, "iou": 1.0, "hd95": 2.0}]
    s = summarize(rows)
    assert s["mean"]["dice"] == 0.5 and s["mean"]["hd95"] == 2.0 and s["per_class"]["a"]["n_hd95_undefined"] == 1
    with pytest.raises(ValueError, match="differs"):
        case_metrics(z, np.zeros((8, 9)), {"a": 1})


def test_overlays_2d_and_3d(tmp_path):
    pred, ref = squares()
    assert overlay_panels(np.random.rand(40, 40), ref, pred).shape[2] == 3
    vol = np.zeros((6, 7, 8), np.uint8)
    vol[2:4, 2:5, 3:6] = 2
    panels = overlay_panels(None, vol, vol)
    assert panels.ndim == 3 and panels.shape[0] > panels.shape[1] / 3  # three rows of middle slices
    p = save_overlay(tmp_path / "o.png", None, vol, vol, title="t")
    from PIL import Image

    assert Image.open(p).format == "PNG"


def test_evaluate_refuses_missing_reference_and_writes_nothing(tmp_path):
    from medssm.data.io import Geometry, write_image

    pred_dir, ref_dir = tmp_path / "p", tmp_path / "r"
    pred, ref = squares()
    write_image(pred, Geometry.default(pred.shape), pred_dir / "a.png")
    write_image(pred, Geometry.default(pred.shape), pred_dir / "b.png")
    write_image(ref, Geometry.default(ref.shape), ref_dir / "a.png")
    with pytest.raises(FileNotFoundError, match="no reference for 1 prediction"):
        evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(ref_dir), out=str(tmp_path / "e"), progress=False))
    assert not (tmp_path / "e").exists()
    (pred_dir / "b.png").unlink()
    out = evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(ref_dir), out=str(tmp_path / "e"), progress=False))
    assert (out / "summary.json").is_file() and (out / "overlays" / "a.png").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(ref_dir), out=str(tmp_path / "e"), progress=False))


def test_losses_and_recipes():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    loss = make_loss("dice_ce")(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert SoftDiceLoss()(perfect, target) < 1e-4 and DiceCELoss()(perfect, target) < 1e-4
    recipe = lambda name: get_model_card(name).recipe  # noqa: E731
    assert recipe("lightm_unet_2d_tiny").optimizer == "adam" and recipe("lightm_unet_3d").lr == 1e-4
    assert recipe("segmamba_3d").loss == "ce" and recipe("monai:SegResNet").optimizer == "sgd"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "poly", total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(poly_factor(5, 10)) == pytest.approx(0.5 ** 0.9)
