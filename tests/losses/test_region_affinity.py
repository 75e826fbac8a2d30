"""RegionAffinityLoss (EMKD): cosine affinity between class-region prototypes, teacher vs student."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.losses import LOSSES, RegionAffinityLoss
from mkd.losses.region_affinity import region_masks

# one slice, 2 channels on a 1 x 4 grid
#   student: background locations (1, 0), spleen locations (0, 1) -> r_bg = (1, 0), r_fg = (0, 1), cos 0
#   teacher: background locations (1, 0), spleen locations (1, 1) -> r_bg = (1, 0), r_fg = (1, 1), cos 1/sqrt 2
#   L = (0 - 1/sqrt 2)**2 = 1/2
S = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
T = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)


def test_hand_value_with_labels_at_image_resolution():
    # labels at 2 x 8 (the image), area-averaged onto the 1 x 4 grid: (0, 0, 1, 1)
    labels = torch.tensor([0.0] * 4 + [1.0] * 4).repeat(2, 1).view(1, 1, 2, 8)
    assert RegionAffinityLoss()(S, T, labels).item() == pytest.approx(0.5, abs=1e-6)
    assert (0 - 1 / math.sqrt(2)) ** 2 == pytest.approx(0.5)


def test_unlabelled_slices_use_the_teachers_prediction():
    labelled = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4)
    missing = torch.full((1, 1, 1, 4), -1.0)  # FillMissingLabeld's sentinel
    teacher_logits = torch.tensor([-3.0, -1.0, 2.0, 5.0]).view(1, 1, 1, 4)  # sigmoid > 1/2 on the last two
    expected = RegionAffinityLoss()(S, T, labelled).item()
    assert RegionAffinityLoss()(S, T, missing, teacher_logits).item() == pytest.approx(expected, abs=1e-6)
    assert RegionAffinityLoss()(S, T, None, teacher_logits).item() == pytest.approx(expected, abs=1e-6)
    # labels win over the teacher where a slice has them
    wrong_teacher = -teacher_logits
    assert RegionAffinityLoss()(S, T, labelled, wrong_teacher).item() == pytest.approx(expected, abs=1e-6)
    # without teacher logits an unlabelled slice is left out: batch [labelled, unlabelled] = the labelled one alone
    batch_s, batch_t = torch.cat([S, torch.randn_like(S)]), torch.cat([T, torch.randn_like(T)])
    labels = torch.cat([labelled, missing])
    assert RegionAffinityLoss()(batch_s, batch_t, labels).item() == pytest.approx(expected, abs=1e-6)
    per_slice = RegionAffinityLoss(reduction="none")(batch_s, batch_t, labels)
    assert per_slice.tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_a_slice_without_spleen_counts_for_nothing():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = RegionAffinityLoss()(s, torch.randn(2, 5, 4, 4), torch.zeros(2, 1, 8, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))  # in the graph, zero gradient, no NaN


def test_zero_for_equal_features_invariances_and_soft_masks():
    torch.manual_seed(0)
    labels = (torch.rand(2, 1, 16, 16) > 0.7).float()
    s, t = torch.randn(2, 6, 4, 4), torch.randn(2, 9, 4, 4)
    loss = RegionAffinityLoss()
    assert loss(t, t.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    base = loss(s, t, labels).item()
    assert base > 1e-4
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert loss(3 * torch.einsum("dc,bchw->bdhw", q, s), 0.5 * t, labels).item() == pytest.approx(base, rel=1e-4)
    masks, valid = region_masks(labels, None, 2, torch.Size([4, 4]))
    assert masks.shape == (2, 2, 4, 4) and valid.all()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 4, 4))  # shares of each cell
    assert 0 < masks[:, 1].max() <= 1


def test_three_classes_average_the_three_pairs():
    labels = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    s = torch.eye(3).view(1, 3, 1, 3)  # prototypes e0, e1, e2: every cos 0
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 3, 1, 3)
    # teacher prototypes (1,0,0), (1,1,0), (0,1,0): cos 1/sqrt 2, 0, 1/sqrt 2 -> squares 1/2, 0, 1/2 -> mean 1/3
    assert RegionAffinityLoss(num_classes=3)(s, t, labels).item() == pytest.approx(1 / 3, abs=1e-6)


def test_gradient_reaches_a_student_network():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 4, 3, padding=1)
    labels = torch.zeros(2, 1, 8, 8)
    labels[:, :, 2:5, 3:6] = 1
    RegionAffinityLoss()(student(torch.rand(2, 3, 8, 8)), torch.randn(2, 16, 8, 8), labels).backward()
    assert torch.count_nonzero(student.weight.grad) > 0


def test_registered_and_errors():
    assert LOSSES["region_affinity"] is RegionAffinityLoss and RegionAffinityLoss.inputs == ("features",)
    with pytest.raises(ValueError, match="needs labels or the teacher's logits"):
        RegionAffinityLoss()(S, T)
    with pytest.raises(ValueError, match="num_classes=1"):
        RegionAffinityLoss(num_classes=1)
    with pytest.raises(ValueError, match="same batch and spatial size"):
        RegionAffinityLoss()(S, T[..., :3], torch.zeros(1, 1, 1, 4))
