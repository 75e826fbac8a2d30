"""DIST: relational KD by Pearson correlation between teacher and student predictions, per pixel and per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["DISTLoss", "pearson_distance"]


def pearson_distance(u: torch.Tensor, v: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``1 - rho(u, v)`` along ``dim``, with ``rho`` the Pearson correlation coefficient.

    ``rho = sum((u - mean u)(v - mean v)) / max(||u - mean u|| * ||v - mean v||, eps)``: a constant
    vector correlates 0 with anything (distance 1) instead of giving NaN. (Sums of squares rather than
    ``norm``: a norm over the short class dim is several times slower on a CPU.)

    Example:
        >>> pearson_distance(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])).item() < 1e-6
        True
    """
    u = u - u.mean(dim, keepdim=True)
    v = v - v.mean(dim, keepdim=True)
    rho = (u * v).sum(dim) / ((u * u).sum(dim) * (v * v).sum(dim)).clamp_min(eps * eps).sqrt()
    return 1 - rho


class DISTLoss(_Loss):
    """DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022, arXiv:2205.10536).

    Predictions are softened, ``Y = softmax(Z / T)`` over the classes, and with the Pearson
    distance ``d_p(u, v) = 1 - rho_p(u, v)`` the student keeps the teacher's relations rather
    than its exact probabilities:

        L_inter = T**2 * mean over pixels i of d_p(Y^s[i, :], Y^t[i, :])   (across the classes of a pixel)
        L_intra = T**2 * mean over classes c of d_p(Y^s[:, c], Y^t[:, c])  (across the pixels of a slice)
        L = beta * L_inter + gamma * L_intra

    For dense prediction every pixel is an instance: the inter-class relation is taken per
    pixel, the intra-class relation per slice and class over that slice's pixels, and both
    are averaged over the batch. ``beta = gamma = 1``, ``T = 1`` are the defaults.

    **One output channel.** A sigmoid logit ``z`` becomes the two-class distribution
    ``[1 - p, p]`` with ``p = sigmoid(z / T)`` (the softmax of ``(0, z) / T``); ``C > 1``
    channels use the channel softmax. With two classes, each pixel's inter-class term
    compares two 2-vectors, whose correlation is always ``+-1``: ``d_p`` is 0 when student and
    teacher are on the same side of ``p = 1/2`` and 2 when not, with zero gradient (a known
    property, tested). The signal then comes from the intra-class term, which is
    ``1 - corr(p^s, p^t)`` over the pixels of the slice (the same for both classes, as
    correlation is unchanged by ``p -> 1 - p``). A slice where either side's probability map is
    constant has correlation 0 there (distance 1), not NaN.

    Input: ``logits`` (predictions). Computed in float32 with autocast off; nothing is detached.

    Args:
        beta: weight of the inter-class term (>= 0).
        gamma: weight of the intra-class term (>= 0).
        temperature: ``T`` (> 0).
        reduction: ``"mean"`` (default) or ``"sum"`` over slices, or ``"none"`` for the ``(B,)``
            per-slice losses ``beta * L_inter(b) + gamma * L_intra(b)``.

    Raises:
        ValueError: negative ``beta`` / ``gamma``, non-positive ``temperature`` or an unknown ``reduction``.

    Example:
        >>> import math
        >>> logit = lambda p: math.log(p / (1 - p))
        >>> s = torch.tensor([logit(0.2), logit(0.6), logit(0.8)]).view(1, 1, 1, 3)
        >>> t = torch.tensor([logit(0.2), logit(0.8), logit(0.4)]).view(1, 1, 1, 3)
        >>> round(DISTLoss()(s, t).item(), 5)  # inter (0 + 0 + 2) / 3, intra 1 - 1/2
        1.16667
    """

    #: where a declared term may use it: predictions only
    inputs = ("logits",)

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        if beta < 0 or gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0; got beta={beta}, gamma={gamma}.")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, reduction={self.reduction!r}"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K, N)`` class probabilities: ``[1 - p, p]`` for one channel, the channel softmax otherwise."""
        z = logits.float().flatten(2) / self.temperature
        if z.shape[1] == 1:
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        return F.softmax(z, dim=1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_logits: ``(B, C, *spatial)`` raw student outputs.
            teacher_logits: the teacher's, same shape.

        Returns:
            a float32 scalar, or the ``(B,)`` per-slice losses for ``reduction="none"``.

        Raises:
            ValueError: when the shapes differ or there is no spatial dim.
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student and teacher logits must have the same shape; got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_logits.shape)}."
            )
        if student_logits.ndim < 3:
            raise ValueError(f"logits must be (B, C, *spatial); got shape {tuple(student_logits.shape)}.")
        with float32_compute(student_logits.device):
            ys, yt = self.probabilities(student_logits), self.probabilities(teacher_logits)  # (B, K, N)
            inter = pearson_distance(ys, yt, dim=1).mean(1)  # per pixel across classes -> (B,)
            intra = pearson_distance(ys, yt, dim=2).mean(1)  # per class across pixels -> (B,)
            loss = self.temperature**2 * (self.beta * inter + self.gamma * intra)
        return reduce(loss, self.reduction)
