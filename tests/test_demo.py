"""mkd demo end to end on a small phantom with tiny settings: every step runs and the table is printed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mkd.cli import cli


@pytest.mark.slow
def test_demo_runs_every_step_and_prints_the_comparison(tmp_path, monkeypatch):
    import mkd.demo

    tiny = {"image_size": [32, 32], "network_preset": "tiny", "batch_size": 8}
    real = mkd.demo.run_demo

    def small_demo(out, **kwargs):  # the CLI's demo, on 6 small cases and tiny networks
        return real(out, cases=6, overrides=tiny, **kwargs)

    monkeypatch.setattr(mkd.demo, "run_demo", small_demo)
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1"])
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in (out / "runs").iterdir() if (p / "run.json").is_file())
    assert runs == [
        "distill-s1-t1-bn+pmd-contrastive-f0.5-pseudo-transfer-seed0",
        "student-s1-f0.5-seed0",
        "teacher-t1-seed0",
    ]
    for run in runs:  # every model was evaluated on the test patients
        summary = json.loads((out / "runs" / run / "eval" / "test" / "summary.json").read_text())
        assert summary["split"] == "test"
    for label in ("S1", "KD(T1,S1) B+PMD (pseudo recipe) +transfer", "n_seeds"):
        assert label in result.output
    assert "figure: " in result.output and "demo finished in" in result.output
    steps = json.loads((out / "demo.json").read_text())["steps"]
    assert len(steps) == 4 and all(v >= 0 for v in steps.values())
    # a second run refuses to overwrite without --overwrite
    again = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output
