"""DISTLoss: Pearson relations of softened predictions, per pixel across classes and per class across pixels."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.losses import LOSSES, DISTLoss
from mkd.losses.dist import pearson_distance


def _logits(*ps: float) -> torch.Tensor:
    """One slice, one channel, a 1 x N row of pixels whose sigmoid is ``ps``."""
    return torch.tensor([math.log(p / (1 - p)) for p in ps]).view(1, 1, 1, len(ps))


def test_hand_value_binary():
    # T = 1, beta = gamma = 1; one slice of three pixels, sigmoid probabilities
    #   student p_s = (0.2, 0.6, 0.8),  teacher p_t = (0.2, 0.8, 0.4)
    # inter-class, per pixel: [1 - p, p] are 2-vectors, correlation +1 on the same side of 1/2, -1 otherwise
    #   pixel 1: 0.2 / 0.2 -> d = 0;  pixel 2: 0.6 / 0.8 -> d = 0;  pixel 3: 0.8 / 0.4 -> d = 2;  mean 2/3
    # intra-class, class "spleen": centred x 15, s = (-5, 1, 4), t = (-4, 5, -1)
    #   rho = (20 + 5 - 4) / (sqrt(42) sqrt(42)) = 21 / 42 = 1/2 -> d = 1/2; class "background" (1 - p): the same
    #   mean over classes 1/2
    # L = 1 * 2/3 + 1 * 1/2 = 7/6 = 1.1666667
    s, t = _logits(0.2, 0.6, 0.8), _logits(0.2, 0.8, 0.4)
    assert DISTLoss()(s, t).item() == pytest.approx(7 / 6, abs=1e-5)
    assert DISTLoss(beta=0.0)(s, t).item() == pytest.approx(0.5, abs=1e-5)
    assert DISTLoss(gamma=0.0)(s, t).item() == pytest.approx(2 / 3, abs=1e-5)


def test_two_channel_softmax_equals_one_channel_sigmoid():
    torch.manual_seed(0)
    s, t = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    two = DISTLoss(temperature=2.0)(torch.cat([torch.zeros_like(s), s], 1), torch.cat([torch.zeros_like(t), t], 1))
    assert DISTLoss(temperature=2.0)(s, t).item() == pytest.approx(two.item(), rel=1e-5)


def test_zero_for_equal_predictions_and_pearson_invariance():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 6, 6)
    assert DISTLoss()(z, z.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert DISTLoss()(torch.randn(2, 4, 6, 6), z).item() > 1e-2
    # Pearson distance ignores the scale and offset of either vector
    u, v = torch.randn(10), torch.randn(10)
    assert pearson_distance(3 * u + 1, v - 7).item() == pytest.approx(pearson_distance(u, v).item(), rel=1e-5)
    assert pearson_distance(torch.ones(4), v[:4]).item() == pytest.approx(1.0)  # constant: rho 0, not NaN


def test_binary_inter_class_term_has_no_gradient():
    # 2-vectors always correlate +-1: the binary inter-class term is a step, its gradient is 0 (the intra term is not)
    torch.manual_seed(0)
    s = torch.randn(2, 1, 4, 4).requires_grad_()
    t = torch.randn(2, 1, 4, 4)
    DISTLoss(gamma=0.0)(s, t).backward()
    assert s.grad.abs().max().item() < 1e-6
    s.grad = None
    DISTLoss(beta=0.0)(s, t).backward()
    assert s.grad.abs().max().item() > 1e-4


def test_gradient_reaches_a_student_network():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 1, 3, padding=1)
    DISTLoss()(student(torch.rand(2, 3, 8, 8)), torch.randn(2, 1, 8, 8)).backward()
    assert torch.count_nonzero(student.weight.grad) > 0


def test_reductions_and_registered():
    torch.manual_seed(0)
    s, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    per_slice = DISTLoss(reduction="none")(s, t)
    assert per_slice.shape == (3,)
    assert DISTLoss()(s, t).item() == pytest.approx(per_slice.mean().item(), rel=1e-6)
    assert DISTLoss(reduction="sum")(s, t).item() == pytest.approx(per_slice.sum().item(), rel=1e-6)
    assert LOSSES["dist"] is DISTLoss and DISTLoss.inputs == ("logits",)


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        DISTLoss()(torch.randn(2, 1, 4, 4), torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="beta and gamma must be >= 0"):
        DISTLoss(beta=-1)
    with pytest.raises(ValueError, match="temperature=-2"):
        DISTLoss(temperature=-2)
