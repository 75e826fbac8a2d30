"""The CLI's own checks: one-line errors before any training starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mkd.cli import cli
from mkd.networks import build, save_checkpoint


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_distill_without_a_teacher_checkpoint(tmp_path):
    res = _invoke("distill", "--teacher", str(tmp_path / "t.pt"), "--output", str(tmp_path / "run"))
    assert res.exit_code == 1
    assert (
        res.output.strip()
        == f"Error: {tmp_path / 't.pt'}: teacher checkpoint not found; train one with `mkd teacher` or pass --teacher"
    )
    assert not (tmp_path / "run").exists()


def test_distill_needs_a_scale_or_pmd(tmp_path):
    res = _invoke("distill", "--scales", "none", "--no-pmd", "--output", str(tmp_path / "run"))
    assert res.exit_code == 2 and "nothing to distil" in res.output


def test_distill_rejects_weights_for_unselected_terms(tmp_path):
    teacher = save_checkpoint(tmp_path / "t.pt", build("t1", preset="tiny"))
    res = _invoke("distill", "--teacher", str(teacher), "--scales", "bn", "--weights", "dec=0.3")
    assert res.exit_code == 2 and "'dec' is not a selected scale" in res.output
    res = _invoke("distill", "--teacher", str(teacher), "--weights", "bn=high")
    assert res.exit_code == 2 and "expected TERM=NUMBER" in res.output


@pytest.fixture
def fake_distill(tmp_path, monkeypatch):
    """``(seen, teacher)``: a teacher checkpoint, and what ``mkd distill`` hands to the bundle (it runs nothing)."""
    import mkd.bundle

    seen = {}

    def fake_run_bundle(name, output_dir, dataset_dir, overrides=None, **kwargs):
        seen.update(name=name, overrides=overrides, output_dir=output_dir)
        return {"checkpoint": str(tmp_path / "model.pt")}

    monkeypatch.setattr(mkd.bundle, "run_bundle", fake_run_bundle)
    return seen, save_checkpoint(tmp_path / "t.pt", build("t1", preset="tiny"))


def _composed(overrides):
    """The distill bundle's resolved settings for the overrides ``mkd distill`` gave it."""
    from mkd.bundle import bundle_configs, compose_config

    config = compose_config(bundle_configs("distill", "cpu"), overrides)
    return config.get_parsed_content("distillation"), config.get_parsed_content("weights")


def test_distill_recipe_options_reach_the_bundle(tmp_path, fake_distill):
    seen, teacher = fake_distill
    args = ["distill", "--teacher", str(teacher), "--pmd", "--recipe", "thesis", "--pmd-temperature", "2",
            "--neighbours", "5", "--transfer", "--output", str(tmp_path / "run")]  # fmt: skip
    res = _invoke(*args)
    assert seen["name"] == "distill", res.output
    over = seen["overrides"]
    assert over["recipe"] == "thesis" and over["pmd_temperature"] == 2.0 and over["neighbour_distance"] == 5
    assert over["transfer"] is True and "temperature" not in over  # tau: the recipe's
    res = _invoke("distill", "--teacher", str(teacher), "--recipe", "best")
    assert res.exit_code == 2 and "'best' is not one of 'recommended', 'thesis', 'transfer', 'pseudo'" in res.output
    res = _invoke("distill", "--teacher", str(teacher), "--baseline", str(tmp_path / "nope.pt"))
    assert res.exit_code == 1 and res.output.strip().endswith(
        "nope.pt: baseline checkpoint not found (--baseline); train one with `mkd student`"
    )
    res = _invoke("distill", "--teacher", str(teacher), "--reference", str(tmp_path / "nope.pt"))
    assert res.exit_code == 1 and res.output.strip().endswith(
        "nope.pt: reference checkpoint not found (--reference); train one with `mkd student --data-fraction 1.0`"
    )
    # without --transfer / --no-transfer the recipe decides (the bundle's default), and --reference reaches it
    seen.clear()
    res = _invoke("distill", "--teacher", str(teacher), "--recipe", "transfer", "--reference", str(teacher),
                  "--output", str(tmp_path / "run2"))  # fmt: skip
    assert "transfer" not in seen["overrides"] and seen["overrides"]["reference_ckpt"] == str(teacher.resolve())
    seen.clear()
    _invoke("distill", "--teacher", str(teacher), "--recipe", "transfer", "--no-transfer", "--output",
            str(tmp_path / "run3"))  # fmt: skip
    assert seen["overrides"]["transfer"] is False


