"""Distributed training: the launchers' variables, and a two-process Gloo run on real lung cases
that ends with the same weights on both ranks as one process given the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medssm.engine.distributed import DistEnv, environment, gather_work, shard, split_work
from medssm.engine.segmentation import TrainConfig, train

from ..subsets import lung_subset

# Run by torchrun in each process: train with segmentation.train or classification.train_classifier (argv 1), then
# save this rank's final parameters (BatchNorm statistics stay per rank on Gloo) and its wrapper's type.
WORKER = """
import json, sys
from safetensors.torch import save_file
from medssm.engine import classification, distributed, segmentation
seen = {}
real_wrap = distributed.wrap
def wrap(model, device):
    seen["model"], seen["wrapped"] = model, real_wrap(model, device)
    return seen["wrapped"]
distributed.wrap = wrap
trainer, config = {"segmentation": (segmentation.train, segmentation.TrainConfig),
                   "classification": (classification.train_classifier, classification.ClassifierTrainConfig)}[sys.argv[1]]
trainer(config(**json.loads(sys.argv[2])))
save_file({k: v.detach().contiguous() for k, v in seen["model"].named_parameters()},
          f"{sys.argv[3]}/rank{distributed.world().rank}.safetensors", metadata={"wrapper": type(seen["wrapped"]).__name__})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, task: str, cfg: dict) -> list[dict[str, torch.Tensor]]:
    """Train ``cfg`` in two Gloo processes under torchrun; each rank's final parameters."""
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(tmp_path / "worker.py"), task, json.dumps(cfg), str(tmp_path)],
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]


def test_environment_from_torchrun_slurm_or_nothing():
    assert environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == DistEnv(3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert environment(slurm) == DistEnv(5, 6, 2)
    assert environment({**slurm, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == DistEnv(0, 2, 0)  # torchrun's win
    assert environment({}) == DistEnv(0, 1, 0) and not environment({}).distributed


def test_single_process_helpers_pass_through():
    x = torch.arange(6)
    assert shard(x) is x
    assert split_work(range(5)) == [0, 1, 2, 3, 4] and gather_work([3, 1]) == [3, 1]


def test_two_process_gloo_run_equals_single_process(data_root, tmp_path):
    lung = lung_subset(data_root, tmp_path / "Dataset001_LungXray", n=6, size=64)
    cfg = dict(data=str(lung), model="lightm_unet_2d_tiny", epochs=1, iterations_per_epoch=3, val_every=1,
               val_cases=2, patch_size=(64, 64), batch_size=4, device="cpu", progress=False)
    single = train(TrainConfig(**cfg, out=str(tmp_path / "single")))

    ranks = _two_processes(tmp_path, "segmentation", {**cfg, "out": str(tmp_path / "ddp")})
    with safe_open(str(tmp_path / "rank1.safetensors"), "pt") as f:
        assert f.metadata()["wrapper"] == "DistributedDataParallel"
    reference = load_file(str(single / "checkpoints" / "last" / "model.safetensors"))
    saved = load_file(str(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    initial = _initial_weights(cfg["model"])
    assert ranks[0].keys() == ranks[1].keys() == reference.keys() == saved.keys()
    for k in reference:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=k)  # replicas identical
        torch.testing.assert_close(saved[k], ranks[0][k], rtol=0, atol=0, msg=k)     # rank 0 saved them
    # The two processes' update is the single process's, up to rounding (which Adam turns into a
    # full step of either sign for a parameter whose gradient is all rounding, so: norms).
    update = torch.cat([(reference[k] - initial[k]).flatten() for k in reference])
    apart = torch.cat([(ranks[0][k] - reference[k]).flatten() for k in reference])
    assert update.norm() > 0 and apart.norm() <= 1e-3 * update.norm()

    log_single = json.loads((single / "log.json").read_text())
    log_ddp = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert len(log_ddp) == 1 and log_ddp[0]["nonfinite_steps"] == 0
    assert log_ddp[0]["train_loss"] == pytest.approx(log_single[0]["train_loss"], abs=1e-5)
    assert log_ddp[0]["val_dice"] == pytest.approx(log_single[0]["val_dice"], abs=1e-4)
    assert not (tmp_path / "ddp" / "checkpoints" / "last.old").exists()


def _initial_weights(model: str) -> dict[str, torch.Tensor]:
    """The weights both runs started from (same seed, same construction as the trainer)."""
    from medssm.nets import build_for_data

    torch.manual_seed(TrainConfig(data="").seed)
    return build_for_data(model, spatial_dims=2, in_channels=1, num_classes=2).state_dict()


def test_two_process_classifier_run(data_root, tmp_path):
    """Both ranks train the same weights and validate their share of the samples; rank 0 writes the
    run, here with the moving average of the weights."""
    import numpy as np

    with np.load(data_root / "medmnist" / "breastmnist.npz") as z:
        arrays = {f"{s}_{k}": z[f"{s}_{k}"][:n] for s, n in (("train", 32), ("val", 12), ("test", 4))
                  for k in ("images", "labels")}
    np.savez(tmp_path / "breast.npz", **arrays)
    cfg = dict(data=str(tmp_path / "breast.npz"), out=str(tmp_path / "run"), model="medmamba_tiny", epochs=2,
               batch_size=8, ema=0.9, device="cpu", progress=False)
    ranks = _two_processes(tmp_path, "classification", cfg)
    for k in ranks[0]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=k)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and all(r["nonfinite_steps"] == 0 for r in log)
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()
