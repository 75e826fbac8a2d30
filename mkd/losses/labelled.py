"""Supervised loss on the labelled samples of a batch that mixes labelled and unlabelled slices.

A distillation student may see the labels of its own training patients only, but it also
learns from the teacher on a transfer set without labels (``mkd.data.load_split(..., "transfer")``).
Those items get a sentinel label (``mkd.data.FillMissingLabeld``, value ``mkd.data.UNLABELLED``
= -1) so that they collate into the same batch; :class:`LabelledOnly` keeps them out of the
supervised term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LabelledOnly", "labelled_mask"]


def labelled_mask(label: torch.Tensor) -> torch.Tensor:
    """Which samples of a batch are labelled: ``(B,)`` bool, false where the label holds any negative value.

    Args:
        label: ``(B, ...)`` labels, sentinel-filled (negative) for unlabelled samples.

    Raises:
        ValueError: ``label`` has no batch dimension.

    Example:
        >>> labelled_mask(torch.tensor([[0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])).tolist()
        [True, False, True]
    """
    if label.ndim < 1:
        raise ValueError(f"label must have a batch dimension, got a tensor of shape {tuple(label.shape)}")
    negative = label < 0
    return ~(negative.flatten(1).any(dim=1) if label.ndim > 1 else negative)


class LabelledOnly(nn.Module):
    """Wrap a supervised loss so that it is computed over the labelled samples of the batch only.

    ``forward(pred, label)`` returns ``loss(pred[m], label[m])`` with ``m = labelled_mask(label)``:
    a sample is unlabelled when its label contains any negative value (the sentinel of
    ``mkd.data.FillMissingLabeld``). With a ``batch=True`` Dice loss the Dice is pooled over
    the labelled samples; with a mean reduction it averages over them. A batch without any
    labelled sample gives a scalar zero that stays in ``pred``'s autograd graph (its gradient
    is zero, never NaN), so the step still backpropagates the distillation terms.

    Args:
        loss: the wrapped loss, called as ``loss(pred, label)`` on the labelled subset, e.g.
            ``monai.losses.DiceCELoss(sigmoid=True, batch=True)``. A module is registered as a
            submodule (its state moves with ``.to()``).

    Example:
        >>> from monai.losses import DiceCELoss
        >>> loss = LabelledOnly(DiceCELoss(sigmoid=True, batch=True))
        >>> pred = torch.zeros(2, 1, 4, 4, requires_grad=True)
        >>> label = torch.stack([torch.ones(1, 4, 4), torch.full((1, 4, 4), -1.0)])
        >>> bool(torch.isclose(loss(pred, label), DiceCELoss(sigmoid=True, batch=True)(pred[:1], label[:1])))
        True
    """

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        if not callable(loss):
            raise ValueError(f"loss must be a callable loss(pred, label), got {type(loss).__name__}")
        self.loss = loss

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Compute the wrapped loss over the labelled samples.

        Args:
            pred: ``(B, C, *spatial)`` network output.
            label: ``(B, C', *spatial)`` labels; an unlabelled sample holds negative values.

        Returns:
            the wrapped loss on the labelled subset, or a zero scalar (connected to ``pred``)
            when no sample is labelled.

        Raises:
            ValueError: ``pred`` and ``label`` have different batch sizes.
        """
        if pred.shape[0] != label.shape[0]:
            raise ValueError(
                f"pred and label must have the same batch size; got {tuple(pred.shape)} and {tuple(label.shape)}"
            )
        mask = labelled_mask(label).to(pred.device)
        if bool(mask.all()):
            return self.loss(pred, label)
        if not bool(mask.any()):
            return pred.reshape(-1)[:0].sum().float()  # an empty sum: exactly 0, zero gradient, in the graph
        return self.loss(pred[mask], label[mask.to(label.device)])
