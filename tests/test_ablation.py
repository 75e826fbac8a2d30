"""``mkd ablate``: grid expansion, ids, dependency order, per-run commands, resumability."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mkd.ablation import (
    AblationResult,
    expand_grid,
    is_done,
    load_grid,
    plan_ablation,
    run_ablation,
    run_status,
    select_runs,
)
from mkd.cli import cli
from mkd.errors import MkdError

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "seeds": [0, 1],
    "settings": {"all": {"image_size": [32, 32]}, "teacher": {"network_preset": "tiny"}},
    "teachers": ["t1"],
    "students": ["s1", "s2"],
    "distill": [{"table": "4.3", "student": "s1", "scales": ["bn", "enc+bn"], "pmd": [False, True]}],
}


def test_expansion_counts_ids_and_order():
    grid = expand_grid(SMALL)
    # 1 teacher (fixed seed 0), 2 students x 1 fraction x 2 seeds, 2 scales x 2 pmd x 2 seeds
    assert grid.count() == {"teacher": 1, "student": 4, "distill": 8}
    ids = [r.id for r in grid.runs]
    assert ids[:5] == ["teacher-t1-seed0", "student-s1-f0.5-seed0", "student-s1-f0.5-seed1",
                       "student-s2-f0.5-seed0", "student-s2-f0.5-seed1"]  # fmt: skip
    # no recipe: the default one (pseudo), whose transfer set is on
    assert ids[5:9] == [
        "distill-s1-t1-bn-contrastive-f0.5-transfer-seed0",
        "distill-s1-t1-bn-contrastive-f0.5-transfer-seed1",
        "distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed0",
        "distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed1",
    ]
    assert "distill-s1-t1-bn+enc+pmd-contrastive-f0.5-transfer-seed1" in ids  # scales in the order bn, enc, dec
    kd = grid["distill-s1-t1-bn+enc+pmd-contrastive-f0.5-transfer-seed1"]
    assert kd.method == "KD(T1,S1) B+E+PMD +transfer" and kd.scales == ("bn", "enc") and kd.pmd and kd.transfer
    assert kd.teacher == "teacher-t1-seed0" and kd.baseline == "student-s1-f0.5-seed1"
    assert kd.settings == {"image_size": [32, 32]}  # not the teacher's network_preset
    assert grid["teacher-t1-seed0"].settings == {"image_size": [32, 32], "network_preset": "tiny"}
    # dependency order: every run comes after the run it needs
    position = {r.id: i for i, r in enumerate(grid.runs)}
    assert all(position[r.depends_on] < position[r.id] for r in grid.runs if r.depends_on)
    over = kd.bundle_overrides("/runs")
    assert over["train_split"] == "student" and over["scales"] == ["bn", "enc"] and over["pmd"] is True
    assert over["teacher_ckpt"].endswith("teacher-t1-seed0/models/model.pt")
    assert kd.run_json()["baseline"] == "student-s1-f0.5-seed1"


def test_expansion_options_and_labels():
    grid = expand_grid({**SMALL, "teacher_seed": "each", "recipe": "recommended", "distill": [
        {"student": "s1", "scales": "bn", "feature_loss": "mse", "data_fraction": 1.0, "pmd": True},
        {"student": "s1", "scales": "bn", "contrastive_mode": "pixel", "tag": "t04", "settings": {"temperature": 0.4}},
        {"student": "s1", "scales": "none", "pmd": True, "tag": "T2", "pmd_temperature": 2.0},
    ]}, seed_offset=3)  # fmt: skip
    assert [r.id for r in grid.runs if r.kind == "teacher"] == ["teacher-t1-seed3", "teacher-t1-seed4"]
    mse = grid["distill-s1-t1-bn+pmd-mse-f1.0-seed4"]
    assert mse.method == "KD(T1,S1) B+PMD MSE (100%)" and mse.teacher == "teacher-t1-seed4"
    assert mse.baseline == "student-s1-f1.0-seed4" and grid[mse.baseline].method == "S1 (100%)"
    assert grid["distill-s1-t1-bn+pmd-contrastive-pixel-f0.5-t04-seed3"].method == "KD(T1,S1) B+PMD pixel [t04]"
    # a PMD-only run names no feature loss: none was trained
    pmd = grid["distill-s1-t1-pmd-f0.5-T2-seed3"]
    assert pmd.method == "KD(T1,S1) PMD [T2]" and (pmd.loss, pmd.mode) == (None, None)
    assert pmd.settings["pmd_temperature"] == 2.0  # a setting given as a block key is a bundle override
    # recipes and the transfer set: named in ids and labels, passed to the bundle
    block = {"student": "s1", "scales": "bn", "pmd": True, "recipe": ["thesis", "recommended"],
             "transfer": [False, True]}  # fmt: skip
    rec = expand_grid({**SMALL, "distill": [block]})
    thesis = rec["distill-s1-t1-bn+pmd-contrastive-f0.5-thesis-seed0"]
    assert thesis.method == "KD(T1,S1) B+PMD (thesis recipe)" and thesis.bundle_overrides("/r")["recipe"] == "thesis"
    tr = rec["distill-s1-t1-bn+pmd-contrastive-f0.5-recommended-transfer-seed1"]
    assert tr.method == "KD(T1,S1) B+PMD (recommended recipe) +transfer" and tr.bundle_overrides("/r")["transfer"]
    assert "baseline_ckpt" not in tr.bundle_overrides("/r")  # its baseline has not run
    # a grid-wide recipe applies to every block without renaming the rows (the thesis grids)
    wide = expand_grid({**SMALL, "recipe": "thesis"})
    kd = wide["distill-s1-t1-bn+pmd-contrastive-f0.5-seed0"]
    assert kd.method == "KD(T1,S1) B+PMD" and kd.recipe == "thesis" and kd.bundle_overrides("/r")["recipe"] == "thesis"
    # the same configuration listed by two blocks is one run that belongs to both
    twice = expand_grid({**SMALL, "distill": [{"table": "A", "scales": "bn"}, {"table": "B", "scales": "bn"}]})
    assert twice.count()["distill"] == 4
    assert twice["distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed0"].groups == ["A", "B"]


def test_self_training_and_the_all_labels_reference(tmp_path):
    block = {"teacher": ["t1", "self"], "student": "s1", "scales": "bn", "pmd": True, "recipe": "transfer",
             "transfer": True, "data_fraction": 0.5}  # fmt: skip
    grid = expand_grid({**SMALL, "data_fractions": [0.5, 1.0], "distill": [block]})
    own = grid["distill-s1-self-bn+pmd-contrastive-f0.5-transfer-seed0"]
    kd = grid["distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed0"]
    # the baseline of the same seed and data is the teacher: it runs first, and is accepted as a teacher
    assert own.teacher == own.baseline == own.depends_on == "student-s1-f0.5-seed0" and own.teacher_arch == "s1"
    assert own.method == "Self-training(S1) B+PMD (transfer recipe) +transfer"
    order = [r.id for r in grid.runs]
    assert order.index(own.baseline) < order.index(own.id)
    # the student trained on all labels is passed to the teacher check once it has run
    assert kd.reference == own.reference == "student-s1-f1.0-seed0"
    assert "reference_ckpt" not in kd.bundle_overrides(tmp_path)
    (tmp_path / kd.reference / "models").mkdir(parents=True)
    (tmp_path / kd.reference / "models" / "model.pt").write_bytes(b"")
    (tmp_path / own.baseline / "models").mkdir(parents=True)
    (tmp_path / own.baseline / "models" / "model.pt").write_bytes(b"")
    over = own.bundle_overrides(tmp_path)
    assert over["allow_student_teacher"] is True and over["teacher_ckpt"] == over["baseline_ckpt"]
    assert over["reference_ckpt"] == str((tmp_path / kd.reference / "models" / "model.pt").resolve())
    assert "allow_student_teacher" not in kd.bundle_overrides(tmp_path)
    with pytest.raises(MkdError, match="set by the grid itself"):
        expand_grid({**SMALL, "settings": {"distill": {"reference_ckpt": "x.pt"}}})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seedz": [0]}, "unknown key"),
        ({"distill": [{"scales": "bn+xx"}]}, "unknown scale"),
        ({"data_fractions": [0.3]}, "data fraction must be 0.5"),
        ({"settings": {"all": {"arch": "s2"}}}, "set by the grid itself"),
        ({"students": ["t1"]}, "is not a student"),
        ({"distill": [{"scales": "none", "pmd": False}]}, "nothing to distil"),
        ({"distill": [{"scales": "bn", "weights": {"dec": 0.3}}]}, "not a selected scale"),
        ({"profile": "gpu"}, "profile must be"),
        ({"recipe": "best"}, "grid: recipe='best': expected one of recommended, thesis, transfer, pseudo"),
        ({"distill": [{"scales": "bn", "recipe": "best"}]}, r"distill\[0\]: recipe='best': expected one of"),
        ({"distill": [{"scales": "bn", "loss": "dist"}]}, "feature_loss='dist': expected one of contrastive, mse, cwd"),
        ({"distill": [{"scales": "bn", "transfer": "yes"}]}, "transfer='yes': expected true or false"),
        ({"distill": [{"scales": "bn", "loss": "mse", "feature_loss": "mse"}]}, "give feature_loss once"),
        ({"distill": [{"scales": "bn", "temperature": 0.2, "settings": {"temperature": 0.2}}]}, "give it once"),
    ],
)
def test_invalid_grids_are_clear_errors(change, message):
    with pytest.raises(MkdError, match=message):
        expand_grid({**SMALL, **change})


def test_a_setting_the_run_does_not_use_is_an_error_in_a_grid_block_too():
    """The CLI's check, from the same function: a given setting the block's runs do not use is named in one line."""
    mse = {"scales": "bn", "loss": "mse", "settings": {"temperature": 0.2}}  # a grid of today, silently tau-less
    with pytest.raises(MkdError) as err:
        expand_grid({**SMALL, "distill": [mse]})
    assert str(err.value) == "distill[0]: temperature is set but feature_loss 'mse' does not use it"
    with pytest.raises(MkdError, match=r"^distill\[0\]: temperature is set but feature_loss 'mse' does not use it$"):
        expand_grid({**SMALL, "distill": [{"scales": "bn", "feature_loss": "mse", "temperature": 0.2}]})  # block key
    with pytest.raises(MkdError, match=r"contrastive_mode is set but no feature scale is distilled \(scales none\)"):
        expand_grid({**SMALL, "distill": [{"scales": "none", "pmd": True, "mode": "pixel"}]})
    with pytest.raises(MkdError, match=r"dice_hard is set but the run has no dice term \(recipe 'recommended'"):
        expand_grid({**SMALL, "distill": [{"scales": "bn", "recipe": "recommended", "settings": {"dice_hard": True}}]})
    # a recipe's default the run does not use is no error: an MSE run of the recommended recipe (tau 0.4)
    assert expand_grid({**SMALL, "distill": [{"scales": "bn", "loss": "mse", "recipe": "recommended"}]})


def test_a_blocks_transfer_and_pmd_default_to_its_recipe_and_ids_name_what_was_trained():
    def runs(**block):
        grid = expand_grid({**SMALL, "seeds": [0], "students": ["s1"], "distill": [{"scales": "bn", **block}]})
        return [r for r in grid.runs if r.kind == "distill"]

    (tr,) = runs(recipe="transfer")  # the recipe's transfer set, named once (was -transfer-transfer-)
    assert (tr.pmd, tr.transfer, tr.id) == (True, True, "distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed0")
    assert tr.bundle_overrides("/r")["transfer"] is True and tr.method == "KD(T1,S1) B+PMD (transfer recipe) +transfer"
    (off,) = runs(recipe="transfer", transfer=False)
    assert off.id == "distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-notransfer-seed0" and not off.transfer
    (rec,) = runs(recipe="recommended")
    assert (rec.pmd, rec.transfer, rec.id) == (True, False, "distill-s1-t1-bn+pmd-contrastive-f0.5-recommended-seed0")
    (pseudo,) = runs(recipe="pseudo", transfer=True)  # unchanged: the grids of the pseudo recipe keep their ids
    assert pseudo.id == "distill-s1-t1-bn+pmd-contrastive-f0.5-pseudo-transfer-seed0"
    # PMD only: no loss part (nothing contrastive was trained), and the bundle gets no feature loss
    (pmd,) = runs(scales="none", recipe="recommended")
    assert (pmd.id, pmd.loss, pmd.mode) == ("distill-s1-t1-pmd-f0.5-recommended-seed0", None, None)
    over = pmd.bundle_overrides("/r")
    assert over["scales"] == [] and over["pmd"] is True and not {"feature_loss", "contrastive_mode"} & set(over)
    # an MSE run records InfoNCE's default mode as before (its run.json is unchanged) but does not pass it on
    (mse,) = runs(recipe="recommended", feature_loss="mse")
    assert mse.mode == "image" and mse.bundle_overrides("/r")["feature_loss"] == "mse"
    assert "contrastive_mode" not in mse.bundle_overrides("/r")
    from mkd.bundle import bundle_configs, compose_config

    for run in (pmd, mse):  # the bundle's check agrees with the grid's
        config = compose_config(bundle_configs("distill", "cpu"), run.bundle_overrides("/r"))
        assert config.get_parsed_content("distillation")["pmd"] is True


def test_old_grid_keys_are_aliases_of_the_bundle_keys():
    old = {"scales": "bn", "loss": "contrastive", "mode": "pixel", "weights": {"bn": 0.3}, "recipe": "thesis"}
    new = {"scales": "bn", "feature_loss": "contrastive", "contrastive_mode": "pixel", "weight_overrides": {"bn": 0.3},
           "recipe": "thesis"}  # fmt: skip
    a, b = (expand_grid({**SMALL, "distill": [block]}) for block in (old, new))
    assert [r.run_json() for r in a.runs] == [r.run_json() for r in b.runs]
    assert "distill-s1-t1-bn+pmd-contrastive-pixel-f0.5-thesis-x6210bf-seed0" in a  # the hash of main's ids


def test_shipped_grids_mirror_the_thesis_tables():
    for name in ("thesis", "thesis_cpu"):
        grid = load_grid(ROOT / "grids" / f"{name}.yaml")
        assert grid.profile == ("thesis" if name == "thesis" else "cpu") and grid.seeds == [0, 1, 2]
        groups = {g for r in grid.runs for g in r.groups}
        assert {g.split()[0] for g in groups} == {f"4.{i}" for i in range(2, 12)}
        methods = {r.method for r in grid.runs}
        assert {"KD(T1,S1) B+PMD", "KD(T2,S1) E+PMD", "KD(T1,S2) B+PMD", "KD(T1,S1) B+E+D MSE",
                "KD(T1,S1) B (100%)", "S1 (100%)", "U-Net"} <= methods  # fmt: skip
        assert all(r.recipe == "thesis" for r in grid.runs if r.kind == "distill")
    smoke = load_grid(ROOT / "grids" / "smoke.yaml")
    assert smoke.count() == {"teacher": 1, "student": 1, "distill": 2}
    # the distillation diagnosis grids share one teacher and the confirmation runs fresh seeds
    select, confirm, diagnose = (load_grid(ROOT / "grids" / f"{n}.yaml") for n in ("kd_select_cpu", "kd_confirm_cpu",
                                                                                    "kd_cpu"))  # fmt: skip
    assert select.seeds == [0, 1, 2] and confirm.seeds == [10, 11, 12, 13, 14] and diagnose.seeds == [0, 1, 2]
    assert {r.id for g in (select, confirm, diagnose) for r in g.runs if r.kind == "teacher" and r.arch == "t1"
            and not r.settings} == {"teacher-t1-seed0"}  # fmt: skip
    assert {r.method for r in confirm.runs} == {"T1", "S1", "KD(T1,S1) B+PMD (recommended recipe)",
                                                "KD(T1,S1) B+PMD (thesis recipe)"}  # fmt: skip
    # half the labels + distillation against all labels: every student run takes the same steps
    labels = load_grid(ROOT / "grids" / "kd_labels_cpu.yaml")
    assert labels.seeds == [30, 31, 32, 33, 34] and labels.count() == {"teacher": 1, "student": 10, "distill": 15}
    assert {r.method for r in labels.runs} == {
        "T1", "S1", "S1 (100%)", "KD(T1,S1) B+PMD (transfer recipe) +transfer",
        "Self-training(S1) B+PMD (transfer recipe) +transfer", "KD(T1,S1) B+PMD (recommended recipe)"}  # fmt: skip
    assert all(
        "epoch_splits" not in r.settings and "epochs" not in r.settings for r in labels.runs if r.kind != "teacher"
    )
    # the Dice-target selection (seeds 0-2) and its confirmation (seeds 30-34) share the labels grid's teacher
    dice_select, dice_confirm = (load_grid(ROOT / "grids" / f"{n}.yaml") for n in ("kd_dice_select_cpu",
                                                                                   "kd_labels_dice_cpu"))  # fmt: skip
    teachers = {r.id: r.settings for g in (labels, dice_select, dice_confirm) for r in g.runs if r.kind == "teacher"}
    assert teachers == {"teacher-t1-seed0": {"epochs": 30, "early_stop_patience": 0}}
    assert dice_select.seeds == [0, 1, 2] and dice_confirm.seeds == [30, 31, 32, 33, 34]
    hard = sorted(r.settings.get("dice_hard", False) for r in dice_select.runs if r.kind == "distill")
    assert hard == [False] * 3 + [True] * 3
    assert all(r.weights == {"dice": 1.0} and r.transfer for r in dice_select.runs if r.kind == "distill")
    assert dice_confirm.count() == {"teacher": 1, "student": 10, "distill": 15}
    assert {r.method for r in dice_confirm.runs if r.kind == "distill"} == {
        "KD(T1,S1) B+PMD (pseudo recipe) +transfer", "Self-training(S1) B+PMD (pseudo recipe) +transfer",
        "KD(T1,S1) B+PMD (pseudo recipe)"}  # fmt: skip


def _write_grid(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fake_done(run_dir: Path) -> None:
    (run_dir / "eval" / "test").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "test" / "summary.json").write_text("{}")


def test_print_commands_dry_run_and_only(tmp_path):
    grid_file = _write_grid(tmp_path, SMALL)
    runs = tmp_path / "runs"
    args = ["ablate", str(grid_file), "--runs", str(runs), "--data", str(tmp_path / "data")]
    res = CliRunner().invoke(cli, [*args, "--print-commands"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    grid = load_grid(grid_file)
    assert len(lines) == 13
    ids = [shlex.split(line)[shlex.split(line).index("--only") + 1] for line in lines]
    assert ids == [r.id for r in grid.runs]  # dependency order
    first = shlex.split(lines[0])
    assert first[:3] == ["mkd", "ablate", str(grid_file.resolve())]
    assert first[first.index("--runs") + 1] == str(runs.resolve())  # absolute: runs anywhere

    # a distillation run whose teacher is not done cannot run alone
    res = CliRunner().invoke(cli, [*args, "--only", ids[-1]])
    assert res.exit_code == 1 and "needs teacher run teacher-t1-seed0" in res.output
    res = CliRunner().invoke(cli, [*args, "--only", "nope"])
    assert res.exit_code == 1 and "no run 'nope'" in res.output

    # finished runs drop out of the commands; dry-run shows the states
    _fake_done(runs / "teacher-t1-seed0")
    _fake_done(runs / "student-s1-f0.5-seed0")
    res = CliRunner().invoke(cli, [*args, "--print-commands", "--kind", "distill"])
    assert len([line for line in res.stdout.splitlines() if line.strip()]) == 8
    res = CliRunner().invoke(cli, [*args, "--print-commands"])
    assert len([line for line in res.stdout.splitlines() if line.strip()]) == 11
    res = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert res.exit_code == 0 and "13 runs: 2 done, 11 pending" in res.output
    assert run_status(grid, runs)["distill-s1-t1-bn-contrastive-f0.5-transfer-seed0"] == "pending"


def test_select_runs_by_id_and_kind_in_dependency_order():
    grid = expand_grid(SMALL)
    assert select_runs(grid) == grid.runs
    assert [r.id for r in select_runs(grid, kinds=["teacher"])] == ["teacher-t1-seed0"]
    only = ["distill-s1-t1-bn-contrastive-f0.5-transfer-seed1", "student-s2-f0.5-seed0", "teacher-t1-seed0"]
    assert [r.id for r in select_runs(grid, only)] == ["teacher-t1-seed0", "student-s2-f0.5-seed0",
                                                       "distill-s1-t1-bn-contrastive-f0.5-transfer-seed1"]  # fmt: skip
    assert [r.id for r in select_runs(grid, only, kinds=["student", "distill"])] == [only[1], only[0]]
    with pytest.raises(MkdError) as err:
        select_runs(grid, ["nope"])
    assert str(err.value) == ("no run 'nope' in the grid; it has 13 runs, e.g. teacher-t1-seed0, "
                              "student-s1-f0.5-seed0, student-s1-f0.5-seed1")  # fmt: skip


def test_plan_lines_and_commands_of_a_small_grid(tmp_path):
    """What --dry-run and --print-commands print, made by the library (the CLI only echoes the lines)."""
    grid = load_grid(_write_grid(tmp_path, SMALL))
    runs = tmp_path / "runs"
    _fake_done(runs / "teacher-t1-seed0")
    _fake_done(runs / "student-s1-f0.5-seed0")
    plan = plan_ablation(grid, runs, kinds=["teacher", "student"], name="grid.yaml")
    assert plan.lines() == [
        "grid grid.yaml: profile cpu, seeds [0, 1], 1 teachers, 4 student baselines, 8 distillation runs",
        "done     teacher-t1-seed0       T1",
        "done     student-s1-f0.5-seed0  S1",
        "pending  student-s1-f0.5-seed1  S1",
        "pending  student-s2-f0.5-seed0  S2",
        "pending  student-s2-f0.5-seed1  S2",
        f"5 runs: 2 done, 3 pending (runs folder {runs})",
    ]
    assert plan.warnings() == []
    data = tmp_path / "data"
    assert plan.data_warning(data) == (
        f"warning: a real run would stop here: {data / 'datalist.json'}: datalist not found; run `mkd prepare` first "
        "(or pass `data_dir`)"
    )
    commands = plan.commands(data, device="cpu")
    assert commands[0] == "# stage 1: student baselines (independent): 3 commands"
    assert commands[-1] == f"# 3 pending runs; then: mkd report {runs}"
    assert [shlex.split(c)[shlex.split(c).index("--only") + 1] for c in commands[1:-1]] == [
        "student-s1-f0.5-seed1", "student-s2-f0.5-seed0", "student-s2-f0.5-seed1"]  # fmt: skip
    assert shlex.split(commands[1])[-2:] == ["--device", "cpu"]
    every = plan_ablation(grid, runs).commands(data)
    assert [c for c in every if c.startswith("#")] == [
        "# stage 1: student baselines (independent): 3 commands",
        "# stage 2: distillation runs (each needs its teacher from stage 1): 8 commands",
        f"# 11 pending runs; then: mkd report {runs}",
    ]
    nothing = plan_ablation(grid, runs, only=["teacher-t1-seed0"])
    assert nothing.data_warning(data) is None
    assert nothing.lines()[-1] == f"1 runs: 1 done, 0 pending (runs folder {runs})"


def test_ablation_result_lines():
    result = AblationResult(ran=["a", "b"], done=["c"], seconds=12.4, runs_dir=Path("runs"))
    assert result.lines() == ["ablate: 2 ran, 1 already done, 0 failed, 0 blocked (12 s); runs folder runs",
                              "next: mkd report runs"]  # fmt: skip
    result.only = ["a"]
    assert result.lines()[1:] == []
    result.elsewhere = ["d"]
    assert result.lines() == [
        "ablate: 2 ran, 1 already done, 0 failed, 0 blocked, 1 running elsewhere (12 s); runs folder runs",
        "1 run(s) are being trained by another process; run the same command again once they are done",
    ]
    failed = AblationResult(failed={"e": "InputError: e: broken"}, blocked=["f"], runs_dir=Path("runs"))
    assert failed.lines() == ["ablate: 0 ran, 0 already done, 1 failed, 1 blocked (0 s); runs folder runs"]
    assert failed.failure_lines() == ["  failed: e: InputError: e: broken"]


@pytest.mark.slow
def test_smoke_grid_end_to_end_then_nothing_new(tiny_prepared, tmp_path):
    """Run grids/smoke.yaml once for real; a second run does nothing; a lost evaluation is redone alone."""
    runs = tmp_path / "runs"
    args = ["ablate", str(ROOT / "grids" / "smoke.yaml"), "--runs", str(runs), "--data", str(tiny_prepared)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "ablate: 4 ran, 0 already done, 0 failed" in res.output
    folders = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert folders == ["distill-s1-t1-bn+pmd-contrastive-f0.5-seed0", "distill-s1-t1-pmd-f0.5-seed0",
                       "student-s1-f0.5-seed0", "teacher-t1-seed0"]  # fmt: skip
    for name in folders:
        d = runs / name
        assert is_done(d) and (d / "models" / "model.pt").is_file() and (d / "metrics.csv").is_file()
        info = json.loads((d / "run.json").read_text())
        assert info["id"] == name and info["profile"] == "cpu"
    kd = json.loads((runs / folders[0] / "run.json").read_text())
    assert kd["baseline"] == "student-s1-f0.5-seed0" and kd["teacher"] == "teacher-t1-seed0"
    config = json.loads((runs / folders[0] / "config.json").read_text())
    assert config["image_size"] == [32, 32] and config["epochs"] == 1 and config["pmd"] is True
    assert config["teacher_ckpt"] == str(runs.resolve() / "teacher-t1-seed0" / "models" / "model.pt")

    def snapshot():
        return {str(p): p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}

    before = snapshot()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "4 runs: 4 done, 0 pending" in res.output and "0 ran, 4 already done" in res.output
    assert snapshot() == before
    res = CliRunner().invoke(cli, [*args, "--print-commands"])
    assert res.stdout.strip() == ""

    # a run whose evaluation is missing but whose training finished is evaluated again, not retrained
    student = runs / "student-s1-f0.5-seed0"
    metrics_mtime = (student / "metrics.csv").stat().st_mtime_ns
    summary = (student / "eval" / "test" / "summary.json").read_text()
    for f in (student / "eval" / "test").iterdir():
        f.unlink()
    result = run_ablation(load_grid(ROOT / "grids" / "smoke.yaml"), runs, tiny_prepared)
    assert result.ran == [student.name] and result.pending == [student.name]
    assert (student / "metrics.csv").stat().st_mtime_ns == metrics_mtime
    again = json.loads((student / "eval" / "test" / "summary.json").read_text())
    assert again["pooled"] == json.loads(summary)["pooled"]

    # --jobs 2: worker processes, each running the per-run command; the distillation run waits for its teacher
    for name in ("teacher-t1-seed0", "distill-s1-t1-bn+pmd-contrastive-f0.5-seed0"):
        for f in (runs / name / "eval" / "test").iterdir():
            f.unlink()
    result = run_ablation(load_grid(ROOT / "grids" / "smoke.yaml"), runs, tiny_prepared, jobs=2)
    assert result.failed == {} and sorted(result.ran) == ["distill-s1-t1-bn+pmd-contrastive-f0.5-seed0",
                                                          "teacher-t1-seed0"]  # fmt: skip
    assert (runs / ".logs" / "teacher-t1-seed0.log").is_file()
    assert all(is_done(runs / r) for r in result.planned)

    # the report of the real runs has qualitative panels and the teacher's reconstructions
    res = CliRunner().invoke(cli, ["report", str(runs), "--slices", "2"])
    assert res.exit_code == 0, res.output
    figures = {p.name for p in (runs / "report" / "figures").glob("*.png")}
    assert "qualitative_KD_T1_S1_B+PMD.png" in figures and "reconstruction_T1.png" in figures
    import pandas as pd

    summary = pd.read_csv(runs / "report" / "summary.csv")
    assert {"T1", "S1", "KD(T1,S1) B+PMD", "KD(T1,S1) PMD"} <= set(summary["method"])  # PMD alone is a row


def test_run_lock_blocks_a_second_process_and_takes_over_a_dead_ones(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from mkd.ablation import run_lock

    with run_lock(tmp_path, "student-s1-f0.5-seed0") as lock:
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(MkdError) as err, run_lock(tmp_path, "student-s1-f0.5-seed0"):
            pass
        assert str(err.value).startswith(
            f"{lock}: run student-s1-f0.5-seed0 is being run by pid {os.getpid()} on {socket.gethostname()} since "
        )
        assert lock.is_file()  # the refused second holder did not remove the first one's lock
    assert not lock.exists()  # released when the block ends
    # a lock left by a process that has exited (a killed job) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}))
    with run_lock(tmp_path, "student-s1-f0.5-seed0"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a lock from another host cannot be checked from here: it is reported, not broken
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(MkdError, match="is being run by pid 1 on elsewhere since earlier"):
        with run_lock(tmp_path, "student-s1-f0.5-seed0"):
            pass
    assert lock.is_file()


def test_a_locked_run_is_refused_before_its_folder_is_touched(tmp_path):
    from mkd.ablation import execute_run

    grid = expand_grid(SMALL)
    spec = grid["student-s1-f0.5-seed0"]
    runs = tmp_path / "runs"
    (runs / spec.id).mkdir(parents=True)
    (runs / spec.id / "half-written.txt").write_text("another process is training this run")
    (runs / f"{spec.id}.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "started": "09:00"}))
    assert run_status(grid, runs)[spec.id] == "running"
    with pytest.raises(
        MkdError, match=r"student-s1-f0\.5-seed0\.lock: run student-s1-f0\.5-seed0 is being run by pid 4242 on node7"
    ):
        execute_run(spec, runs, tmp_path / "no-data-needed")
    assert (runs / spec.id / "half-written.txt").is_file()  # not deleted as a "half-finished run"


# --- issue 18: a grid file is data, not code ---


def test_grid_settings_are_values_and_dry_run_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = '$__import__("os").system("touch pwned") or 1'
    grid_file = _write_grid(tmp_path, {**SMALL, "settings": {"all": {"epochs": code}}})
    for extra in (["--dry-run"], []):
        res = CliRunner().invoke(cli, ["ablate", str(grid_file), "--runs", "runs", "--data", "data", *extra])
        assert res.exit_code == 1
        assert res.output.strip() == (
            f"Error: {grid_file}: settings.all epochs: {code!r} is a MONAI expression or reference ('$...'), not a "
            "value; settings take plain values (numbers, strings, lists, mappings); pass --allow-expressions to run "
            "it as code on purpose (docs/security.md)"
        )
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()
    nested = {
        **SMALL,
        "distill": [{"scales": "bn", "settings": {"terms": {"bn": {"loss": {"_target_": "os.system"}}}}}],
    }
    with pytest.raises(MkdError, match=r"distill\[0\]\.settings terms#bn#loss#_target_: _target_ makes the mapping"):
        expand_grid(nested)
    named = {**SMALL, "teachers": {"t1": {"settings": {"optimizer#_target_": "os.system"}}}}
    with pytest.raises(MkdError, match=r"teachers\.t1\.settings optimizer#_target_: _target_ makes the item"):
        expand_grid(named)
    # plain strings pass (a loss named by its registry name); --allow-expressions lets code through, also to workers
    plain = expand_grid({**SMALL, "settings": {"distill": {"terms": {"bn": {"input": "bn", "loss": "contrastive"}}}}})
    assert plain["distill-s1-t1-bn-contrastive-f0.5-transfer-seed0"].settings["terms"]["bn"]["loss"] == "contrastive"
    allowed = load_grid(grid_file, allow_expressions=True)
    assert allowed["teacher-t1-seed0"].settings["epochs"] == code
    from mkd.ablation import run_command

    assert run_command(allowed, "teacher-t1-seed0", "runs", "data")[-1] == "--allow-expressions"
    assert "--allow-expressions" not in run_command(
        load_grid(_write_grid(tmp_path, SMALL)), "teacher-t1-seed0", "r", "d"
    )


def test_grid_yaml_refuses_anchors_aliases_and_huge_files(tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(
        "teachers: [t1]\nstudents: [s1]\nsettings:\n  all:\n    a: &a [x, x, x, x, x, x, x, x, x]\n"
        "    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n    c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    )
    with pytest.raises(MkdError) as err:
        load_grid(laughs)
    assert str(err.value) == f"{laughs}: line 5: YAML anchor '&a'; a grid is plain data, write the values out"
    alias = tmp_path / "alias.yaml"
    alias.write_text("teachers: [t1]\nstudents: [s1]\nseeds: *nowhere\n")
    with pytest.raises(MkdError, match=r"alias\.yaml: (line 3: YAML alias '\*nowhere'|not valid YAML)"):
        load_grid(alias)
    res = CliRunner().invoke(cli, ["ablate", str(laughs), "--dry-run", "--runs", str(tmp_path / "r")])
    assert res.exit_code == 1 and res.output.startswith(f"Error: {laughs}: line 5: YAML anchor '&a'")
    big = tmp_path / "big.yaml"
    big.write_text("teachers: [t1]\nstudents: [s1]\n# " + "x" * (1 << 20) + "\n")
    with pytest.raises(MkdError, match=r"big\.yaml: grid file of 1048609 bytes; a grid may be at most 1048576 bytes"):
        load_grid(big)


def test_dry_run_checks_settings_against_the_bundle_and_warns_for_absurd_seed_counts(tmp_path):
    args = ["--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--dry-run"]
    typo = _write_grid(tmp_path, {**SMALL, "settings": {"student": {"epochz": 3}}})
    res = CliRunner().invoke(cli, ["ablate", str(typo), *args])
    assert res.exit_code == 1
    assert res.output.startswith(
        f"Error: {typo.resolve()}: run student-s1-f0.5-seed0: unknown bundle key 'epochz' (in student); "
        "top-level keys: "
    )
    assert " epochs, " in res.output
    wrong = _write_grid(tmp_path, {**SMALL, "settings": {"all": {"epochs": "many"}}})
    res = CliRunner().invoke(cli, ["ablate", str(wrong), *args])
    assert res.exit_code == 1
    assert res.output.strip().startswith(
        f'Error: {wrong.resolve()}: run teacher-t1-seed0: setting epochs="many": epochs is an integer in the teacher '
        "bundle"
    )
    many = _write_grid(tmp_path, {**SMALL, "seeds": list(range(1200)), "distill": []})
    res = CliRunner().invoke(cli, ["ablate", str(many), *args])
    assert res.exit_code == 0, res.output
    assert f"warning: {many} expands to 2401 runs (1200 seeds); check 'seeds' before running it" in res.stderr
    res = CliRunner().invoke(cli, ["ablate", str(_write_grid(tmp_path, SMALL)), *args])
    assert res.exit_code == 0 and "expands to" not in res.output
    data = tmp_path / "data" / "datalist.json"
    assert res.stderr.strip() == (
        f"warning: a real run would stop here: {data}: datalist not found; run `mkd prepare` first (or pass --data)"
    )


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_runs_held_by_a_parallel_ablate_are_running_elsewhere_not_failed(tmp_path, jobs):
    import os
    import socket

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.npy").write_bytes(b"")
    item = {"image": "a.npy", "label": "a.npy"}
    (data / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    grid_file = _write_grid(tmp_path, {"teachers": ["t1"], "students": ["s1"], "distill": [{"scales": "bn"}]})
    runs = tmp_path / "runs"
    runs.mkdir()
    other = {"host": socket.gethostname(), "pid": os.getppid(), "started": "09:00"}  # a live process
    for run_id in ("teacher-t1-seed0", "student-s1-f0.5-seed0"):
        (runs / f"{run_id}.lock").write_text(json.dumps(other))
    args = ["ablate", str(grid_file), "--runs", str(runs), "--data", str(data)]
    res = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert "running  teacher-t1-seed0" in res.output and "running  student-s1-f0.5-seed0" in res.output
    res = CliRunner().invoke(cli, [*args, "--jobs", jobs])
    assert res.exit_code == 0, res.output
    prefix = "[1/3] " if jobs == "1" else ""
    who = f"pid {os.getppid()} on {socket.gethostname()} since 09:00"
    assert f"{prefix}teacher-t1-seed0: running elsewhere ({who}); skipped" in res.output
    blocked = ("distill-s1-t1-bn+pmd-contrastive-f0.5-transfer-seed0: skipped, teacher teacher-t1-seed0 is running "
               "elsewhere; run the same command again once it is done")  # fmt: skip
    assert blocked in res.output
    assert "ablate: 0 ran, 0 already done, 0 failed, 1 blocked, 2 running elsewhere" in res.output
    assert "FAILED" not in res.output and "run(s) are being trained by another process" in res.output
    kept = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))  # (.logs of --jobs 2)
    assert kept == ["student-s1-f0.5-seed0.lock", "teacher-t1-seed0.lock"]
    # a lock left by an exited process is not "running": the run is pending and would be taken over
    (runs / "teacher-t1-seed0.lock").write_text(json.dumps({**other, "pid": 2**22 + 12345}))
    assert run_status(load_grid(grid_file), runs)["teacher-t1-seed0"] == "pending"
