"""Devices and mixed precision: device selection, precision checks, and mixed-precision training
(real lung cases and real PneumoniaMNIST images) that stays finite: bf16 on the CPU, bf16 and fp16
on CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from medssm.engine.classification import ClassifierTrainConfig, train_classifier
from medssm.devices import autocast, check_precision, cpu_threads, resolve_device
from medssm.engine.loop import grad_scaler
from medssm.engine.segmentation import TrainConfig, train
from medssm.nets import build_for_data, checkpointing_enabled, set_checkpointing
from medssm.nets.cpu_conv import Conv3d

from ..subsets import lung_subset


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_device_selection_without_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS backend"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        resolve_device("gpu0")


def test_device_selection_with_cuda_and_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_mps_chosen_by_auto_when_it_is_the_only_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_precision_checks_and_autocast():
    cpu = torch.device("cpu")
    check_precision("bf16", cpu)
    check_precision("fp32", cpu)
    with pytest.raises(ValueError, match="needs a GPU.*use bf16"):
        check_precision("fp16", cpu)
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        check_precision("fp8", cpu)
    a = torch.randn(4, 4)
    with autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32
    assert not grad_scaler(cpu, "bf16").is_enabled()  # only fp16 scales the loss


def test_cpu_threads_set_and_restore_torch_threads():
    before = torch.get_num_threads()
    with cpu_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None) as n:
        assert n == before
    with pytest.raises(ValueError, match="at least 1"):
        with cpu_threads(0):
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_pages():
    """After keep_freed_memory, a freed 64 MiB block is handed out again without faulting in new pages
    (by default glibc unmaps it on free, and every new one faults in all 16,384 pages afresh). The heap
    may take a few rounds to settle (small allocations split the first freed block): the last rounds
    reuse it. Run in a fresh process: the setting is process-wide and how the heap lies depends on what
    ran before."""
    code = """
