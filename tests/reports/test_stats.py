"""Paired tests, bootstrap intervals and Holm correction against hand values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mkd.reports import bootstrap_ci, holm, paired_test


def test_paired_ttest_by_hand_and_scipy():
    baseline = [0.70, 0.71, 0.72]
    method = [0.71, 0.73, 0.75]  # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01
    r = paired_test(method, baseline)
    # t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3, df 2; two-sided p = 1 - t / sqrt(t^2 + 2)
    t = 2 * math.sqrt(3)
    assert r["t_statistic"] == pytest.approx(t)
    assert r["t_pvalue"] == pytest.approx(1 - t / math.sqrt(t * t + 2))  # 0.0742
    assert r["t_pvalue"] == pytest.approx(stats.ttest_rel(method, baseline).pvalue)
    # exact Wilcoxon: all 3 differences positive, p = 2 / 2^3
    assert r["wilcoxon_pvalue"] == pytest.approx(0.25)
    assert r["test"] == "ttest" and r["pvalue"] == r["t_pvalue"]  # 3 seeds: t-test reported
    assert r["n"] == 3 and r["mean_diff"] == pytest.approx(0.02)
    assert r["mean_method"] == pytest.approx(0.73) and r["mean_baseline"] == pytest.approx(0.71)


def test_auto_switches_to_wilcoxon_for_many_pairs():
    rng = np.random.default_rng(1)
    b = rng.random(10)
    a = b + rng.normal(0.05, 0.05, 10)
    r = paired_test(a, b)
    assert r["test"] == "wilcoxon" and r["n"] == 10
    assert r["pvalue"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert paired_test(a, b, test="ttest")["pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_test(a, b, alternative="greater")["t_pvalue"] == pytest.approx(
        stats.ttest_rel(a, b, alternative="greater").pvalue
    )


def test_bootstrap_ci_contains_the_shift():
    b = np.linspace(0.5, 0.8, 8)
    r = paired_test(b + 0.03, b)  # constant shift
    assert r["ci_low"] == pytest.approx(0.03) and r["ci_high"] == pytest.approx(0.03)
    assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
    assert r["t_pvalue"] == 0.0
    noise = np.array([0.01, -0.01, 0.02, -0.02, 0.005, -0.005, 0.0, 0.0])  # mean exactly 0
    d = 0.03 + noise
    low, high = bootstrap_ci(d, seed=3)
    assert low < 0.03 < high and high - low < 0.03
    assert bootstrap_ci(d, seed=3) == (low, high)  # seeded: repeatable
    assert bootstrap_ci(d, confidence=0.5, seed=3)[1] - bootstrap_ci(d, confidence=0.5, seed=3)[0] < high - low


def test_degenerate_inputs():
    r = paired_test([0.5, 0.6], [0.5, 0.6])  # no difference at all
    assert math.isnan(r["t_pvalue"]) and math.isnan(r["wilcoxon_pvalue"]) and r["mean_diff"] == 0.0
    r = paired_test([0.5, float("nan"), 0.7], [0.4, 0.5, 0.6])  # NaN pair dropped
    assert r["n"] == 2
    assert math.isnan(paired_test([0.5], [0.4])["pvalue"])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1, 2], [1])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.2, float("nan"), 0.9])
    assert out[0] == pytest.approx(0.4) and math.isnan(out[1]) and out[2] == pytest.approx(0.9)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
