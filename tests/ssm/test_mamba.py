import math

import pytest
import torch

from medssm.ssm import Mamba, use_backend


def test_parameter_names_shapes_and_init():
    m = Mamba(d_model=40)
    rank = math.ceil(40 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (160, 40), "conv1d.weight": (80, 1, 4), "conv1d.bias": (80,),
        "x_proj.weight": (rank + 32, 80), "dt_proj.weight": (80, rank), "dt_proj.bias": (80,),
        "A_log": (80, 16), "D": (80,), "out_proj.weight": (40, 80),
    }
    assert torch.allclose(m.A_log[5], torch.log(torch.arange(1, 17.0)))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert m.dt_proj.weight.abs().max() <= rank ** -0.5


def test_segmamba_suffixes():
    m = Mamba(d_model=16, orders=("raster", "reversed", "slice"))
    names = set(m.state_dict())
    for n in ("A_b_log", "A_s_log", "D_b", "D_s", "conv1d_b.weight", "x_proj_s.weight", "dt_proj_b.bias"):
        assert n in names
    assert sum("in_proj" in n for n in names) == 1 and sum("out_proj" in n for n in names) == 1


def test_reversed_direction_equals_flipped_sequence():
    torch.manual_seed(1)
    fwd = Mamba(d_model=8, d_state=4).double()
    both = Mamba(d_model=8, d_state=4, orders=("raster", "reversed")).double()
    sd = both.state_dict()
    # give the reversed direction the forward weights: then out = f(x) + flip(f'(flip(x))) with f' = f minus D/out_proj share
    for k, v in fwd.state_dict().items():
        sd[k] = v
        suffixed = k.replace("conv1d", "conv1d_b").replace("x_proj", "x_proj_b").replace("dt_proj", "dt_proj_b")
        suffixed = {"A_log": "A_b_log", "D": "D_b"}.get(k, suffixed)
        if suffixed != k:
            sd[suffixed] = v
    both.load_state_dict(sd)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with use_backend("reference"):
        expected = fwd(x) + fwd(x.flip(1)).flip(1)
        torch.testing.assert_close(both(x), expected)


def test_slice_order_needs_shape_and_gradients_flow():
    m = Mamba(d_model=8, orders=("raster", "reversed", "slice"))
    x = torch.randn(2, 3 * 4 * 5, 8, requires_grad=True)
    y = m(x, spatial_shape=(3, 4, 5))
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="spatial_shape"):
        m(x, spatial_shape=(3, 4, 4))
