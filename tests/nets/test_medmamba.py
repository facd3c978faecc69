"""MedMamba: shared model tests in 2D and 3D, exact parameter counts, the authors' state-dict layout,
and the pieces that decide whether outputs match the released code (scan directions, shuffle, merging)."""

import math

import pytest
import torch

import medssm
from medssm.nets.medmamba import SS2D, DropPath, MedMamba, SSConvSSM, gather_cells
from medssm.ssm import selective_scan, use_backend
@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (1, 2, 17, 9), (1, 1, 9, 13, 11)])
def test_odd_and_non_multiple_sizes_are_padded(shape):
    model = medssm.create_model("medmamba_tiny", in_chans=shape[1], num_classes=3, spatial_dims=len(shape) - 2)
    with torch.no_grad():
        assert model.eval()(torch.randn(*shape)).shape == (shape[0], 3)


@pytest.mark.parametrize("name, expected", [
    ("medmamba_t", 14_457_222), ("medmamba_s", 18_625_158), ("medmamba_b", 39_864_838)])
def test_parameter_counts_match_the_released_code(name, expected):
    model = medssm.create_model(name, num_classes=6)
    assert sum(p.numel() for p in model.parameters()) == expected


def authors_state_dict_shapes(depths, dims, num_classes, in_chans=3, d_state=16):
    """Key -> shape of the authors' VSSM state dict, written out from a reading of their MedMamba.py."""
    shapes = {"patch_embed.proj.weight": (dims[0], in_chans, 4, 4), "patch_embed.proj.bias": (dims[0],),
              "patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],)}
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        half = dim // 2
        d_inner, rank = 2 * half, math.ceil(half / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({p + "ln_1.weight": (half,), p + "ln_1.bias": (half,)})
            a = p + "self_attention."
            shapes.update({
                a + "x_proj_weight": (4, rank + 2 * d_state, d_inner), a + "dt_projs_weight": (4, d_inner, rank),
                a + "dt_projs_bias": (4, d_inner), a + "A_logs": (4 * d_inner, d_state), a + "Ds": (4 * d_inner,),
                a + "in_proj.weight": (2 * d_inner, half), a + "conv2d.weight": (d_inner, 1, 3, 3),
                a + "conv2d.bias": (d_inner,), a + "out_norm.weight": (d_inner,), a + "out_norm.bias": (d_inner,),
                a + "out_proj.weight": (half, d_inner)})
            c = p + "conv33conv33conv11."
            for bn in (0, 2, 5):
                shapes.update({c + f"{bn}.{n}": (half,) for n in ("weight", "bias", "running_mean", "running_var")})
                shapes[c + f"{bn}.num_batches_tracked"] = ()
            for conv, k in ((1, 3), (4, 3), (7, 1)):
                shapes.update({c + f"{conv}.weight": (half, half, k, k), c + f"{conv}.bias": (half,)})
        if i < len(depths) - 1:
            d = f"layers.{i}.downsample."
            shapes.update({d + "reduction.weight": (2 * dim, 4 * dim), d + "norm.weight": (4 * dim,),
                           d + "norm.bias": (4 * dim,)})
    shapes.update({"head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return shapes


def test_state_dict_layout_is_the_authors():
    model = medssm.create_model("medmamba_t", num_classes=6)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == authors_state_dict_shapes((2, 2, 4, 2), (96, 192, 384, 768), 6)


def test_a_checkpoint_in_the_authors_layout_loads_strictly():
    shapes = authors_state_dict_shapes((1, 1, 1, 1), (16, 32, 64, 128), 4, in_chans=1)
    checkpoint = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s) + 0.5)
                  for k, s in shapes.items()}
    model = medssm.create_model("medmamba_tiny", num_classes=4, in_chans=1)
    model.load_state_dict(checkpoint, strict=True)
    torch.testing.assert_close(model.layers[2].blocks[0].self_attention.A_logs,
                               checkpoint["layers.2.blocks.0.self_attention.A_logs"], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 1, 32, 32))).all()


