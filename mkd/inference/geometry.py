"""The ``mkd prepare`` volume pipeline after loading, and its inverse back to the input's voxel grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mkd.inference.io import Volume
from mkd.inference.settings import InferenceSettings

__all__ = ["Preprocessed", "preprocess", "invert", "invert_mask"]


def _pipeline(settings: InferenceSettings):
    """``volume_transforms`` without its loader (the same transform objects ``mkd prepare`` builds)."""
    from monai.transforms import Compose, LoadImaged, Resized

    from mkd.data.transforms import volume_transforms

    full = volume_transforms(
        keys=("image",), window=settings.window, spacing=settings.spacing, size=settings.prepare_size
    )
    xforms = list(full.transforms)
    if not (isinstance(xforms[0], LoadImaged) and isinstance(xforms[-1], Resized)):
        raise RuntimeError("mkd.data.volume_transforms changed: expected LoadImaged first and Resized last")
    return Compose(xforms[1:])


@dataclass
class Preprocessed:
    """A volume after the ``mkd prepare`` pipeline, with what :func:`invert` needs.

    Attributes:
        image: MetaTensor (1, prepare_size, prepare_size, Z') in [0, 1]; its ``applied_operations``
            record the geometry.
        transform: the MONAI ``Compose`` that ran (its transforms invert the geometry).
        settings: the settings used.
    """

    image: Any
    transform: Any
    settings: InferenceSettings


def preprocess(volume: Volume | Any, settings: InferenceSettings) -> Preprocessed:
    """The ``mkd prepare`` volume pipeline after loading: channel-first, RAS, spacing, window, resize.

    Args:
        volume: a :class:`Volume`, or a MetaTensor (X, Y, Z) with its affine.
        settings: the preprocessing settings.

    Returns:
        the preprocessed volume; slice it with :func:`mkd.data.volume_to_slices`.
    """
    data = volume.data if isinstance(volume, Volume) else volume
    transform = _pipeline(settings)
    return Preprocessed(image=transform({"image": data})["image"], transform=transform, settings=settings)


def invert(values: torch.Tensor, preprocessed: Preprocessed) -> torch.Tensor:
    """Map a (1, h, w, Z') map on the preprocessed grid back to the input's voxel grid.

    ``values`` may be at the network's input size (h, w) rather than the prepared size; it is
    first resized in-plane to the prepared size. Then MONAI inverts the recorded geometry in
    reverse order: ``Resized`` (with ``trilinear`` interpolation instead of the forward ``area``,
    Z unchanged), ``Spacingd`` (bilinear resampling) and ``Orientationd`` (exact flips /
    transposes). Use it on probabilities and threshold afterwards.

    Args:
        values: float tensor (1, h, w, Z').
        preprocessed: what :func:`preprocess` returned for this volume.

    Returns:
        float tensor (X, Y, Z): the input's shape and voxel order.

    Raises:
        ValueError: ``values`` does not have the preprocessed volume's slice count.
    """
    from monai.data import MetaTensor
    from monai.transforms.utils import convert_applied_interp_mode
    from monai.utils import TraceKeys

    ref = preprocessed.image
    ops = list(ref.applied_operations)
    if not ops or ops[-1][TraceKeys.CLASS_NAME] != "Resize":
        raise RuntimeError("the preprocessed volume has no Resize as its last operation")
    n_slices = int(ref.shape[-1])
    v = torch.as_tensor(values).detach().to("cpu", torch.float32).as_subclass(torch.Tensor)
    if v.ndim != 4 or v.shape[0] != 1 or v.shape[-1] != n_slices:
        raise ValueError(f"expected values of shape (1, h, w, {n_slices}), got {tuple(v.shape)}")
    if tuple(v.shape) != tuple(ref.shape):
        v = F.interpolate(v[None], size=tuple(ref.shape[1:]), mode="trilinear", align_corners=False)[0]
    # probabilities are resized back linearly, not with the forward "area" (blocky when upsampling)
    ops[-1] = convert_applied_interp_mode(ops[-1], mode="trilinear", align_corners=False)
    m = MetaTensor(v, meta=dict(ref.meta), applied_operations=ops)
    # Compose.inverse needs the transform objects that ran forward (MONAI checks their ids)
    out = preprocessed.transform.inverse({"image": m})["image"]
    return torch.as_tensor(out).as_subclass(torch.Tensor)[0]


def _slice_wise(ops: list) -> bool:
    """Whether the recorded geometry maps each slice to itself: RAS and an in-plane resize, no ``Spacing``."""
    from monai.utils import TraceKeys

    names = [op[TraceKeys.CLASS_NAME] for op in ops]
    return names in (["Resize"], ["Orientation", "Resize"])


def invert_mask(values: torch.Tensor, preprocessed: Preprocessed, threshold: float = 0.5) -> np.ndarray:
    """``invert(values, preprocessed) > threshold`` as uint8, computed only on the slices that can hold foreground.

    The same mask as thresholding :func:`invert`'s probabilities (``tests/test_infer.py`` compares them
    voxel for voxel), at a cost that follows the organ rather than the volume. When the recorded geometry
    is RAS plus an in-plane resize (no ``spacing``, the ``mkd prepare`` default), both resizes back
    (network size to prepared size, prepared size to the input's in-plane grid) keep each slice apart:
    their weight along Z is exactly 1 on the slice itself and 0 on its neighbour, and in-plane they are
    convex combinations of that slice's values. So a slice whose values
    are all at or below ``threshold`` stays at or below it, and only the run of slices from the first to
    the last one above it is resized (in float32, as a batch of 2D slices: a bilinear resize per slice,
    which gives the values of :func:`invert`'s trilinear resize with Z kept bit for bit, in half the
    time), thresholded, and put back through the inverse orientation as uint8 (a flip / transpose of
    bytes, not of floats). With a ``Spacing`` step (which mixes slices), this is ``invert`` followed by
    the threshold.

    Args:
        values: float tensor (1, h, w, Z') of probabilities on the preprocessed grid (any in-plane size).
        preprocessed: what :func:`preprocess` returned for this volume.
        threshold: foreground is ``value > threshold``.

    Returns:
        uint8 array (X, Y, Z) with values {0, 1}: the input's shape and voxel order.

    Raises:
        ValueError: ``values`` does not have the preprocessed volume's slice count.
    """
    from monai.data import MetaTensor
    from monai.transforms import Orientationd
    from monai.utils import TraceKeys

    ref = preprocessed.image
    ops = list(ref.applied_operations)
    if not _slice_wise(ops) or ops[-1][TraceKeys.ORIG_SIZE][-1] != ref.shape[-1]:
        return (invert(values, preprocessed) > threshold).numpy().view(np.uint8)
    n_slices = int(ref.shape[-1])
    v = torch.as_tensor(values).detach().to("cpu", torch.float32).as_subclass(torch.Tensor)
    if v.ndim != 4 or v.shape[0] != 1 or v.shape[-1] != n_slices:
        raise ValueError(f"expected values of shape (1, h, w, {n_slices}), got {tuple(v.shape)}")
    grid = tuple(int(n) for n in ops[-1][TraceKeys.ORIG_SIZE])  # (X', Y', Z) before the resize
    mask = torch.zeros((1, *grid), dtype=torch.uint8)
    above = torch.nonzero(v.amax(dim=(0, 1, 2)) > threshold).flatten()
    if above.numel():
        z0, z1 = int(above[0]), int(above[-1]) + 1
        # slices as a batch of 2D maps: bilinear per slice gives the trilinear values of `invert` (Z kept)
        # bit for bit, in half the time
        block = v[0, :, :, z0:z1].permute(2, 0, 1)[:, None]
        if tuple(block.shape[-2:]) != tuple(ref.shape[1:3]):
            block = F.interpolate(block, size=tuple(ref.shape[1:3]), mode="bilinear", align_corners=False)
        block = F.interpolate(block, size=grid[:2], mode="bilinear", align_corners=False)  # Resize's inverse
        mask[0, :, :, z0:z1] = (block[:, 0] > threshold).permute(1, 2, 0)
    if ops[0][TraceKeys.CLASS_NAME] == "Orientation":
        orient = next(t for t in preprocessed.transform.transforms if isinstance(t, Orientationd))
        m = MetaTensor(mask, meta=dict(ref.meta), applied_operations=ops[:1])
        mask = torch.as_tensor(orient.inverse({"image": m})["image"]).as_subclass(torch.Tensor)
    return np.ascontiguousarray(mask[0].numpy())
