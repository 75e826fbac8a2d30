"""InfoNCE between student and teacher embeddings: image-, pixel- and class-level (supervised) variants."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from mkd.losses._utils import check_reduction, float32_compute, reduce

__all__ = ["InfoNCELoss", "sample_locations"]

#: the InfoNCE variants (``mode``)
MODES = ("image", "pixel", "supervised")
_MODES = MODES


def sample_locations(
    num_locations: int,
    max_samples: int,
    classes: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw at most ``max_samples`` distinct location indices out of ``num_locations``.

    When ``num_locations <= max_samples`` every location is kept, in order. Otherwise
    the draw is without replacement and uses torch's global random generator of
    ``device`` (so it is reproducible after ``torch.manual_seed``): uniform when
    ``classes`` is ``None``, and class-balanced otherwise, i.e. each location is
    weighted by ``1 / (number of locations of its class)`` so that every class
    present gets about the same share of the budget and a small structure (a spleen
    covers ~1% of a slice) is not drowned by background. The weighted draw is the
    Efraimidis-Spirakis one (keep the ``max_samples`` largest ``u ** (1 / w)``,
    ``u ~ U(0, 1)``), which is a single ``topk``: no Python loop.

    Args:
        num_locations: how many locations there are to choose from.
        max_samples: the budget, at least 1.
        classes: optional ``(num_locations,)`` tensor of non-negative integer class
            indices, one per location, for class-balanced sampling.
        device: where the indices live (default: ``classes``'s device, else CPU).

    Returns:
        a ``(min(num_locations, max_samples),)`` int64 tensor of indices.

    Raises:
        ValueError: when ``max_samples < 1`` or ``classes`` has the wrong size or
            negative values.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> sample_locations(10, 4).shape
        torch.Size([4])
    """
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be at least 1.")
    if device is None:
        device = classes.device if classes is not None else torch.device("cpu")
    if classes is not None:
        if classes.numel() != num_locations:
            raise ValueError(f"classes has {classes.numel()} entries; expected one per location ({num_locations}).")
        if classes.numel() and int(classes.min()) < 0:
            raise ValueError(f"class indices must be non-negative; got minimum {int(classes.min())}.")
    if num_locations <= max_samples:
        return torch.arange(num_locations, device=device)
    keys = torch.rand(num_locations, device=device)
    if classes is not None:
        classes = classes.reshape(-1).long().to(device)
        counts = torch.bincount(classes)
        # log(u ** (1 / w)) with w = 1 / count: the largest keys are the sample
        keys = keys.log() * counts[classes].to(keys.dtype)
    return keys.topk(max_samples).indices


