"""Feature regression (FitNets): mean squared error between projected student and teacher features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["FeatureMSELoss"]


class FeatureMSELoss(_Loss):
    """FitNets-style hint loss: ``mean((s - t) ** 2)`` over all elements.

    The ablation baseline for "contrastive vs MSE" (SPEC §3): the same projected
    features that :class:`~mkd.losses.InfoNCELoss` contrasts are regressed instead.
    Inputs of any shape (``(B, D, *spatial)`` or ``(B, D)``) as long as both match;
    computed in float32 with autocast off. Nothing is detached.

    Args:
        reduction: ``"mean"`` (default), ``"sum"``, or ``"none"`` for the
            element-wise squared errors.

    Raises:
        ValueError: for an unknown ``reduction``.

    Example:
        >>> s, t = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 2.0, 5.0, 4.0]])
        >>> FeatureMSELoss()(s, t).item()  # (1 + 0 + 4 + 0) / 4
        1.25
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: projected student features.
            teacher: (projected) teacher features of the same shape.

        Returns:
            a float32 scalar, or the element-wise squared errors for ``reduction="none"``.

        Raises:
            ValueError: when the shapes differ.
        """
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher features must have the same shape; got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)} (project them with ProjectorHeads first)."
            )
        with float32_compute(student.device):
            loss = F.mse_loss(student.float(), teacher.float(), reduction="none")
        return reduce(loss, self.reduction)
