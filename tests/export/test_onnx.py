"""ONNX export: the chunked scan against the reference, its graph at lengths it was not traced at,
parity of every registered tiny model in onnxruntime at two sizes and batches, the CLI, bad input."""

import json

import numpy as np
import pytest
import torch

import medssm
from medssm.cli import main
from medssm.export import ExportParityError, export_onnx
from medssm.export.onnx import _export_symbolics, ort_session
from medssm.ssm import current_backend, use_backend
from medssm.ssm import Mamba, chunked, selective_scan

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# Every registered model family, at its tiny size (the full sizes are exported by benchmarks/export.py).
TINY_CASES = {
    "lightm_unet_2d_tiny": ({}, (32, 32)),
    "lightm_unet_3d_tiny": ({}, (32, 32, 32)),
    "segmamba_tiny": ({"in_channels": 1, "out_channels": 3}, (32, 16, 16)),
    "segmamba_tiny-2d": ({"spatial_dims": 2, "in_channels": 1, "out_channels": 3}, (32, 16)),
    "medmamba_tiny": ({"in_chans": 1, "num_classes": 3}, (64, 64)),
}


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100, 600])
@pytest.mark.parametrize("groups", [1, 4])
def test_chunked_scan_matches_reference(length, groups):
    g = torch.Generator().manual_seed(length)
    b, d, n = 2, 8, 4
    u, dt, z = (torch.randn(b, d, length, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 5
    B, C = (torch.randn(b, groups, n, length, generator=g, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    ref, ref_last = selective_scan(u, dt, A, B, C, D, z, bias, True, True, backend="reference")
    out, last = selective_scan(u, dt, A, B, C, D, z, bias, True, True, backend="chunked")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", [torch.nn.InstanceNorm3d(16, affine=True), torch.nn.GroupNorm(4, 16),
                                  torch.nn.GroupNorm(2, 16, affine=False)], ids=["instance", "group", "group_plain"])
def test_exported_norms_keep_float32_accuracy_on_large_volumes(tmp_path, norm):
    """Instance/group norms over 64^3 voxels with an offset mean, at the traced and another size:
    onnxruntime's own InstanceNormalization (the stock export) is 1e-6 to 1e-5 from float64 here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, 64, 64, generator=g) * 3 + 5
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(generator=g)
        with _export_symbolics(17):
            torch.onnx.export(norm.eval(), (x,), str(tmp_path / "n.onnx"), dynamo=False, opset_version=17,
                              input_names=["x"], dynamic_axes={"x": {0: "b", 2: "d"}})
        session = ort_session(tmp_path / "n.onnx")
        for xx in (x, torch.cat([x, -x])[:, :, :40]):
            exact = norm.double()(xx.double()).numpy()
            got = session.run(None, {"x": xx.numpy()})[0].astype(np.float64)
            assert np.linalg.norm(got - exact) <= 1e-7 * np.linalg.norm(exact)
    norm.float()


@pytest.mark.parametrize("extra_levels", [chunked.EXTRA_LEVELS, 0])
def test_scan_graph_is_right_at_lengths_it_was_not_traced_at(tmp_path, monkeypatch, extra_levels):
    """Traced at L=64, run at shorter, unaligned and far longer sequences. Without extra levels the
    graph's top level is left with several chunks at the longer lengths (its masked product)."""
    monkeypatch.setattr(chunked, "EXTRA_LEVELS", extra_levels)
    layer = Mamba(8).eval()
    with torch.no_grad(), use_backend("chunked"):
        torch.onnx.export(layer, (torch.randn(1, 64, 8),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b", 1: "L"}})
    session = ort_session(tmp_path / "m.onnx", threads=1)
    for batch, length in [(1, 5), (2, 100), (1, 3001)]:
        x = torch.randn(batch, length, 8)
        got = session.run(None, {"x": x.numpy()})[0]
        with torch.no_grad(), use_backend("reference"):
            ref = layer(x).numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ("lightm_unet_3d_tiny", "segmamba_tiny")
                                  else c for c in sorted(TINY_CASES)])
def test_parity_of_every_registered_model(case, tmp_path):
    name = case.split("-")[0]
    kwargs, size = TINY_CASES[case]
    model = medssm.create_model(name, **kwargs)
    result = export_onnx(model, tmp_path / "m.onnx", size)
    assert (tmp_path / "m.onnx").is_file()
    assert [c["shape"][0] for c in result.checks] == [1, 2]  # dynamic batch ...
    assert result.checks[1]["shape"][2:] != result.checks[0]["shape"][2:]  # ... and dynamic spatial size checked
    assert result.rel_error <= 1e-4
    assert model.training  # left as it was
    assert current_backend() == "auto"  # the export's own backend switch is undone
    out_channels = kwargs.get("num_classes") or kwargs.get("out_channels", 2)
    for check in result.checks:  # a segmentation output follows the input's size
        spatial = () if name.startswith("medmamba") else check["shape"][2:]
        assert check["output_shape"] == (check["shape"][0], out_channels, *spatial)


def test_every_registered_model_has_a_tested_tiny_size():
    """Every network class of medssm's own registered models (and dimensionality) has a parity case."""
    def kind(model):
        return type(model), model.spatial_dims

    tested = {kind(medssm.create_model(c.split("-")[0], **TINY_CASES[c][0])) for c in TINY_CASES}
    for name in medssm.list_models():
        model = medssm.create_model(name)
        if type(model).__module__.startswith("medssm"):
            assert kind(model) in tested, f"{name}: no ONNX parity test for its network"


def test_parity_failure_is_loud_and_writes_nothing(tmp_path):
    model = medssm.create_model("medmamba_tiny", in_chans=1, num_classes=2)
    with pytest.raises(ExportParityError, match="does not match PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", (32, 32), rtol=1e-30)
    assert not list(tmp_path.iterdir())


def test_an_output_of_another_shape_fails_the_parity_check(tmp_path):
    """A graph that holds only at its traced size (a Python int of a shape baked in) gives another output
    shape at the second size: ExportParityError naming the shapes, and no file."""

    class Cropped(torch.nn.Module):
        def forward(self, x):
            return x[..., : int(x.shape[-1])] * 2  # the tracer records 32: the ONNX graph crops every input to 32

    with pytest.raises(ExportParityError, match=r"output shape \(2, 1, 40, 32\), PyTorch gives \(2, 1, 40, 40\)"):
        export_onnx(Cropped(), tmp_path / "m.onnx", (1, 1, 32, 32), check_size=(40, 40))
    assert not list(tmp_path.iterdir())


def test_static_export_rejects_other_sizes(tmp_path):
    model = medssm.create_model("medmamba_tiny", in_chans=1, num_classes=2)
    result = export_onnx(model, tmp_path / "m.onnx", (32, 32), dynamic_spatial=False, dynamic_batch=False)
    assert len(result.checks) == 1 and result.dynamic_axes["input"] == {}
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    with pytest.raises(InvalidArgument, match="Got: 48 Expected: 32"):
        ort_session(tmp_path / "m.onnx").run(None, {"input": np.zeros((1, 1, 48, 48), np.float32)})


def test_bad_arguments(tmp_path):
    model = medssm.create_model("lightm_unet_2d_tiny")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "m.txt")
    with pytest.raises(ValueError, match="divisible by 8"):
        export_onnx(model, tmp_path / "m.onnx", (30, 32))
    with pytest.raises(ValueError, match="2 spatial sizes"):
        export_onnx(model, tmp_path / "m.onnx", (32, 32, 32))


def test_cli_exports_a_saved_model_folder(tmp_path, capsys):
    model = medssm.create_model("medmamba_tiny", in_chans=1, num_classes=3)
    medssm.save_model(model, tmp_path / "run" / "checkpoints" / "best", extra={"task": "classification"})
    out = tmp_path / "exported" / "net.onnx"
    assert main(["export", str(tmp_path / "run"), "--onnx", str(out), "--input-size", "32", "32"]) == 0
    text = capsys.readouterr().out
    assert "relative error" in text and out.is_file()
    x = np.random.default_rng(1).standard_normal((2, 1, 40, 48), dtype=np.float32)
    got = ort_session(out, threads=1).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = medssm.load_model(tmp_path / "run" / "checkpoints" / "best").eval()(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)


def test_cli_bad_source(tmp_path, capsys):
    # The CLI reports bad input on stderr with exit status 2 (no traceback).
    assert main(["export", "no_such_model", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "nor a registered model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "not a medssm run" in capsys.readouterr().err
    assert main(["export", "lightm_unet_2d_tiny", "--onnx", str(tmp_path / "m.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert main(["export", "lightm_unet_2d_tiny", "--onnx", str(tmp_path / "m.onnx"), "--model-kwargs",
                 json.dumps([1])]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))
