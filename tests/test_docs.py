"""Every shell command of README.md and docs/ runs as written, with tiny settings: each command of a
``bash`` block is in :data:`COMMANDS` (a new or changed command fails the first test until it is
listed), with the options added to make it tiny, or the reason it does not run here. The medssm
commands then run in order through the CLI on small copies of the real data, ``$MEDSSM_DATA``
pointing at them, from a scratch folder standing in for the repository root."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medssm.cli import main

from .subsets import hippocampus_subset, lung_subset

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]

SEG_TINY = "--epochs 1 --iterations-per-epoch 1 --batch-size 2 --patch-size 64 64 --val-cases 1 --no-progress"
CLS_TINY = "--epochs 1 --iterations-per-epoch 1 --batch-size 8 --limit 16 --no-progress"
RUN = None  # marks a command that runs as written (cheap, or given tiny data)


def skip(reason: str) -> tuple[str, str]:
    return ("skip", reason)


# Every documented command -> the options that make it tiny (appended), RUN, or skip(reason).
COMMANDS: dict[str, object] = {
    # README.md
    "bash scripts/quickstart.sh": skip("the main job itself (about 13 minutes): `medssm quickstart` runs below, tiny"),
    "bash scripts/test.sh": skip("this test suite"),
    "source .venv/bin/activate": skip("the environment this suite runs in"),
    "export MEDSSM_DATA=${MEDSSM_DATA:-../shared/data}": skip("set by this test to the tiny data"),
    "medssm train -d $MEDSSM_DATA/Dataset001_LungXray --model lightm_unet_2d -o runs/lung": SEG_TINY,
    "medssm predict -i $MEDSSM_DATA/Dataset001_LungXray/imagesTr -o runs/lung/predictions -m runs/lung": "--no-progress",
    "medssm evaluate runs/lung/predictions $MEDSSM_DATA/Dataset001_LungXray/labelsTr -o runs/lung/eval": "--no-progress",
    "medssm train -d $MEDSSM_DATA/medmnist/pneumoniamnist.npz --model medmamba_t -o runs/pneu": CLS_TINY,
    "medssm predict -m runs/pneu -i $MEDSSM_DATA/medmnist/pneumoniamnist.npz -o runs/pneu_test.csv": "--no-progress",
    "medssm evaluate runs/pneu_test.csv": "--no-progress",
    # docs/explanation/architecture.md: the rules, checked with grep on the code
    "cd src/medssm": RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(nets|data|runs|metrics|inference|engine|export|integrations|workflows|cli)\\b" ssm files.py devices.py budget.py labels.py': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(data|runs|metrics|inference|engine|export|integrations|cli)\\b" nets': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(ssm|nets|runs|metrics|inference|engine|export|integrations|cli)\\b" data': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(metrics|inference|engine|export|integrations|cli)\\b" runs.py': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(inference|engine|export|integrations|cli)\\b" metrics': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(engine|export|integrations|cli)\\b" inference': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(export|integrations|workflows|cli)\\b" engine': RUN,
    'grep -rnE "(from|import) +(\\.+|medssm\\.)(cli)\\b" workflows': RUN,
    'grep -rn "scan_backend" nets | grep -v RETIRED_KWARGS': RUN,
    "cd ../..": RUN,
    'grep -rn "startswith" src/medssm --include=*.py': RUN,
    # docs/getting-started/quickstart.md
    "medssm quickstart -o runs/quickstart": "--model lightm_unet_2d_tiny --epochs 1 --iterations-per-epoch 1 --batch-size 2 "
                                            "--patch-size 32 --target-spacing 2 --val-cases 1 --precision fp32 --no-progress",
    # docs/how-to/classification.md
    "medssm train -d $MEDSSM_DATA/medmnist/pneumoniamnist.npz -o runs/pneumonia --model medmamba_t --input-size 28": CLS_TINY,
    "medssm predict -m runs/pneumonia -i $MEDSSM_DATA/medmnist/pneumoniamnist.npz --split test -o runs/pneumonia_test.csv": "--no-progress",
    "medssm predict -m runs/pneumonia -i $MEDSSM_DATA/Dataset001_LungXray/imagesTr -o runs/lung_xrays.csv": "--no-progress",
    "medssm evaluate runs/pneumonia_test.csv": "--no-progress",
    "medssm evaluate runs/pneumonia_test.csv -r $MEDSSM_DATA/medmnist/pneumoniamnist.npz -o runs/pneumonia_eval": "--no-progress",
    # docs/how-to/compare.md
    "medssm compare -d $MEDSSM_DATA/Dataset001_LungXray --budget 10m -o runs/compare_lung": skip(
        "five models for ten minutes each: tests/engine/test_compare.py runs compare on tiny budgets"),
    # docs/how-to/distributed.md
    "torchrun --nproc_per_node 4 -m medssm train --data Dataset001_LungXray --model lightm_unet_2d -o runs/lung_ddp --batch-size 8 --precision bf16": skip(
        "four processes: tests/engine/test_distributed.py runs torchrun with two"),
    "torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr 10.0.0.1 --master_port 29500 -m medssm train --data Dataset002_Hippocampus -o /shared/runs/hippo --batch-size 32": skip(
        "two nodes of eight GPUs"),
    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': skip("SLURM"),
    "export MASTER_PORT=29500": skip("SLURM"),
    "srun python -m medssm train --data Dataset002_Hippocampus -o /shared/runs/hippo --batch-size 16": skip("SLURM"),
    # docs/how-to/export-onnx.md
    'pip install -c constraints.txt -e ".[export]"': skip("installs packages (the test set-up has them)"),
    "medssm export runs/lung --onnx lung.onnx --input-size 256 256": "--input-size 64 64 --no-progress",  # smaller: faster
    "medssm export lightm_unet_2d_tiny --onnx tiny.onnx": "--no-progress",
    "medssm export medmamba_tiny --onnx medmamba_tiny.onnx --model-kwargs '{\"in_chans\": 1, \"num_classes\": 2}' --input-size 28 28": "--no-progress",
    # docs/how-to/monai.md
    "medssm train --data Dataset001_LungXray --model monai:SegResNet -o runs/lung_segresnet": SEG_TINY,
    "medssm info monai:UNet --input-size 1 1 256 256": "--no-progress",
    # docs/how-to/nnunet.md: tests/integrations/test_nnunet.py runs nnU-Net's entry points with these trainers
    '.venv/bin/pip install -c constraints.txt -e ".[nnunet]"': skip("installs packages (the test set-up has them)"),
    "export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed nnUNet_results=/data/nnUNet_results": skip("nnU-Net's environment"),
    'export nnUNet_extTrainer=$(python -c "import medssm.integrations.nnunet as m; print(m.TRAINER_DIR)")': RUN,
    "nnUNetv2_plan_and_preprocess -d 1 -c 2d --verify_dataset_integrity": skip("tests/integrations/test_nnunet.py"),
    "nnUNetv2_train 1 2d 0 -tr nnUNetTrainerLightMUNet": skip("tests/integrations/test_nnunet.py"),
    "nnUNetv2_predict -i imagesTs -o predictions -d 1 -c 2d -f 0 -tr nnUNetTrainerLightMUNet": skip("tests/integrations/test_nnunet.py"),
    "export nnUNet_extTrainer=$nnUNet_extTrainer:$PWD/my_trainers": skip("nnU-Net's environment"),
    "nnUNetv2_train 1 2d 0 -tr nnUNetTrainerLightMUNetSmall": skip("a user's own trainer, shown as an example"),
    # docs/reference/models.md
    "medssm models": RUN,
    # docs/how-to/predict-and-evaluate.md
    "medssm predict -i $MEDSSM_DATA/Dataset001_LungXray/imagesTr -o runs/lung/predictions -m runs/lung --skip-existing --mirror --save-probabilities": "--no-progress",
    "medssm evaluate runs/lung/predictions $MEDSSM_DATA/Dataset001_LungXray/labelsTr -o runs/lung/eval --labels runs/lung --overwrite": "--no-progress",
    # docs/how-to/train-segmentation.md
    "medssm train --data $MEDSSM_DATA/Dataset001_LungXray --model lightm_unet_2d -o runs/lung": SEG_TINY,
    "medssm train --data Dataset002_Hippocampus --model lightm_unet_3d -o runs/hippo": "--epochs 1 --iterations-per-epoch 1 --batch-size 2 --patch-size 32 32 32 --val-cases 1 --no-progress",
    "medssm train --data Dataset001_LungXray --model monai:SegResNet --model-kwargs '{\"init_filters\": 32}' -o runs/segresnet": SEG_TINY,
    "medssm train --data Dataset001_LungXray --model lightm_unet_2d --budget 20m --recipe short -o runs/lung_20m": skip(
        "twenty minutes: tests/engine/test_budget.py trains to a tiny budget"),
    "medssm train --data Dataset137_BraTS2021 --model segmamba_3d -o runs/brats --patch-size 128 128 128 --batch-size 2": skip(
        "BraTS is not in the shared data: tests/engine/test_regions.py trains SegMamba on a BraTS-like region set"),
    """echo '{"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}' > regions.json""": RUN,
    "medssm evaluate runs/brats_integer/predictions labelsTs -o runs/brats_integer/eval --regions regions.json": skip(
        "BraTS predictions: tests/engine/test_regions.py scores an integer-label model's maps by regions"),
}

# Commands of other pages a page needs first (its runs to predict with, export ...).
LUNG_RUN = "medssm train -d $MEDSSM_DATA/Dataset001_LungXray --model lightm_unet_2d -o runs/lung"
NEEDS = {"docs/how-to/predict-and-evaluate.md": [LUNG_RUN], "docs/how-to/export-onnx.md": [LUNG_RUN]}


def shell_commands(page: str) -> list[str]:
    """The commands of a page's bash blocks: continuation lines joined, comments dropped."""
    commands, lang, pending, joint = [], None, "", ""
    for line in (ROOT / page).read_text().splitlines():
        text = line.strip()
        if text.startswith("```") and not pending:
            lang = None if lang is not None else (text[3:].strip() or "text")
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        pending += joint + (line if joint == "\n" else text.removeprefix("$ ").rstrip("\\").strip())
        if text.endswith("\\"):
            joint = " "  # a continued line
            continue
        if open_quote(pending):
            joint = "\n"  # a quoted argument spanning lines: kept as written
            continue
        joint = ""
        command, pending = strip_comment(pending), ""
        if command:
            commands.append(command)
    return commands


