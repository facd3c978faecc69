"""Stock nnU-Net v2 with medssm's trainers: plan, preprocess, train one short epoch on a few real
lung X-rays (CPU), validate, predict, and load the checkpoint back with medssm.load_pretrained.

Every nnU-Net step runs through nnU-Net's own command-line entry points in a subprocess, with the
trainer found through ``nnUNet_extTrainer`` exactly as a user's shell would find it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("nnunetv2")

import medssm  # noqa: E402
from medssm.integrations import nnunet as medssm_nnunet  # noqa: E402
from medssm.nets.pretrained import load_pretrained  # noqa: E402

CASES = ["CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0003_0", "CHNCXR_0004_0"]
TINY = {"init_filters": 8, "blocks_down": (1, 1, 1, 1)}
TEST_TRAINER = f'''
import torch
from medssm.integrations.nnunet import nnUNetTrainerLightMUNet


class nnUNetTrainerLightMUNetTest(nnUNetTrainerLightMUNet):
    """One epoch of ten iterations, Adam at 3e-3, with a tiny LightM-UNet: a user's own variant of medssm's
    trainer (two iterations at the authors' 1e-4 left a network that predicted no lung in one run of many)."""

    model_kwargs = {TINY!r}

    # nnU-Net records __init__'s arguments by name: the signature must be spelled out.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.initial_lr = 3e-3
        self.num_val_iterations_per_epoch = 1
'''


# nnU-Net looks for a trainer in its own package first, importing every module there; one of them
# (primus_trainers) imports timm, which imports torchvision, and a torchvision that does not match
# torch (as here: "operator torchvision::nms does not exist") makes that search raise before
# nnU-Net reaches nnUNet_extTrainer. Only then, this runner searches the nnUNet_extTrainer folders
# with nnU-Net's own function, the way nnU-Net does after its package. Everything else is stock.
FIND_TRAINER = """
import os
import nnunetv2.inference.predict_from_raw_data as _predict
import nnunetv2.run.run_training as _train
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as _stock

def _find(name):
    try:
        return _stock(name)
    except RuntimeError as e:
        if "torchvision" not in str(e):
            raise
        print("nnU-Net's own trainer search failed on torchvision; searching nnUNet_extTrainer only")
        for path in os.environ["nnUNet_extTrainer"].split(os.pathsep):
            found = recursive_find_python_class(path, name, None, base_folder=path, cleanup_imports_from_base_folder=True)
            if found is not None:
                return found
        raise

_train.recursive_find_trainer_class_by_name = _predict.recursive_find_trainer_class_by_name = _find
"""


def _nnunet(entry: str, argv: list[str], env: dict, timeout: int = 400) -> str:
    """Run one of nnU-Net's console entry points (module:function) with ``argv``."""
    module, function = entry.split(":")
    code = FIND_TRAINER + f"\nimport sys; from {module} import {function} as f; sys.argv = ['nnunet'] + {argv!r}; f()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{entry} {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def nnunet_env(tmp_path, raw, pre, results) -> dict:
    """nnU-Net's environment for a test: its three folders, medssm's trainers and the test's own
    (TEST_TRAINER, in a folder of its own), one process, no compilation."""
    trainers = tmp_path / "my_trainers"
    trainers.mkdir()
    (trainers / "medssm_test_trainers.py").write_text(textwrap.dedent(TEST_TRAINER))
    return {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(results),
            "nnUNet_extTrainer": os.pathsep.join([medssm_nnunet.TRAINER_DIR, str(trainers)]),
            "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_trainers_build_networks_with_the_current_signature():
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base = set(inspect.signature(nnUNetTrainer.build_network_architecture).parameters)
    for cls in (medssm_nnunet.nnUNetTrainerLightMUNet, medssm_nnunet.nnUNetTrainerSegMamba):
        assert issubclass(cls, nnUNetTrainer)
        assert set(inspect.signature(cls.build_network_architecture).parameters) == base

    class Config:
        patch_size = (32, 48, 32)

    net = medssm_nnunet.nnUNetTrainerSegMamba.build_network_architecture(None, Config, 2, 3, False)
    assert isinstance(net, medssm.nets.SegMamba) and net.spatial_dims == 3
    Config.patch_size = (40, 40)
    with pytest.raises(ValueError, match="patch size"):
        medssm_nnunet.nnUNetTrainerSegMamba.build_network_architecture(None, Config, 1, 2, False)
    Config.patch_size = (64,)
    with pytest.raises(ValueError, match="no 1D network"):
        medssm_nnunet.nnUNetTrainerLightMUNet.build_network_architecture(None, Config, 1, 2, False)


@pytest.mark.slow
def test_plan_preprocess_train_predict_with_stock_nnunet(tmp_path, data_root):
    raw, pre, results = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    dataset = raw / "Dataset501_LungTiny"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / sub).mkdir(parents=True)
    source = data_root / "Dataset001_LungXray"
    for case in CASES:
        shutil.copy(source / "imagesTr" / f"{case}_0000.png", dataset / "imagesTr")
        shutil.copy(source / "labelsTr" / f"{case}.png", dataset / "labelsTr")
    shutil.copy(source / "imagesTr" / "CHNCXR_0007_0_0000.png", dataset / "imagesTs")
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "X-ray"}, "labels": {"background": 0, "lung": 1},
        "numTraining": len(CASES), "file_ending": ".png"}))
    env = nnunet_env(tmp_path, raw, pre, results)

    _nnunet("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
            ["-d", "501", "-c", "2d", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], env)
    plans_file = pre / "Dataset501_LungTiny" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    assert plans["configurations"]["2d"]["patch_size"] == [256, 256]  # planned by nnU-Net for 256² images
    plans["configurations"]["2d"].update(patch_size=[64, 64], batch_size=2)  # a tiny patch for the test
    plans_file.write_text(json.dumps(plans))
    (pre / "Dataset501_LungTiny" / "splits_final.json").write_text(json.dumps([{"train": CASES[:3], "val": CASES[3:]}]))
    env["nnUNet_n_proc_DA"] = "0"  # augment in the training process (planning needs >= 1)

    _nnunet("nnunetv2.run.run_training:run_training_entry",
            ["501", "2d", "0", "-tr", "nnUNetTrainerLightMUNetTest", "-device", "cpu"], env)
    fold = results / "Dataset501_LungTiny" / "nnUNetTrainerLightMUNetTest__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    # Validated on the held-out case: nnU-Net's Dice is that of its prediction file, as medssm scores it,
    # and the network found lung there (a network that predicted only background would score 0).
    from medssm.data.io import read_image
    from medssm.metrics.segmentation import case_metrics

    pred, ref = (read_image(d / f"{CASES[3]}.png")[0] for d in (fold / "validation", dataset / "labelsTr"))
    ours = case_metrics(pred, ref, {"lung": 1})["lung"]["dice"]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(ours, abs=1e-6) and ours > 0

    # Prediction with stock nnU-Net finds the trainer again and rebuilds the network from the plans.
    out = tmp_path / "pred"
    _nnunet("nnunetv2.inference.predict_from_raw_data:predict_entry_point",
            ["-i", str(dataset / "imagesTs"), "-o", str(out), "-d", "501", "-c", "2d", "-f", "0",
             "-tr", "nnUNetTrainerLightMUNetTest", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert (out / "CHNCXR_0007_0.png").is_file()

    # The nnU-Net checkpoint is what LightM-UNet's authors release: medssm loads it (weights only).
    net = medssm.create_model("lightm_unet_2d", in_channels=1, out_channels=2, **TINY)
    load_pretrained(net, fold / "checkpoint_final.pth")
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in checkpoint["network_weights"].items())
    # The trainer took LightM-UNet's recipe: Adam at lr 1e-4, weight decay 1e-5, no test-time mirroring.
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    group = checkpoint["optimizer_state"]["param_groups"][0]
    assert "betas" in group and (group["initial_lr"], group["weight_decay"]) == (1e-4, 1e-5)


@pytest.mark.slow
def test_stock_nnunet_trains_a_medssm_network_on_regions(tmp_path, data_root):
    """A region dataset (the hippocampus as a whole and its posterior part): nnU-Net builds a network with
    one sigmoid output per region through medssm's trainer, trains and validates it per region."""
    from ..subsets import hippocampus_subset
    from ..synthetic import HIPPOCAMPUS_REGIONS, region_version

    raw, pre, results = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    source = hippocampus_subset(data_root, tmp_path / "hippo", n=4)
    region_version(source, raw / "Dataset502_HippoRegions", HIPPOCAMPUS_REGIONS)
    env = nnunet_env(tmp_path, raw, pre, results)
    _nnunet("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
            ["-d", "502", "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], env)
    plans_file = pre / "Dataset502_HippoRegions" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=[32, 32, 32], batch_size=2)
    plans_file.write_text(json.dumps(plans))
    cases = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").iterdir())
    (pre / "Dataset502_HippoRegions" / "splits_final.json").write_text(json.dumps([{"train": cases[:3], "val": cases[3:]}]))
    env["nnUNet_n_proc_DA"] = "0"
    _nnunet("nnunetv2.run.run_training:run_training_entry",
            ["502", "3d_fullres", "0", "-tr", "nnUNetTrainerLightMUNetTest", "-device", "cpu"], env)
    fold = results / "Dataset502_HippoRegions" / "nnUNetTrainerLightMUNetTest__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    out_weight = [v for k, v in checkpoint["network_weights"].items() if k.endswith("weight")][-1]
    assert out_weight.shape[0] == 2  # one output per region, no background channel
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    # nnU-Net scored the regions of the held-out case as medssm scores them (the union of their labels).
    from medssm.data.io import read_image
    from medssm.metrics.segmentation import case_metrics

    pred, ref = (read_image(d / f"{cases[3]}.nii.gz")[0] for d in (fold / "validation", source / "labelsTr"))
    ours = case_metrics(pred, ref, {"(1, 2)": [1, 2], "2": [2]})
    assert set(summary["mean"]) == {"(1, 2)", "2"}
    for region, theirs in summary["mean"].items():
        assert theirs["n_ref"] == ours[region]["n_ref"] and theirs["Dice"] == pytest.approx(ours[region]["dice"], abs=1e-6)
