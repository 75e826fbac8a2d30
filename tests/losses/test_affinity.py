"""PairwiseAffinityLoss: squared difference of the cosine-similarity graphs between locations."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.losses import LOSSES, PairwiseAffinityLoss
from mkd.losses.affinity import node_features


def test_hand_value_and_different_channel_counts():
    # one slice, a 1 x 2 grid (two nodes):
    #   student nodes (1, 0), (0, 1)        -> a = [[1, 0], [0, 1]]
    #   teacher nodes (1, 0, 0), (1, 1, 0)  -> a = [[1, 1/sqrt 2], [1/sqrt 2, 1]]   (3 channels: any count works)
    #   L = ((0 - 1/sqrt 2)**2 * 2 + 0 + 0) / 2**2 = 1 / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    assert PairwiseAffinityLoss()(s, t).item() == pytest.approx(0.25, abs=1e-6)
    assert (1 / math.sqrt(2)) ** 2 * 2 / 4 == pytest.approx(0.25)


def test_zero_for_equal_maps_and_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 6, 6), torch.randn(2, 5, 6, 6)
    loss = PairwiseAffinityLoss()
    assert loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    base = loss(s, t).item()
    assert base > 1e-3
    # positive rescaling of each location's vector and an orthogonal change of channel basis change nothing
    scale = torch.rand(2, 1, 6, 6) + 0.5
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    rotated = torch.einsum("dc,bchw->bdhw", q, s)
    assert loss(rotated * scale, t * scale.flip(-1)).item() == pytest.approx(base, rel=1e-4)


def test_nodes_are_pooled_to_bound_memory():
    feat = torch.randn(2, 4, 96, 96)
    assert node_features(feat, 24).shape == (2, 4, 576)
    assert node_features(feat, None).shape == (2, 4, 9216)
    assert node_features(torch.randn(1, 4, 6, 30), 24).shape == (1, 4, 6 * 24)  # only larger dims shrink
    # the default: the student's 24 x 24 bottleneck in 2 x 2 patches, 144 nodes
    assert PairwiseAffinityLoss().affinity(torch.randn(2, 64, 24, 24)).shape == (2, 144, 144)
    # pooling first is the loss of the pooled maps
    s, t = torch.randn(1, 3, 8, 8), torch.randn(1, 2, 8, 8)
    pooled = PairwiseAffinityLoss(spatial_size=None)(
        torch.nn.functional.avg_pool2d(s, 2), torch.nn.functional.avg_pool2d(t, 2)
    )
    assert PairwiseAffinityLoss(spatial_size=4)(s, t).item() == pytest.approx(pooled.item(), rel=1e-5)


def test_gradient_reaches_a_student_network():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 4, 3, padding=1)
    PairwiseAffinityLoss()(student(torch.rand(2, 3, 8, 8)), torch.randn(2, 16, 8, 8)).backward()
    assert torch.count_nonzero(student.weight.grad) > 0


def test_reductions_raw_features_and_registered():
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    per_slice = PairwiseAffinityLoss(reduction="none")(s, t)
    assert per_slice.shape == (3,)
    assert PairwiseAffinityLoss()(s, t).item() == pytest.approx(per_slice.mean().item(), rel=1e-6)
    assert not PairwiseAffinityLoss().projected and PairwiseAffinityLoss(projected=True).projected
    assert LOSSES["affinity"] is PairwiseAffinityLoss and PairwiseAffinityLoss.inputs == ("features",)


def test_errors():
    with pytest.raises(ValueError, match="same batch and spatial size"):
        PairwiseAffinityLoss()(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 5))
    with pytest.raises(ValueError, match="spatial_size=0"):
        PairwiseAffinityLoss(spatial_size=0)
