"""``mkd report`` on a fake runs folder with known numbers: tables, % change, paired tests, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from mkd.cli import cli
from mkd.errors import MkdError
from mkd.reports import build_report, collect_runs

SEEDS = (0, 1, 2)
PATIENTS = ("spleen_2", "spleen_4", "spleen_7")
# pooled test Dice per seed, and per-volume Dice per (seed, patient): known numbers
DICE = {"S1": (0.70, 0.72, 0.74), "KD(T1,S1) B": (0.76, 0.77, 0.81), "KD(T1,S1) E": (0.71, 0.75, 0.74)}
VOLUME_SHIFT = {"S1": 0.0, "KD(T1,S1) B": 0.05, "KD(T1,S1) E": 0.01}
IDS = {"S1": "student-s1-f0.5", "KD(T1,S1) B": "distill-s1-t1-bn-contrastive-f0.5",
       "KD(T1,S1) E": "distill-s1-t1-enc-contrastive-f0.5"}  # fmt: skip


def _volume_dice(method: str, seed: int, i: int) -> float:
    return 0.6 + 0.1 * i + 0.01 * seed + VOLUME_SHIFT[method] + (0.004 * i * seed if method != "S1" else 0.0)


def _write_run(root: Path, method: str, seed: int) -> Path:
    run_id = f"{IDS[method]}-seed{seed}"
    d = root / run_id
    (d / "eval" / "test").mkdir(parents=True)
    kind = "student" if method == "S1" else "distill"
    info = {"id": run_id, "kind": kind, "method": method, "arch": "s1",
            "teacher": None if kind == "student" else "teacher-t1-seed0", "teacher_arch": None if kind == "student"
            else "t1", "scales": [] if kind == "student" else ["bn" if method.endswith("B") else "enc"],
            "loss": None if kind == "student" else "contrastive", "pmd": False, "mode": None, "data_fraction": 0.5,
            "seed": seed, "profile": "cpu", "baseline": None if kind == "student" else f"student-s1-f0.5-seed{seed}",
            "settings": {}, "groups": ["4.3 test table"]}  # fmt: skip
    (d / "run.json").write_text(json.dumps(info))
    dice = DICE[method][seed]
    iou = dice / (2 - dice)
    vols = [_volume_dice(method, seed, i) for i in range(len(PATIENTS))]
    summary = {
        "pooled": {"iou": iou, "dice": dice, "recall": dice - 0.02, "precision": dice + 0.03},
        "per_volume": {"dice": {"mean": float(np.mean(vols)), "std": 0.0, "n": 3},
                       "iou": {"mean": float(np.mean([v / (2 - v) for v in vols])), "std": 0.0, "n": 3},
                       "hd95": {"mean": 10.0 - 10 * dice, "std": 0.0, "n": 3}},
        "data": str(root / "no_such_data"),
    }  # fmt: skip
    (d / "eval" / "test" / "summary.json").write_text(json.dumps(summary))
    per_volume = {
        "patient": PATIENTS,
        "dice": vols,
        "iou": [v / (2 - v) for v in vols],
        "hd95": [5.0 - v for v in vols],
    }
    pd.DataFrame(per_volume).to_csv(d / "eval" / "test" / "per_volume.csv", index=False)
    log = {
        "epoch": [1, 2, 3],
        "train_loss": [0.9, 0.6, 0.5],
        "val_pooled_dice": [0.3 + seed * 0.01, dice - 0.1, dice - 0.05],
    }
    pd.DataFrame(log).to_csv(d / "metrics.csv", index=False)
    (d / "summary.json").write_text(json.dumps({"best_epoch": 3, "best_val_pooled_dice": dice - 0.05, "epochs": 3}))
    return d


@pytest.fixture
def fake_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for method in DICE:
        for seed in SEEDS:
            _write_run(root, method, seed)
    (root / "half-finished").mkdir()  # no run.json / eval: not collected
    (root / "half-finished" / "run.json").write_text("{}")
    return root


def test_collect_runs_one_row_per_finished_run(fake_runs):
    runs = collect_runs(fake_runs)
    assert len(runs) == 9
    assert list(runs["kind"][:3]) == ["student"] * 3  # baselines before distillation runs
    kd = runs[runs["run_id"] == "distill-s1-t1-bn-contrastive-f0.5-seed1"].iloc[0]
    assert kd["baseline"] == "S1" and kd["baseline_run"] == "student-s1-f0.5-seed1"
    assert kd["dice"] == pytest.approx(0.77) and kd["scales"] == "bn"
    assert kd["best_val_pooled_dice"] == pytest.approx(0.72) and kd["epochs"] == 3
    assert kd["volume_dice"] == pytest.approx(np.mean([_volume_dice("KD(T1,S1) B", 1, i) for i in range(3)]))


def test_report_tables_numbers_by_hand(fake_runs, tmp_path):
    out = tmp_path / "report"
    result = build_report(fake_runs, out, n_resamples=2000)
    s = result.frames["summary"].set_index("method")
    assert list(s.index) == ["S1", "KD(T1,S1) B", "KD(T1,S1) E"]
    # mean and sample std over seeds, % change of the mean against S1's mean
    assert s.loc["KD(T1,S1) B", "dice_mean"] == pytest.approx((0.76 + 0.77 + 0.81) / 3)
    assert s.loc["KD(T1,S1) B", "dice_std"] == pytest.approx(np.std([0.76, 0.77, 0.81], ddof=1))
    assert s.loc["KD(T1,S1) B", "dice_change_pct"] == pytest.approx(100 * (0.78 - 0.72) / 0.72)
    assert np.isnan(s.loc["S1", "dice_change_pct"])
    assert s.loc["KD(T1,S1) E", "precision_mean"] == pytest.approx(0.7333333 + 0.03)

    # seed-paired test = scipy's paired t-test on the per-seed pooled Dice
    sig = result.frames["significance_seeds"].set_index(["method", "metric"])
    row = sig.loc[("KD(T1,S1) B", "dice")]
    assert row["test"] == "ttest" and row["n"] == 3
    assert row["pvalue"] == pytest.approx(stats.ttest_rel(DICE["KD(T1,S1) B"], DICE["S1"]).pvalue)
    assert row["mean_diff"] == pytest.approx(0.06) and row["ci_low"] <= 0.06 <= row["ci_high"]
    assert {"pvalue_holm", "t_pvalue", "wilcoxon_pvalue"} <= set(sig.columns)
    # volume-paired test: each volume averaged over seeds, then paired by patient
    vsig = result.frames["significance_volumes"].set_index(["method", "metric"])
    a = [np.mean([_volume_dice("KD(T1,S1) E", s_, i) for s_ in SEEDS]) for i in range(3)]
    b = [np.mean([_volume_dice("S1", s_, i) for s_ in SEEDS]) for i in range(3)]
    assert vsig.loc[("KD(T1,S1) E", "dice"), "pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert vsig.loc[("KD(T1,S1) E", "dice"), "n"] == 3

    # per-volume table
    v = result.frames["volume"].set_index("method")
    expected = np.mean([_volume_dice("KD(T1,S1) B", s_, i) for s_ in SEEDS for i in range(3)])
    assert v.loc["KD(T1,S1) B", "volume_dice_mean"] == pytest.approx(expected)

    # Markdown: formatted cells, the p column and a footnote naming the test
    assert "0.780 ± 0.026 (+8.3%)" in result.markdown
    assert "p dice (seeds)" in result.markdown and "paired t-test" in result.markdown
    md = (out / "summary.md").read_text()
    assert md == result.markdown
    # files: tables, figures; qualitative panels skipped with a note (no data, no checkpoints)
    for name in ("summary.csv", "volume.csv", "volume.md", "significance_seeds.csv", "significance_volumes.csv",
                 "runs.csv", "per_volume.csv", "report.md", "group:4.3 test table.csv"):  # fmt: skip
        assert result.files[name].is_file(), name
    pngs = {p.name for p in result.figures}
    assert {"ablation_dice_S1.png", "val_dice_S1.png", "S1.png", "KD_T1_S1_B.png"} <= pngs
    for p in result.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("qualitative panels skipped" in n for n in result.notes)
    assert result["markdown"] == result.markdown and result.get("figures") == result.figures
    assert result.tables[0] == out / "summary.csv" and all(p.is_file() for p in result.tables)
    assert pd.read_csv(out / "summary.csv")["dice_mean"].iloc[0] == pytest.approx(0.72)
    assert not list(out.parent.glob(".report.tmp-*"))  # built atomically


def test_report_baseline_override_and_errors(fake_runs, tmp_path):
    result = build_report(fake_runs, tmp_path / "r", baseline="KD(T1,S1) E", figures=False)
    s = result.frames["summary"].set_index("method")
    assert s.loc["KD(T1,S1) B", "baseline"] == "KD(T1,S1) E"
    assert s.loc["S1", "dice_change_pct"] == pytest.approx(100 * (0.72 - 0.7333333) / 0.7333333, rel=1e-5)
    with pytest.raises(MkdError, match="not a method"):
        build_report(fake_runs, tmp_path / "r2", baseline="nope", figures=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MkdError, match="no finished runs"):
        build_report(tmp_path / "empty")


def test_report_cli_prints_the_table(fake_runs):
    res = CliRunner().invoke(cli, ["report", str(fake_runs), "--no-qualitative"])
    assert res.exit_code == 0, res.output
    assert "| KD(T1,S1) B | S1 | 3 |" in res.output
    assert (fake_runs / "report" / "summary.md").is_file()
    res = CliRunner().invoke(cli, ["report", str(fake_runs / "nothing")])
    assert res.exit_code == 1 and "runs folder not found" in res.output


def test_report_of_an_external_evaluation_reads_eval_name_not_the_test_split(fake_runs, tmp_path):
    """``--evaluation NAME``: each run's ``eval/NAME/`` (an external test set), its numbers, not ``eval/test``."""
    ext_dice = {"S1": (0.50, 0.52, 0.54), "KD(T1,S1) B": (0.60, 0.62, 0.64), "KD(T1,S1) E": (0.51, 0.53, 0.55)}
    for method, values in ext_dice.items():
        for seed in SEEDS:
            if method == "KD(T1,S1) E" and seed == 2:
                continue  # not evaluated on the external set: left out, and said so
            d = fake_runs / f"{IDS[method]}-seed{seed}"
            (d / "eval" / "external").mkdir()
            summary = json.loads((d / "eval" / "test" / "summary.json").read_text())
            summary["pooled"]["dice"] = values[seed]
            summary["data"] = str(tmp_path / "external_data")
            (d / "eval" / "external" / "summary.json").write_text(json.dumps(summary))
            pv = pd.read_csv(d / "eval" / "test" / "per_volume.csv")
            pv["dice"] = [values[seed] - 0.1 * i for i in range(len(pv))]
            pv.to_csv(d / "eval" / "external" / "per_volume.csv", index=False)
    result = build_report(fake_runs, tmp_path / "ext", evaluation="external", figures=False, n_resamples=200)
    s = result.frames["summary"].set_index("method")
    assert s.loc["KD(T1,S1) B", "dice_mean"] == pytest.approx(0.62)
    assert s.loc["KD(T1,S1) E", "n_seeds"] == 2 and s.loc["KD(T1,S1) E", "dice_mean"] == pytest.approx(0.52)
    assert result.left_out == {
        "distill-s1-t1-enc-contrastive-f0.5-seed2":
            "no eval/external/summary.json (mkd evaluate --output RUN/eval/external writes it)",
        "half-finished": "training not finished (no models/model.pt)",
    }  # fmt: skip
    # volume pairs come from eval/external/per_volume.csv: KD B - S1 is +0.10 on every volume
    vsig = result.frames["significance_volumes"].set_index(["method", "metric"])
    assert vsig.loc[("KD(T1,S1) B", "dice"), "mean_diff"] == pytest.approx(0.10)
    page = (tmp_path / "ext" / "report.md").read_text()
    assert f"eval/external/` (its evaluation named 'external', data {tmp_path / 'external_data'})" in page
    # the default is still the run's own test split
    assert build_report(fake_runs, tmp_path / "own", figures=False, n_resamples=200).frames["summary"].set_index(
        "method"
    ).loc["KD(T1,S1) B", "dice_mean"] == pytest.approx((0.76 + 0.77 + 0.81) / 3)
    res = CliRunner().invoke(cli, ["report", str(fake_runs), "--evaluation", "../test", "--no-figures"])
    assert res.exit_code == 1
    assert "Error: --evaluation '../test': expected the name of one folder under RUN/eval/" in res.output


