"""The CLI frame: task detection, options built from config dataclasses, clean errors."""

import dataclasses
import json

import pytest

from medssm.cli import add_config_arguments, config_from_args, detect_task, main


@pytest.mark.parametrize("argv, task", [
    (["--task", "classification", "-d", "x"], "classification"),
    (["-d", "pneumoniamnist"], "classification"),
    (["--data", "breastmnist_64"], "classification"),
    (["-d", "data.npz"], "classification"),
    (["preds.csv"], "classification"),
    (["--model", "medmamba_t", "-d", "somewhere"], "classification"),
    (["-d", "Dataset001_LungXray", "--model", "lightm_unet_2d"], "segmentation"),
])
def test_detect_task(argv, task):
    assert detect_task("train", argv) == task


def test_detect_task_from_run(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"name": "medmamba_tiny", "task": "classification"}))
    assert detect_task("predict", ["-m", str(tmp_path), "-i", "images"]) == "classification"


def test_detect_task_from_folders(tmp_path):
    (tmp_path / "xr" / "test" / "normal").mkdir(parents=True)  # a test split alone is a classification set
    (tmp_path / "Dataset001_X" / "imagesTr").mkdir(parents=True)
    assert detect_task("evaluate", ["-i", str(tmp_path / "xr")]) == "classification"
    assert detect_task("train", ["-d", str(tmp_path / "Dataset001_X")]) == "segmentation"


@dataclasses.dataclass
class _Config:
    source: str = dataclasses.field(metadata={"positional": True})
    size: tuple[int, ...] = (8, 8)
    rate: float = 0.5
    mirror: bool = False
    name: str | None = None


def test_config_options_from_dataclass():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Config)
    cfg = config_from_args(_Config, parser.parse_args(["src", "--size", "1", "2", "3", "--mirror", "--rate", "2"]))
    assert cfg == _Config("src", (1, 2, 3), 2.0, True, None)
    assert config_from_args(_Config, parser.parse_args(["src"])) == _Config("src")
    partial = argparse.ArgumentParser()
    add_config_arguments(partial, _Config, exclude=("rate", "mirror"))
    with pytest.raises(SystemExit):
        partial.parse_args(["src", "--rate", "2"])


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["predict", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out"),
                 "-m", str(tmp_path / "no_run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medssm predict: error:") and "Traceback" not in err


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command" in capsys.readouterr().err
