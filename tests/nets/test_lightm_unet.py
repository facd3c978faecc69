"""LightM-UNet: the shared model tests in 2D and 3D, exact parameter counts, the authors' key layout."""

import pytest
import torch
import torch.nn as nn

import medssm
from medssm.nets.lightm_unet import LightMUNet, RVMLayer
from medssm.ssm import Mamba

@pytest.mark.parametrize("name, shape", [("lightm_unet_2d_tiny", (1, 2, 8, 24)),
                                         ("lightm_unet_3d_tiny", (2, 2, 8, 16, 8))])
def test_any_size_divisible_by_8(name, shape):
    model = medssm.create_model(name, in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], 3, *shape[2:])


@pytest.mark.parametrize("name, in_channels, out_channels, expected", [
    ("lightm_unet_2d", 3, 2, 5_011_765),
    ("lightm_unet_3d", 1, 3, 5_015_766),
])
def test_parameter_count_of_the_released_model(name, in_channels, out_channels, expected):
    model = medssm.create_model(name, in_channels=in_channels, out_channels=out_channels)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(isinstance(m, Mamba) for m in model.modules()) == 21


def authors_state_dict_shapes(spatial_dims, in_channels, out_channels, filters=32, blocks_down=(1, 2, 2, 4),
                              blocks_up=(1, 1, 1), d_state=16, d_conv=4, expand=2):
    """Key -> shape of a state dict of the authors' ``LightMUNet``, listed from the structure of
    their code (MONAI ``Convolution`` keeps its conv at ``.conv``; Sequential indices as there)."""
    k = (1,) * spatial_dims
    k3 = (3,) * spatial_dims
    shapes = {}

    def dwconv(prefix, c_in, c_out, kernel, bias):
        shapes[f"{prefix}.0.conv.weight"] = (c_in, 1, *kernel)
        shapes[f"{prefix}.1.conv.weight"] = (c_out, c_in, *k)
        if bias:
            shapes[f"{prefix}.0.conv.bias"] = (c_in,)
            shapes[f"{prefix}.1.conv.bias"] = (c_out,)

    def group_norm(prefix, c):
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (c,)

    def mamba_layer(prefix, c_in, c_out):
        d_inner, dt_rank = expand * c_in, -(-c_in // 16)
        group_norm(f"{prefix}.norm", c_in)
        shapes.update({
            f"{prefix}.skip_scale": (1,),
            f"{prefix}.mamba.A_log": (d_inner, d_state),
            f"{prefix}.mamba.D": (d_inner,),
            f"{prefix}.mamba.in_proj.weight": (2 * d_inner, c_in),
            f"{prefix}.mamba.conv1d.weight": (d_inner, 1, d_conv),
            f"{prefix}.mamba.conv1d.bias": (d_inner,),
            f"{prefix}.mamba.x_proj.weight": (dt_rank + 2 * d_state, d_inner),
            f"{prefix}.mamba.dt_proj.weight": (d_inner, dt_rank),
            f"{prefix}.mamba.dt_proj.bias": (d_inner,),
            f"{prefix}.mamba.out_proj.weight": (c_in, d_inner),
            f"{prefix}.proj.weight": (c_out, c_in),
            f"{prefix}.proj.bias": (c_out,),
        })

    dwconv("convInit", in_channels, filters, k3, bias=False)
    for i, n in enumerate(blocks_down):
        c = filters * 2**i
        if i > 0:
            mamba_layer(f"down_layers.{i}.0.0", c // 2, c)
        for j in range(1, n + 1):
            group_norm(f"down_layers.{i}.{j}.norm1", c)
            group_norm(f"down_layers.{i}.{j}.norm2", c)
            mamba_layer(f"down_layers.{i}.{j}.conv1", c, c)
            mamba_layer(f"down_layers.{i}.{j}.conv2", c, c)
    for i, n in enumerate(blocks_up):
        c = filters * 2 ** (len(blocks_up) - i)
        shapes[f"up_samples.{i}.0.conv.weight"] = (c // 2, c, *k)
        for j in range(n):
            group_norm(f"up_layers.{i}.{j}.norm1", c // 2)
            group_norm(f"up_layers.{i}.{j}.norm2", c // 2)
            dwconv(f"up_layers.{i}.{j}.conv", c // 2, c // 2, k3, bias=False)
            shapes[f"up_layers.{i}.{j}.skip_scale"] = (1,)
    group_norm("conv_final.0", filters)
    dwconv("conv_final.2", filters, out_channels, k, bias=True)
    return shapes


@pytest.mark.parametrize("spatial_dims, in_channels, out_channels", [(2, 3, 2), (3, 1, 3)])
def test_authors_checkpoint_layout_loads_strictly(spatial_dims, in_channels, out_channels):
    model = LightMUNet(spatial_dims, in_channels, out_channels)
    expected = authors_state_dict_shapes(spatial_dims, in_channels, out_channels)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # The deepest Mamba's A_log under the authors' name is the one the forward uses.
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, in_channels, *(16,) * spatial_dims)
    with torch.no_grad():
        before = model.eval()(x)
        checkpoint["down_layers.3.4.conv2.mamba.A_log"] -= 2.0
        model.load_state_dict(checkpoint, strict=True)
        assert not torch.allclose(model(x), before)


def test_rvm_layer_follows_the_formula():
    layer = RVMLayer(8, 16)
    with torch.no_grad():
        layer.skip_scale.fill_(0.7)
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 3, 4, 5)
    tokens = x.reshape(2, 8, 60).transpose(1, 2)  # C order: last axis fastest
    y = layer.mamba(layer.norm(tokens)) + 0.7 * tokens  # skip from the un-normalised tokens
    expected = layer.proj(layer.norm(y)).transpose(1, 2).reshape(2, 16, 3, 4, 5)
    torch.testing.assert_close(layer(x), expected)


def test_ssm_norm_variant_is_the_layer_plus_a_norm_before_the_gate():
    plain, normed = Mamba(16), Mamba(16, out_norm=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["out_norm.bias", "out_norm.weight"] and not unexpected
    x = torch.randn(2, 10, 16)
    assert not torch.allclose(normed(x), plain(x))
    normed.out_norm = nn.Identity()
    torch.testing.assert_close(normed(x), plain(x))

    base, paper = LightMUNet(2, 1, 2), LightMUNet(2, 1, 2, ssm_norm=True)
    widths = [m.d_inner for m in paper.modules() if isinstance(m, Mamba) and m.out_norm is not None]
    assert len(widths) == 21
    assert sum(p.numel() for p in paper.parameters()) - sum(p.numel() for p in base.parameters()) == 2 * sum(widths)


@pytest.mark.parametrize("shape, bad", [((1, 1, 20, 16), "20 -> 16 or 24;"), ((1, 1, 8, 8, 4), "4 -> 8;")])
def test_wrong_input_size_says_which_sizes_work(shape, bad):
    model = medssm.create_model("lightm_unet_3d_tiny" if len(shape) == 5 else "lightm_unet_2d_tiny")
    with pytest.raises(ValueError, match="divisible by 8") as err:
        model(torch.randn(*shape))
    assert bad in str(err.value)


def test_wrong_number_of_spatial_axes_is_refused():
    with pytest.raises(ValueError, match="spatial_dims=2"):
        medssm.create_model("lightm_unet_2d_tiny")(torch.randn(1, 1, 8, 8, 8))


def test_released_scan_is_causal_and_the_two_way_option_sees_the_whole_level():
    """A token of the released layer depends only on the tokens before it in C order; with
    ``orders=("raster", "reversed")`` also on those after it."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, 4)
    later = x.clone()
    later[..., -1, -1, -1] = torch.randn(1, 8)  # change the last token only
    for orders, sees_later in [(("raster",), False), (("raster", "reversed"), True)]:
        layer = RVMLayer(8, 8, orders=orders)
        with torch.no_grad():
            first = layer(later)[..., 0, 0, 0] - layer(x)[..., 0, 0, 0]
        assert (first.abs().max() > 1e-7) == sees_later, orders  # released: exactly 0


def test_two_way_option_adds_the_reversed_scan_parameters_and_keeps_the_released_default():
    released = LightMUNet(3, 1, 3, init_filters=8)
    two_way = LightMUNet(3, 1, 3, init_filters=8, orders=("raster", "reversed"))
    assert LightMUNet(3, 1, 3, init_filters=8, orders=("raster",)).state_dict().keys() == released.state_dict().keys()
    extra = set(two_way.state_dict()) - set(released.state_dict())
    assert set(released.state_dict()) <= set(two_way.state_dict())
    suffixes = {k.split("mamba.")[1] for k in extra}
    assert suffixes == {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
                        "A_b_log", "D_b"}
    assert len(extra) == 7 * 21
    assert two_way(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_two_way_option_is_saved_and_loaded(tmp_path):
    model = medssm.create_model("lightm_unet_3d_tiny", orders=["raster", "reversed"])
    medssm.save_model(model, tmp_path)
    loaded = medssm.load_model(tmp_path)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
