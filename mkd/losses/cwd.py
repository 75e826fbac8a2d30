"""Channel-wise distillation (CWD): KL between the spatial distributions of each channel, teacher to student."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["CWDLoss"]


class CWDLoss(_Loss):
    """Channel-wise distillation for dense prediction (CWD; Shu et al., ICCV 2021, arXiv:2011.13256).

    Each channel ``c`` of a ``(B, C, *spatial)`` map ``y`` is turned into a probability
    distribution over its ``N`` spatial locations, ``phi(y_c)_i = exp(y_ci / T) / sum_j exp(y_cj / T)``,
    and the student's distribution is pulled towards the teacher's:

        L = T**2 / C * sum_c sum_i phi(y^t_c)_i * log( phi(y^t_c)_i / phi(y^s_c)_i ),

    averaged over the batch (``reduction="mean"`` averages over slices and channels). The
    KL weights each location by the teacher's probability, so the locations where the
    teacher's channel is most active count most.

    **One output channel.** On the spleen logits (``C = 1``) this is well defined as it
    stands: the single channel's softmax over the ``H*W`` pixels is the teacher's
    spatial distribution of spleen evidence, and ``L = T**2 * KL`` of that one
    distribution (unlike a softmax over the channel dim, which is identically 1).

    **Inputs.** ``input: logits`` (the paper distils the logits this way) or a feature scale;
    on features the handler passes projected embeddings (``ProjectorHeads``), which gives
    both sides the same channel count, as the paper's 1x1 alignment conv does.

    Properties: zero when student == teacher; unchanged when a constant is added to a whole
    channel of either map (softmax over locations is shift-invariant); nothing is detached.
    Computed in float32 with autocast off.

    Args:
        temperature: ``T`` (> 0); the spatial softmax uses ``y / T`` and the KL is multiplied by ``T**2``.
        reduction: ``"mean"`` (default) or ``"sum"`` over slices and channels, or ``"none"`` for the
            ``(B, C)`` per-channel values (``T**2 * KL``).

    Raises:
        ValueError: for a non-positive ``temperature`` or an unknown ``reduction``.

    Example:
        >>> import math
        >>> s = torch.zeros(1, 1, 1, 2)                            # q = (1/2, 1/2)
        >>> t = torch.tensor([[[[math.log(3.0), 0.0]]]])           # p = (3/4, 1/4)
        >>> round(CWDLoss(temperature=1.0)(s, t).item(), 6)  # 0.75 ln 1.5 + 0.25 ln 0.5
        0.130812
    """

    #: where a declared term may use it: a feature scale or the logits
    inputs = ("features", "logits")

    def __init__(self, temperature: float = 4.0, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: ``(B, C, *spatial)`` student logits or (projected) features.
            teacher: the teacher's, same shape.

        Returns:
            a float32 scalar, or the ``(B, C)`` per-channel values for ``reduction="none"``.

        Raises:
            ValueError: when the shapes differ or there is no spatial dim.
        """
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher maps must have the same shape; got {tuple(student.shape)} and "
                f"{tuple(teacher.shape)} (project features with ProjectorHeads first)."
            )
        if student.ndim < 3:
            raise ValueError(f"maps must be (B, C, *spatial) with a spatial dim; got shape {tuple(student.shape)}.")
        temp = self.temperature
        with float32_compute(student.device):
            log_q = F.log_softmax(student.float().flatten(2) / temp, dim=-1)
            log_p = F.log_softmax(teacher.float().flatten(2) / temp, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, C)
            loss = kl * (temp * temp)
        return reduce(loss, self.reduction)
