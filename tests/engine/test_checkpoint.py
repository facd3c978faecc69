import json

import numpy as np
import pytest
import torch

from medssm.engine.checkpoint import load_checkpoint, save_checkpoint
from medssm.engine.history import History
from medssm.nets import registry


def _linear(in_features=3, out_features=2):
    return torch.nn.Linear(in_features, out_features)


@pytest.fixture(autouse=True)
def _registered_linear(monkeypatch):
    """A tiny model registered for these tests only (no other test sees it)."""
    monkeypatch.setitem(registry._MODELS, "_test_linear", _linear)


def _trained(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_round_trip_restores_model_optimizer_schedule_and_rng(tmp_path):
    import medssm

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
    import medssm

    model = medssm.create_model("_test_linear")
    torch.rand(1, device="cuda")  # CUDA in use: its generator is saved too
    save_checkpoint(tmp_path / "last", model, epoch=1)
    after_save = torch.rand(5, device="cuda")
    torch.rand(7, device="cuda")
    load_checkpoint(tmp_path / "last", model)
    assert torch.equal(torch.rand(5, device="cuda"), after_save)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import medssm

    model = medssm.create_model("_test_linear")
    save_checkpoint(tmp_path / "last", model, epoch=1)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last", model, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last", model)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_history_csv_json_png_and_resume(tmp_path):
    h = History(tmp_path)
    for e in range(1, 4):
        h.log(epoch=e, train_loss=1 / e, val_dice=0.5 + e / 10, lr=1e-3, nonfinite_steps=0)
    png = h.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "epoch,train_loss,val_dice,lr,nonfinite_steps"
    resumed = History(tmp_path, resume=True, resume_epoch=2)
    assert [r["epoch"] for r in resumed.rows] == [1, 2]
