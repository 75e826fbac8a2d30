"""Paired significance of a method against its baseline: t-test, Wilcoxon, bootstrap CI, Holm.

Pairs are seeds (same seed, same data split, method vs baseline student) or test volumes
(same patient, metric averaged over seeds). Which test is *reported* (``"auto"``):

- fewer than 6 pairs (the usual 3-5 seeds): the **paired t-test**. The exact two-sided
  Wilcoxon signed-rank test cannot go below ``2 / 2**n`` (0.0625 at n = 5), so it could
  never flag a difference; the t-test can, at the price of assuming roughly normal
  differences.
- 6 pairs or more (test volumes): the **Wilcoxon signed-rank test**, which does not assume
  normality; per-volume Dice differences are bounded and skewed by the odd failed volume.

Both p-values are always returned. The effect size is the mean paired difference with a
seeded percentile-bootstrap confidence interval. See ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "paired_test", "holm", "WILCOXON_MIN_PAIRS"]

#: with at least this many pairs ``test="auto"`` reports the Wilcoxon signed-rank test.
WILCOXON_MIN_PAIRS = 6


def _pairs(method: Sequence[float], baseline: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(method, dtype=np.float64).reshape(-1)
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} (method) and {b.size} (baseline)")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (e.g. paired differences).

    :func:`scipy.stats.bootstrap` with ``method="percentile"``.

    Args:
        values: the sample; non-finite values are dropped.
        confidence: coverage of the interval, in (0, 1).
        n_resamples: number of resamples with replacement.
        seed: seed of the NumPy generator, so the interval is repeatable.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for an empty sample.

    Example:
        >>> bootstrap_ci([0.02, 0.02, 0.02])
        (0.02, 0.02)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    from scipy.stats import bootstrap

    res = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))  # fmt: skip
    low, high = res.confidence_interval
    # a constant sample gives a degenerate interval; keep it exactly at the value.
    low, high = min(float(low), float(v.mean())), max(float(high), float(v.mean()))
    return (low, high)


def paired_test(
    method: Sequence[float],
    baseline: Sequence[float],
    test: str = "auto",
    alternative: str = "two-sided",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare paired samples (method vs its baseline, same seeds or same test volumes).

    Args:
        method: the method's metric per pair (e.g. per seed).
        baseline: the baseline's metric for the same pairs, same order. Pairs with a
            non-finite value on either side are dropped.
        test: which p-value to report as ``pvalue``: ``"ttest"`` (paired t-test),
            ``"wilcoxon"`` (signed-rank) or ``"auto"`` (Wilcoxon when there are at least
            :data:`WILCOXON_MIN_PAIRS` pairs, else the t-test; see the module docstring).
        alternative: ``"two-sided"``, ``"greater"`` (method > baseline) or ``"less"``.
        confidence: coverage of the bootstrap interval.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        A plain dict: ``n, mean_method, mean_baseline, mean_diff, ci_low, ci_high,
        confidence, t_statistic, t_pvalue, wilcoxon_statistic, wilcoxon_pvalue, test,
        pvalue``. Differences are ``method - baseline``. Values that cannot be computed
        (fewer than 2 pairs, all differences zero) are NaN.
    """
    if test not in ("auto", "ttest", "wilcoxon"):
        raise ValueError(f"test must be 'auto', 'ttest' or 'wilcoxon', got {test!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    from scipy import stats

    a, b = _pairs(method, baseline)
    d = a - b
    n = int(d.size)
    t_stat = t_p = w_stat = w_p = math.nan
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if np.ptp(d) > 0:
                r = stats.ttest_rel(a, b, alternative=alternative)
                t_stat, t_p = float(r.statistic), float(r.pvalue)
            elif d[0] != 0:  # a constant, non-zero shift: the difference is certain
                t_stat, t_p = math.copysign(math.inf, d[0]), 0.0
                if (alternative == "greater" and d[0] < 0) or (alternative == "less" and d[0] > 0):
                    t_p = 1.0
            if np.any(d != 0):
                r = stats.wilcoxon(a, b, alternative=alternative)
                w_stat, w_p = float(r.statistic), float(r.pvalue)
    reported = test if test != "auto" else ("wilcoxon" if n >= WILCOXON_MIN_PAIRS else "ttest")
    low, high = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {
        "n": n,
        "mean_method": float(a.mean()) if n else math.nan,
        "mean_baseline": float(b.mean()) if n else math.nan,
        "mean_diff": float(d.mean()) if n else math.nan,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "t_statistic": t_stat,
        "t_pvalue": t_p,
        "wilcoxon_statistic": w_stat,
        "wilcoxon_pvalue": w_p,
        "test": reported,
        "pvalue": t_p if reported == "ttest" else w_p,
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in input order.

    NaN p-values stay NaN and do not count towards the number of tests.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return [float(round(v, 12)) if np.isfinite(v) else math.nan for v in out]
