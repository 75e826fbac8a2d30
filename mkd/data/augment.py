"""Random augmentation of training slices, named by one bundle setting (``augment``).

``augment="consistent"`` is function matching (Beyer et al., "Knowledge distillation: A good teacher is
patient and consistent", CVPR 2022): every training slice gets a random view -- flips, a small rotation
and scaling, intensity jitter -- and slices of a batch are mixed in pairs (MixUp or CutMix), and a
distilled student's teacher runs live on *that* view. The same setting gives the baseline student the
same views, so the two differ by the teacher only.

Two parts, both MONAI transforms:

* :func:`augmentation_transforms`: per-slice dictionary transforms (``RandFlipd``, ``RandAffined``,
  ``RandScaleIntensityd``, ``RandShiftIntensityd``) appended to the training pipeline after loading and
  resizing. ``CacheDataset`` keeps the deterministic part and draws a new view at every fetch; MONAI's
  ``DataLoader`` seeds them from torch's generator, which ``monai.utils.set_determinism`` seeds.
* :class:`RandMixSlicesd`: the pair-wise mix of a collated batch (:func:`batch_mix` builds it); the
  handler :class:`mkd.handlers.BatchAugmentation` applies it to the trainer's batch before the step.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

__all__ = ["AUGMENTS", "MIXES", "RandMixSlicesd", "augmentation_transforms", "batch_mix"]

#: values of the bundle setting ``augment``: ``none`` (no random transform; the teacher cache can be used)
#: and ``consistent`` (random views and a mix of slice pairs, seen by teacher and student alike)
AUGMENTS = ("none", "consistent")
#: values of the bundle setting ``mix`` (used when ``augment`` is not ``none``)
MIXES = ("mixup", "cutmix", "none")

#: the ``consistent`` views (not tuned): each in-plane flip with p 0.5; a rotation of up to 15 degrees and
#: a scaling of up to 10 % with p 0.5; intensity x (1 +- 0.1) and + (+-0.1) with p 0.5 each
FLIP_PROB = 0.5
AFFINE_PROB = 0.5
ROTATE_DEGREES = 15.0
SCALE = 0.1
INTENSITY_PROB = 0.5
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1
#: the mix (not tuned): a slice is mixed with p 0.5, its weight drawn from Beta(1, 1) and kept >= 0.5
MIX_PROB = 0.5
MIX_ALPHA = 1.0


def _check(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def augmentation_transforms(
    augment: str = "none", image_key: str = "image", label_key: str = "label", spatial_dims: int = 2
) -> list:
    """The per-slice random transforms of an ``augment`` setting, to append to a training pipeline.

    Geometric transforms move image and label together (bilinear for the image, nearest for the label,
    zeros outside); intensity transforms touch the image only. An unlabelled slice's sentinel label (-1,
    :class:`~mkd.data.FillMissingLabeld`) stays negative inside the slice, so the slice stays unlabelled.
    The list ends with ``EnsureTyped(track_meta=False)`` (plain tensors, as the pipeline before it gives).

    Args:
        augment: one of :data:`AUGMENTS`.
        image_key: the image key.
        label_key: the label key.
        spatial_dims: 2 for slices (rotation in the plane), 3 for volumes (about each axis).

    Returns:
        MONAI dictionary transforms; an empty list for ``"none"``.

    Raises:
        ValueError: an unknown ``augment``.

    Example:
        >>> [type(t).__name__ for t in augmentation_transforms("consistent")]  # doctest: +NORMALIZE_WHITESPACE
        ['RandFlipd', 'RandFlipd', 'RandAffined', 'RandScaleIntensityd', 'RandShiftIntensityd', 'EnsureTyped']
    """
    if _check("augment", augment, AUGMENTS) == "none":
        return []
    keys = [image_key, label_key]
    angle = math.radians(ROTATE_DEGREES)
    return [
        *(RandFlipd(keys=keys, prob=FLIP_PROB, spatial_axis=axis) for axis in range(spatial_dims)),
        RandAffined(
            keys=keys,
            prob=AFFINE_PROB,
            rotate_range=(angle,) if spatial_dims == 2 else (angle,) * 3,
            scale_range=(SCALE,) * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandScaleIntensityd(keys=image_key, factors=INTENSITY_SCALE, prob=INTENSITY_PROB),
        RandShiftIntensityd(keys=image_key, offsets=INTENSITY_SHIFT, prob=INTENSITY_PROB),
        EnsureTyped(keys=keys, track_meta=False),
    ]


def batch_mix(
    augment: str = "none", mix: str = "mixup", prob: float = MIX_PROB, alpha: float = MIX_ALPHA
) -> RandMixSlicesd | None:
    """The batch-level mix of an ``augment`` setting, or ``None`` when it has none.

    Args:
        augment: one of :data:`AUGMENTS`; ``"none"`` has no mix.
        mix: one of :data:`MIXES`: ``"mixup"`` (a weighted sum of two slices), ``"cutmix"`` (a box of the
            partner pasted in), ``"none"``.
        prob: probability that a slice is mixed.
        alpha: the Beta(alpha, alpha) parameter of the mixing weight.

    Raises:
        ValueError: an unknown ``augment`` or ``mix``.
    """
    _check("mix", mix, MIXES)
    if _check("augment", augment, AUGMENTS) == "none" or mix == "none":
        return None
    return RandMixSlicesd(keys="image", label_key="label", mode=mix, prob=prob, alpha=alpha)


class RandMixSlicesd(Randomizable, MapTransform):
    """Mix the slices of a collated batch in pairs, the label exactly as the image (MixUp or CutMix).

    Each slice ``i`` is mixed with probability ``prob`` with a partner ``j`` drawn from the same group:
    labelled slices with labelled ones, unlabelled (sentinel, negative label) with unlabelled ones, so a
    sentinel never enters a labelled slice's label and :class:`mkd.losses.LabelledOnly` still leaves the
    unlabelled slices out of the supervised loss. The weight ``lam`` is drawn from Beta(alpha, alpha) and
    replaced by ``max(lam, 1 - lam)``, so the slice stays the larger part of its mix; the batch's other
    keys (``patient``, ``z``, ``slice``) stay the slice's own.

    * ``mixup``: ``x_i <- lam x_i + (1 - lam) x_j`` and ``y_i <- lam y_i + (1 - lam) y_j`` (soft labels in
      [0, 1], which ``DiceCELoss(sigmoid=True)`` takes as they are);
    * ``cutmix``: a box of ``j`` (side ``round(n * sqrt(1 - lam))`` on each axis of size ``n``, i.e. a
      share ``1 - lam`` of a 2D slice, at a random place inside it) is pasted into image and label
      alike (labels stay binary).

    An unlabelled slice's image is mixed, its label is left as it is (it stays unlabelled). A batch that
    carries cached teacher outputs (``teacher_*`` keys) is refused: the teacher's output on a mixed slice
    is not the mix of its outputs, so the teacher must run live on the mixed batch.

    Randomness comes from the transform's own ``R`` (a ``numpy.random.RandomState``; seed it with
    :meth:`set_random_state`, as :class:`mkd.handlers.BatchAugmentation` does from torch's generator).

    Args:
        keys: the image key(s) to mix.
        label_key: the label key, mixed the same way and used for the groups; ``None`` mixes images only
            (all slices one group).
        mode: ``"mixup"`` or ``"cutmix"``.
        prob: probability that a slice is mixed.
        alpha: Beta(alpha, alpha) parameter of the weight; must be positive.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: unknown ``mode``, ``prob`` outside [0, 1], ``alpha`` <= 0; when called, cached teacher
            outputs in the batch.

    Example:
        >>> mix = RandMixSlicesd(keys="image", label_key="label", prob=1.0).set_random_state(0)
        >>> batch = {"image": torch.rand(4, 3, 8, 8), "label": (torch.rand(4, 1, 8, 8) > 0.5).float()}
        >>> mix(batch)["image"].shape
        torch.Size([4, 3, 8, 8])
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str | None = "label",
        mode: str = "mixup",
        prob: float = MIX_PROB,
        alpha: float = MIX_ALPHA,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mode = _check("mode", mode, ("mixup", "cutmix"))
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if not float(alpha) > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        self.label_key = label_key
        self.prob = float(prob)
        self.alpha = float(alpha)
        self.partner: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.boxes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def randomize(self, data: tuple[torch.Tensor, Sequence[int]]) -> None:
        """Draw the partners, weights and (CutMix) boxes for a batch.

        Args:
            data: ``(labelled, spatial_shape)``: the ``(B,)`` bool mask of labelled slices and the
                slices' spatial shape.
        """
        labelled, spatial = data
        b = int(labelled.shape[0])
        lam = self.R.beta(self.alpha, self.alpha, size=b)
        lam = np.maximum(lam, 1.0 - lam)
        lam[self.R.random_sample(b) >= self.prob] = 1.0
        partner = np.arange(b)
        groups = labelled.cpu().numpy()
        for group in (groups, ~groups):
            idx = np.flatnonzero(group)
            partner[idx] = idx[self.R.permutation(len(idx))]
        self.partner = torch.from_numpy(partner)
        self.weight = torch.from_numpy(lam).float()
        self.boxes = []
        if self.mode == "cutmix":
            for n in spatial:
                side = np.rint(n * np.sqrt(1.0 - lam)).astype(int)
                start = (self.R.random_sample(b) * (n - side + 1)).astype(int)
                self.boxes.append((torch.from_numpy(start), torch.from_numpy(start + side)))

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` ``(B, C, *spatial)`` with the drawn partners and weights."""
        other = x[self.partner.to(x.device)]
        if self.mode == "mixup":
            w = self.weight.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return w * x + (1 - w) * other
        inside = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
        for axis, (start, stop) in enumerate(self.boxes):  # (B, 1, ..., n, ..., 1) per axis, broadcast
            n = x.shape[2 + axis]
            pos = torch.arange(n, device=x.device).reshape([1] * (2 + axis) + [n] + [1] * (x.ndim - 3 - axis))
            start, stop = (t.to(x.device).reshape(-1, *([1] * (x.ndim - 1))) for t in (start, stop))
            inside = inside & (pos >= start) & (pos < stop)
        return torch.where(inside, other, x)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mkd.data.teacher_cache import CACHE_PREFIX
        from mkd.losses.labelled import labelled_mask

        d = dict(data)
        cached = sorted(str(k) for k in d if str(k).startswith(CACHE_PREFIX))
        if cached:
            raise ValueError(
                f"{type(self).__name__}: the batch carries cached teacher outputs ({', '.join(cached)}); a mixed "
                "slice needs the teacher's output on the mixed slice: switch the teacher cache off (use_cache=false)"
            )
        first = self.first_key(d)
        if first == ():
            return d
        ref = d[first]
        label = d.get(self.label_key) if self.label_key is not None else None
        labelled = labelled_mask(label) if label is not None else torch.ones(ref.shape[0], dtype=torch.bool)
        self.randomize((labelled, tuple(ref.shape[2:])))
        for key in self.key_iterator(d):
            d[key] = self._mix(d[key])
        if label is not None:
            mixed = self._mix(label)
            keep = labelled.to(label.device).reshape(-1, *([1] * (label.ndim - 1)))
            d[self.label_key] = torch.where(keep, mixed, label)  # an unlabelled slice keeps its sentinel label
        return d
