"""Thesis-style tables on a small fake runs table, numbers checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mkd.errors import MkdError
from mkd.reports import format_table, paired_test, significance_table, summary_table, to_markdown, write_table


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        [
            # method, baseline, seed, iou, dice
            ("s1", None, 0, 0.50, 0.70),
            ("s1", None, 1, 0.60, 0.72),
            ("kd", "s1", 0, 0.60, 0.76),
            ("kd", "s1", 1, 0.61, 0.78),
            ("kd_mse", "s1", 0, 0.55, 0.71),
            ("kd_mse", "s1", 1, 0.45, None),  # a missing value (null in a JSON summary)
        ],
        columns=["method", "baseline", "seed", "iou", "dice"],
    )


def test_summary_table_by_hand():
    t = summary_table(_runs(), metrics=("iou", "dice")).set_index("method")
    assert list(t.index) == ["s1", "kd", "kd_mse"]
    assert t.loc["kd", "dice_mean"] == pytest.approx(0.77)
    assert t.loc["s1", "dice_std"] == pytest.approx(math.sqrt(2 * 0.01**2))  # sample std of 0.70, 0.72
    assert t.loc["kd", "dice_change_pct"] == pytest.approx(100 * (0.77 - 0.71) / 0.71)  # +8.45 %
    assert t.loc["kd", "iou_change_pct"] == pytest.approx(100 * (0.605 - 0.55) / 0.55)  # +10.0 %
    assert t.loc["kd_mse", "iou_change_pct"] == pytest.approx(-9.0909, abs=1e-3)  # 0.50 vs 0.55
    assert t.loc["kd_mse", "dice_mean"] == pytest.approx(0.71) and math.isnan(t.loc["kd_mse", "dice_std"])
    assert math.isnan(t.loc["s1", "dice_change_pct"]) and t.loc["kd", "n_seeds"] == 2


def test_format_and_write(tmp_path):
    t = summary_table(_runs(), metrics=("iou", "dice"))
    f = format_table(t).set_index("method")
    assert f.loc["kd", "dice"] == "0.770 ± 0.014 (+8.5%)"
    assert f.loc["s1", "dice"] == "0.710 ± 0.014" and f.loc["kd_mse", "dice"] == "0.710 (+0.0%)"
    paths = write_table(t, tmp_path / "out" / "table4_2.csv", markdown=format_table(t))
    assert paths["csv"].name == "table4_2.csv" and paths["markdown"].name == "table4_2.md"
    back = pd.read_csv(paths["csv"])
    assert back["dice_mean"].tolist() == pytest.approx(t["dice_mean"].tolist())
    md = paths["markdown"].read_text()
    assert md.splitlines()[0] == "| method | baseline | n_seeds | iou | dice |"
    assert "| kd | s1 | 2 | 0.605 ± 0.007 (+10.0%) | 0.770 ± 0.014 (+8.5%) |" in md


def test_to_markdown_rounds_and_blanks():
    md = to_markdown(pd.DataFrame({"a": ["x|y"], "b": [1 / 3], "c": [np.nan]}))
    assert md.splitlines()[2] == "| x\\|y | 0.333 |  |"


def test_bad_baselines_raise():
    runs = _runs()
    runs.loc[runs.method == "kd", "baseline"] = "s9"
    with pytest.raises(MkdError, match="'s9', which has no runs"):
        summary_table(runs, metrics=("dice",))
    with pytest.raises(MkdError, match="lacks columns \\['recall'\\]"):
        summary_table(_runs(), metrics=("dice", "recall"))


def test_significance_over_seeds():
    sig = significance_table(_runs(), metrics=("iou", "dice"))
    assert sig[["method", "metric"]].values.tolist() == [
        ["kd", "iou"],
        ["kd", "dice"],
        ["kd_mse", "iou"],
        ["kd_mse", "dice"],
    ]
    row = sig.set_index(["method", "metric"]).loc[("kd", "dice")]
    ref = paired_test([0.76, 0.78], [0.70, 0.72])
    assert row["n"] == 2 and row["mean_diff"] == pytest.approx(0.06) and row["test"] == "ttest"
    assert row["ci_low"] == pytest.approx(ref["ci_low"]) and row["ci_high"] == pytest.approx(ref["ci_high"])
    assert sig.set_index(["method", "metric"]).loc[("kd_mse", "dice"), "n"] == 1  # seed 1 has no value


def test_significance_over_volumes_averages_seeds():
    rows = []
    for seed in (0, 1):
        for k, patient in enumerate(["p1", "p2", "p3", "p4", "p5", "p6"]):
            base = 0.6 + 0.05 * k
            rows.append(("s1", None, seed, patient, base))
            rows.append(("kd", "s1", seed, patient, base + 0.02 + 0.01 * k + (0.01 if seed else -0.01)))
    vols = pd.DataFrame(rows, columns=["method", "baseline", "seed", "patient", "dice"])
    r = significance_table(vols, metrics=("dice",), pair_on="patient").iloc[0]
    # per patient, averaged over the 2 seeds: differences 0.02 + 0.01 k, k = 0..5 -> mean 0.045
    assert r["n"] == 6 and r["mean_diff"] == pytest.approx(0.045)
    assert r["test"] == "wilcoxon" and r["pvalue"] == pytest.approx(2 / 2**6)  # exact, all 6 positive
    assert r["pvalue_holm"] == pytest.approx(r["pvalue"])


def test_gap_table_by_hand():
    from mkd.reports.tables import gap_table

    runs = pd.DataFrame({
        "method": ["T1", "S1", "S1", "KD", "KD", "KD bad"],
        "baseline": [None, None, None, "S1", "S1", "S1"],
        "teacher_method": [None, None, None, "T1", "T1", "T1"],
        "seed": [0, 0, 1, 0, 1, 0],
        "dice": [0.90, 0.70, 0.74, 0.80, 0.84, 0.60],
        "volume_dice": [0.88, 0.60, 0.60, 0.60, 0.62, 0.50],
    })  # fmt: skip
    gap = gap_table(runs).set_index("method")
    assert list(gap.index) == ["KD", "KD bad"]  # teachers and baselines have no row
    # KD: (0.82 - 0.72) / (0.90 - 0.72); volume: (0.61 - 0.60) / (0.88 - 0.60)
    assert gap.loc["KD", "dice_recovered"] == pytest.approx(0.10 / 0.18)
    assert gap.loc["KD", "volume_dice_recovered"] == pytest.approx(0.01 / 0.28)
    assert gap.loc["KD", "n_seeds"] == 2 and gap.loc["KD", "dice_teacher"] == pytest.approx(0.90)
    assert gap.loc["KD bad", "dice_recovered"] == pytest.approx((0.60 - 0.72) / 0.18)  # worse than the baseline: < 0
    weak = runs.assign(dice=[0.70, 0.70, 0.74, 0.80, 0.84, 0.60])  # teacher below its baseline: no gap to recover
    assert np.isnan(gap_table(weak, ["dice"]).set_index("method").loc["KD", "dice_recovered"])
