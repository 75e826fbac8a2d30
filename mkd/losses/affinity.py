"""Pair-wise affinity distillation (structured KD): match the cosine-similarity graph between spatial locations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["PairwiseAffinityLoss", "node_features"]


def node_features(feature: torch.Tensor, spatial_size: int | Sequence[int] | None) -> torch.Tensor:
    """The ``(B, C, N)`` node vectors of a ``(B, C, *spatial)`` map: each spatial dim larger than
    ``spatial_size`` is average-pooled to it (a node is then the mean feature of a patch), then flattened.

    Example:
        >>> node_features(torch.ones(2, 3, 8, 8), 4).shape
        torch.Size([2, 3, 16])
    """
    if spatial_size is not None:
        dims = feature.ndim - 2
        size = [int(spatial_size)] * dims if isinstance(spatial_size, int) else [int(s) for s in spatial_size]
        if len(size) != dims:
            raise ValueError(f"spatial_size={spatial_size} does not match a feature with {dims} spatial dims.")
        target = [min(s, t) for s, t in zip(feature.shape[2:], size)]
        if target != list(feature.shape[2:]):
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
            feature = pool(feature, target)
    return feature.flatten(2)


class PairwiseAffinityLoss(_Loss):
    """Pair-wise distillation of structured KD (Liu et al., CVPR 2019, arXiv:1903.04197).

    The feature map is a graph whose nodes are spatial locations; the affinity of nodes
    ``i`` and ``j`` is the cosine similarity ``a_ij = f_i . f_j / (||f_i|| ||f_j||)``, and the
    student's affinity matrix is regressed onto the teacher's:

        L = 1 / N**2 * sum_i sum_j (a^s_ij - a^t_ij)**2,   averaged over the batch.

    **Nodes and cost.** The matrix is ``N x N`` per slice and costs ``N**2 * C`` multiply-adds,
    so each map is first average-pooled to at most ``spatial_size`` per spatial dim (a node is
    then the mean feature of a patch, the paper's coarser node granularity). The default 12
    gives at most 144 nodes: the student's 24 x 24 bottleneck in 2 x 2 patches, a 96 x 96
    decoder map in 8 x 8 patches. ``spatial_size=24`` keeps the bottleneck's every location
    (576 nodes, 16 times the multiply-adds: on two CPU cores that more than doubles a
    training step, see docs/losses.md); ``None`` keeps every location of any map (a 96 x 96
    map would need 9216**2 floats, 340 MiB, per slice).

    **Raw features.** Affinities are comparable across channel counts, so the term uses the
    *raw* student and teacher features of its scale (``projected = False``: the
    :class:`~mkd.handlers.DistillationHandler` skips the projector heads and only brings the
    teacher map to the student's grid). Projecting both sides with trainable heads would let
    the heads make both affinity matrices constant (loss 0) without the student learning
    anything. Pass ``projected=True`` to get the projected embeddings instead.

    Properties: zero when the maps are equal; unchanged by a positive rescaling of any
    location's feature vector and by any orthogonal change of channel basis on either side.
    Student and teacher may have different channel counts but must share the spatial size.
    Computed in float32 with autocast off; nothing is detached.

    Args:
        spatial_size: the node grid (int or one int per spatial dim): larger maps are average-pooled to it;
            ``None``: every location is a node.
        projected: whether the distillation handler feeds the projector's embeddings (``True``) or the raw
            features (``False``, default).
        reduction: ``"mean"`` (default) or ``"sum"`` over slices, or ``"none"`` for the ``(B,)`` per-slice values.

    Raises:
        ValueError: for an unknown ``reduction`` or a non-positive ``spatial_size``.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # nodes (1, 0), (0, 1): a_01 = 0
        >>> t = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # nodes (1, 0), (1, 1): a_01 = 1/sqrt 2
        >>> round(PairwiseAffinityLoss()(s, t).item(), 6)  # 2 * (1/sqrt 2)**2 / 2**2
        0.25
    """

    #: where a declared term may use it: feature scales
    inputs = ("features",)

    def __init__(
        self, spatial_size: int | Sequence[int] | None = 12, projected: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        sizes = [] if spatial_size is None else [spatial_size] if isinstance(spatial_size, int) else spatial_size
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"spatial_size={spatial_size} must be positive (or None for every location).")
        self.spatial_size = spatial_size
        self.projected = bool(projected)

    def extra_repr(self) -> str:
        return f"spatial_size={self.spatial_size}, projected={self.projected}, reduction={self.reduction!r}"

    def affinity(self, feature: torch.Tensor) -> torch.Tensor:
        """``(B, N, N)`` cosine similarities between the nodes of a ``(B, C, *spatial)`` map."""
        nodes = F.normalize(node_features(feature.float(), self.spatial_size), dim=1, eps=1e-8)
        return nodes.transpose(1, 2) @ nodes

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: ``(B, C_s, *spatial)`` student features.
            teacher: ``(B, C_t, *spatial)`` teacher features on the same grid (any channel count).

        Returns:
            a float32 scalar, or the ``(B,)`` per-slice values for ``reduction="none"``.

        Raises:
            ValueError: batch or spatial sizes differ, or no spatial dim.
        """
        if student.ndim < 3 or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"student and teacher must be (B, C, *spatial) with the same batch and spatial size (channels "
                f"may differ); got {tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        with float32_compute(student.device):
            diff = self.affinity(student) - self.affinity(teacher)
            loss = diff.pow(2).mean(dim=(1, 2))  # 1 / N**2 * sum_ij
        return reduce(loss, self.reduction)
