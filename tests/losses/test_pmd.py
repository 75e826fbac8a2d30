"""PMDLoss: Bernoulli KD for 1-channel outputs, softmax KD for C > 1, times T^2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mkd.losses import PMDLoss


def test_one_pixel_bernoulli_kl_by_hand():
    # T = 4, student logit 0, teacher logit 4 ln 3:
    #   q = sigmoid(0 / 4) = 0.5,  p = sigmoid(ln 3) = 3 / (3 + 1) = 0.75
    #   KL(p || q) = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5)
    #              = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.1308120
    #   x T^2 = 0.1308120 * 16 = 2.0929926
    s = torch.zeros(1, 1, 1, 1)
    t = torch.full((1, 1, 1, 1), 4 * math.log(3.0))
    expected = 16 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert expected == pytest.approx(2.0929926, abs=1e-6)
    assert PMDLoss(temperature=4.0)(s, t).item() == pytest.approx(expected, abs=1e-5)


def test_softmax_over_one_channel_is_zero_but_ours_is_not():
    # the thesis code's formula (SPEC §4.2): softmax over a single channel is 1 everywhere
    torch.manual_seed(0)
    s, t = torch.randn(2, 1, 8, 8), 3 * torch.randn(2, 1, 8, 8)
    temp = 4.0
    thesis = F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="batchmean") * temp**2
    assert thesis.item() == 0.0
    assert PMDLoss(temperature=temp)(s, t).item() > 1e-3


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_for_equal_and_positive_for_different_logits(channels):
    torch.manual_seed(0)
    z = torch.randn(2, channels, 6, 6)
    loss = PMDLoss()
    assert loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(z, z + torch.randn_like(z)).item() > 1e-4


def test_multichannel_matches_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 5), 2 * torch.randn(2, 3, 5, 5)
    temp = 2.0
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="none")
    expected = kl.sum(1).mean() * temp**2  # sum over classes, mean over pixels and batch
    assert PMDLoss(temperature=temp)(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_single_channel_equals_two_class_softmax():
    # Bernoulli with logit z is a 2-class softmax over (0, z)
    torch.manual_seed(0)
    s, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    two = PMDLoss()(torch.cat([torch.zeros_like(s), s], 1), torch.cat([torch.zeros_like(t), t], 1))
    assert PMDLoss()(s, t).item() == pytest.approx(two.item(), rel=1e-5)


def test_reductions_shapes_3d_and_extreme_logits():
    s, t = torch.randn(2, 1, 3, 4, 5), torch.randn(2, 1, 3, 4, 5)
    assert PMDLoss(reduction="none")(s, t).shape == (2, 1, 3, 4, 5)
    assert PMDLoss(reduction="sum")(s, t).item() == pytest.approx(PMDLoss()(s, t).item() * s.numel(), rel=1e-5)
    assert PMDLoss(reduction="none")(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)).shape == (2, 1, 3, 3)
    big = torch.tensor([[[[200.0, -200.0]]]])
    assert torch.isfinite(PMDLoss()(big, -big))


def test_gradient_reaches_student_logits():
    s = torch.randn(2, 1, 4, 4, requires_grad=True)
    PMDLoss()(s, torch.randn(2, 1, 4, 4)).backward()
    assert torch.count_nonzero(s.grad) > 0


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        PMDLoss()(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match="temperature=-1"):
        PMDLoss(temperature=-1)
    with pytest.raises(ValueError, match="reduction='batchmean'"):
        PMDLoss(reduction="batchmean")
