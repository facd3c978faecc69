"""The moving average of the weights: the formula with its warm-up, buffers, state round trip."""

import pytest
import torch

from medssm.engine.ema import WeightAverage


def test_average_follows_the_formula_with_warm_up():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightAverage(model, decay=0.9)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves the BatchNorm statistics
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_state_round_trip_and_bad_decay():
    model = torch.nn.Linear(3, 2)
    ema = WeightAverage(model, 0.99)
    ema.update(model)
    other = WeightAverage(torch.nn.Linear(3, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.module.parameters(), ema.module.parameters()))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="--ema"):
            WeightAverage(model, bad)
