"""The fused CPU Mamba path against the plain PyTorch reference, in float64 on fresh random inputs:
outputs and the gradient of every input and parameter within 1e-10 (relative to the largest value)."""

import pytest
import torch

from medssm.nets.medmamba import SS2D
from medssm.ssm import Mamba
from medssm.ssm.fused_mamba import fused_dtype, rows_linear
from medssm.ssm.scan import count_scan_flops

TOL = 1e-10


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter moved off its initialisation, so that no term (D, biases, ...) is trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def assert_close_relative(got, want, what):
    scale = want.abs().max().clamp_min(1e-300)
    error = ((got - want).abs().max() / scale).item()
    assert error <= TOL, f"{what}: relative error {error:.2e}"


def check_against(run, reference, inputs, names, generator):
    out = run()
    want = reference()
    grad_out = torch.randn(want.shape, generator=generator, dtype=want.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    assert_close_relative(out, want, "output")
    for name, g, w in zip(names, grads, want_grads):
        assert_close_relative(g, w, f"gradient of {name}")
    return out


MAMBA_CASES = [  # orders, spatial shape (L = product), batch, layer options
    (("raster",), (130,), 2, {}),
    (("raster",), (9, 13), 3, {"bias": True, "conv_bias": False, "d_conv": 3}),
    (("raster", "reversed", "slice"), (9, 13), 2, {}),  # SegMamba's layer in 2D: column-major third scan
    (("raster", "reversed", "slice"), (3, 5, 7), 2, {}),  # and in 3D: depth-fastest
    (("raster", "slice"), (4, 5, 6), 1, {"d_state": 5}),
]


@pytest.mark.parametrize("orders, shape, batch, options", MAMBA_CASES,
                         ids=[f"{'+'.join(c[0])}-{'x'.join(map(str, c[1]))}-b{c[2]}" for c in MAMBA_CASES])
def test_fused_mamba_matches_reference(orders, shape, batch, options):
    generator = torch.Generator().manual_seed(len(orders) * 1000 + sum(shape))
    layer = Mamba(12, orders=orders, **{"d_state": 4, **options}).double()
    randomise(layer, generator)
    length = 1
    for s in shape:
        length *= s
    hidden = torch.randn(batch, length, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    names, params = zip(*layer.named_parameters())
    out = check_against(lambda: layer(hidden, shape), lambda: layer.forward_reference(hidden, shape),
                        [hidden, *params], ["input", *names], generator)
    assert out.grad_fn.name().startswith("FusedMamba")
    with torch.no_grad():  # the same forward without autograd
        assert_close_relative(layer(hidden, shape), out.detach(), "output without autograd")


@pytest.mark.parametrize("spatial_dims, shape, batch", [(2, (5, 9), 2), (3, (3, 4, 5), 2)])
def test_ss2d_each_direction_matches_the_grouped_cross_scan(spatial_dims, shape, batch):
    """MedMamba's cross-scan (4 directions in 2D, 6 in 3D): the CPU form, one direction at a time with
    2-D GEMMs, against the authors' stacked form (einsum, one grouped scan)."""
    generator = torch.Generator().manual_seed(spatial_dims)
    attn = SS2D(d_model=6, d_state=3, spatial_dims=spatial_dims).double()
    randomise(attn, generator)
    x = torch.randn(batch, attn.d_inner, *shape, generator=generator, dtype=torch.float64, requires_grad=True)
    names = ["x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    params = [getattr(attn, n) for n in names]
    check_against(lambda: attn._scan_each(x), lambda: attn._scan_grouped(x), [x, *params], ["input", *names],
                  generator)


@pytest.mark.parametrize("token_major", [True, False])
def test_rows_linear_matches_linear(token_major):
    """2-D GEMMs per batch element, on channels-first rows or a transposed view of tokens."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    data = torch.randn(3, 7, 4, generator=generator, dtype=torch.float64)  # (B, L, K)
    x = (data if token_major else data.transpose(1, 2).contiguous()).requires_grad_()
    rows = x.transpose(1, 2) if token_major else x
    out = check_against(lambda: rows_linear(weight, rows, bias),
                        lambda: torch.nn.functional.linear(rows.transpose(1, 2), weight, bias).transpose(1, 2),
                        [weight, bias, x], ["weight", "bias", "x"], generator)
    assert out.is_contiguous() and out.grad_fn.name().startswith("RowsLinear")


def test_flop_counting_sees_the_reference_path():
    """Counters (medssm info) need the modules' own ops: no fused path while scan FLOPs are counted."""
    x = torch.randn(1, 10, 8)
    assert fused_dtype(x) == torch.float32
    with count_scan_flops(compute=False):
        assert fused_dtype(x) is None
    layer = Mamba(8)
    with count_scan_flops(compute=False):
        out = layer(x.requires_grad_())
    assert not out.grad_fn.name().startswith("FusedMamba")


@pytest.mark.parametrize("orders, shape", [(("raster",), (300,)), (("raster", "reversed", "slice"), (6, 7, 8))])
def test_fused_mamba_under_bf16_autocast(orders, shape):
    """bf16 GEMMs with the conv and the scan in float32: within bf16 rounding of the float32 layer
    (as close as the reference path under autocast), float32 gradients for the float32 parameters."""
    generator = torch.Generator().manual_seed(7)
    layer = Mamba(16, orders=orders)
    randomise(layer, generator)
    length = 1
    for s in shape:
        length *= s
    hidden = torch.randn(2, length, 16, generator=generator, requires_grad=True)
    names, params = zip(*layer.named_parameters())
    grad_out = torch.randn(2, length, 16, generator=generator)
    exact = layer.forward_reference(hidden, shape)
    exact_grads = torch.autograd.grad(exact, [hidden, *params], grad_out)
    results = {}
    for path in ("fused", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(hidden, shape) if path == "fused" else layer.forward_reference(hidden, shape)
        results[path] = (out, torch.autograd.grad(out.float(), [hidden, *params], grad_out))
    out, grads = results["fused"]
    assert out.dtype == torch.bfloat16 and out.grad_fn.name().startswith("FusedMamba")
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(out, exact) < max(0.02, 1.5 * relative(results["reference"][0], exact))
    for name, g, r, e in zip(["input", *names], grads, results["reference"][1], exact_grads):
        assert g.dtype == e.dtype and torch.isfinite(g).all(), name
        assert relative(g, e) < max(0.03, 1.5 * relative(r, e)), name


@pytest.mark.parametrize("orders", [("raster",), ("raster", "reversed", "slice")])
def test_fused_mamba_under_saved_tensor_hooks_and_checkpointing(orders):
    """Where saved tensors are intercepted (hooks, torch.utils.checkpoint), the fused layer keeps
    everything through save_for_backward and rebuilds the scan's graph in the backward: the same
    output and gradients as its usual path, and the hooks see what it keeps."""
    generator = torch.Generator().manual_seed(7)
    layer = Mamba(12, d_state=4, orders=orders).double()
    randomise(layer, generator)
    shape = (3, 4, 5)
    hidden = torch.randn(2, 60, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    inputs = [hidden, *layer.parameters()]
    grad_out = torch.randn(2, 60, 12, generator=generator, dtype=torch.float64)
    want = layer(hidden, shape)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        hooked = layer(hidden, shape)
    checkpointed = torch.utils.checkpoint.checkpoint(layer, hidden, shape, use_reentrant=False)
    for out in (hooked, checkpointed):
        assert out.grad_fn is not None
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        for g, w in zip(torch.autograd.grad(out, inputs, grad_out), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-15)
    assert sum(seen) > 5 * len(orders) * 2 * 24 * 60  # per direction at least (x_o, u, delta, z_o, x_dbl)
