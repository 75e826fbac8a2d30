"""SoftDiceKD: MONAI's batch Dice of the student's sigmoid against the teacher's (soft or thresholded) prediction."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.handlers import needs_logits, resolve_terms
from mkd.losses import FEATURE_LOSSES, LOSSES, SoftDiceKD

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr = smooth_dr


def test_hand_value_hard_and_soft_targets():
    # student logits (0, 0) -> p = (0.5, 0.5); teacher logits (ln 3, -ln 3) -> y = (0.75, 0.25), hard (1, 0)
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([math.log(3.0), -math.log(3.0)]).view(1, 1, 1, 2)
    # hard: 1 - (2 * (0.5 * 1 + 0.5 * 0) + e) / (0.5 + 0.5 + 1 + 0 + e) = 1 - 1 / 2 = 0.5
    assert SoftDiceKD(hard=True)(s, t).item() == pytest.approx(1 - (1 + SMOOTH) / (2 + SMOOTH), abs=1e-6)
    # soft: intersection 0.5 * 0.75 + 0.5 * 0.25 = 0.5; sums 1 + 1 = 2 -> again 0.5
    assert SoftDiceKD()(s, t).item() == pytest.approx(0.5, abs=1e-5)
    # a student that agrees more: logits (ln 3, -ln 3) -> p = y = (0.75, 0.25):
    # 1 - 2 * (0.5625 + 0.0625) / (1 + 1) = 1 - 0.625 = 0.375 (soft Dice of a map with itself is below 1)
    assert SoftDiceKD()(t.clone(), t).item() == pytest.approx(0.375, abs=1e-5)
    # T = 2 on logits (2 ln 3, -2 ln 3) gives the same probabilities as T = 1 on (ln 3, -ln 3)
    assert SoftDiceKD(temperature=2.0)(2 * t, 2 * t).item() == pytest.approx(0.375, abs=1e-5)


def test_batch_dice_pools_the_slices():
    # slice 1: teacher says spleen on its one pixel, student p = 0.5; slice 2: teacher and student empty (p ~ 0)
    # pooled over the batch: 1 - (2 * 0.5 + e) / (0.5 + 0 + 1 + 0 + e) = 1 - 1 / 1.5 = 1/3
    s = torch.tensor([0.0, -30.0]).view(2, 1, 1, 1)
    t = torch.tensor([30.0, -30.0]).view(2, 1, 1, 1)
    assert SoftDiceKD(hard=True)(s, t).item() == pytest.approx(1 / 3, abs=1e-5)


def test_gradient_reaches_the_student_not_the_teacher():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    teacher = torch.randn(4, 1, 8, 8, requires_grad=True)
    SoftDiceKD()(student(x), teacher).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.grad is None  # the target is detached


def test_registered_for_the_logits_only_and_refused_elsewhere():
    assert LOSSES["soft_dice"] is SoftDiceKD and "soft_dice" not in FEATURE_LOSSES
    terms = resolve_terms({"dice": {"input": "logits", "loss": "soft_dice", "weight": 1.0, "kwargs": {"hard": True}}})
    assert isinstance(terms["dice"]["loss"], SoftDiceKD) and terms["dice"]["loss"].hard and needs_logits(terms)
    with pytest.raises(ValueError, match="SoftDiceKD applies to logits, not to input .bn."):
        resolve_terms({"dice": {"input": "bn", "loss": "soft_dice", "weight": 1.0}})
    with pytest.raises(ValueError, match="temperature"):
        SoftDiceKD(temperature=0)
