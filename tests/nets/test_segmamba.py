import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock as MonaiOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock as MonaiBasicBlock
from monai.networks.blocks.unetr_block import UnetrUpBlock as MonaiUpBlock

import medssm
from medssm.nets.segmamba import GSC, MambaLayer, SegMamba, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from medssm.ssm import selective_scan, use_backend

SUFFIXES = ("", "_b", "_s")


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 32), (2, 2, 32, 16, 48), (1, 1, 16, 32, 16), (2, 1, 16, 48)])
def test_anisotropic_sizes_divisible_by_16(shape):
    model = medssm.create_model("segmamba_tiny", spatial_dims=len(shape) - 2, in_channels=shape[1], out_channels=3)
    with torch.no_grad():
        assert model.eval()(torch.randn(*shape)).shape == (shape[0], 3, *shape[2:])


def test_registered_sizes():
    assert {"segmamba_3d", "segmamba_2d", "segmamba_tiny"} <= set(medssm.list_models("segmamba*"))
    with torch.device("meta"):
        assert medssm.create_model("segmamba_2d").vit.downsample_layers[0][0].weight.dim() == 4


# --- the authors' layout, written from reading ge-xing/SegMamba (model_segmamba/segmamba.py, mamba_simple.py v3) ---


def authors_state_shapes(in_ch=4, out_ch=4, depths=(2, 2, 2, 2), dims=(48, 96, 192, 384), hidden=768, d_state=16):
    """Key -> shape of the released 3D SegMamba's state dict."""
    k3, k1, k2, k7 = (3, 3, 3), (1, 1, 1), (2, 2, 2), (7, 7, 7)
    s = {"vit.downsample_layers.0.0.weight": (dims[0], in_ch, *k7), "vit.downsample_layers.0.0.bias": (dims[0],)}
    for i in range(1, 4):
        s[f"vit.downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], *k2)
        s[f"vit.downsample_layers.{i}.1.bias"] = (dims[i],)
    for i, d in enumerate(dims):
        for name, k in (("proj", k3), ("proj2", k3), ("proj3", k1), ("proj4", k1)):
            s[f"vit.gscs.{i}.{name}.weight"], s[f"vit.gscs.{i}.{name}.bias"] = (d, d, *k), (d,)
        di, r = 2 * d, math.ceil(d / 16)
        for j in range(depths[i]):
            p = f"vit.stages.{i}.{j}."
            s[p + "norm.weight"] = s[p + "norm.bias"] = (d,)
            s[p + "mamba.in_proj.weight"], s[p + "mamba.out_proj.weight"] = (2 * di, d), (d, di)
            for x in SUFFIXES:
                s[p + f"mamba.conv1d{x}.weight"], s[p + f"mamba.conv1d{x}.bias"] = (di, 1, 4), (di,)
                s[p + f"mamba.x_proj{x}.weight"] = (r + 2 * d_state, di)
                s[p + f"mamba.dt_proj{x}.weight"], s[p + f"mamba.dt_proj{x}.bias"] = (di, r), (di,)
                s[p + f"mamba.A{x}_log"], s[p + f"mamba.D{x}"] = (di, d_state), (di,)
        s[f"vit.mlps.{i}.fc1.weight"], s[f"vit.mlps.{i}.fc1.bias"] = (2 * d, d, *k1), (2 * d,)
        s[f"vit.mlps.{i}.fc2.weight"], s[f"vit.mlps.{i}.fc2.bias"] = (d, 2 * d, *k1), (d,)

    def res_block(prefix, cin, cout):
        s[prefix + "conv1.conv.weight"] = (cout, cin, *k3)
        s[prefix + "conv2.conv.weight"] = (cout, cout, *k3)
        if cin != cout:
            s[prefix + "conv3.conv.weight"] = (cout, cin, *k1)

    for n, (cin, cout) in enumerate([(in_ch, dims[0]), *zip(dims, dims[1:]), (dims[3], hidden)], start=1):
        res_block(f"encoder{n}.layer.", cin, cout)
    for n, (cin, cout) in zip((5, 4, 3, 2), [(hidden, dims[3]), (dims[3], dims[2]), (dims[2], dims[1]), (dims[1], dims[0])]):
        s[f"decoder{n}.transp_conv.conv.weight"] = (cin, cout, *k2)
        res_block(f"decoder{n}.conv_block.", 2 * cout, cout)
    res_block("decoder1.layer.", dims[0], dims[0])
    s["out.conv.conv.weight"], s["out.conv.conv.bias"] = (out_ch, dims[0], *k1), (out_ch,)
    return s


def test_parameter_count_and_authors_keys():
    with torch.device("meta"):
        model = SegMamba(spatial_dims=3, in_channels=4, out_channels=4)
    assert sum(p.numel() for p in model.parameters()) == 67_416_196
    expected = authors_state_shapes()
    assert sum(math.prod(v) for v in expected.values()) == 67_416_196
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_authors_layout_state_dict_loads_strict():
    shapes = authors_state_shapes(in_ch=2, out_ch=3, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), hidden=40)
    state = {k: torch.randn(v) for k, v in shapes.items()}
    model = SegMamba(in_channels=2, out_channels=3, depths=(1, 2, 1, 1), feature_size=(8, 16, 24, 32), hidden_size=40)
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class AuthorsMambaV3(nn.Module):
    """The released bimamba "v3" layer: forward scan, scan of the flipped (x, z), and a slice scan built by
    chunking the raster sequence into ``nslices`` pieces, stacking and flattening (a fixed slice count)."""

    def __init__(self, dim, nslices, d_state=16, d_conv=4):
        super().__init__()
        di, self.r, self.n, self.nslices = 2 * dim, math.ceil(dim / 16), d_state, nslices
        self.in_proj = nn.Linear(dim, 2 * di, bias=False)
        for x in SUFFIXES:
            setattr(self, f"conv1d{x}", nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1))
            setattr(self, f"x_proj{x}", nn.Linear(di, self.r + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{x}", nn.Linear(self.r, di))
            setattr(self, f"A{x}_log", nn.Parameter(torch.zeros(di, d_state)))
            setattr(self, f"D{x}", nn.Parameter(torch.zeros(di)))
        self.out_proj = nn.Linear(di, dim, bias=False)

    def scan(self, xz, x_):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(getattr(self, f"conv1d{x_}")(x)[..., : x.shape[-1]])
        dt, B, C = getattr(self, f"x_proj{x_}")(x.transpose(1, 2)).split([self.r, self.n, self.n], dim=-1)
        dt_proj = getattr(self, f"dt_proj{x_}")
        return selective_scan(x, dt_proj.weight @ dt.transpose(1, 2), -torch.exp(getattr(self, f"A{x_}_log")),
                              B.transpose(1, 2), C.transpose(1, 2), getattr(self, f"D{x_}"), z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True, backend="reference")

    def forward(self, h):
        batch, length, _ = h.shape
        xz = self.in_proj(h).transpose(1, 2)
        out = self.scan(xz, "")
        out_b = self.scan(xz.flip(-1), "_b").flip(-1)
        xz_s = torch.stack(xz.chunk(self.nslices, dim=-1), dim=-1).flatten(-2)
        out_s = self.scan(xz_s, "_s")
        out_s = out_s.reshape(batch, -1, length // self.nslices, self.nslices).permute(0, 1, 3, 2).flatten(-2)
        return self.out_proj((out + out_b + out_s).transpose(1, 2))


class AuthorsMambaLayer(nn.Module):
    def __init__(self, dim, nslices):
        super().__init__()
        self.norm, self.mamba = nn.LayerNorm(dim), AuthorsMambaV3(dim, nslices)

    def forward(self, x):
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1).transpose(1, 2)
        return self.mamba(self.norm(flat)).transpose(1, 2).reshape(b, c, *spatial) + x


@pytest.mark.parametrize("spatial", [(4, 3, 5), (5, 3)])
def test_tri_orientated_layer_matches_authors_slice_construction(spatial):
    """3D: the slice scan is depth-fastest (nslices = depth); 2D: column-major (nslices = rows). The reversed
    scan flips x and z together."""
    ours = MambaLayer(6).double()
    ref = AuthorsMambaLayer(6, nslices=spatial[0]).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 6, *spatial, dtype=torch.float64)
    with use_backend("reference"):
        torch.testing.assert_close(ours(x), ref(x))


class AuthorsGSC(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj, self.proj2 = nn.Conv3d(c, c, 3, 1, 1), nn.Conv3d(c, c, 3, 1, 1)
        self.proj3, self.proj4 = nn.Conv3d(c, c, 1), nn.Conv3d(c, c, 1)

    def forward(self, x):
        act = lambda t: F.relu(F.instance_norm(t))  # noqa: E731
        return act(self.proj4(act(self.proj2(act(self.proj(x)))) + act(self.proj3(x)))) + x


class AuthorsSegMamba(nn.Module):
    """The released 3D SegMamba's structure, with MONAI's decoder blocks and slice counts set for ``patch``."""

    def __init__(self, patch, in_ch, out_ch, depths, dims, hidden):
        super().__init__()
        vit = self.vit = nn.Module()
        vit.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv3d(in_ch, dims[0], 7, 2, 3))] + [
            nn.Sequential(nn.InstanceNorm3d(dims[i]), nn.Conv3d(dims[i], dims[i + 1], 2, 2)) for i in range(3)])
        vit.gscs = nn.ModuleList(AuthorsGSC(d) for d in dims)
        vit.stages = nn.ModuleList(nn.Sequential(*(AuthorsMambaLayer(d, patch[0] // 2 ** (i + 1)) for _ in range(n)))
                                   for i, (d, n) in enumerate(zip(dims, depths)))
        vit.mlps = nn.ModuleList(nn.Sequential() for _ in dims)
        for mlp, d in zip(vit.mlps, dims):
            mlp.fc1, mlp.act, mlp.fc2 = nn.Conv3d(d, 2 * d, 1), nn.GELU(), nn.Conv3d(2 * d, d, 1)
        block = dict(spatial_dims=3, kernel_size=3, norm_name="instance", res_block=True)
        chans = [(in_ch, dims[0]), *zip(dims, dims[1:]), (dims[3], hidden)]
        for n, (i, o) in enumerate(chans, start=1):
            setattr(self, f"encoder{n}", MonaiBasicBlock(in_channels=i, out_channels=o, stride=1, **block))
        ups = [(hidden, dims[3]), (dims[3], dims[2]), (dims[2], dims[1]), (dims[1], dims[0])]
        for n, (i, o) in zip((5, 4, 3, 2), ups):
            setattr(self, f"decoder{n}", MonaiUpBlock(in_channels=i, out_channels=o, upsample_kernel_size=2, **block))
        self.decoder1 = MonaiBasicBlock(in_channels=dims[0], out_channels=dims[0], stride=1, **block)
        self.out = MonaiOutBlock(3, dims[0], out_ch)

    def forward(self, x):
        skips, h = [], x
        for i in range(4):
            h = self.vit.stages[i](self.vit.gscs[i](self.vit.downsample_layers[i](h)))
            skips.append(self.vit.mlps[i](F.instance_norm(h)))
        enc = [self.encoder1(x), self.encoder2(skips[0]), self.encoder3(skips[1]), self.encoder4(skips[2])]
        dec = self.encoder5(skips[3])
        for n in (5, 4, 3, 2):
            dec = getattr(self, f"decoder{n}")(dec, enc[n - 2])
        return self.out(self.decoder1(dec))


@pytest.mark.parametrize("patch", [(32, 48, 32), (48, 32, 16)])
def test_matches_authors_structure_at_any_patch_size(patch):
    """Same weights, same output as the released structure with its slice counts set right for ``patch``."""
    kw = dict(in_ch=2, out_ch=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), hidden=40)
    ours = SegMamba(in_channels=2, out_channels=3, depths=(1, 1, 1, 1), feature_size=(8, 16, 24, 32), hidden_size=40).eval()
    ref = AuthorsSegMamba(patch, **kw).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 2, *patch)
    with torch.no_grad(), use_backend("reference"):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_decoder_blocks_equal_monai(spatial_dims):
    s = (8,) * spatial_dims
    block = dict(spatial_dims=spatial_dims, kernel_size=3, norm_name="instance", res_block=True)
    pairs = [
        (UnetrBasicBlock(spatial_dims, 3, 5), MonaiBasicBlock(in_channels=3, out_channels=5, stride=1, **block), (3,)),
        (UnetrBasicBlock(spatial_dims, 5, 5), MonaiBasicBlock(in_channels=5, out_channels=5, stride=1, **block), (5,)),
        (UnetOutBlock(spatial_dims, 5, 2), MonaiOutBlock(spatial_dims, 5, 2), (5,)),
    ]
    for ours, monai, (c,) in pairs:
        ours.load_state_dict(monai.state_dict(), strict=True)
        x = torch.randn(2, c, *s)
        torch.testing.assert_close(ours(x), monai(x.clone()))
    ours, monai = UnetrUpBlock(spatial_dims, 6, 4), MonaiUpBlock(in_channels=6, out_channels=4, upsample_kernel_size=2, **block)
    ours.load_state_dict(monai.state_dict(), strict=True)
    x, skip = torch.randn(2, 6, *(4,) * spatial_dims), torch.randn(2, 4, *s)
    torch.testing.assert_close(ours(x, skip), monai(x.clone(), skip.clone()))


@pytest.mark.parametrize("gate", ["sum", "product"])
def test_gsc_gate(gate):
    gsc = GSC(2, 4, gate=gate)
    x = torch.randn(2, 4, 6, 5)
    act = lambda t: F.relu(F.instance_norm(t))  # noqa: E731
    a, b = act(gsc.proj2(act(gsc.proj(x)))), act(gsc.proj3(x))
    torch.testing.assert_close(gsc(x), act(gsc.proj4(a + b if gate == "sum" else a * b)) + x)
    with pytest.raises(ValueError, match="gate"):
        GSC(2, 4, gate="max")


def test_product_gate_option_reaches_the_model():
    net = medssm.create_model("segmamba_tiny", spatial_dims=2, in_channels=1, gsc_gate="product")
    assert all(g.gate == "product" for g in net.vit.gscs)


@pytest.mark.parametrize("shape, message", [
    ((1, 1, 16, 16, 40), "divisible by 16"),
    ((1, 1, 24, 32), "divisible by 16"),
    ((1, 1, 16, 16, 16), ">= 32"),
    ((1, 1, 16, 16), ">= 32"),
    ((1, 1, 32, 32, 32, 32), r"\(B, C, D, H, W\)"),
])
def test_unsupported_sizes_raise_clearly(shape, message):
    net = medssm.create_model("segmamba_tiny", spatial_dims=min(len(shape) - 2, 3), in_channels=1)
    with pytest.raises(ValueError, match=message):
        net(torch.randn(*shape))