class InfoNCELoss(_Loss):
    """InfoNCE (contrastive) distillation loss between projected student and teacher features.

    Both inputs are embeddings of the same shape, ``(B, D, *spatial)`` (2D or 3D) or
    ``(B, D)``, already brought to a common shape by projector heads (see
    :class:`mkd.networks.projector.ProjectorHeads`). Embeddings are L2-normalised
    along ``D`` and compared by cosine similarity divided by ``temperature``; each
    student anchor must pick its positive(s) among the teacher embeddings:

    - ``"image"`` (the thesis's variant): spatial dims are average-pooled to one
      embedding per slice; logits = ``s @ t.T / temperature`` (``B x B``);
      cross-entropy with target = the anchor's own index, so the positive is the
      same slice and the negatives are the other slices of the batch.
    - ``"pixel"``: every location is an embedding; up to ``max_samples`` locations
      (over the whole batch) are drawn per call (:func:`sample_locations`, uniform,
      reproducible given torch's RNG); positive = the same location of the same
      slice in the teacher map, negatives = the other sampled locations of this and
      the other slices. Memory is ``O(max_samples**2)`` whatever the feature size.
    - ``"supervised"``: like ``"pixel"``, but ``labels`` (resized to the feature grid
      by nearest neighbour) define the positives: every sampled teacher embedding of
      the anchor's class (SupCon, Khosla et al. 2020, with the student as anchor and
      the teacher as the contrast set; the anchor's own location is one of its
      positives, so the set is never empty). With ``balance_classes`` the sample is
      class-balanced so that the foreground is represented.

    ``symmetric`` averages the student→teacher direction with teacher→student (the
    teacher embeddings as anchors, the student ones as candidates).

    ``neighbour_distance = d >= 1`` removes false negatives: slices of one patient a
    few slices apart are nearly identical, so for every anchor the candidates that
    come from *another* slice of the *same* patient (``groups``) with
    ``|z_i - z_j| <= d`` (``positions``) get a logit of ``-inf``: they leave the
    softmax denominator and are neither positive nor negative. In ``"image"`` mode
    this masks entries of the ``B x B`` logits (the diagonal, the positive, is never
    a candidate for masking); in ``"pixel"`` and ``"supervised"`` modes a sampled
    location inherits the patient and position of its slice, and the locations of
    the anchor's own slice are left as they are. In ``"supervised"`` mode a
    candidate of the anchor's class is a positive and is never masked: only
    different-class neighbours leave the denominator. The mask is symmetric, so
    ``symmetric=True`` applies it in both directions. An anchor whose negatives are
    all masked has a loss of exactly 0 (only its positive is left), not NaN.
    ``d = 0`` (default) switches the mask off and computes the unmasked loss.

    Computation is done in float32 with autocast switched off, whatever the input
    dtype. Nothing is detached: gradients reach whatever requires them on either
    side (pass a frozen teacher's features; a teacher-side projector still trains).

    A batch of one slice in ``"image"`` mode has no negatives: the loss is then
    exactly 0 (``log`` of a one-way softmax; it stays connected to the graph, with
    zero gradient) and a ``UserWarning`` is issued, so that a last incomplete batch
    of 1 does not stop training. Use ``drop_last=True`` in the loader to avoid it.

    Args:
        temperature: the softmax temperature ``tau`` (> 0); the thesis uses 0.4
            (0.1 for T1->S2).
        mode: ``"image"``, ``"pixel"`` or ``"supervised"``.
        symmetric: also contrast in the teacher→student direction and average.
        max_samples: budget of locations per call in the pixel and supervised modes (>= 1).
        balance_classes: supervised mode only: draw the sample class-balanced
            (default) rather than uniformly.
        reduction: ``"mean"`` (default) or ``"sum"`` over anchors, or ``"none"``
            for the per-anchor losses, shape ``(B,)`` (image) or ``(K,)`` with ``K``
            the number of sampled locations (pixel, supervised).
        neighbour_distance: mask, as false negatives, the other slices of the same
            patient at most this many slices away (>= 0; 0, the default, is off).
            Needs ``groups`` and ``positions`` in :meth:`forward`.

    Raises:
        ValueError: for an unknown ``mode`` or ``reduction``, a non-positive
            ``temperature``, a ``max_samples`` below 1 or a negative or
            non-integer ``neighbour_distance``.

    Example:
        >>> loss = InfoNCELoss(temperature=0.4)
        >>> s, t = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
        >>> loss(s, t).shape
        torch.Size([])
        >>> masked = InfoNCELoss(neighbour_distance=2)
        >>> masked(s, t, groups=["a", "a", "a", "b"], positions=[10, 11, 15, 10]).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.4,
        mode: str = "image",
        symmetric: bool = False,
        max_samples: int = 1024,
        balance_classes: bool = True,
        reduction: str = "mean",
        neighbour_distance: int = 0,
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is not supported; expected one of {_MODES}.")
        if int(max_samples) < 1:
            raise ValueError(f"max_samples={max_samples} must be at least 1.")
        if (
            isinstance(neighbour_distance, bool)
            or int(neighbour_distance) != neighbour_distance
            or neighbour_distance < 0
        ):
            raise ValueError(
                f"neighbour_distance={neighbour_distance!r} must be a non-negative integer (0 switches the mask off)."
            )
        self.temperature = float(temperature)
        self.mode = mode
        self.symmetric = bool(symmetric)
        self.max_samples = int(max_samples)
        self.balance_classes = bool(balance_classes)
        self.neighbour_distance = int(neighbour_distance)

    @property
    def image_level(self) -> bool:
        """True in ``image`` mode: the loss sees only the spatial mean of each embedding map, so a linear
        projection may be applied after pooling (see :func:`mkd.handlers.pools_features`)."""
        return self.mode == "image"

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, mode={self.mode!r}, symmetric={self.symmetric}, "
            f"max_samples={self.max_samples}, reduction={self.reduction!r}, "
            f"neighbour_distance={self.neighbour_distance}"
        )

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
        groups: Sequence[str | int] | torch.Tensor | None = None,
        positions: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: student embeddings, ``(B, D, *spatial)`` or ``(B, D)``.
            teacher: teacher embeddings of the same shape.
            labels: supervised mode only (ignored otherwise): class indices
                ``(B, 1, *spatial_l)`` or ``(B, *spatial_l)``, or one-hot
                ``(B, C, *spatial_l)`` (argmax over ``C``), with as many spatial dims
                as the features but any size (resized by nearest neighbour).
            groups: the patient id of each slice, a sequence of ``B`` strings or
                integers, or an integer tensor ``(B,)``. Needed when
                ``neighbour_distance > 0``, ignored otherwise.
            positions: the slice position ``z`` of each slice, a sequence of ``B``
                integers or an integer tensor ``(B,)``. Needed when
                ``neighbour_distance > 0``, ignored otherwise.

        Returns:
            a float32 scalar, or the per-anchor losses for ``reduction="none"``.

        Raises:
            ValueError: when the shapes differ or have fewer than 2 dims, when
                ``labels`` are missing or inconsistent in supervised mode, or when
                ``neighbour_distance > 0`` and ``groups`` or ``positions`` are
                missing, not integer or not of length ``B``.
        """
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher embeddings must have the same shape; got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)} (project them with ProjectorHeads first)."
            )
        if student.ndim < 2:
            raise ValueError(f"embeddings must be (B, D, *spatial) or (B, D); got shape {tuple(student.shape)}.")
        slices = None
        if self.neighbour_distance > 0:
            slices = self._slice_keys(groups, positions, student.shape[0], student.device)
        with float32_compute(student.device):
            if self.mode == "image":
                loss = self._image(student, teacher, slices)
            else:
                loss = self._locations(student, teacher, labels, slices)
        return reduce(loss, self.reduction)

    @staticmethod
    def _slice_keys(
        groups: Sequence[str | int] | torch.Tensor | None,
        positions: Sequence[int] | torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer patient codes and slice positions, both ``(B,)`` int64 on ``device``."""
        if groups is None or positions is None:
            missing = [name for name, v in (("groups", groups), ("positions", positions)) if v is None]
            raise ValueError(
                "the neighbour mask (neighbour_distance > 0) needs the batch's patient ids (groups) and slice "
                f"positions (positions); got {' and '.join(missing)}=None."
            )
        if isinstance(groups, torch.Tensor):
            if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
                raise ValueError(f"groups must be an integer tensor or a sequence of ids; got dtype {groups.dtype}.")
            codes = groups.detach().reshape(-1).long()
            given = tuple(groups.shape)
        else:
            index: dict = {}  # patient id -> code, one pass over the B slices
            items = [g.item() if isinstance(g, torch.Tensor) else g for g in groups]
            codes = torch.tensor([index.setdefault(g, len(index)) for g in items], dtype=torch.long)
            given = (len(items),)
        z = torch.as_tensor(positions).detach()
        if z.is_floating_point() or z.is_complex() or z.dtype == torch.bool:
            raise ValueError(f"positions must be integer slice indices; got dtype {z.dtype}.")
        if given != (batch_size,) or tuple(z.shape) != (batch_size,):
            raise ValueError(
                f"groups and positions must have one entry per slice, shape ({batch_size},); "
                f"got {given} and {tuple(z.shape)}."
            )
        return codes.to(device), z.long().to(device)

    def _neighbours(
        self, slices: tuple[torch.Tensor, torch.Tensor] | None, slice_index: torch.Tensor
    ) -> torch.Tensor | None:
        """``(K, K)`` bool mask: candidate ``j`` is a neighbouring slice of anchor ``i``'s (false negative).

        ``slice_index`` gives the batch slice of each of the ``K`` anchors/candidates.
        """
        if slices is None:
            return None
        codes, z = slices[0][slice_index], slices[1][slice_index]
        same_patient = codes[:, None] == codes[None, :]
        close = (z[:, None] - z[None, :]).abs() <= self.neighbour_distance
        other_slice = slice_index[:, None] != slice_index[None, :]
        return same_patient & close & other_slice

    def _image(
        self, student: torch.Tensor, teacher: torch.Tensor, slices: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if student.shape[0] == 1:
            warnings.warn(
                "InfoNCELoss(mode='image') got a batch of 1: there are no negatives and the loss is 0; "
                "use batches of at least 2 (drop_last=True) for the image-level contrast.",
                stacklevel=3,
            )
        s = student.float().flatten(2).mean(2) if student.ndim > 2 else student.float()
        t = teacher.float().flatten(2).mean(2) if teacher.ndim > 2 else teacher.float()
        mask = self._neighbours(slices, torch.arange(s.shape[0], device=s.device))
        return self._contrast(s, t, positives=None, mask=mask)

    def _locations(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        slices: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, d = student.shape[:2]
        s = student.reshape(b, d, -1)  # (B, D, N)
        t = teacher.reshape(b, d, -1)
        n = s.shape[2]
        classes = None
        if self.mode == "supervised":
            classes = self._classes(labels, student).reshape(-1)  # (B * N,)
        idx = sample_locations(
            b * n,
            self.max_samples,
            classes=classes if (classes is not None and self.balance_classes) else None,
            device=student.device,
        )
        bi, ni = idx // n, idx % n
        # gather before casting so that only the sampled (K, D) rows are copied
        s_emb = s[bi, :, ni].float()
        t_emb = t[bi, :, ni].float()
        positives = None
        if classes is not None:
            c = classes[idx]
            positives = c[:, None] == c[None, :]
        return self._contrast(s_emb, t_emb, positives, mask=self._neighbours(slices, bi))

    def _classes(self, labels: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """Class index per feature location, ``(B, *spatial)`` int64."""
        if labels is None:
            raise ValueError("InfoNCELoss(mode='supervised') needs labels; got labels=None.")
        spatial = tuple(features.shape[2:])
        if not spatial:
            raise ValueError(
                f"mode='supervised' needs features with spatial dims (B, D, *spatial); got {tuple(features.shape)}."
            )
        lab = labels.detach()
        if lab.ndim == features.ndim - 1:
            lab = lab.unsqueeze(1)
        if lab.ndim != features.ndim or lab.shape[0] != features.shape[0]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match features of shape {tuple(features.shape)}; "
                f"expected (B, 1, *spatial) or (B, *spatial) with B={features.shape[0]} "
                f"and {len(spatial)} spatial dims."
            )
        if lab.shape[1] > 1:  # one-hot
            lab = lab.argmax(1, keepdim=True)
        if tuple(lab.shape[2:]) != spatial:
            lab = F.interpolate(lab.float(), size=spatial, mode="nearest-exact")
        lab = lab.round().long()[:, 0]
        if lab.numel() and int(lab.min()) < 0:
            raise ValueError(f"labels must be non-negative class indices; got minimum {int(lab.min())}.")
        return lab.to(features.device)

    def _contrast(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        positives: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-anchor InfoNCE between rows of ``s`` and ``t`` (both ``(K, D)``).

        ``mask`` (``(K, K)`` bool, symmetric, ``False`` on the diagonal) marks the
        candidates taken out of each anchor's softmax; positives are never masked.
        """
        s = F.normalize(s, dim=1)
        t = F.normalize(t, dim=1)
        logits = s @ t.t() / self.temperature  # (K, K): anchor s_i against candidate t_j
        if mask is not None:
            if positives is not None:
                mask = mask & ~positives
            # -inf leaves the softmax; the diagonal (the anchor's own positive) is never masked,
            # so every row keeps a finite entry and its logsumexp is finite
            logits = logits.masked_fill(mask, float("-inf"))
        if positives is None:
            target = torch.arange(logits.shape[0], device=logits.device)
            loss = F.cross_entropy(logits, target, reduction="none")
            if self.symmetric:
                loss = 0.5 * (loss + F.cross_entropy(logits.t(), target, reduction="none"))
            return loss
        pos = positives.to(logits.dtype)
        loss = self._supcon(logits, pos, masked=mask is not None)
        if self.symmetric:
            loss = 0.5 * (loss + self._supcon(logits.t(), pos.t(), masked=mask is not None))
        return loss

    @staticmethod
    def _supcon(logits: torch.Tensor, pos: torch.Tensor, masked: bool = False) -> torch.Tensor:
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        if masked:  # masked entries are -inf and never positives: keep -inf * 0 from giving NaN
            log_prob = log_prob.masked_fill(pos == 0, 0.0)
        return -(log_prob * pos).sum(1) / pos.sum(1)