def test_the_recipe_decides_the_transfer_set_and_says_so_in_one_line(tiny_prepared, caplog):
    import logging

    from mkd.bundle import bundle_configs, compose_config
    from mkd.data import load_split

    student = len(load_split(tiny_prepared, "student"))
    transfer = len(load_split(tiny_prepared, "transfer"))
    assert transfer > 0
    for recipe, extra in (("recommended", 0), ("thesis", 0), ("transfer", transfer), ("pseudo", transfer)):
        config = compose_config(bundle_configs("distill", "cpu"), {"dataset_dir": str(tiny_prepared), "recipe": recipe})
        with caplog.at_level(logging.INFO, logger="mkd.handlers.distillation"):
            caplog.clear()
            assert len(config.get_parsed_content("train#data")) == student + extra
        said = [r.getMessage() for r in caplog.records if "transfer set on" in r.getMessage()]
        assert len(said) == (1 if extra else 0) and (not said or f"on {transfer} unlabelled slices" in said[0])


def test_a_bundle_teacher_distils_logits_only_from_the_default_recipe(fake_distill, tmp_path):
    """The run folder is named after what runs: the recipe's bn term is left out for a bundle teacher."""
    seen, _ = fake_distill
    bundle = tmp_path / "zoo_bundle"
    (bundle / "configs").mkdir(parents=True)
    assert _invoke("distill", "--teacher", str(bundle), "--teacher-label", "1").exit_code == 0
    assert seen["output_dir"].name == "distill-s1-none-pmd"
    assert (seen["overrides"]["teacher_ckpt"], seen["overrides"]["teacher_label"]) == (str(bundle.resolve()), 1)
    settings, weights = _composed(seen["overrides"])
    assert settings["scales"] == [] and weights == {"seg": 1.0, "pmd": 1.0, "dice": 1.0}


def test_one_default_recipe_for_the_cli_the_bundle_and_the_library(fake_distill):
    from mkd.handlers import DEFAULT_RECIPE

    seen, teacher = fake_distill
    option = next(p for p in cli.commands["distill"].params if p.name == "recipe")
    assert option.default is None and option.show_default == DEFAULT_RECIPE == "pseudo"  # not given: the default
    assert _invoke("distill", "--teacher", str(teacher)).exit_code == 0
    assert "recipe" not in seen["overrides"] and _composed(seen["overrides"])[0]["recipe"] == DEFAULT_RECIPE


def test_plain_distill_runs_the_measured_pseudo_setting(fake_distill):
    """docs/distill.md measured pseudo as --scales bn --pmd; plain `mkd distill` ran it without PMD."""
    seen, teacher = fake_distill
    res = _invoke("distill", "--teacher", str(teacher))
    assert res.exit_code == 0, res.output
    settings, weights = _composed(seen["overrides"])
    assert [settings[k] for k in ("scales", "pmd", "recipe", "transfer")] == [["bn"], True, "pseudo", True]
    assert settings["dice_hard"] and weights == {"seg": 1.0, "bn": 0.2, "pmd": 1.0, "dice": 1.0}
    assert seen["output_dir"].name == "distill-s1-bn-pmd"
    explicit = dict(seen)
    _invoke("distill", "--teacher", str(teacher), "--scales", "bn", "--pmd", "--recipe", "pseudo", "--transfer")
    assert _composed(seen["overrides"]) == _composed(explicit["overrides"])