def _comment_start(command: str) -> tuple[int, str | None]:
    """(where a ``# comment`` starts, or the length; the quote still open there)."""
    quote = None
    for i, ch in enumerate(command):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or command[i - 1].isspace()):
            return i, None
    return len(command), quote


def open_quote(command: str) -> bool:
    return _comment_start(command)[1] is not None


def strip_comment(command: str) -> str:
    """``command`` without a trailing ``# comment`` (a # inside quotes is kept)."""
    return command[: _comment_start(command)[0]].strip()


def test_every_documented_command_is_listed():
    documented = {c for page in PAGES for c in shell_commands(page)}
    unlisted = sorted(documented - set(COMMANDS))
    assert not unlisted, "add these commands to COMMANDS (tiny options, RUN or skip):\n" + "\n".join(unlisted)
    stale = sorted(set(COMMANDS) - documented)
    assert not stale, "no longer documented, remove from COMMANDS:\n" + "\n".join(stale)


@pytest.fixture(scope="module")
def tiny_data(data_root, tmp_path_factory) -> Path:
    """$MEDSSM_DATA as the docs use it, small: 6 lung cases at 64², 5 hippocampus cases, MedMNIST subsets."""
    root = tmp_path_factory.mktemp("data")
    lung_subset(data_root, root / "Dataset001_LungXray", n=6, size=64)
    hippocampus_subset(data_root, root / "Dataset002_Hippocampus", n=5)
    (root / "medmnist").mkdir()
    for name in ("pneumoniamnist", "breastmnist"):
        with np.load(data_root / "medmnist" / f"{name}.npz") as z:
            np.savez(root / "medmnist" / f"{name}.npz",
                     **{f"{s}_{k}": z[f"{s}_{k}"][:n] for s, n in (("train", 32), ("val", 16), ("test", 16))
                        for k in ("images", "labels")})
    return root


