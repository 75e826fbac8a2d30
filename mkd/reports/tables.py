"""Thesis-style result tables from a tidy DataFrame of runs.

The input has one row per run (or per run and test volume) with at least a ``method``
column, a ``baseline`` column naming the matching baseline student's method (empty for the
baselines themselves), a ``seed`` column and one column per metric, e.g. ::

    method        baseline  seed  iou    dice   recall  precision  volume_dice  volume_hd95
    s1            NaN       0     0.557  0.715  0.685   0.749      0.70         12.1
    kd_t1_s1_b    s1        0     0.629  0.772  0.721   0.831      0.76         9.8

:func:`summary_table` gives rows = method and, per metric, the mean and sample std over
seeds and the % change of the mean against the baseline's mean;
:func:`significance_table` adds paired tests (see :mod:`mkd.reports.stats`);
:func:`write_table` writes CSV (full precision) and Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mkd.errors import MkdError
from mkd.reports.stats import holm, paired_test

__all__ = [
    "DEFAULT_METRICS",
    "summary_table",
    "format_table",
    "significance_table",
    "gap_table",
    "to_markdown",
    "write_table",
]

#: the thesis's columns: pooled IoU, Dice, recall, precision.
DEFAULT_METRICS: tuple[str, ...] = ("iou", "dice", "recall", "precision")


def _is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _baselines(runs: pd.DataFrame, method: str, baseline: str) -> dict[str, str | None]:
    """Method → its baseline's method name (``None`` for baselines), checked for consistency."""
    methods = list(dict.fromkeys(runs[method].tolist()))
    if baseline not in runs:
        return {m: None for m in methods}
    out: dict[str, str | None] = {}
    for m in methods:
        names = {b for b in runs.loc[runs[method] == m, baseline].tolist() if not _is_blank(b)}
        names.discard(m)
        if len(names) > 1:
            raise MkdError(f"method {m!r} names several baselines {sorted(names)}; give each method one baseline")
        b = names.pop() if names else None
        if b is not None and b not in methods:
            raise MkdError(f"method {m!r} names baseline {b!r}, which has no runs; methods present: {methods}")
        out[m] = b
    return out