def test_a_setting_the_run_does_not_use_is_a_one_line_error(fake_distill):
    seen, teacher = fake_distill
    for args in (["--loss", "mse", "--tau", "0.2"], ["--feature-loss", "mse", "--set", "temperature=0.2"]):
        res = _invoke("distill", "--teacher", str(teacher), *args)
        assert res.exit_code == 2 and "name" not in seen
        assert res.output.strip() == "Error: temperature is set but feature_loss 'mse' does not use it"
    res = _invoke("distill", "--teacher", str(teacher), "--loss", "mse", "--mode", "pixel", "--neighbours", "2")
    assert res.output.strip() == (
        "Error: contrastive_mode and neighbour_distance are set but feature_loss 'mse' does not use them"
    )
    res = _invoke("distill", "--teacher", str(teacher), "--scales", "none", "--loss", "contrastive")
    assert res.output.strip() == "Error: feature_loss is set but no feature scale is distilled (scales none)"
    res = _invoke("distill", "--teacher", str(teacher), "--no-pmd", "--pmd-temperature", "2")
    assert res.output.strip() == "Error: pmd_temperature is set but PMD is off (pmd false and no pmd weight)"
    # dice_hard without a dice term was silently unused
    for args in (["--set", "dice_hard=true"], ["--dice-hard"], ["--no-dice-hard"]):
        res = _invoke("distill", "--teacher", str(teacher), "--recipe", "recommended", *args)
        assert res.exit_code == 2 and res.output.strip() == (
            "Error: dice_hard is set but the run has no dice term (recipe 'recommended' has none; a dice weight "
            "adds it)"
        )
    assert "name" not in seen
    # a recipe's default the run does not use is no error: --loss mse keeps the recipe's tau unused
    assert _invoke("distill", "--teacher", str(teacher), "--loss", "mse").exit_code == 0
    assert seen["overrides"]["feature_loss"] == "mse" and "temperature" not in seen["overrides"]


@pytest.mark.parametrize(
    "old, new, value, key, expected",
    [
        ("--loss", "--feature-loss", "mse", "feature_loss", "mse"),
        ("--mode", "--contrastive-mode", "pixel", "contrastive_mode", "pixel"),
        ("--tau", "--temperature", "0.2", "temperature", 0.2),
        ("--neighbours", "--neighbour-distance", "5", "neighbour_distance", 5),
        ("--weights", "--weight-overrides", "bn=0.5,pmd=0.3", "weight_overrides", {"bn": 0.5, "pmd": 0.3}),
    ],
)
def test_old_flags_are_aliases_of_the_bundle_keys(fake_distill, old, new, value, key, expected):
    seen, teacher = fake_distill
    given = []
    for flag in (old, new):
        assert _invoke("distill", "--teacher", str(teacher), flag, value).exit_code == 0
        given.append(seen["overrides"][key])
    assert given == [expected, expected]


def test_the_distill_options_are_generated_from_the_declared_settings():
    """One option per setting of mkd.handlers.settings.SETTINGS, named after its bundle key (plus its aliases)."""
    from mkd.handlers.settings import SETTINGS

    params = {p.name: p for p in cli.commands["distill"].params}
    for setting in SETTINGS.values():
        option = params[setting.name]
        flags = [*option.opts, *option.secondary_opts]
        assert flags[0] == setting.flag and set(setting.aliases) <= set(flags), flags
        assert option.default is None and option.help == setting.help
    spelled = [f for p in params.values() for f in [*p.opts, *p.secondary_opts]]
    assert len(spelled) == len(set(spelled))  # no second option for a setting, under any spelling


def test_the_pseudo_recipe_adds_dice_against_the_teachers_mask_and_a_setting_turns_it_soft(tiny_prepared):
    from mkd.bundle import bundle_configs, compose_config

    def dice_term(overrides):
        config = compose_config(bundle_configs("distill", "cpu"), {"dataset_dir": str(tiny_prepared), **overrides})
        weights = config.get_parsed_content("weights")
        return weights.get("dice"), config.get_parsed_content("recipe_terms").get("dice")

    weight, term = dice_term({"recipe": "pseudo"})
    assert weight == 1.0 and term["input"] == "logits" and term["loss"].hard
    weight, term = dice_term({"recipe": "pseudo", "dice_hard": False, "weight_overrides": {"dice": 0.5}})
    assert weight == 0.5 and not term["loss"].hard
    assert dice_term({"recipe": "recommended"}) == (None, None)


