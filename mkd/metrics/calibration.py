"""How trustworthy a network's soft outputs are: expected calibration error and logit medians per class."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expected_calibration_error", "logit_summary"]


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """Binary expected calibration error over pixels, with ``bins`` equal-width confidence bins.

    For each bin ``b`` of the predicted foreground probability ``p``:
    ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|``, i.e. how far the predicted
    probability is from the observed foreground frequency (0 for a perfectly calibrated model).
    The last bin includes ``p == 1``.

    Args:
        probs: foreground probabilities in [0, 1], any shape.
        labels: 0 / 1 ground truth of the same number of elements.
        bins: number of bins (>= 1).

    Raises:
        ValueError: different sizes, no element, or ``bins < 1``.

    Example:
        >>> expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0], bins=10)
        0.3
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.size != y.size or p.size == 0:
        raise ValueError(f"probs and labels must be non-empty and of one size; got {p.size} and {y.size}.")
    if int(bins) < 1:
        raise ValueError(f"bins={bins} must be at least 1.")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    conf = np.bincount(index, weights=p, minlength=bins)
    freq = np.bincount(index, weights=y, minlength=bins)
    used = count > 0
    gap = np.abs(freq[used] - conf[used]) / count[used]
    return float(np.round((count[used] / p.size * gap).sum(), 12))


def logit_summary(logits: Any, labels: Any) -> dict[str, float | None]:
    """Median logit on background and on foreground pixels (``None`` when a class is absent).

    A well-trained sigmoid segmenter has clearly negative background and clearly positive
    foreground logits; medians near 0 mean soft targets near 0.5, which prediction-map
    distillation at a high temperature turns into a bias towards false positives.

    Example:
        >>> logit_summary([-4.0, -2.0, 3.0], [0, 0, 1])
        {'background_median': -3.0, 'foreground_median': 3.0}
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if z.size != y.size:
        raise ValueError(f"logits and labels must have one size; got {z.size} and {y.size}.")
    return {
        "background_median": float(np.median(z[~y])) if (~y).any() else None,
        "foreground_median": float(np.median(z[y])) if y.any() else None,
    }
