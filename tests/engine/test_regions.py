"""nnU-Net v2 region datasets end to end: the integrity check, the plan, training one sigmoid per region,
prediction to a label map by regions_class_order, evaluation per region (also of an integer-label
model, the BraTS way), on a region version of the real hippocampus set and on a synthetic four-channel
BraTS-like set (SegMamba and SwinUNETR)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medssm.cli import main
from medssm.data.segmentation.nnunet import DatasetError, verify_dataset
from medssm.data.segmentation.plan import make_plan
from medssm.engine.segmentation import TrainConfig, train
from medssm.runs import load_run

from ..subsets import hippocampus_subset
from ..synthetic import BRATS_REGIONS, HIPPOCAMPUS_REGIONS, brats_like, region_version

TINY3D = dict(model="lightm_unet_3d_tiny", epochs=1, iterations_per_epoch=3, patch_size=(32, 32, 32), batch_size=2,
              progress=False, device="cpu")


@pytest.fixture(scope="module")
def hippo(data_root, tmp_path_factory):
    return hippocampus_subset(data_root, tmp_path_factory.mktemp("hippo") / "Dataset002_Hippocampus", n=5)


@pytest.fixture(scope="module")
def hippo_regions(hippo, tmp_path_factory):
    return region_version(hippo, tmp_path_factory.mktemp("regions") / "Dataset003_HippocampusRegions",
                          HIPPOCAMPUS_REGIONS)


@pytest.fixture(scope="module")
def region_run(hippo_regions, tmp_path_factory):
    return train(TrainConfig(data=str(hippo_regions), out=str(tmp_path_factory.mktemp("runs") / "r"), **TINY3D))


def with_meta(dataset, tmp_path, **changes):
    copy = tmp_path / dataset.name
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**meta, **changes}))
    return copy


def test_the_integrity_check_understands_regions(hippo_regions, tmp_path):
    dataset = verify_dataset(hippo_regions)
    assert dataset.label_set.has_regions and dataset.label_set.structures == {"hippocampus": (1, 2), "posterior": (2,)}
    bad = {
        "needs 'regions_class_order'": {"regions_class_order": None},
        "has 1 entries for 2 regions": {"regions_class_order": [1]},
        "paints 1 for region 'posterior', which holds labels \\[2\\]": {"regions_class_order": [1, 1]},
        "label 3 occurs in no label file": {"labels": {"background": 0, "hippocampus": [1, 2, 3], "posterior": 2}},
        "cannot hold the background label 0": {"labels": {"background": 0, "all": [0, 1, 2], "posterior": 2}},
    }
    for i, (problem, change) in enumerate(bad.items()):
        copy = with_meta(hippo_regions, tmp_path / str(i), **change)
        with pytest.raises(DatasetError, match=problem):
            verify_dataset(copy)


def test_the_plan_records_the_regions_and_the_network_has_a_channel_each(hippo_regions):
    plan = make_plan(verify_dataset(hippo_regions), divisor=16)
    assert plan.regions_class_order == [1, 2] and plan.label_set.channels == 2
    assert plan.label_set.activation == "sigmoid" and plan.num_classes == 3  # labels 0, 1, 2 in the files


def test_a_region_run_trains_predicts_and_is_scored_per_region(region_run, hippo_regions, tmp_path):
    log = load_run(region_run).log
    assert {"val_dice", "val_dice_hippocampus", "val_dice_posterior"} <= set(log[-1])
    model = load_run(region_run).load_model()
    assert model.medssm_config["kwargs"]["out_channels"] == 2
    pred = tmp_path / "pred"
    assert main(["predict", "-i", str(hippo_regions / "imagesTr"), "-o", str(pred), "-m", str(region_run),
                 "--save-probabilities", "--no-progress"]) == 0
    case = sorted(pred.glob("*.nii.gz"))[0]
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
    with np.load(str(case).replace(".nii.gz", ".npz")) as f:
        probs, names = f["probabilities"], list(f["labels"])
    assert names == ["hippocampus", "posterior"] and probs.shape == (2, *label_map.shape)
    # The label map is the regions painted in regions_class_order where their probability exceeds 0.5.
    expected = np.zeros(label_map.shape, np.uint8)
    expected[probs[0] > 0.5] = 1
    expected[probs[1] > 0.5] = 2
    assert (label_map == expected).all() and set(np.unique(label_map)) <= {0, 1, 2}
    source = sitk.ReadImage(str(hippo_regions / "imagesTr" / case.name.replace(".nii.gz", "_0000.nii.gz")))
    assert sitk.ReadImage(str(case)).GetSpacing() == source.GetSpacing()
    ev = tmp_path / "ev"
    assert main(["evaluate", str(pred), str(hippo_regions / "labelsTr"), "-o", str(ev), "--no-progress"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["structures"] == "regions" and set(summary["per_class"]) == {"hippocampus", "posterior"}


def test_an_integer_label_model_is_scored_the_region_way(hippo, tmp_path):
    """Label maps of any model, scored per region: the region is the union of its labels in both maps."""
    pred, ref = tmp_path / "pred", hippo / "labelsTr"
    pred.mkdir()
    cases = sorted(ref.glob("*.nii.gz"))
    rng = np.random.default_rng(0)
    for path in cases:  # a "prediction": the reference with every anterior voxel called posterior, and noise
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        array = np.where(array == 1, 2, array)
        array[rng.random(array.shape) < 0.01] = 0
        out = sitk.GetImageFromArray(array.astype(np.uint8))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(pred / path.name))
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"hippocampus": [1, 2], "posterior": [2]}))
    assert main(["evaluate", str(pred), str(ref), "-o", str(tmp_path / "ev"), "--regions", str(regions),
                 "--no-overlays", "--no-progress"]) == 0
    rows = [r.split(",") for r in (tmp_path / "ev" / "metrics.csv").read_text().splitlines()[1:]]
    by = {(r[0], r[1]): float(r[2]) for r in rows}
    for path in cases:
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / path.name)))
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        for name, values in (("hippocampus", [1, 2]), ("posterior", [2])):
            a, b = np.isin(p, values), np.isin(r, values)
            case = path.name[: -len(".nii.gz")]
            assert by[case, name] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-6)
    assert all(by[c, "hippocampus"] > 0.95 for c, n in by if n == "hippocampus")  # the whole is right ...
    assert all(by[c, "posterior"] < 0.9 for c, n in by if n == "posterior")  # ... the posterior part is not


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return brats_like(tmp_path_factory.mktemp("brats") / "Dataset004_BraTSLike", cases=5, shape=(32, 40, 32))


def test_mri_sequences_are_normalised_inside_the_brain(brats):
    plan = make_plan(verify_dataset(brats), divisor=16)
    assert plan.normalization == ["ZScore"] * 4 and plan.use_mask_for_norm == [True] * 4
    assert plan.label_set.structures == {"whole tumour": (1, 2, 3), "tumour core": (2, 3), "enhancing tumour": (3,)}


def test_segmamba_trains_predicts_and_scores_brats_regions(brats, tmp_path):
    """The seed's own setting at toy size: four sequences in, three nested regions out (SwinUNETR, which
    halves its input five times, needs patches of 64³: it is run on this set in the measured comparison)."""
    run = train(TrainConfig(data=str(brats), out=str(tmp_path / "run"), **{**TINY3D, "model": "segmamba_tiny",
                                                                          "iterations_per_epoch": 1, "val_cases": 1}))
    assert load_run(run).load_model().medssm_config["kwargs"]["out_channels"] == 3
    pred = tmp_path / "pred"
    assert main(["predict", "-i", str(brats / "imagesTr"), "-o", str(pred), "-m", str(run), "--no-mirror",
                 "--no-progress"]) == 0
    assert main(["evaluate", str(pred), str(brats / "labelsTr"), "-o", str(tmp_path / "ev"), "--no-overlays",
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert list(summary["per_class"]) == list(BRATS_REGIONS["labels"])[1:] and summary["n_cases"] == 5
