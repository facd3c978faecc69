import pytest
import torch

from medssm.ssm import (CROSS_SCAN_2D, CROSS_SCAN_3D, cross_merge, cross_scan, from_order, image_to_tokens,
                        to_order, tokens_to_image)

SHAPES = [(5,), (4, 6), (3, 7), (5, 5), (2, 3, 4), (3, 5, 7), (4, 4, 4), (1, 3, 1)]


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
@pytest.mark.parametrize("order", ["raster", "reversed", "slice", "slice_reversed", "axis1", "axis1_reversed"])
def test_inverse_is_exact(shape, order):
    if order.startswith("axis1") and len(shape) < 3:
        with pytest.raises(ValueError, match="spatial axes"):
            to_order(torch.zeros(1, 2, int(torch.tensor(shape).prod())), shape, order)
        return
    x = torch.randn(2, 3, *shape)
    t = image_to_tokens(x, order)
    assert t.shape == (2, x[0, 0].numel(), 3)
    assert torch.equal(tokens_to_image(t, shape, order), x)
    seq = x.flatten(2)
    assert torch.equal(from_order(to_order(seq, shape, order), shape, order), seq)


def test_orders_visit_the_documented_axis_fastest():
    x = torch.arange(2 * 3).reshape(1, 1, 2, 3).float()  # H=2, W=3
    assert image_to_tokens(x, "raster")[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert image_to_tokens(x, "slice")[0, :, 0].tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert image_to_tokens(x, "slice_reversed")[0, :, 0].tolist() == [5, 2, 4, 1, 3, 0]
    v = torch.arange(2 * 2 * 2).reshape(1, 1, 2, 2, 2).float()  # D, H, W
    assert image_to_tokens(v, "slice")[0, :, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # depth fastest
    assert image_to_tokens(v, "axis1")[0, :, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("shape,orders", [((4, 5), CROSS_SCAN_2D), ((3, 4, 5), CROSS_SCAN_3D)])
def test_cross_scan_each_direction_restores(shape, orders):
    x = torch.randn(2, 3, *shape)
    ys = cross_scan(x)
    assert ys.shape == (2, len(orders), 3, x[0, 0].numel())
    for k, order in enumerate(orders):
        assert torch.equal(from_order(ys[:, k], shape, order), x.flatten(2))
    torch.testing.assert_close(cross_merge(ys, shape), len(orders) * x.flatten(2))


def test_unknown_order_is_named():
    with pytest.raises(ValueError, match="diagonal"):
        to_order(torch.zeros(1, 4), (2, 2), "diagonal")