def _check_columns(runs: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise MkdError(f"runs table lacks columns {missing}; it has {list(runs.columns)}")


def _numeric(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """A copy with the metric columns as floats (``None`` / text from JSON become NaN)."""
    runs = runs.copy()
    for k in metrics:
        runs[k] = pd.to_numeric(runs[k], errors="coerce").astype(float)
    return runs


def summary_table(
    runs: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    method: str = "method",
    baseline: str = "baseline",
    seed: str = "seed",
) -> pd.DataFrame:
    """Rows = method (in order of first appearance); per metric mean, std over seeds and % change.

    Args:
        runs: tidy runs table (see the module docstring). Several rows with the same method
            and seed (e.g. one per test volume) are first averaged per seed.
        metrics: metric columns to summarise.
        method: column naming the method.
        baseline: column naming each method's baseline method (blank for baselines). If the
            column is absent, no % change is computed.
        seed: column naming the seed.

    Returns:
        Columns ``method, baseline, n_seeds`` then ``<m>_mean, <m>_std, <m>_change_pct`` per
        metric. ``std`` is the sample std (ddof 1; NaN for one seed). ``change_pct`` is
        ``100 * (mean - baseline_mean) / baseline_mean`` (ratio of means over seeds), NaN for
        baselines.

    Raises:
        MkdError: a column is missing, a method names an absent baseline or several baselines.
    """
    _check_columns(runs, [method, seed, *metrics])
    runs = _numeric(runs, metrics)
    base_of = _baselines(runs, method, baseline)
    per_seed = runs.groupby([method, seed], sort=False, dropna=False)[list(metrics)].mean()
    rows = []
    means: dict[str, pd.Series] = {}
    for m in base_of:
        block = per_seed.loc[m]
        means[m] = block.mean()
        row: dict[str, Any] = {"method": m, "baseline": base_of[m], "n_seeds": int(len(block))}
        for k in metrics:
            row[f"{k}_mean"] = float(block[k].mean())
            row[f"{k}_std"] = float(block[k].std(ddof=1)) if len(block) > 1 else math.nan
        rows.append(row)
    for row in rows:
        b = row["baseline"]
        for k in metrics:
            ref = means[b][k] if b is not None else math.nan
            row[f"{k}_change_pct"] = 100.0 * (row[f"{k}_mean"] - ref) / ref if b is not None and ref != 0 else math.nan
    columns = ["method", "baseline", "n_seeds"] + [f"{k}_{s}" for k in metrics for s in ("mean", "std", "change_pct")]
    return pd.DataFrame(rows, columns=columns)


def gap_table(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("dice", "volume_dice"),
    *,
    method: str = "method",
    baseline: str = "baseline",
    teacher: str = "teacher_method",
    seed: str = "seed",
) -> pd.DataFrame:
    """How much of the teacher-student gap each distilled method recovers: ``(KD - S) / (T - S)``.

    ``KD``, ``S`` and ``T`` are the means over seeds of the method, its baseline student and
    its teacher. 0 is no gain over the baseline, 1 reaches the teacher; it is NaN when the
    teacher is not better than the baseline (no gap to recover).

    Args:
        runs: tidy runs table with a ``teacher`` column naming each distilled method's teacher
            method (blank for teachers and baselines).
        metrics: metric columns.
        method, baseline, teacher, seed: column names.

    Returns:
        One row per method with a baseline and a teacher: ``method, baseline, teacher, n_seeds``
        and ``<m>_kd, <m>_baseline, <m>_teacher, <m>_recovered`` per metric.

    Example:
        >>> runs = pd.DataFrame({"method": ["T", "S", "KD"], "baseline": [None, None, "S"],
        ...                      "teacher_method": [None, None, "T"], "seed": [0, 0, 0],
        ...                      "dice": [0.9, 0.7, 0.8]})
        >>> round(float(gap_table(runs, ["dice"])["dice_recovered"][0]), 3)
        0.5
    """
    _check_columns(runs, [method, seed, *metrics])
    runs = _numeric(runs, metrics)
    means = runs.groupby([method, seed], sort=False)[list(metrics)].mean().groupby(level=0, sort=False).mean()
    rows = []
    for m, block in runs.groupby(method, sort=False):
        b = next((v for v in block.get(baseline, []) if not _is_blank(v)), None)
        t = next((v for v in block.get(teacher, []) if not _is_blank(v)), None)
        if b is None or t is None or b not in means.index or t not in means.index:
            continue
        row: dict[str, Any] = {"method": m, "baseline": b, "teacher": t, "n_seeds": int(block[seed].nunique())}
        for k in metrics:
            kd, base, top = (float(means.loc[x, k]) for x in (m, b, t))
            row[f"{k}_kd"], row[f"{k}_baseline"], row[f"{k}_teacher"] = kd, base, top
            row[f"{k}_recovered"] = (kd - base) / (top - base) if top > base else math.nan
        rows.append(row)
    columns = ["method", "baseline", "teacher", "n_seeds"] + [
        f"{k}_{s}" for k in metrics for s in ("kd", "baseline", "teacher", "recovered")
    ]
    return pd.DataFrame(rows, columns=columns)


def _metrics_of(summary: pd.DataFrame) -> list[str]:
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]


def format_table(summary: pd.DataFrame, digits: int = 3, change_digits: int = 1) -> pd.DataFrame:
    """Strings for display: one column per metric, ``"0.772 ± 0.010 (+3.9%)"``.

    The ``± std`` part is left out for a single seed, the ``(%)`` part for baselines.

    Args:
        summary: output of :func:`summary_table`.
        digits: decimals of mean and std.
        change_digits: decimals of the % change.

    Returns:
        Columns ``method, baseline, n_seeds`` and one per metric.
    """
    out = pd.DataFrame({"method": summary["method"], "baseline": summary["baseline"], "n_seeds": summary["n_seeds"]})
    out["baseline"] = out["baseline"].map(lambda v: "" if _is_blank(v) else v)
    for k in _metrics_of(summary):
        cells = []
        for mean, std, change in zip(summary[f"{k}_mean"], summary[f"{k}_std"], summary[f"{k}_change_pct"]):
            text = "nan" if not np.isfinite(mean) else f"{mean:.{digits}f}"
            if np.isfinite(std):
                text += f" ± {std:.{digits}f}"
            if np.isfinite(change):
                text += f" ({change:+.{change_digits}f}%)"
            cells.append(text)
        out[k] = cells
    return out


def significance_table(
    runs: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    pair_on: str | Sequence[str] = "seed",
    method: str = "method",
    baseline: str = "baseline",
    test: str = "auto",
    alternative: str = "two-sided",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired test of every method against its baseline, per metric.

    Each method's rows are averaged within ``pair_on`` groups, then joined with its
    baseline's on ``pair_on``: ``pair_on="seed"`` on a table of runs pairs seeds;
    ``pair_on="patient"`` on a table of per-volume rows (method, seed, patient, ...)
    averages each volume over seeds and pairs volumes.

    Args:
        runs: tidy table (see the module docstring).
        metrics: metric columns to test.
        pair_on: column(s) that identify a pair.
        method: method column.
        baseline: baseline column.
        test, alternative, confidence, n_resamples, seed: see :func:`mkd.reports.stats.paired_test`.

    Returns:
        One row per (method with a baseline, metric): ``method, baseline, metric, n,
        mean_method, mean_baseline, mean_diff, ci_low, ci_high, test, pvalue, pvalue_holm,
        t_pvalue, wilcoxon_pvalue``. ``pvalue_holm`` is Holm-corrected over the methods
        compared on the same metric.
    """
    keys = [pair_on] if isinstance(pair_on, str) else list(pair_on)
    _check_columns(runs, [method, *keys, *metrics])
    runs = _numeric(runs, metrics)
    base_of = _baselines(runs, method, baseline)
    grouped = runs.groupby([method, *keys], sort=False, dropna=False)[list(metrics)].mean()
    rows = []
    for m, b in base_of.items():
        if b is None:
            continue
        joined = grouped.loc[m].join(grouped.loc[b], how="inner", lsuffix="_m", rsuffix="_b")
        for k in metrics:
            r = paired_test(
                joined[f"{k}_m"].to_numpy(),
                joined[f"{k}_b"].to_numpy(),
                test=test,
                alternative=alternative,
                confidence=confidence,
                n_resamples=n_resamples,
                seed=seed,
            )
            rows.append({"method": m, "baseline": b, "metric": k, **r})
    columns = ["method", "baseline", "metric", "n", "mean_method", "mean_baseline", "mean_diff", "ci_low", "ci_high"]
    columns += ["test", "pvalue", "pvalue_holm", "t_pvalue", "wilcoxon_pvalue"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=columns)
    df["pvalue_holm"] = np.nan
    for _, idx in df.groupby("metric", sort=False).groups.items():
        df.loc[idx, "pvalue_holm"] = holm(df.loc[idx, "pvalue"].to_numpy())
    return df[columns]


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no index); floats rounded to ``digits``, NaN as blank."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.{digits}f}"
        if _is_blank(v):
            return ""
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    table: pd.DataFrame,
    path: str | PathLike,
    markdown: pd.DataFrame | None = None,
    digits: int = 3,
) -> dict[str, Path]:
    """Write ``<path>.csv`` (``table`` at full precision) and ``<path>.md``, each atomically.

    Args:
        table: the numeric table (e.g. :func:`summary_table`).
        path: output path; a ``.csv`` or ``.md`` suffix is replaced.
        markdown: what the Markdown file shows (e.g. :func:`format_table` of ``table``);
            default ``table`` with floats rounded to ``digits``.
        digits: decimals in the default Markdown.

    Returns:
        ``{"csv": path, "markdown": path}``.
    """
    from mkd.utils import atomic_file

    stem = Path(path)
    if stem.suffix in (".csv", ".md"):
        stem = stem.with_suffix("")
    paths = {"csv": stem.with_name(stem.name + ".csv"), "markdown": stem.with_name(stem.name + ".md")}
    with atomic_file(paths["csv"]) as fh:
        table.to_csv(fh, index=False)
    with atomic_file(paths["markdown"]) as fh:
        fh.write(to_markdown(table if markdown is None else markdown, digits=digits))
    return paths
