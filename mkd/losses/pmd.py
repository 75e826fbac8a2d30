"""Prediction-map distillation (PMD): Hinton KD on temperature-softened segmentation logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["PMDLoss"]


class PMDLoss(_Loss):
    """Knowledge-distillation KL between teacher and student prediction maps, times ``T**2``.

    For logits ``z`` of shape ``(B, C, *spatial)`` and temperature ``T``, per pixel:

    - ``C == 1`` (sigmoid output, as in the spleen models): the two-class (Bernoulli)
      KL with ``p = sigmoid(z_t / T)`` and ``q = sigmoid(z_s / T)``:
      ``p log(p / q) + (1 - p) log((1 - p) / (1 - q))``. A softmax over the single
      channel would be identically 1 and give a loss of exactly 0 (the defect of the
      thesis's code, SPEC §4.2); this is the correct binary form.
    - ``C > 1`` (softmax output): ``sum_c p_c log(p_c / q_c)`` with
      ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)`` over channels, i.e.
      ``F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="none").sum(1)``.

    The per-pixel KL is multiplied by ``T**2`` (Hinton et al. 2015, so that gradient
    magnitudes do not shrink with ``T``) and averaged over pixels and batch
    (``reduction="mean"``). Computation is in float32 with autocast off. The teacher
    logits are used as given: pass them detached (a frozen teacher's are).

    Args:
        temperature: softening temperature ``T`` (> 0); 4 in the thesis's code.
        reduction: ``"mean"`` (default) or ``"sum"`` over pixels and batch, or
            ``"none"`` for the per-pixel map of shape ``(B, 1, *spatial)``.

    Raises:
        ValueError: for a non-positive ``temperature`` or an unknown ``reduction``.

    Example:
        >>> import math
        >>> s, t = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 4 * math.log(3.0))
        >>> round(PMDLoss(temperature=4.0)(s, t).item(), 4)  # 16 * (0.75 ln 1.5 + 0.25 ln 0.5)
        2.093
    """

    def __init__(self, temperature: float = 4.0, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_logits: ``(B, C, *spatial)`` raw student outputs (before sigmoid/softmax).
            teacher_logits: the teacher's, same shape.

        Returns:
            a float32 scalar, or the ``(B, 1, *spatial)`` per-pixel map for ``reduction="none"``.

        Raises:
            ValueError: when the shapes differ or have fewer than 2 dims.
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student and teacher logits must have the same shape; got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_logits.shape)}."
            )
        if student_logits.ndim < 2:
            raise ValueError(f"logits must be (B, C, *spatial); got shape {tuple(student_logits.shape)}.")
        temp = self.temperature
        with float32_compute(student_logits.device):
            zs = student_logits.float() / temp
            zt = teacher_logits.float() / temp
            if zs.shape[1] == 1:
                p = torch.sigmoid(zt)
                # log q, log(1 - q) for both sides via logsigmoid: stable for large |z|
                kl = p * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - p) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
            else:
                log_p = F.log_softmax(zt, dim=1)
                kl = (log_p.exp() * (log_p - F.log_softmax(zs, dim=1))).sum(1, keepdim=True)
            loss = kl * (temp * temp)
        return reduce(loss, self.reduction)
