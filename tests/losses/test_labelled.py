"""LabelledOnly: the supervised loss over the labelled samples of a mixed batch, checked by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from mkd.losses import LabelledOnly, labelled_mask


def _batch(spatial: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 samples: 0 and 2 labelled (binary), 1 all sentinel, 3 with a single sentinel pixel."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(4, 1, *spatial, generator=g)
    label = (torch.rand(4, 1, *spatial, generator=g) > 0.6).float()
    label[1] = -1.0
    label[3].view(-1)[5] = -1.0
    return pred, label


def _dice_ce_by_hand(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceCELoss(sigmoid=True, batch=True) for one channel: batch Dice + mean BCE with logits."""
    p = torch.sigmoid(pred)
    dice = 1 - (2 * (p * label).sum() + 1e-5) / (p.sum() + label.sum() + 1e-5)
    bce = F.binary_cross_entropy_with_logits(pred, label)
    return dice + bce


def test_labelled_mask_flags_any_negative_value():
    _, label = _batch((6, 6))
    assert labelled_mask(label).tolist() == [True, False, True, False]
    assert labelled_mask(torch.zeros(0, 1, 2, 2)).shape == (0,)
    with pytest.raises(ValueError, match="batch dimension"):
        labelled_mask(torch.tensor(1.0))


@pytest.mark.parametrize("spatial", [(6, 6), (4, 5, 3)], ids=["2d", "3d"])
def test_equals_the_wrapped_loss_on_the_labelled_subset(spatial):
    pred, label = _batch(spatial)
    pred.requires_grad_(True)
    wrapped = LabelledOnly(DiceCELoss(sigmoid=True, batch=True))
    value = wrapped(pred, label)
    keep = torch.tensor([0, 2])
    expected = _dice_ce_by_hand(pred.detach()[keep], label[keep])
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert value.item() == pytest.approx(DiceCELoss(sigmoid=True, batch=True)(pred[keep], label[keep]).item())
    value.backward()
    assert pred.grad[[1, 3]].abs().max() == 0  # unlabelled samples get no supervised gradient
    assert pred.grad[[0, 2]].abs().sum() > 0


def test_a_fully_labelled_batch_is_the_wrapped_loss_and_a_plain_function_works():
    pred, label = _batch((6, 6))
    label = label.clamp(min=0)
    dice = DiceLoss(sigmoid=True)
    assert LabelledOnly(dice)(pred, label).item() == pytest.approx(dice(pred, label).item())
    mse = LabelledOnly(F.mse_loss)
    pred2, label2 = _batch((6, 6))
    assert mse(pred2, label2).item() == pytest.approx(F.mse_loss(pred2[[0, 2]], label2[[0, 2]]).item())
    assert isinstance(LabelledOnly(dice).loss, DiceLoss) and "loss" in dict(LabelledOnly(dice).named_children())


def test_an_all_unlabelled_batch_gives_a_connected_zero_without_nan():
    pred = torch.randn(3, 1, 4, 4)
    pred[0, 0, 0, 0] = float("inf")  # even a non-finite output must not leak into the zero
    pred.requires_grad_(True)
    label = torch.full((3, 1, 4, 4), -1.0)
    value = LabelledOnly(DiceCELoss(sigmoid=True, batch=True))(pred, label)
    assert value.item() == 0.0 and value.dtype == torch.float32 and value.ndim == 0
    assert value.requires_grad and value.grad_fn is not None
    (value + 0).backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same batch size"):
        LabelledOnly(DiceLoss(sigmoid=True))(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="callable"):
        LabelledOnly("dice")  # type: ignore[arg-type]