def test_training_commands_reject_a_malformed_set(tmp_path):
    res = _invoke("student", "--set", "epochs", "--output", str(tmp_path / "run"))
    assert res.exit_code == 1 and "expected KEY=VALUE" in res.output


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    res = _invoke("student", "--resume", "--overwrite", "--output", str(tmp_path / "run"))
    assert res.exit_code == 2 and "--overwrite and --resume exclude each other" in res.output


# --- issue 18: settings are values; code runs only with --allow-expressions ---


def test_set_refuses_a_python_expression_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _invoke(
        "student", "--data", "D", "--output", "R", "--set", 'epochs=$__import__("os").system("touch pwned") or 1'
    )
    assert res.exit_code == 1
    assert res.output.strip() == (
        'Error: --set epochs: \'$__import__("os").system("touch pwned") or 1\' is a MONAI expression or reference '
        "('$...'), not a value; settings take plain values (numbers, strings, lists, mappings); pass "
        "--allow-expressions to run it as code on purpose (docs/security.md)"
    )
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "R").exists()


def test_set_refuses_a_target_mapping_at_any_depth_and_a_target_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _invoke("student", "--data", "D", "--output", "R",
                  "--set", 'optimizer={"_target_":"os.system","command":"touch pwned"}')  # fmt: skip
    assert res.exit_code == 1 and res.output.startswith(
        "Error: --set optimizer#_target_: _target_ makes the mapping an object MONAI would build (and run); "
    )
    assert not (tmp_path / "pwned").exists()
    res = _invoke("student", "--data", "D", "--set", 'x=[1, {"a": {"_requires_": "@train"}}]')
    assert res.exit_code == 1 and "Error: --set x#1#a#_requires_: _requires_ makes the mapping" in res.output
    res = _invoke("student", "--data", "D", "--set", "train#handlers#0#_target_=os.system")
    assert res.exit_code == 1 and "Error: --set train#handlers#0#_target_: _target_ makes the item" in res.output
    for value in ("@train#trainer", "%configs/x.json#a"):
        res = _invoke("student", "--data", "D", "--set", f"loss={value}")
        assert res.exit_code == 1 and f"Error: --set loss: '{value}' is a MONAI expression" in res.output


def test_set_accepts_plain_values_and_allow_expressions_runs_code_on_purpose(tmp_path, monkeypatch):
    import mkd.bundle

    seen = {}

    def fake_run_bundle(name, output_dir, dataset_dir, overrides=None, **kwargs):
        seen.update(overrides)
        return {"checkpoint": "model.pt"}

    monkeypatch.setattr(mkd.bundle, "run_bundle", fake_run_bundle)
    monkeypatch.chdir(tmp_path)
    terms = '{"bn": {"input": "bn", "loss": "contrastive", "weight": 0.2}, "d": {"input": "logits", "loss": "mse"}}'
    res = _invoke("student", "--set", f"terms={terms}", "--set", "device_name=cuda", "--set", "note=a $ in the middle")
    assert res.exit_code == 0, res.output
    assert seen["terms"]["bn"]["loss"] == "contrastive" and seen["note"] == "a $ in the middle"
    res = _invoke("student", "--allow-expressions", "--set", "epochs=$1 + 1")
    assert res.exit_code == 0, res.output
    assert seen["epochs"] == "$1 + 1"
    assert "This runs code" in " ".join(_invoke("student", "--help").output.split())


def test_importing_the_cli_imports_neither_torch_nor_monai():
    """``mkd --help`` and every usage error stay fast: registries are read when an option needs its choices."""
    import subprocess
    import sys

    code = ("import sys, mkd.cli; from mkd.handlers.settings import SETTINGS; "
            "print(sorted(m for m in ('torch', 'monai', 'mkd.networks', 'mkd.handlers.distillation') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # the choices are still the registries' when click reads them
    from mkd.cli import cli
    from mkd.networks.registry import TEACHERS

    teacher = next(c for c in cli.commands["teacher"].params if c.name == "arch")
    assert teacher.type.choices == tuple(TEACHERS)
    res = CliRunner().invoke(cli, ["teacher", "--arch", "s1"])
    assert res.exit_code == 2 and "'s1' is not one of" in res.output
