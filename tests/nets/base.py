"""The shared model tester: every registered model family subclasses ``ModelTester``.

A subclass sets ``model_name`` (a small registered size), ``model_kwargs``, ``input_shapes``
(several sizes, 2D and/or 3D as the family supports) and ``expected_output_shape``.
"""

import copy

import pytest
import torch

import medssm


class ModelTester:
    model_name: str
    model_kwargs: dict = {}
    input_shapes: list[tuple[int, ...]] = []

    def expected_output_shape(self, input_shape: tuple[int, ...], kwargs: dict) -> tuple[int, ...]:
        raise NotImplementedError

    def kwargs_for(self, input_shape):
        """Model arguments for an input shape (override to switch spatial_dims with the shape)."""
        return dict(self.model_kwargs)

    def build(self, input_shape):
        kwargs = self.kwargs_for(input_shape)
        return medssm.create_model(self.model_name, **kwargs), kwargs

    def test_registered(self):
        assert self.model_name in medssm.list_models()

    def test_forward_shapes(self):
        for shape in self.input_shapes:
            model, kwargs = self.build(shape)
            model.eval()
            with torch.no_grad():
                out = model(torch.randn(*shape))
            assert tuple(out.shape) == tuple(self.expected_output_shape(shape, kwargs)), shape
            assert torch.isfinite(out).all(), shape

    def test_backward_reaches_every_parameter(self):
        for shape in {len(s): s for s in self.input_shapes}.values():  # one size per dimensionality
            model, _ = self.build(shape)
            model.train()
            model(torch.randn(*shape)).square().mean().backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"no gradient for {missing[:5]}"
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    def test_save_load_round_trip(self, tmp_path):
        shape = self.input_shapes[0]
        model, _ = self.build(shape)
        model.eval()
        x = torch.randn(*shape)
        medssm.save_model(model, tmp_path / "m")
        loaded = medssm.load_model(tmp_path / "m").eval()
        assert (tmp_path / "m" / "model.safetensors").is_file()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    def test_eval_is_deterministic(self):
        shape = self.input_shapes[0]
        model, _ = self.build(shape)
        model.eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    def test_cuda_matches_cpu(self, monkeypatch):
        """The same weights and input on CUDA (its scan backend) and on CPU: outputs and gradients agree."""
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions
        for shape in {len(s): s for s in self.input_shapes}.values():
            model, _ = self.build(shape)
            model.eval()
            x = torch.randn(*shape)
            results = []
            for device in ("cpu", "cuda"):
                m = copy.deepcopy(model).to(device)
                out = m(x.to(device))
                out.square().mean().backward()
                results.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}))
            (out_cpu, grads_cpu), (out_cuda, grads_cuda) = results
            assert (out_cuda - out_cpu).abs().max() <= 1e-4 * out_cpu.abs().max(), shape
            # Each gradient to 1e-3 of its own size, or of the largest one's: a bias before a
            # normalisation has a gradient that is zero but for rounding, on either device.
            floor = 1e-3 * max(g.abs().max() for g in grads_cpu.values())
            for name, g in grads_cpu.items():
                assert (grads_cuda[name] - g).abs().max() <= max(1e-3 * g.abs().max(), floor), (shape, name)
