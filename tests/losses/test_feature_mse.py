"""FeatureMSELoss (FitNets hint loss)."""

from __future__ import annotations

import pytest
import torch

from mkd.losses import FeatureMSELoss


def test_hand_value_and_reductions():
    # differences (1, 0, -2, 0) -> squares (1, 0, 4, 0): mean 1.25, sum 5
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0, 5.0, 4.0]])
    assert FeatureMSELoss()(s, t).item() == pytest.approx(1.25)
    assert FeatureMSELoss(reduction="sum")(s, t).item() == pytest.approx(5.0)
    assert FeatureMSELoss(reduction="none")(s, t).tolist() == [[1.0, 0.0, 4.0, 0.0]]


def test_maps_float32_and_gradient():
    s = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3, 3, dtype=torch.float16)
    loss = FeatureMSELoss()(s, teacher)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.count_nonzero(s.grad) > 0


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        FeatureMSELoss()(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="reduction='max'"):
        FeatureMSELoss(reduction="max")
