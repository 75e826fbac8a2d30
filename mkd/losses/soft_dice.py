"""Dice against the teacher's prediction: the labelled slices' segmentation loss, the teacher as the label."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import float32_compute

__all__ = ["SoftDiceKD"]


class SoftDiceKD(_Loss):
    """Batch Dice loss of the student's prediction against the teacher's, on the logits.

    PMD (a per-pixel Bernoulli KL) weighs every pixel alike; with the spleen on about 1 % of
    the pixels, most of its signal is the background. The labelled slices are trained with
    batch Dice + BCE for that reason (docs/training.md); this term gives the unlabelled
    (transfer) slices the same Dice part, with the teacher's prediction as the target:

        L = 1 - (2 * sum_i p^s_i * y_i) / (sum_i p^s_i + sum_i y_i),
        p^s = sigmoid(z^s / T),  y = sigmoid(z^t / T)  (or 1[z^t > 0] with ``hard=True``),

    summed over every pixel of the batch (MONAI's ``DiceLoss(sigmoid=True, batch=True)``; its
    smoothing terms 1e-5). ``hard=True`` is self-training with the teacher's thresholded masks
    (pseudo-labels). With soft targets the loss is not zero when the student equals the teacher
    (a soft Dice of a map with itself is below 1); its minimum is at a sharper student.

    Args:
        temperature: ``T`` (> 0) applied to both logits before the sigmoid.
        hard: threshold the teacher's probability at 0.5.

    Example:
        >>> s = torch.zeros(1, 1, 1, 2)                 # p = (0.5, 0.5)
        >>> t = torch.tensor([[[[20.0, -20.0]]]])       # y = (1, 0)
        >>> round(SoftDiceKD(hard=True)(s, t).item(), 4)  # 1 - 2 * 0.5 / (1 + 1)
        0.5
    """

    #: where a declared term may use it: the logits only (it needs probabilities)
    inputs = ("logits",)

    def __init__(self, temperature: float = 1.0, hard: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        self.temperature = float(temperature)
        self.hard = bool(hard)
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, hard={self.hard}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: ``(B, 1, *spatial)`` student logits.
            teacher: the teacher's logits, same shape.

        Returns:
            a float32 scalar.

        Raises:
            ValueError: when the shapes differ.
        """
        if student.shape != teacher.shape:
            raise ValueError(f"student and teacher logits must have the same shape; got {tuple(student.shape)} "
                             f"and {tuple(teacher.shape)}.")  # fmt: skip
        with float32_compute(student.device):
            z_t = teacher.detach().float() / self.temperature
            target = (z_t > 0).float() if self.hard else torch.sigmoid(z_t)
            return self.dice(student.float() / self.temperature, target)