def _direction_by_hand(x, k, attn):
    """Direction k of the authors' forward_corev0 with explicit transposes and flips: (B, d, H, W)
    -> that direction's scan output restored to row-major, (B, d, H*W)."""
    b, d, h, w = x.shape
    seq = x.flatten(2) if k in (0, 2) else x.transpose(2, 3).flatten(2)  # row- or column-major
    if k >= 2:
        seq = seq.flip(-1)
    r, n = attn.dt_rank, attn.d_state
    dbl = torch.einsum("bdl,cd->bcl", seq, attn.x_proj_weight[k])
    dt, B, C = dbl.split([r, n, n], dim=1)
    dt = torch.einsum("brl,dr->bdl", dt, attn.dt_projs_weight[k])
    rows = slice(k * d, (k + 1) * d)
    y = selective_scan(seq, dt, -torch.exp(attn.A_logs[rows]), B, C, attn.Ds[rows],
                       delta_bias=attn.dt_projs_bias[k], delta_softplus=True, backend="reference")
    if k >= 2:
        y = y.flip(-1)
    return y if k in (0, 2) else y.view(b, d, w, h).transpose(2, 3).flatten(2)


def test_ss2d_scans_the_authors_four_directions_with_their_parameters():
    attn = SS2D(d_model=4, d_state=3, spatial_dims=2).double()
    with torch.no_grad():
        for p in (attn.x_proj_weight, attn.dt_projs_weight, attn.dt_projs_bias, attn.Ds):
            p.normal_()  # make the four directions differ
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)  # (B, d_inner, H, W), H != W
    expected = sum(_direction_by_hand(x, k, attn) for k in range(4))
    with use_backend("reference"):
        torch.testing.assert_close(attn._scan_all(x), expected)


def test_ss3d_has_six_directions_and_handles_non_cubic_volumes():
    attn = SS2D(d_model=4, spatial_dims=3)
    assert attn.x_proj_weight.shape[0] == 6 and attn.A_logs.shape == (6 * 8, 16)
    x = torch.randn(1, 3, 2, 5, 4)  # (B, D, H, W, C)
    assert attn(x).shape == x.shape


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_block_interleaves_conv_and_ssm_halves(spatial_dims):
    block = SSConvSSM(8, spatial_dims=spatial_dims).eval()
    x = torch.randn(2, *(3,) * spatial_dims, 8)  # channels-last
    with torch.no_grad():
        out = block(x)
        left, right = x.chunk(2, dim=-1)
        conv = block.conv33conv33conv11(left.movedim(-1, 1)).movedim(1, -1)
        ssm = block.self_attention(block.ln_1(right))
    torch.testing.assert_close(out[..., 0::2], conv + x[..., 0::2])
    torch.testing.assert_close(out[..., 1::2], ssm + x[..., 1::2])


def test_patch_merging_concatenates_in_the_authors_order():
    x = torch.randn(2, 4, 6, 3)  # (B, H, W, C)
    expected = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(gather_cells(x), expected, rtol=0, atol=0)
    v = torch.randn(1, 2, 4, 6, 3)  # (B, D, H, W, C): the first axis's offset varies fastest
    cells = gather_cells(v).unflatten(-1, (8, 3))  # (B, D/2, H/2, W/2, 8, C)
    torch.testing.assert_close(cells[..., 1, :], v[:, 1::2, 0::2, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(cells[..., 6, :], v[:, 0::2, 1::2, 1::2], rtol=0, atol=0)


def test_odd_sizes_are_padded_with_zeros_at_the_end():
    model = MedMamba(in_chans=1, num_classes=2, depths=(1, 1), dims=(8, 16), drop_path_rate=0.0).eval()
    x = torch.randn(1, 1, 14, 10)  # -> 4x3 after the padded 4x4 embedding, 2x2 after merging
    padded = torch.nn.functional.pad(x, (0, 2, 0, 2))
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(x), model.patch_embed(padded), rtol=0, atol=0)
        assert model.forward_features(x).shape == (1, 2, 2, 16)


def test_drop_path_drops_whole_samples_and_rescales():
    drop = DropPath(0.5).train()
    out = drop(torch.ones(2000, 3, 4))
    kept = out.flatten(1).amax(1)
    assert set(out.unique().tolist()) <= {0.0, 2.0} and torch.equal(out.flatten(1).amin(1), kept)
    assert 0.4 < (kept > 0).float().mean() < 0.6
    x = torch.randn(4, 5)
    assert torch.equal(drop.eval()(x), x)


def test_timm_style_head_api():
    model = medssm.create_model("medmamba_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)


def test_clear_errors():
    model = medssm.create_model("medmamba_tiny", num_classes=2)
    with pytest.raises(ValueError, match="spatial_dims=2"):
        model(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="2 or 3"):
        MedMamba(spatial_dims=1)
    with pytest.raises(ValueError, match="2\\*dims"):
        MedMamba(dims=(16, 24, 48, 96))
