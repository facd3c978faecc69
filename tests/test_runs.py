import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import medssm
from medssm.nets import registry
from medssm.runs import RunBusyError, claim_run, load_run, load_training_state, save_checkpoint


@pytest.fixture(autouse=True)
def _registered_linear(monkeypatch):
    """A tiny model registered for these tests only (no other test sees it)."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    registry.register_model(lambda in_features=3, out_features=2: torch.nn.Linear(in_features, out_features),
                            name="_test_linear", task="classification", spatial_dims=(2,), size_divisor=1,
                            input_size=(3, 3), description="a linear layer")


def load_checkpoint(directory, model, **kw):
    """Weights and training state of a checkpoint folder, through the run loader."""
    load_run(directory).load_weights(model)
    return load_training_state(directory, **kw)


def _trained(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_round_trip_restores_model_optimizer_schedule_and_rng(tmp_path):
    model = medssm.create_model("_test_linear")
    opt, sched = _trained(model)
    save_checkpoint(tmp_path / "last", model, epoch=3, optimizer=opt, scheduler=sched,
                    metadata={"labels": {"background": 0}}, extra_state={"best": 0.5})
    after_save = (torch.rand(3), np.random.rand(2))
    other = medssm.create_model("_test_linear")
    opt2 = torch.optim.Adam(other.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    state = load_checkpoint(tmp_path / "last", other, optimizer=opt2, scheduler=sched2)
    assert state["epoch"] == 3 and state["extra"]["best"] == 0.5
    assert torch.equal(other.weight, model.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), after_save[0]) and np.array_equal(np.random.rand(2), after_save[1])
    meta = json.loads((tmp_path / "last" / "model.json").read_text())
    assert meta["name"] == "_test_linear" and meta["labels"] == {"background": 0}
    assert medssm.load_model(tmp_path / "last").weight.equal(model.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_round_trip_restores_the_cuda_generator(tmp_path):
    model = medssm.create_model("_test_linear")
    torch.rand(1, device="cuda")  # CUDA in use: its generator is saved too
    save_checkpoint(tmp_path / "last", model, epoch=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    after_save = torch.rand(5, device="cuda")
    torch.rand(7, device="cuda")
    load_checkpoint(tmp_path / "last", model)
    assert torch.equal(torch.rand(5, device="cuda"), after_save)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = medssm.create_model("_test_linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "last", model, epoch=1, optimizer=opt)
    with monkeypatch.context() as m, pytest.raises(OSError):
        m.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        save_checkpoint(tmp_path / "last", model, epoch=2, optimizer=opt)
    assert load_checkpoint(tmp_path / "last", model)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def _run_folder(tmp_path, layout: str):
    """A trained model written in one of the layouts load_run reads."""
    model = medssm.create_model("_test_linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = {"task": "classification", "classes": ["a", "b"], "input_size": 3}
    run = tmp_path / layout
    if layout == "run":  # today's: RUN/model.json + checkpoints/{best,last}
        save_checkpoint(run / "checkpoints" / "last", model, epoch=2, optimizer=opt, metadata=meta)
        save_checkpoint(run / "checkpoints" / "best", model, epoch=1, metadata=meta)
        (run / "model.json").write_text(json.dumps({**model.medssm_config, **meta}))
    elif layout == "legacy":  # classification runs before 0.2: the best model at RUN/, the last at RUN/last
        medssm.save_model(model, run, extra=meta)
        save_checkpoint(run / "last", model, epoch=2, optimizer=opt, metadata=meta)
    else:  # a saved model folder
        medssm.save_model(model, run, extra=meta)
    return run, model


@pytest.mark.parametrize("layout", ["run", "legacy", "saved"])
def test_load_run_reads_every_layout(tmp_path, layout):
    run_dir, model = _run_folder(tmp_path, layout)
    run = load_run(run_dir)
    assert run.task == "classification" and run.model_name == "_test_linear" and run.card.size_divisor == 1
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(run.load_model("best")(x), model(x))
    if layout == "saved":
        with pytest.raises(FileNotFoundError, match="checkpoints/last"):
            run.checkpoint("last")
    else:
        assert load_training_state(run.checkpoint("last"), restore_rng=False)["epoch"] == 2
    if layout == "run":  # a checkpoint folder of a run is a run of its own
        assert load_run(run_dir / "checkpoints" / "best").checkpoint("best") == run_dir / "checkpoints" / "best"


def test_load_run_names_the_damaged_file(tmp_path):
    run_dir, _ = _run_folder(tmp_path, "run")
    weights = run_dir / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged weights file"):
        load_run(run_dir).load_model("best")
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_run(run_dir).load_model("best")
    state = run_dir / "checkpoints" / "last" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="training_state.pt: cannot be read"):
        load_training_state(state.parent)
    (run_dir / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json: not valid JSON"):
        load_run(run_dir)
    with pytest.raises(FileNotFoundError, match="not a medssm run"):
        load_run(tmp_path)


def test_claim_run_refuses_a_second_writer_and_frees_after_a_crash(tmp_path):
    with claim_run(tmp_path / "run"):
        with pytest.raises(RunBusyError, match=f"process {os.getpid()}"):
            with claim_run(tmp_path / "run"):
                pass
    # A process killed while holding the claim leaves the lock file, not the lock.
    code = ("import os, sys; from medssm.runs import claim_run\n"
            "with claim_run(sys.argv[1]): os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    with claim_run(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"process {os.getpid()}")
