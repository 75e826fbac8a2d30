"""mkd.reports: thesis-style tables, paired statistics, figures, and the report of a runs folder."""

from __future__ import annotations

from mkd.reports.figures import (
    plot_ablation,
    plot_mask_preview,
    plot_qualitative,
    plot_reconstructions,
    plot_training_curves,
    preview_panels,
    radiological,
    to_ras,
)
from mkd.reports.report import VOLUME_METRICS, ReportResult, build_report, collect_runs, collect_volumes, left_out_runs
from mkd.reports.stats import WILCOXON_MIN_PAIRS, bootstrap_ci, holm, paired_test
from mkd.reports.tables import (
    DEFAULT_METRICS,
    format_table,
    significance_table,
    summary_table,
    to_markdown,
    write_table,
)

__all__ = [
    "DEFAULT_METRICS",
    "VOLUME_METRICS",
    "ReportResult",
    "build_report",
    "collect_runs",
    "left_out_runs",
    "collect_volumes",
    "WILCOXON_MIN_PAIRS",
    "bootstrap_ci",
    "format_table",
    "holm",
    "paired_test",
    "plot_ablation",
    "plot_mask_preview",
    "plot_qualitative",
    "plot_reconstructions",
    "plot_training_curves",
    "preview_panels",
    "radiological",
    "to_ras",
    "significance_table",
    "summary_table",
    "to_markdown",
    "write_table",
]
