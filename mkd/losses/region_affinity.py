"""EMKD region affinity: match the similarity between class-region prototypes of teacher and student features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute
from mkd.losses.labelled import labelled_mask

__all__ = ["RegionAffinityLoss", "region_masks"]


def _one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *S)`` class indices -> ``(B, K, *S)`` float one-hot."""
    return F.one_hot(classes.long().clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()


def _resize(masks: torch.Tensor, size: torch.Size) -> torch.Tensor:
    from mkd.networks.projector import match_spatial

    return match_spatial(masks, list(size))


def region_masks(
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    num_classes: int,
    size: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft class-region masks on a feature grid, from the labels or, where a slice has none, the teacher.

    Args:
        labels: ``(B, 1, *S)`` or ``(B, *S)`` class indices, or ``(B, K, *S)`` one-hot (``K = num_classes > 1``),
            at any resolution; a slice holding a negative value is unlabelled (``mkd.data.FillMissingLabeld``).
            ``None``: no slice is labelled.
        teacher_logits: ``(B, C, *S')`` teacher logits: the teacher's prediction (``sigmoid > 1/2`` for one
            channel, the argmax otherwise) stands in for the labels of unlabelled slices. ``None``: those
            slices have no regions.
        num_classes: ``K``, the number of regions (2 for a sigmoid output: background and foreground).
        size: the feature grid ``(*spatial)``.

    Returns:
        ``(masks, valid)``: ``(B, K, *size)`` region weights in [0, 1] (the share of each grid cell that
        belongs to the region: one-hot masks area-averaged onto the grid) and ``(B,)`` bool, whether the
        slice has regions at all.

    Raises:
        ValueError: neither labels nor teacher logits.
    """
    if labels is None and teacher_logits is None:
        raise ValueError("region affinity needs labels or the teacher's logits to find the class regions.")
    ref = labels if labels is not None else teacher_logits
    batch = ref.shape[0]
    dims = len(size)
    masks = torch.zeros(batch, num_classes, *size, device=ref.device)
    valid = torch.zeros(batch, dtype=torch.bool, device=ref.device)
    if teacher_logits is not None:
        z = teacher_logits.detach()
        classes = (z[:, 0] > 0) if z.shape[1] == 1 else z.argmax(1)
        masks = _resize(_one_hot(classes, num_classes), size).to(ref.device)
        valid = torch.ones(batch, dtype=torch.bool, device=ref.device)
    if labels is not None:
        lab = labels.detach()
        if lab.ndim == dims + 2 and lab.shape[1] == num_classes and num_classes > 1:
            onehot = lab.float().clamp_min(0)
        else:
            onehot = _one_hot(lab[:, 0] if lab.ndim == dims + 2 else lab, num_classes)
        labelled = labelled_mask(lab).to(ref.device)
        shape = (batch,) + (1,) * (dims + 1)
        masks = torch.where(labelled.view(shape), _resize(onehot, size).to(ref.device), masks)
        valid = valid | labelled
    return masks, valid


class RegionAffinityLoss(_Loss):
    """The region affinity distillation of EMKD (Qin et al., IEEE TMI 2021, "Efficient Medical Image
    Segmentation Based on Knowledge Distillation", arXiv:2108.09987).

    The student mimics how different the teacher's representations of the tissue regions are.
    For each slice and class region ``k`` (background and spleen here) a prototype is the
    masked average of the feature vectors, ``r_k = sum_i m_ki f_i / sum_i m_ki``, with ``m_k`` the
    region's mask on the feature grid (one-hot labels area-averaged onto the grid, so a spleen
    smaller than a grid cell still counts by its share). The region affinity is the cosine
    similarity of two prototypes, and the student's affinities are regressed onto the teacher's:

        L = mean over slices b and region pairs k < l of (cos(r^s_bk, r^s_bl) - cos(r^t_bk, r^t_bl))**2.

    With a sigmoid output there are two regions and one pair per slice. A pair counts only
    where both regions are present in the slice; a batch without any such pair gives 0 (in
    the graph, zero gradient).

    **Labels.** The distillation handler passes the batch's ``labels`` and, because ``forward``
    takes it, ``teacher_logits`` (so the teacher cache stores logits, see
    :func:`mkd.handlers.needs_logits`). Slices without labels (the transfer set, labels filled
    with -1) use the teacher's thresholded prediction as their regions; without teacher logits
    they are left out.

    **Raw features.** Prototype affinities compare across channel counts, so like
    :class:`~mkd.losses.PairwiseAffinityLoss` the term takes the raw features of its scale
    (``projected = False``; the teacher map is brought to the student's grid).

    Properties: zero when student and teacher features are equal; unchanged by a positive
    rescaling of either side's features and by an orthogonal change of channel basis.
    Computed in float32 with autocast off; labels and teacher logits are only used as masks.

    Args:
        num_classes: regions ``K`` (2 for a one-channel sigmoid output).
        projected: whether the distillation handler feeds projected embeddings (``True``) or raw features
            (``False``, default).
        reduction: ``"mean"`` (default) over the counted (slice, pair) entries, ``"sum"``, or ``"none"`` for
            the ``(B,)`` per-slice means (0 for a slice without a counted pair).

    Raises:
        ValueError: ``num_classes < 2`` or an unknown ``reduction``.

    Example:
        >>> s = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)  # r_bg (1, 0), r_fg (0, 1)
        >>> t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)  # r_bg (1, 0), r_fg (1, 1)
        >>> labels = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4)
        >>> round(RegionAffinityLoss()(s, t, labels).item(), 6)  # (0 - 1/sqrt 2)**2
        0.5
    """

    #: where a declared term may use it: feature scales
    inputs = ("features",)

    def __init__(self, num_classes: int = 2, projected: bool = False, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2 (background and at least one class).")
        self.num_classes = int(num_classes)
        self.projected = bool(projected)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, projected={self.projected}, reduction={self.reduction!r}"

    def affinities(self, feature: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B, K, K)`` cosine similarities between the region prototypes of a ``(B, C, *spatial)`` map."""
        w = masks.flatten(2)  # (B, K, N)
        proto = torch.einsum("bkn,bcn->bkc", w, feature.float().flatten(2)) / w.sum(-1, keepdim=True).clamp_min(1e-8)
        proto = F.normalize(proto, dim=-1, eps=1e-8)
        return proto @ proto.transpose(1, 2)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: ``(B, C_s, *spatial)`` student features.
            teacher: ``(B, C_t, *spatial)`` teacher features on the same grid (any channel count).
            labels: class labels at any resolution (see :func:`region_masks`); negative = unlabelled slice.
            teacher_logits: the teacher's logits, used for unlabelled slices.

        Returns:
            a float32 scalar, or the ``(B,)`` per-slice values for ``reduction="none"``.

        Raises:
            ValueError: batch or spatial sizes differ, or neither labels nor teacher logits.
        """
        if student.ndim < 3 or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"student and teacher must be (B, C, *spatial) with the same batch and spatial size (channels "
                f"may differ); got {tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        with float32_compute(student.device):
            masks, valid = region_masks(labels, teacher_logits, self.num_classes, student.shape[2:])
            masks, valid = masks.to(student.device), valid.to(student.device)
            i, j = torch.triu_indices(self.num_classes, self.num_classes, offset=1, device=student.device)
            sq = (self.affinities(student, masks) - self.affinities(teacher, masks))[:, i, j].pow(2)  # (B, P)
            present = masks.flatten(2).sum(-1) > 0  # (B, K)
            counted = (present[:, i] & present[:, j] & valid[:, None]).float()
            total = (sq * counted).sum()
            if self.reduction == "sum":
                return total
            if self.reduction == "none":
                return (sq * counted).sum(1) / counted.sum(1).clamp_min(1)
            return total / counted.sum().clamp_min(1)
