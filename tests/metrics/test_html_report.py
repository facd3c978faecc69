"""report.html: what it encodes (class bits, orientation, image residuals), and, in a real headless
Chromium (tests/browser.py), pages made by real commands on small real data: the lung quickstart on a
few cases, a hippocampus run with anisotropic voxels, and a classification evaluation.

In the browser: the case table has one row per case and sorts and filters; clicking a case shows it;
moving a slider changes the slice drawn (pixels differ); the three planes of a 3D case are drawn in
the image's spacing; the curves show values on hover; no console error; no request leaves the page.
Screenshots go to $MEDSSM_SCREENSHOTS when it is set (to look at them), else to the test's folder."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medssm.data.io import read_image
from medssm.metrics.html_report import (_med_residuals, _to_uint8, canonical_axes, encode_volume, labels_to_bits,
                                        write_html_report)

from ..browser import Browser
from ..subsets import hippocampus_subset, lung_subset

SPACING_XYZ = (1.0, 1.5, 2.5)  # written into the hippocampus copies (ITK order): no voxel is a cube


# ----------------------------------------------------------------------------------------------
# What the page encodes (no browser).


def test_class_bits_hold_integer_classes_and_overlapping_regions():
    labels = np.array([[0, 1, 2, 3]])
    bits = labels_to_bits(labels, [("anterior", 1), ("posterior", 2)])
    assert bits.tolist() == [[0, 1, 2, 0]]
    # nnU-Net regions (BraTS style): whole tumour {1,2,3}, tumour core {2,3}, enhancing {3}, overlapping
    bits = labels_to_bits(labels, [("whole", [1, 2, 3]), ("core", [2, 3]), ("enhancing", [3])])
    assert bits.tolist() == [[0, 0b001, 0b011, 0b111]]
    assert labels_to_bits(labels, [(f"c{k}", k) for k in range(1, 11)]).dtype == np.uint16


def undo_residuals(res: np.ndarray) -> np.ndarray:
    """The decoder of report.js (unpredict), written again in Python, voxel by voxel."""
    out = np.zeros_like(res, dtype=np.int64)
    for s in np.ndindex(res.shape[:-2]):
        a, r = out[s], res[s].astype(np.int64)
        for y in range(r.shape[0]):
            for x in range(r.shape[1]):
                left = a[y, x - 1] if x else 0
                up = a[y - 1, x] if y else 0
                upleft = a[y - 1, x - 1] if x and y else 0
                lo, hi = min(left, up), max(left, up)
                guess = lo if upleft >= hi else hi if upleft <= lo else left + up - upleft
                a[y, x] = (r[y, x] + guess) & 255
    return out.astype(np.uint8)


def test_image_residuals_invert_exactly(data_root):
    image = _to_uint8(read_image(sorted((data_root / "Dataset002_Hippocampus" / "imagesTr").iterdir())[0])[0])
    part = image[:3, :20, :17]
    assert np.array_equal(undo_residuals(_med_residuals(part)), part)


def test_canonical_axes():
    assert canonical_axes(np.eye(3)) == ((0, 1, 2), (False, False, False))
    assert canonical_axes(np.diag([1.0, -1.0, -1.0])) == ((0, 1, 2), (False, True, True))
    # array axis 0 runs along physical x, axis 2 along -z: read back as (z, y, x)
    d = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert canonical_axes(d) == ((2, 1, 0), (True, False, False))


def test_encode_volume_orients_and_strides_with_the_spacing():
    ref = np.zeros((6, 600, 40), np.uint8)
    ref[2:4, 100:300, 10:20] = 1
    flip_x = np.diag([1.0, 1.0, -1.0])
    v = encode_volume(np.random.default_rng(0).random(ref.shape), (3.0, 0.5, 0.8), flip_x, {"reference": ref},
                      [("a", 1)])
    assert v["dims"] == 3 and v["stride"] == 3 and v["shape"] == [2, 200, 14]  # every 3rd voxel: 600 -> 200
    assert v["spacing"] == pytest.approx([9.0, 1.5, 2.4])
    shown = ref[::3, ::3, ::3][:, :, ::-1]  # every 3rd voxel, x counted from the flipped end
    fg = np.argwhere(shown)
    assert v["centre"] == ((fg.min(0) + fg.max(0)) // 2).tolist()  # the slices first shown: the reference's centre
    v2 = encode_volume(np.ones((3, 32, 48)), (1.0, 1.0), np.eye(2), {"reference": np.zeros((32, 48), np.uint8)},
                       [("a", 1)])
    assert v2["dims"] == 2 and v2["shape"] == [1, 32, 48] and v2["channels"] == 3  # an RGB picture in colour


def page_data(page: Path) -> dict:
    """The JSON report.html draws from."""
    return json.loads(re.search(r'<script id="medssm-data" type="application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))


def test_regions_and_their_names_come_from_the_files(tmp_path):
    """An evaluation of nnU-Net regions (named, overlapping label sets), as summary.json and metrics.csv
    will hold it: the page names the regions and draws each as its own bit."""
    from medssm.data.io import write_image

    ref = np.zeros((16, 16), np.uint8)
    ref[2:10, 2:10], ref[4:8, 4:8] = 1, 2
    for folder in ("pred", "ref"):
        write_image(ref, None, tmp_path / folder / "case_a.png")
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "summary.json").write_text(json.dumps({
        "mean": {"dice": 1.0, "iou": 1.0, "hd95": 0.0}, "n_cases": 1, "pred": str(tmp_path / "pred"),
        "ref": str(tmp_path / "ref"), "images": None, "classes": {"whole": [1, 2], "core": [2]}, "regions": True,
        "per_class": {r: {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "n_cases": 1} for r in ("whole", "core")}}))
    (ev / "metrics.csv").write_text("case,class,dice,iou,hd95,n_pred,n_ref\n"
                                    "case_a,whole,1.0,1.0,0.0,64,64\ncase_a,core,1.0,1.0,0.0,16,16\n")
    data = page_data(write_html_report(ev))
    sections = {s["title"]: s for s in data["sections"]}
    assert [r[0] for r in sections["Metrics"]["rows"]] == ["whole", "core", "mean"]
    cases = sections["Cases"]
    assert [c["name"] for c in cases["viewer"]["classes"]] == ["whole", "core"]
    assert {"dice:whole", "dice:core", "vref:core"} <= {c["key"] for c in cases["columns"]}
    assert ["regions", "whole, core"] in sections["What was evaluated"]["items"]
    volume = data["volumes"]["case_a"]
    bits = np.frombuffer(zlib.decompress(base64.b64decode(volume["labels"]["reference"])), np.uint8).reshape(16, 16)
    assert bits[0, 0] == 0 and bits[3, 3] == 0b01 and bits[5, 5] == 0b11  # the core inside the whole


# ----------------------------------------------------------------------------------------------
# Real pages, in a real browser.


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MEDSSM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lung_quickstart(data_root, tmp_path_factory) -> Path:
    """The lung quickstart, tiny, on 20 real cases (4 held out): its report folder."""
    from medssm.workflows.quickstart import QuickstartConfig, quickstart

    tmp = tmp_path_factory.mktemp("quickstart")
    data = lung_subset(data_root, tmp / "Dataset001_LungXray", n=20, size=64)
    return quickstart(QuickstartConfig(data=str(data), out=str(tmp / "out"), model="lightm_unet_2d_tiny", epochs=2,
                                       iterations_per_epoch=1, batch_size=2, patch_size=32, target_spacing=2.0,
                                       val_every=1, val_cases=1, precision="fp32", progress=False))


@pytest.fixture(scope="module")
def hippocampus_evaluation(data_root, tmp_path_factory) -> Path:
    """A hippocampus run (tiny, one step) on 5 real volumes whose voxels were made 1 x 1.5 x 2.5 mm,
    its predictions of them, and their evaluation folder."""
    from medssm.engine.segmentation import TrainConfig, train
    from medssm.inference.segmentation import PredictConfig, predict
    from medssm.metrics.evaluate_segmentation import EvaluateConfig, evaluate

    tmp = tmp_path_factory.mktemp("hippocampus")
    data = hippocampus_subset(data_root, tmp / "Dataset002_Hippocampus", n=5)
    for f in [*(data / "imagesTr").iterdir(), *(data / "labelsTr").iterdir()]:
        image = sitk.ReadImage(str(f))
        image.SetSpacing(SPACING_XYZ)
        sitk.WriteImage(image, str(f))
    run = train(TrainConfig(data=str(data), out=str(tmp / "run"), model="lightm_unet_3d_tiny", epochs=1,
                            iterations_per_epoch=1, patch_size=(32, 32, 32), batch_size=2, val_cases=1, progress=False))
    predict(PredictConfig(input=str(data / "imagesTr"), output=str(tmp / "pred"), model=str(run), progress=False))
    return evaluate(EvaluateConfig(pred=str(tmp / "pred"), ref=str(data / "labelsTr"), out=str(tmp / "eval"),
                                   progress=False))


def case_dice(folder: Path) -> dict[str, float]:
    """Mean Dice over classes of each case, from metrics.csv."""
    rows = list(csv.DictReader(io.StringIO((folder / "metrics.csv").read_text())))
    cases = dict.fromkeys(r["case"] for r in rows)
    return {c: float(np.mean([float(r["dice"]) for r in rows if r["case"] == c])) for c in cases}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def table_cases(b: Browser) -> list[str]:
    return b.js("[...document.querySelectorAll('#cases tbody tr')].map(tr => tr.dataset.case)")


def check_page_is_offline(page: Path, b: Browser) -> None:
    html = page.read_text()
    assert not re.search(r"<(link|img|iframe|object|embed)\b|\bsrc=", html), "the page loads nothing from outside"
    assert "default-src 'none'" in html
    assert b.errors == []
    assert b.requests_off_page() == []
    assert b.requests == [page.resolve().as_uri()]  # the page itself, nothing else


def test_lung_quickstart_page(browser_path, lung_quickstart, shots):
    page = lung_quickstart / "report.html"
    assert page.is_file()
    summary = json.loads((lung_quickstart / "summary.json").read_text())
    assert summary["classes"] == {"lung": [1]} and summary["predictions"]["model"] == "lightm_unet_2d_tiny"
    assert Path(summary["images"]).name == "imagesTr" and summary["created"]
    dice = case_dice(lung_quickstart)
    assert len(dice) == 4
    with Browser(browser_path) as b:
        b.open(page)
        # the summary names the metric table, the run and the time
        text = b.js("document.body.innerText")
        assert "lightm_unet_2d_tiny" in text and "Training" in text and "Time" in text
        # one row per case, sorted by Dice (lowest first), then the other way round
        assert sorted(table_cases(b)) == sorted(dice)
        assert table_cases(b) == sorted(dice, key=dice.get)
        b.click("#cases th[data-key='dice']")
        assert table_cases(b) == sorted(dice, key=dice.get, reverse=True)
        b.click("#cases th[data-key='case']")
        assert table_cases(b) == sorted(dice)
        # filter by name
        some = sorted(dice)[1]
        b.click("#cases .filter-text")
        b.type(some[-6:])
        assert table_cases(b) == [c for c in sorted(dice) if some[-6:] in c]
        b.js("(() => { const i = document.querySelector('#cases .filter-text'); i.value = ''; "
             "i.dispatchEvent(new Event('input')); })()")
        # the page opens on the worst case; a click shows another: one 2D plane, no slice slider
        assert b.js("document.querySelector('.viewer-title').dataset.case") == min(dice, key=dice.get)
        b.click("#cases th[data-key='dice']")  # lowest first again
        worst, best = min(dice, key=dice.get), max(dice, key=dice.get)
        assert table_cases(b)[0] == worst
        b.click(f"#cases tbody tr[data-case='{best}']")
        b.wait_for(f"document.querySelector('.viewer-title').dataset.case === '{best}'")
        assert b.js("document.querySelector('#cases tr.selected').dataset.case") == best
        assert b.js("document.querySelectorAll('canvas.plane').length") == 1
        assert b.js("document.querySelector('.slice-bar').offsetParent === null")  # hidden for 2D
        assert f"Dice {dice[best]:.4f}" in b.js("document.querySelector('.panel-title').textContent")
        canvas = "canvas.plane[data-plane='axial']"
        shown = pixels(b.screenshot(canvas, path=shots / "lung_case.png"))
        assert shown.std() > 10  # an image, not an empty canvas
        # the prediction toggle changes what is drawn, and brings it back
        b.click("#show-prediction")
        without = pixels(b.screenshot(canvas))
        b.click("#show-prediction")
        assert np.abs(without - shown).max() > 0 and np.array_equal(pixels(b.screenshot(canvas)), shown)
        # previous: the case before it in the table's order
        b.click(".case-nav button:nth-child(1)")
        second = sorted(dice, key=dice.get)[-2]
        b.wait_for(f"document.querySelector('.viewer-title').dataset.case === '{second}'")
        # the training curves show their values on hover
        point = b.rect("#training circle")  # the first point of the first curve
        b.move(point["x"] + point["width"] / 2, point["y"] + point["height"] / 2)
        tip = b.wait_for("(() => { const t = document.querySelector('#training .tooltip:not([hidden])');"
                         " return t && t.textContent; })()")
        assert "train_loss" in tip and "epoch: 1" in tip
        b.js("window.scrollTo(0, 0)")
        b.screenshot(path=shots / "lung_quickstart.png")
        check_page_is_offline(page, b)


def test_hippocampus_page_scrolls_in_three_planes_in_the_image_spacing(browser_path, hippocampus_evaluation, shots):
    folder = hippocampus_evaluation
    page = folder / "report.html"
    dice = case_dice(folder)
    case = max(dice, key=dice.get)  # not the one the page opens on
    images = Path(json.loads((folder / "summary.json").read_text())["images"])
    image, geometry = read_image(images / f"{case}_0000.nii.gz")
    # these volumes need no axis swapped, their y and x axes flipped (LPS: towards posterior and left)
    assert canonical_axes(geometry.direction) == ((0, 1, 2), (False, True, True))
    (Z, Y, X), (sz, sy, sx) = image.shape, geometry.spacing
    assert (sx, sy, sz) == SPACING_XYZ
    with Browser(browser_path) as b:
        b.open(page)
        assert sorted(table_cases(b)) == sorted(dice) and len(dice) == 5
        b.click(f"#cases tbody tr[data-case='{case}']")
        b.wait_for(f"document.querySelector('.viewer-title').dataset.case === '{case}'")
        sizes = b.js("Object.fromEntries([...document.querySelectorAll('canvas.plane')].map(c => [c.dataset.plane, "
                     "[c.getBoundingClientRect().width, c.getBoundingClientRect().height, c.width, c.height]]))")
        assert set(sizes) == {"axial", "coronal", "sagittal"}
        # voxels drawn in their spacing, one scale for the three planes: (width, height) in mm
        expected = {"axial": (X * sx, Y * sy, X, Y), "coronal": (X * sx, Z * sz, X, Z),
                    "sagittal": (Y * sy, Z * sz, Y, Z)}
        scale = sizes["axial"][0] / expected["axial"][0]
        for plane, (w, h, cols, rows) in expected.items():
            assert sizes[plane][2:] == [cols, rows], plane
            assert sizes[plane][0] == pytest.approx(w * scale, abs=1.0), plane
            assert sizes[plane][1] == pytest.approx(h * scale, abs=1.0), plane
        assert sizes["coronal"][1] / sizes["coronal"][0] == pytest.approx(Z * 2.5 / X, rel=0.02)  # not Z / X
        # the decoded image is the one Python encoded, voxel for voxel (flipped to the canonical axes)
        decoded = b.js(f"medssmReport.decode('{case}').then(v => Array.from(v.image))")
        order, flips = canonical_axes(geometry.direction)
        expected_image = _to_uint8(image)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
        assert np.array_equal(np.asarray(decoded, np.uint8).reshape(Z, Y, X), expected_image)
        b.screenshot(path=shots / "hippocampus_case.png")
        # hovering names the voxel of the file (its y and x axes were flipped for the canonical view)
        reference = read_image(folder.parent / "Dataset002_Hippocampus" / "labelsTr" / f"{case}.nii.gz")[0]
        names = {0: "background", 1: "anterior", 2: "posterior"}
        k = int(b.js("document.querySelector('#slice-axial').value"))
        hits = np.argwhere(reference[k, ::-1, ::-1] > 0)  # a voxel of the hippocampus on this slice, as drawn
        r, c = hits[len(hits) // 2]
        box = b.rect("canvas.plane[data-plane='axial']")
        b.move(box["x"] + (c + 0.5) * box["width"] / X, box["y"] + (r + 0.5) * box["height"] / Y)
        readout = b.wait_for("document.querySelector('.readout').textContent")
        assert readout.startswith(f"voxel ({X - 1 - c}, {Y - 1 - r}, {k}) of the file")
        assert f"reference: {names[int(reference[k, Y - 1 - r, X - 1 - c])]}" in readout
        # moving the axial slider (keys, as a person would) draws another slice; the other planes stay
        b.js("document.querySelector('#slice-axial').focus()")
        start = int(b.js("document.querySelector('#slice-axial').value"))
        before = {p: pixels(b.screenshot(f"canvas.plane[data-plane='{p}']")) for p in sizes}
        step = -3 if start > Z // 2 else 3
        for _ in range(abs(step)):
            b.press("ArrowLeft" if step < 0 else "ArrowRight", key_code=37 if step < 0 else 39)
        assert int(b.js("document.querySelector('#slice-axial').value")) == start + step
        assert b.js("document.querySelector('.slice-label').textContent") == f"{start + step + 1} / {Z}"
        after = {p: pixels(b.screenshot(f"canvas.plane[data-plane='{p}']")) for p in sizes}
        assert np.abs(after["axial"] - before["axial"]).max() > 0
        assert np.array_equal(after["coronal"], before["coronal"])
        assert np.array_equal(after["sagittal"], before["sagittal"])
        # scrolling over the coronal plane moves its slice
        coronal = int(b.js("document.querySelector('#slice-coronal').value"))
        r = b.rect("canvas.plane[data-plane='coronal']")
        b.send("Input.dispatchMouseEvent", type="mouseWheel", x=r["x"] + r["width"] / 2, y=r["y"] + r["height"] / 2,
               deltaX=0, deltaY=100)
        b.wait_for(f"document.querySelector('#slice-coronal').value === '{min(coronal + 1, Y - 1)}'")
        b.screenshot(path=shots / "hippocampus_slider.png")
        check_page_is_offline(page, b)


def test_classification_page(browser_path, data_root, tmp_path, shots, capsys):
    from medssm.metrics.evaluate_classification import (ClassifierEvaluateConfig, evaluate_classifier,
                                                        write_predictions)

    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        targets = z["test_labels"][:40, 0].astype(np.int64)
    rng = np.random.default_rng(0)
    p1 = np.clip(0.3 + 0.4 * targets + rng.normal(0, 0.25, len(targets)), 0.01, 0.99)
    names = [f"test/{i}" for i in range(len(targets))]
    write_predictions(tmp_path / "pred.csv", names, np.stack([1 - p1, p1], 1), ["normal", "pneumonia"], targets)
    m = evaluate_classifier(ClassifierEvaluateConfig(predictions=str(tmp_path / "pred.csv"), out=str(tmp_path / "ev"),
                                                     progress=False))
    page = tmp_path / "ev" / "report.html"
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {page}"  # the command's last line
    with Browser(browser_path) as b:
        b.open(page)
        assert len(table_cases(b)) == 40
        cells = b.js("[...document.querySelectorAll('table.confusion tbody td')].map(td => +td.textContent)")
        assert cells == [v for row in m["confusion_matrix"] for v in row]
        assert "AUC" in b.js("document.querySelector('#roc').textContent")
        column = "[...document.querySelectorAll('#cases tbody tr')].map(tr => +tr.children[3].textContent)"
        p_true = np.where(targets == 1, p1, 1 - p1)
        assert b.js(column) == sorted(np.round(p_true, 4).tolist())  # the worst errors first
        b.click("#cases th[data-key=':ptrue']")
        assert b.js(column) == sorted(np.round(p_true, 4).tolist(), reverse=True)
        b.screenshot(path=shots / "classification.png")
        check_page_is_offline(page, b)


def test_multi_label_classification_page(browser_path, tmp_path):
    """Several findings per image: no confusion matrix, a ROC curve per finding, the findings listed."""
    from medssm.metrics.evaluate_classification import (ClassifierEvaluateConfig, evaluate_classifier,
                                                        write_predictions)

    rng = np.random.default_rng(1)
    findings = ["effusion", "mass", "nodule"]
    targets = (rng.random((30, 3)) < 0.4).astype(np.int64)
    probs = np.clip(0.25 + 0.5 * targets + rng.normal(0, 0.2, targets.shape), 0.01, 0.99)
    write_predictions(tmp_path / "pred.csv", [f"x{i}" for i in range(30)], probs, findings, targets)
    evaluate_classifier(ClassifierEvaluateConfig(predictions=str(tmp_path / "pred.csv"), out=str(tmp_path / "ev"),
                                                 progress=False))
    page = tmp_path / "ev" / "report.html"
    sections = {s["title"]: s for s in page_data(page)["sections"]}
    assert "Confusion matrix" not in sections
    assert [r[0] for r in sections["Per class"]["rows"]] == findings
    with Browser(browser_path) as b:
        b.open(page)
        legend = b.js("[...document.querySelectorAll('#roc .legend > span')]"
                      ".map(e => e.textContent)")
        assert [t.split(" (AUC")[0] for t in legend] == findings
        assert b.js("document.querySelector('#cases tbody tr').children[1].textContent") == \
            "; ".join(f for f, t in zip(findings, targets[0]) if t)
        check_page_is_offline(page, b)


def test_write_html_report_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compare.json, summary.json or metrics.json"):
        write_html_report(tmp_path)
