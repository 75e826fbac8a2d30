"""Put 2D slice predictions back into 3D volumes by their axial index ``z``.

The prepared dataset (``docs/architecture.md``) stores each slice with its patient id
and its axial index ``z`` in the source volume, so slice-wise predictions can be
restacked into a ``(Z, H, W)`` volume per patient and scored in 3D (the Medical
Segmentation Decathlon convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["restack", "spacing_after_resize"]


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "new_full")


def restack(
    slices: Any,
    zs: Sequence[int] | np.ndarray | Any,
    *,
    depth: int | None = None,
    start: int | None = 0,
    fill: float | None = None,
) -> Any:
    """Stack slices into a volume so that ``volume[z - start]`` is the slice whose index is ``z``.

    Args:
        slices: the slices, either one array / tensor of shape ``(N, ...)`` or a sequence
            of ``N`` arrays / tensors of equal shape. A tensor (or a sequence of tensors)
            gives a tensor on the same device; anything else gives a NumPy array.
        zs: the ``N`` axial indices, in the same order as ``slices``; any order, no repeats.
        depth: number of slices of the output volume; default ``max(zs) - start + 1``.
        start: the ``z`` stored at index 0 of the volume; ``None`` means ``min(zs)``
            (the volume spans only the slices given). Default 0: the volume's index is ``z`` itself.
        fill: value for indices in ``[0, depth)`` that no slice covers. ``None`` (default)
            makes a missing index an error: a test patient should keep every slice.

    Returns:
        The volume, shape ``(depth, ...)``, same dtype as the slices.

    Raises:
        ValueError: lengths differ, a ``z`` repeats or falls outside ``[start, start + depth)``,
            or an index is missing and ``fill`` is ``None``.

    Example:
        >>> import numpy as np
        >>> restack(np.array([[1], [0], [2]]), [1, 0, 2])[:, 0].tolist()
        [0, 1, 2]
    """
    if isinstance(slices, (list, tuple)):
        if len(slices) == 0:
            raise ValueError("restack needs at least one slice, got none")
        if _is_tensor(slices[0]):
            import torch

            slices = torch.stack(list(slices))
        else:
            slices = np.stack([np.asarray(s) for s in slices])
    elif not _is_tensor(slices):
        slices = np.asarray(slices)
    z = np.asarray(zs.detach().cpu().numpy() if _is_tensor(zs) else zs).reshape(-1)
    if z.size == 0:
        raise ValueError("restack needs at least one slice, got none")
    if not np.issubdtype(z.dtype, np.integer):
        if not np.all(np.equal(np.mod(z, 1), 0)):
            raise ValueError(f"z indices must be integers, got {z[:5].tolist()}...")
        z = z.astype(np.int64)
    if len(z) != slices.shape[0]:
        raise ValueError(f"got {slices.shape[0]} slices but {len(z)} z indices; they must match")
    uniq, counts = np.unique(z, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"z indices repeat: {uniq[counts > 1][:10].tolist()}; each z may appear once")
    start = int(z.min()) if start is None else int(start)
    depth = int(z.max()) - start + 1 if depth is None else int(depth)
    idx = z - start
    if idx.min() < 0 or idx.max() >= depth:
        raise ValueError(
            f"z indices {int(z.min())}..{int(z.max())} fall outside the volume [{start}, {start + depth}) "
            f"(start={start}, depth={depth})"
        )
    if fill is None and len(z) != depth:
        missing = np.setdiff1d(np.arange(depth), idx) + start
        shown = ", ".join(str(v) for v in missing[:10].tolist()) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} of {depth} slices are missing (z = {shown}); pass fill=0 to fill them with zeros"
        )
    shape = (depth, *slices.shape[1:])
    if _is_tensor(slices):
        import torch

        out = slices.new_full(shape, 0 if fill is None else fill)
        out[torch.as_tensor(idx, device=slices.device)] = slices
    else:
        out = np.full(shape, 0 if fill is None else fill, dtype=slices.dtype)
        out[idx] = slices
    return out


def spacing_after_resize(spacing: Sequence[float], shape: Sequence[int], new_shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel spacing after resampling an array of ``shape`` to ``new_shape`` over the same extent.

    Slices are resized to e.g. 256 x 256 before training, so the in-plane spacing of a
    restacked prediction is not the scanner's: use this to get the spacing (in mm) that
    HD95 needs.

    Args:
        spacing: original spacing per axis (mm), in the array's axis order.
        shape: original size per axis.
        new_shape: size per axis after resizing (same axis order).

    Returns:
        ``spacing[i] * shape[i] / new_shape[i]`` per axis.

    Example:
        >>> spacing_after_resize((5.0, 0.8, 0.8), (90, 512, 512), (90, 256, 256))
        (5.0, 1.6, 1.6)
    """
    if not (len(spacing) == len(shape) == len(new_shape)):
        raise ValueError(
            f"spacing, shape and new_shape need one entry per axis; got {len(spacing)}, {len(shape)}, {len(new_shape)}"
        )
    return tuple(float(s) * float(n) / float(m) for s, n, m in zip(spacing, shape, new_shape))
