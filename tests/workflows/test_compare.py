"""medssm compare end to end on a few real cases: two tiny models, a tiny budget, the report, and resume."""

import contextlib
import io
import json
import re

import numpy as np
import pytest

from medssm.cli import main

from ..browser import Browser
from ..subsets import lung_subset


def page_data(page) -> dict:
    """The JSON report.html draws from."""
    return json.loads(re.search(r'<script id="medssm-data" type="application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))


@pytest.fixture(scope="module")
def lung_comparison(data_root, tmp_path_factory):
    """compare on 6 real lung cases, two tiny models: (output folder, arguments, what it printed)."""
    tmp = tmp_path_factory.mktemp("compare")
    lung = lung_subset(data_root, tmp / "Dataset001_LungXray", n=6, size=64)
    out = tmp / "cmp"
    args = ["compare", "-d", str(lung), "--models", "lightm_unet_2d_tiny,monai:UNet", "--budget", "10s",
            "--over-budget", "--recipe", "short", "-o", str(out), "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return out, args, printed.getvalue()


def test_segmentation_comparison_and_resume(lung_comparison, capsys):
    out, args, printed = lung_comparison
    result = json.loads((out / "compare.json").read_text())
    rows = {r["model"]: r for r in result["results"]}
    assert set(rows) == {"lightm_unet_2d_tiny", "monai:UNet"} and all(r["status"] == "complete" for r in rows.values())
    for r in rows.values():
        held_out = r["scores"]["held_out"]
        assert held_out["cases"] == 2 and held_out["dice"] > 0  # fold 0 of 6 cases: 2 held out, scored
        evaluation = out / "models" / r["model"].replace(":", "_") / "evaluation_held_out" / "summary.json"
        assert held_out["dice"] == json.loads(evaluation.read_text())["mean"]["dice"]
        assert r["cost"]["parameters"] > 0 and r["cost"]["step_s"] > 0 and r["curve"]
        assert r["recipe"]["optimizer"] == "adamw"  # --recipe short, shared
    for png in ("curves.png", "scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "lightm_unet_2d_tiny" in report and "monai:UNet" in report
    # report.html: its path is the last line printed; a row per model; the held-out cases of both models
    page = out / "report.html"
    assert printed.splitlines()[-1] == f"report: {page}"
    sections = {s["title"]: s for s in page_data(page)["sections"]}
    assert [r[0] for r in sections["Models"]["rows"]] == ["lightm_unet_2d_tiny", "monai:UNet"]
    cases = sections["Held-out cases, model by model"]
    assert cases["viewer"]["panels"] == ["lightm_unet_2d_tiny", "monai:UNet"]
    assert sorted(r["case"] for r in cases["rows"]) == summary_cases(out)
    # Run again: both models are complete and not trained again; the report is rewritten.
    stamp = (out / "models" / "monai_UNet" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("complete, not run again") == 2
    assert (out / "models" / "monai_UNet" / "result.json").stat().st_mtime_ns == stamp


def summary_cases(out):
    """The held-out cases, as the first model's evaluation lists them."""
    rows = (out / "models" / "lightm_unet_2d_tiny" / "evaluation_held_out" / "metrics.csv").read_text().splitlines()[1:]
    return sorted({r.split(",")[0] for r in rows})


def test_comparison_page_shows_the_models_side_by_side(lung_comparison, browser_path):
    out, _, _ = lung_comparison
    with Browser(browser_path) as b:
        b.open(out / "report.html")
        assert b.js("[...document.querySelectorAll('#models tbody tr')].map(tr => tr.children[0].textContent)") == \
            ["lightm_unet_2d_tiny", "monai:UNet"]
        b.click("#cases tbody tr")
        b.wait_for("document.querySelectorAll('canvas.plane').length === 2")
        assert b.js("[...document.querySelectorAll('.panel')].map(p => p.dataset.panel)") == \
            ["lightm_unet_2d_tiny", "monai:UNet"]
        assert b.js("document.querySelectorAll('#charts svg').length") == 3  # scores, curves, score and time
        assert b.errors == [] and b.requests_off_page() == []


def test_classification_comparison(data_root, tmp_path):
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        arrays = {f"{s}_{k}": z[f"{s}_{k}"][:n] for s, n in (("train", 48), ("val", 16), ("test", 16))
                  for k in ("images", "labels")}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    out = tmp_path / "cmp"
    assert main(["compare", "-d", str(tmp_path / "pneumoniamnist.npz"), "--models", "medmamba_tiny,monai:resnet18",
                 "--budget", "5s", "--over-budget", "-o", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "compare.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["complete", "complete"]
    sections = {s["title"]: s for s in page_data(out / "report.html")["sections"]}
    matrices = sections["Confusion matrices (held-out)"]["matrices"]
    assert [m["title"] for m in matrices] == ["medmamba_tiny", "monai:resnet18"]
    for m, r in zip(matrices, rows):  # each model's held-out confusion matrix, as its evaluation counted it
        assert sum(map(sum, m["matrix"])) == r["scores"]["held_out"]["cases"]
    roc = sections["ROC per class (held-out)"]["charts"]
    assert len(roc) == 1 and [s["name"].split(" (")[0] for s in roc[0]["series"]] == ["medmamba_tiny", "monai:resnet18"]
    assert all({"held_out", "test"} <= set(r["scores"]) for r in rows)
    assert all(r["scores"]["test"]["cases"] == 16 for r in rows)
    for r in rows:  # refitted after every epoch, never past one pass over the 48 samples
        assert r["budget"]["epochs"] == 1 or r["budget"]["refit"]["iterations_per_epoch"] <= 24


def test_the_default_comparison_follows_the_data_and_the_cards(data_root, tmp_path):
    from medssm.workflows.compare import default_models, task_of

    volumes = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "cubes3d.npz", **{f"{s}_{k}": v for s in ("train", "val", "test")
                                          for k, v in (("images", volumes), ("labels", np.array([[0], [1], [0], [1]])))})
    assert task_of(str(tmp_path / "cubes3d.npz")) == ("classification", 3)
    assert task_of(str(data_root / "Dataset002_Hippocampus")) == ("segmentation", 3)
    assert default_models("classification", 3) == ["medmamba_t", "medmamba_t_nomamba", "monai:resnet18"]
    assert default_models("segmentation", 2) == ["lightm_unet_2d", "lightm_unet_2d_nomamba", "monai:SegResNet",
                                                 "monai:UNet", "monai:DynUNet"]


def test_a_region_dataset_is_compared_per_region(data_root, tmp_path):
    from ..synthetic import lung_regions

    regions = lung_regions(lung_subset(data_root, tmp_path / "lung", n=6, size=64), tmp_path / "Dataset005_LungRegions")
    out = tmp_path / "cmp"
    assert main(["compare", "-d", str(regions), "--models", "lightm_unet_2d_tiny", "--budget", "5s", "--over-budget",
                 "--recipe", "short", "-o", str(out), "--no-progress"]) == 0
    row = json.loads((out / "compare.json").read_text())["results"][0]
    per = row["scores"]["held_out"]["per_structure"]
    assert list(per) == ["lungs", "right lung"]
    assert row["scores"]["held_out"]["dice"] == pytest.approx(np.mean([per[n]["dice"] for n in per]))
    assert "| model | lungs | right lung |" in (out / "report.md").read_text()


def test_a_multi_label_dataset_is_compared_by_mean_auc(tmp_path):
    from ..synthetic import chestmnist_like

    chest = chestmnist_like(tmp_path / "chestmnist.npz")
    out = tmp_path / "cmp"
    assert main(["compare", "-d", str(chest), "--models", "medmamba_tiny", "--budget", "5s", "--over-budget",
                 "-o", str(out), "--no-progress"]) == 0
    row = json.loads((out / "compare.json").read_text())["results"][0]
    metrics = json.loads((out / "models" / "medmamba_tiny" / "evaluation_test" / "metrics.json").read_text())
    assert metrics["multi_label"] and row["scores"]["test"]["auc"] == metrics["auc"]
    assert row["scores"]["test"]["cases"] == 32 and {"held_out", "test"} <= set(row["scores"])
