"""mkd.metrics: pooled / per-slice / per-volume segmentation metrics, restacking, PSNR.

See ``docs/metrics.md`` for the definitions and the empty-mask conventions.
"""

from __future__ import annotations

from mkd.metrics.reconstruction import PSNRAccumulator, psnr
from mkd.metrics.restack import restack, spacing_after_resize
from mkd.metrics.segmentation import (
    METRIC_NAMES,
    SegmentationAccumulator,
    SegmentationResult,
    binarize,
    flatten_summary,
    hausdorff_distance,
    keep_largest_component,
    metrics_from_counts,
    per_slice_metrics,
    per_volume_metrics,
    pooled_metrics,
)

__all__ = [
    "METRIC_NAMES",
    "SegmentationAccumulator",
    "SegmentationResult",
    "PSNRAccumulator",
    "binarize",
    "flatten_summary",
    "hausdorff_distance",
    "keep_largest_component",
    "metrics_from_counts",
    "per_slice_metrics",
    "per_volume_metrics",
    "pooled_metrics",
    "psnr",
    "restack",
    "spacing_after_resize",
]