def test_report_of_one_grid_in_a_shared_runs_folder(fake_runs, tmp_path):
    """``only`` (``mkd report --grid``) keeps the listed runs: here seed 2 of every method is left out."""
    keep = [f"{IDS[m]}-seed{s}" for m in DICE for s in (0, 1)]
    result = build_report(fake_runs, tmp_path / "report", only=keep, figures=False, n_resamples=200)
    s = result.frames["summary"].set_index("method")
    assert set(result.runs["seed"]) == {0, 1} and (s["n_seeds"] == 2).all()
    assert s.loc["KD(T1,S1) B", "dice_mean"] == pytest.approx((0.76 + 0.77) / 2)


def test_report_says_which_runs_it_left_out_and_why(fake_runs, tmp_path):
    """A run without its evaluation dropped silently: fewer seeds, no note (issue 12, case 8)."""
    import shutil

    shutil.rmtree(fake_runs / "distill-s1-t1-bn-contrastive-f0.5-seed2" / "eval")
    (fake_runs / "distill-s1-t1-bn-contrastive-f0.5-seed2" / "models").mkdir()
    (fake_runs / "distill-s1-t1-bn-contrastive-f0.5-seed2" / "models" / "model.pt").write_bytes(b"weights")
    (fake_runs / "teacher-by-hand" / "models").mkdir(parents=True)  # `mkd teacher --output runs/...`
    (fake_runs / "teacher-by-hand" / "models" / "model.pt").write_bytes(b"weights")
    (fake_runs / "notes").mkdir()  # not a run: not listed
    expected = {
        "distill-s1-t1-bn-contrastive-f0.5-seed2": "evaluation missing (no eval/test/summary.json); "
        "mkd ablate on this runs folder evaluates it",
        "half-finished": "training not finished (no models/model.pt)",
        "teacher-by-hand": "no run.json (not a run of mkd ablate, so its method and seed are unknown)",
    }
    res = CliRunner().invoke(cli, ["report", str(fake_runs), "--no-figures", "--output", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "| KD(T1,S1) B | S1 | 2 |" in res.output  # two seeds left of three
    for run, why in expected.items():
        assert f"left out: {run}: {why}" in res.output
    assert "9 runs" not in res.output and "8 runs, 3 left out; report in" in res.output
    page = (tmp_path / "r" / "report.md").read_text()
    assert "8 finished runs, 3 methods, seeds [0, 1, 2]; 3 run(s) left out (see below)." in page
    assert "## Runs left out\n\n" + "\n".join(f"- {k}: {v}" for k, v in expected.items()) in page
    table = pd.read_csv(tmp_path / "r" / "left_out.csv")
    assert dict(zip(table["run"], table["reason"])) == expected
    only = build_report(fake_runs, tmp_path / "r2", only=[f"{IDS['S1']}-seed0", "half-finished"], figures=False,
                        n_resamples=100)  # fmt: skip
    assert only.left_out == {"half-finished": expected["half-finished"]}  # runs outside --grid are not listed


def test_volume_table_shows_the_largest_component_metrics_when_evaluated(fake_runs, tmp_path):
    """Evaluations with ``per_volume_lcc`` (mkd evaluate on a single-organ network) add *_lcc columns."""
    assert "volume_hd95_lcc_mean" not in build_report(fake_runs, tmp_path / "plain", figures=False).frames["volume"]
    for summary_path in fake_runs.glob("*/eval/test/summary.json"):
        summary = json.loads(summary_path.read_text())
        seed = json.loads((summary_path.parents[2] / "run.json").read_text())["seed"]
        summary["per_volume_lcc"] = {"dice": {"mean": 0.9 + 0.01 * seed, "std": 0.0, "n": 3},
                                     "hd95": {"mean": 2.0 * (seed + 1), "std": 0.0, "n": 3}}  # fmt: skip
        summary_path.write_text(json.dumps(summary))
    result = build_report(fake_runs, tmp_path / "lcc", figures=False)
    v = result.frames["volume"].set_index("method")
    assert v.loc["S1", "volume_hd95_lcc_mean"] == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    assert v.loc["KD(T1,S1) B", "volume_dice_lcc_mean"] == pytest.approx(0.91)
    header = (tmp_path / "lcc" / "volume.md").read_text().splitlines()[0]
    assert "volume_dice_lcc" in header and "volume_hd95_lcc" in header


def test_the_end_of_a_validation_curve_says_whether_training_converged(tmp_path):
    from mkd.reports.report import convergence_table, curve_end_change

    path = tmp_path / "metrics.csv"
    curve = [0.5, 0.7, 0.80, 0.82, 0.84, 0.85, 0.85, 0.86]
    path.write_text("epoch,val_pooled_dice\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(curve)))
    # last 3: (0.85 + 0.85 + 0.86) / 3 = 0.853333; the 3 before: (0.80 + 0.82 + 0.84) / 3 = 0.82
    assert curve_end_change(path) == pytest.approx(0.0333333, abs=1e-6)
    assert curve_end_change(path, window=4) == pytest.approx(
        (0.84 + 0.85 + 0.85 + 0.86) / 4 - (0.5 + 0.7 + 0.8 + 0.82) / 4
    )
    path.write_text("epoch,val_pooled_dice\n1,0.5\n2,0.6\n")
    assert curve_end_change(path) is None  # too short to tell
    assert curve_end_change(tmp_path / "missing.csv") is None
    path.write_text("")
    assert curve_end_change(path) is None
    runs = pd.DataFrame({"method": ["S1", "S1", "KD"], "epochs": [15, 15, 15], "best_epoch": [14, 15, 13],
                         "val_last_change": [0.001, 0.003, -0.002]})  # fmt: skip
    table = convergence_table(runs)
    assert table["method"].tolist() == ["S1", "KD"] and table["best epoch"].tolist() == ["14, 15", "13"]
    assert table.iloc[0]["val Dice, last 3 epochs - 3 before"] == "+0.0020 ± 0.0014"


def test_the_panels_refuse_a_network_whose_output_is_not_finite_as_evaluate_does(tiny_prepared, tmp_path):
    """The qualitative panels drew a diverged network's NaN output as an empty mask; mkd evaluate refused it."""
    import re

    import torch

    from mkd.networks import build, save_checkpoint
    from mkd.reports.report import _pick_slices, _predict

    torch.manual_seed(0)
    net = build("s1")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1e30)  # finite weights (load_network accepts them), an overflowing output
    ckpt = save_checkpoint(tmp_path / "big.pt", net, run={"image_size": [32, 32]})
    items = _pick_slices(tiny_prepared, 2)
    with pytest.raises(MkdError) as err:
        _predict(ckpt, items, [64, 64], "cpu")
    patients = ", ".join(sorted({d["patient"] for d in items}))
    assert re.fullmatch(
        rf"{re.escape(str(ckpt))}: the network's output holds \d+ NaN or infinite value\(s\) of {2 * 32 * 32} "
        rf"\(test slices of {patients}\); its weights are broken \(a diverged run\?\): retrain it or use an "
        "earlier checkpoint",
        str(err.value),
    ), str(err.value)
