"""Reconstruction quality of multi-task teachers: PSNR (via MONAI's ``PSNRMetric``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["psnr", "PSNRAccumulator"]


def _to_tensor(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor
            x = x.as_tensor()
        return x.detach().float()
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def psnr(recon: Any, image: Any, data_range: float = 1.0, reduction: str = "mean") -> Any:
    """Peak signal-to-noise ratio ``20 log10(data_range) - 10 log10(MSE)`` in dB, per image.

    The MSE is taken over each image's channels and pixels (MONAI ``PSNRMetric``), so the
    batch mean is the mean of per-image PSNRs, not the PSNR of the pooled MSE.

    Args:
        recon: reconstructions, batch first ``(B, C, H, W)`` (or ``(B, ...)``), tensor or array.
        image: the inputs the teacher reconstructs, same shape; intensities in ``[0, data_range]``.
        data_range: the largest possible intensity (1.0 for the prepared data).
        reduction: ``"mean"`` gives a float (mean over images); ``"none"`` gives a float64
            NumPy array of shape ``(B,)``.

    Returns:
        PSNR in dB; ``inf`` for an image reconstructed exactly.

    Example:
        >>> import numpy as np
        >>> round(psnr(np.full((1, 3, 4, 4), 0.1), np.zeros((1, 3, 4, 4))), 6)  # MSE 0.01
        20.0
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    r, x = _to_tensor(recon), _to_tensor(image).to(_to_tensor(recon).device)
    if r.shape != x.shape:
        raise ValueError(f"recon and image must have the same shape, got {tuple(r.shape)} and {tuple(x.shape)}")
    if r.ndim < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(r.shape)}")
    from monai.metrics import PSNRMetric

    values = PSNRMetric(max_val=data_range, reduction="none")(r, x).reshape(-1).cpu().double().numpy()
    return float(values.mean()) if reduction == "mean" else values


class PSNRAccumulator:
    """Collects per-image PSNR batch by batch; :meth:`compute` gives ``{"mean", "std", "n"}``.

    Args:
        data_range: see :func:`psnr`.
    """

    def __init__(self, data_range: float = 1.0) -> None:
        self.data_range = data_range
        self.values: list[float] = []

    def reset(self) -> None:
        self.values = []

    def update(self, recon: Any, image: Any) -> None:
        """Add a batch ``(B, C, H, W)`` of reconstructions and their inputs."""
        self.values.extend(psnr(recon, image, data_range=self.data_range, reduction="none").tolist())

    def compute(self) -> dict[str, float | int | None]:
        """Mean and sample std of the per-image PSNR (dB) over finite values, and their count."""
        v = np.asarray([x for x in self.values if math.isfinite(x)], dtype=np.float64)
        return {
            "mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size),
            "n_exact": int(sum(1 for x in self.values if x == math.inf)),
        }
