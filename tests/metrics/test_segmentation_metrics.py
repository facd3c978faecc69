"""Dice, IoU, HD95 on known shapes; empty-structure conventions; overlays; evaluate's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssm.engine.schedules import make_scheduler, poly_factor
from medssm.nets import get_model_card
from medssm.metrics.evaluate_segmentation import EvaluateConfig, evaluate
from medssm.metrics.overlays import overlay_panels, save_overlay
from medssm.metrics.segmentation import case_metrics, dice_of_masks, summarize


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
    assert dice_of_masks(pred[None] == 1, ref[None] == 1) == [pytest.approx(0.5)]


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


def test_recipes_and_schedules():
    recipe = lambda name: get_model_card(name).recipe  # noqa: E731
    assert recipe("lightm_unet_2d_tiny").optimizer == "adam" and recipe("lightm_unet_3d").lr == 1e-4
    assert recipe("segmamba_3d").loss == "ce" and recipe("monai:SegResNet").optimizer == "sgd"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "poly", total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(poly_factor(5, 10)) == pytest.approx(0.5 ** 0.9)


def test_evaluate_draws_a_test_set_with_its_own_images_in_colour(data_root, tmp_path, capsys):
    """labelsTs is drawn over the images of imagesTs (imagesTr beside it holds other cases), an RGB
    image in colour; with no images beside the labels, one printed line says so."""
    from PIL import Image

    from medssm.metrics.overlays import MIN_SIDE

    lung = data_root / "Dataset001_LungXray"
    cases = sorted(p.name[: -len(".png")] for p in (lung / "labelsTr").glob("*.png"))[:3]
    dataset = tmp_path / "Dataset001_LungXray"
    for folder in ("imagesTr", "imagesTs", "labelsTs", "pred"):
        (dataset / folder).mkdir(parents=True)
    grey = {case: np.asarray(Image.open(lung / "imagesTr" / f"{case}_0000.png")) for case in cases}
    Image.fromarray(grey[cases[0]]).save(dataset / "imagesTr" / f"{cases[0]}_0000.png")  # a training case
    Image.fromarray(grey[cases[1]]).save(dataset / "imagesTs" / f"{cases[1]}_0000.png")
    rgb = np.stack([grey[cases[2]], grey[cases[2]] // 2, 255 - grey[cases[2]]], axis=-1)
    Image.fromarray(rgb).save(dataset / "imagesTs" / f"{cases[2]}_0000.png")
    for case in cases[1:]:
        for folder in ("labelsTs", "pred"):
            (dataset / folder / f"{case}.png").write_bytes((lung / "labelsTr" / f"{case}.png").read_bytes())

    def image_panel(out, case):
        picture = np.asarray(Image.open(out / "overlays" / f"{case}.png").convert("RGB")).astype(float)
        side = 256 * max(1, -(-MIN_SIDE // 256))
        return picture[18:18 + side, :side]

    out = evaluate(EvaluateConfig(pred=str(dataset / "pred"), ref=str(dataset / "labelsTs"), out=str(tmp_path / "e"),
                                  progress=False))
    assert "no image" not in capsys.readouterr().out
    panel = image_panel(out, cases[1])
    assert np.corrcoef(panel[..., 0].ravel(), grey[cases[1]].ravel())[0, 1] > 0.95
    panel = image_panel(out, cases[2])
    for channel in range(3):  # each colour channel of the picture follows the file's
        assert np.corrcoef(panel[..., channel].ravel(), rgb[..., channel].ravel().astype(float))[0, 1] > 0.95
    for folder in ("imagesTs", "imagesTr"):
        for f in (dataset / folder).iterdir():
            f.unlink()
        (dataset / folder).rmdir()
    out = evaluate(EvaluateConfig(pred=str(dataset / "pred"), ref=str(dataset / "labelsTs"), out=str(tmp_path / "e2"),
                                  progress=False))
    printed = [line for line in capsys.readouterr().out.splitlines() if "no image" in line]
    assert len(printed) == 1 and "imagesTs" in printed[0] and (out / "overlays" / f"{cases[2]}.png").is_file()
