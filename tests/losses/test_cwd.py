"""CWDLoss: KL between per-channel spatial softmaxes, teacher to student, times T^2."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.losses import LOSSES, CWDLoss


def test_hand_value_one_channel_logits():
    # one slice, one channel, two pixels:
    #   student logits (0, 0)    -> spatial softmax q = (1/2, 1/2)
    #   teacher logits (ln 3, 0) -> spatial softmax p = (3/4, 1/4)
    #   KL(p || q) = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.3040988 - 0.1732868 = 0.1308120
    # T = 1: L = 0.1308120.  T = 2 with teacher (2 ln 3, 0): same p, L = 4 * 0.1308120 = 0.5232481
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl == pytest.approx(0.1308120, abs=1e-7)
    assert CWDLoss(temperature=1.0)(s, t).item() == pytest.approx(kl, abs=1e-6)
    assert CWDLoss(temperature=2.0)(s, 2 * t).item() == pytest.approx(4 * kl, abs=1e-6)


def test_channels_are_averaged():
    # a second channel where student == teacher adds KL 0: mean over channels = 0.1308120 / 2 = 0.0654060
    s = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([[math.log(3.0), 0.0], [5.0, -1.0]]).view(1, 2, 1, 2)
    s[0, 1] = t[0, 1]
    loss = CWDLoss(temperature=1.0, reduction="none")(s, t)
    assert loss.shape == (1, 2)
    assert loss[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert CWDLoss(temperature=1.0)(s, t).item() == pytest.approx(0.0654060, abs=1e-6)


def test_zero_for_equal_maps_and_shift_invariance():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    loss = CWDLoss()
    assert loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(s, t).item() > 1e-3
    # adding a constant to a whole channel leaves its spatial softmax unchanged
    shift = torch.randn(2, 3, 1, 1) * 10
    assert loss(s + shift, t - shift).item() == pytest.approx(loss(s, t).item(), rel=1e-5)


def test_gradient_reaches_a_student_network():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    CWDLoss()(student(x), torch.randn(2, 1, 8, 8)).backward()
    assert torch.count_nonzero(student.weight.grad) > 0


def test_3d_float32_and_registered():
    s = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    loss = CWDLoss(reduction="sum")(s, torch.randn(2, 4, 3, 4, 5, dtype=torch.float16))
    assert loss.dtype == torch.float32 and loss.item() > 0
    assert LOSSES["cwd"] is CWDLoss and set(CWDLoss.inputs) == {"features", "logits"}


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        CWDLoss()(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match="spatial dim"):
        CWDLoss()(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature=0"):
        CWDLoss(temperature=0)