def medssm(command: str, workspace: Path) -> None:
    """Run a medssm command (with its tiny options) through the CLI, in ``workspace``."""
    args = [os.path.expandvars(a) for a in shlex.split(f"{command} {COMMANDS[command] or ''}")[1:]]
    previous = os.getcwd()
    os.chdir(workspace)
    try:
        assert main(args) == 0, command
    finally:
        os.chdir(previous)


def runnable(page: str) -> list[str]:
    return [c for c in NEEDS.get(page, []) + shell_commands(page) if not isinstance(COMMANDS.get(c, ("skip",)), tuple)]


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)])
def test_page_commands_run(page, tiny_data, tmp_path, monkeypatch):
    """The page's medssm commands in order through the CLI; its other commands as one bash script (so
    that a `cd` holds for the lines after it), which must run without an error, in the environment the
    set-up makes (its python first on PATH)."""
    commands = runnable(page)
    monkeypatch.setenv("MEDSSM_DATA", str(tiny_data))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    workspace = tmp_path / "repo"
    shutil.copytree(ROOT / "src", workspace / "src")  # for the pages that look at the code (architecture.md)
    script = []
    for command in commands:
        if command.startswith("medssm "):
            medssm(command, workspace)
        else:
            script.append(command + (f" {COMMANDS[command]}" if COMMANDS[command] else ""))
    if script:
        proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workspace, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode in (0, 1) and not proc.stderr, proc.stderr[-3000:]  # grep says 1 for "no match"