import resource, sys, torch
from medssm.devices import keep_freed_memory
def rounds():
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(2**24)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    return faults
default = rounds()
assert keep_freed_memory()
kept = rounds()
assert min(default[1:]) > 10000 and max(kept[-4:]) < 1000, (default, kept)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = build_for_data("lightm_unet_2d_tiny", spatial_dims=2, in_channels=1, num_classes=2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with autocast(torch.device("cpu"), "bf16"):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps ~3 digits; an untrained network's GroupNorms amplify a few pixels, so compare on the whole map
    # (the mean error here: 0.049 of the mean with the Mamba layers' reference path, 0.050 with the fused one)
    assert (out.float() - ref).abs().mean() < 0.06 * ref.abs().mean()
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("depth, kernel", [(2, 3), (1, 3), (4, 5), (6, 3)])
@pytest.mark.parametrize("conv_class", [torch.nn.Conv3d, Conv3d])
def test_bf16_weight_gradient_of_shallow_3d_convolution(conv_class, depth, kernel, fill_freed_memory):
    """Under bf16 autocast the weight gradient of a 3D convolution on a map shallower than its kernel
    (oneDNN's bfloat16 kernel reads uninitialised memory there: 1e36 or NaN) is as right as on deeper
    maps: within bf16's rounding of the float64 one, whatever the freed memory held, for torch's own
    module (MONAI's models) and medssm's."""
    torch.manual_seed(depth * kernel)
    conv = conv_class(32, 32, kernel, padding=kernel // 2, bias=True)
    x = torch.randn(1, 32, depth, 8, 8)
    grad = torch.randn(1, 32, depth, 8, 8)
    conv.double()(x.double()).backward(grad.double())
    want = conv.weight.grad.clone()
    conv.float().zero_grad()
    for value in (1e3, float("nan")):
        fill_freed_memory(value)
        with autocast(torch.device("cpu"), "bf16"):
            out = conv(x.bfloat16())
        assert out.dtype == torch.bfloat16
        out.float().backward(grad)
        assert (conv.weight.grad.double() - want).abs().max() < 0.02 * want.abs().max(), value
        conv.zero_grad()


def test_bf16_checkpointed_block_is_recomputed_through_the_shallow_detour(fill_freed_memory):
    """A checkpointed MONAI block whose convolution takes that float32 detour (SegResNet's deepest level
    is 2 deep for a 16-deep patch) is recomputed through it in the backward: the plain network's
    gradients, bit for bit, not torch's CheckpointError (recomputed tensors of another dtype) or
    oneDNN's bfloat16 weight gradient."""
    torch.manual_seed(0)
    net = build_for_data("monai:SegResNet", spatial_dims=3, in_channels=1, num_classes=2, init_filters=8)
    x = torch.randn(2, 1, 16, 32, 32)
    grads = {}
    for on in (False, True):
        set_checkpointing(net, enabled=on)
        net.zero_grad()
        fill_freed_memory(float("nan"))
        with autocast(torch.device("cpu"), "bf16"):
            out = net(x)
        out.float().square().mean().backward()
        grads[on] = {name: p.grad.clone() for name, p in net.named_parameters()}
    assert checkpointing_enabled(net)
    for name, want in grads[False].items():
        assert torch.isfinite(want).all(), name
        torch.testing.assert_close(grads[True][name], want, rtol=0, atol=0, msg=name)


# bf16 on the CPU (in CI); bf16 and fp16 (with loss scaling) on CUDA where there is a GPU.
MIXED = [("cpu", "bf16"),
         *(pytest.param("cuda", p, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
           for p in ("bf16", "fp16"))]


@pytest.mark.parametrize("device,precision", MIXED)
def test_mixed_precision_segmentation_training_stays_finite(data_root, tmp_path, device, precision):
    lung = lung_subset(data_root, tmp_path / "Dataset001_LungXray", n=6, size=32)
    run = train(TrainConfig(data=str(lung), out=str(tmp_path / "run"), model="lightm_unet_2d_tiny", epochs=1,
                            iterations_per_epoch=2, val_cases=1, patch_size=(32, 32), batch_size=2, device=device,
                            precision=precision, progress=False))
    row = json.loads((run / "log.json").read_text())[0]
    assert row["nonfinite_steps"] == 0 and torch.isfinite(torch.tensor(row["train_loss"]))
    # The validation in reduced precision scores what fp32 scores with the same weights (a model that
    # predicted only background would score 0 both ways: it must score more).
    from medssm.data.segmentation.preprocess import load_cache
    from medssm.inference.sliding import sliding_window_probabilities
    from medssm.metrics.segmentation import dice_of_masks
    from medssm.runs import load_run

    loaded = load_run(run)
    case = json.loads((run / "splits.json").read_text())[0]["val"][0]
    entry = load_cache({case: run / "preprocessed" / f"{case}.npz"})[case]
    probs = sliding_window_probabilities(loaded.load_model("last", device=device), torch.as_tensor(entry["image"]),
                                         loaded.plan.patch_size, device=device)
    fp32_dice = dice_of_masks(probs.argmax(0).numpy()[None] == 1, entry["label"][None] == 1)[0]
    assert row["val_dice"] > 0 and row["val_dice"] == pytest.approx(fp32_dice, abs=0.05)
    weights = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 masters


def test_fp16_on_cpu_refused_before_anything_is_written(data_root, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(TrainConfig(data=str(data_root / "Dataset001_LungXray"), out=str(tmp_path / "run"), device="cpu",
                          precision="fp16", progress=False))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device,precision", MIXED)
def test_mixed_precision_classification_training_stays_finite(data_root, tmp_path, device, precision):
    out = train_classifier(ClassifierTrainConfig(
        data=str(data_root / "medmnist" / "pneumoniamnist.npz"), out=str(tmp_path / "run"), model="medmamba_tiny",
        epochs=1, batch_size=8, iterations_per_epoch=2, limit=24, device=device, precision=precision, progress=False))
    row = json.loads((out / "log.json").read_text())[0]
    assert torch.isfinite(torch.tensor([row["train_loss"], row["val_loss"]])).all()
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "checkpoints" / "best" / "model.safetensors")).values())
