"""The CLI's shared options and its table of flags: a library message names a parameter, the CLI its flag."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mkd.cli import cli
from mkd.cli_options import PARAMETER_FLAGS, as_flags
from mkd.errors import MkdError


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    ("library", "cli_text"),
    [
        ("x: output already exists; pass `overwrite=True` to replace it",
         "x: output already exists; pass --overwrite to replace it"),
        ("`device=cuda:3`: CUDA is not available on this machine; use `device=cpu` (or auto)",
         "--device cuda:3: CUDA is not available on this machine; use --device cpu (or auto)"),
        ("datalist not found; run `mkd prepare` first (or pass `data_dir`)",
         "datalist not found; run `mkd prepare` first (or pass --data)"),
        ("choose another runs folder (`runs_dir`)", "choose another runs folder (--runs)"),
        ("(add `kinds=teacher`)", "(add --kind teacher)"),
        ("`overrides` epochs=\"abc\": epochs is an integer", "--set epochs=\"abc\": epochs is an integer"),
        ("give `preview` another name", "give --preview/--png another name"),
        ("panels skipped (`qualitative=False`)", "panels skipped (--no-qualitative)"),
    ],
)  # fmt: skip
def test_as_flags_names_each_backticked_parameter_by_its_flag(library, cli_text):
    assert as_flags(library) == cli_text


def test_as_flags_leaves_other_text_alone():
    """Only backticked names of the table change: not commands, paths, setting keys or unknown names."""
    text = "/data/output_dir/x: top-level keys: dataset_dir, output_dir; run `mkd teacher` or `mkd prepare`; `epochs`"
    assert as_flags(text) == text
    assert (
        as_flags("`overwrite=True` and `resume=True` exclude each other")
        == "--overwrite and --resume exclude each other"
    )


def test_every_flag_of_the_table_is_an_option_of_a_command():
    options = {opt for command in cli.commands.values() for p in command.params for opt in p.opts}
    flags = {flag for value in PARAMETER_FLAGS.values() for flag in value.split("/")}
    assert flags - options == set()


def test_a_python_caller_reads_the_parameter_and_a_cli_user_the_flag(tmp_path):
    from mkd.data.prepare import check_output_dir

    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MkdError) as err:
        check_output_dir(out, overwrite=False)
    assert str(err.value) == f"{out}: output already exists; pass `overwrite=True` to replace it"
    res = _invoke("prepare", "--out", out)
    assert (
        res.exit_code == 1
        and res.output.strip() == f"Error: {out}: output already exists; pass --overwrite to replace it"
    )
    with pytest.raises(MkdError) as err:
        check_output_dir(out, overwrite=True)
    assert str(err.value) == (
        f"{out}: not written by `mkd prepare` (no prepare.json) and not empty; `overwrite=True` replaces only a "
        "prepared dataset: choose another `out_dir`"
    )
    res = _invoke("prepare", "--out", out, "--overwrite")
    assert res.output.strip() == (
        f"Error: {out}: not written by `mkd prepare` (no prepare.json) and not empty; --overwrite replaces only a "
        "prepared dataset: choose another --out"
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_an_existing_demo_folder_names_overwrite_in_each_voice(tmp_path):
    from mkd.demo import run_demo

    (tmp_path / "demo").mkdir()
    with pytest.raises(MkdError) as err:
        run_demo(tmp_path / "demo")
    assert str(err.value) == f"{tmp_path / 'demo'}: demo folder exists; pass `overwrite=True` to replace it"
    res = _invoke("demo", "--out", tmp_path / "demo")
    assert res.exit_code == 1 and res.output.strip() == (
        f"Error: {tmp_path / 'demo'}: demo folder exists; pass --overwrite to replace it"
    )


def test_a_malformed_set_names_set_and_a_python_caller_reads_overrides(tmp_path):
    from mkd.bundle import parse_overrides

    with pytest.raises(MkdError) as err:
        parse_overrides(["epochs"])
    assert str(err.value) == "`overrides` 'epochs': expected KEY=VALUE, e.g. `overrides` epochs=3"
    res = _invoke("student", "--set", "epochs", "--output", tmp_path / "run")
    assert res.exit_code == 1 and res.output.strip() == "Error: --set 'epochs': expected KEY=VALUE, e.g. --set epochs=3"


def test_a_set_value_of_the_wrong_type_names_set(tmp_path):
    """run_bundle says `overrides` (tests/bundles/test_bundles.py); mkd student says --set, before any file."""
    res = _invoke("student", "--data", tmp_path / "data", "--output", tmp_path / "run", "--set", "epochs=abc")
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == (
        'Error: --set epochs="abc": epochs is an integer in the student bundle (15), got a string'
    )
    assert not (tmp_path / "run").exists()


def test_shared_options_keep_their_names_defaults_and_help():
    def option(command, name):
        return next(p for p in cli.commands[command].params if p.name == name)

    for command in ("teacher", "student", "distill", "evaluate"):
        data = option(command, "data_dir")
        assert data.opts == ["--data"] and data.default == "mkd_data" and data.help.startswith("Prepared dataset")
    for command in ("infer", "ablate", "report"):
        assert option(command, "data_dir").default is None
    for command in ("teacher", "evaluate", "infer", "ablate"):
        assert option(command, "device").default == "auto"
    assert option("report", "device").default == "cpu"
    for command in ("prepare", "teacher", "infer", "export", "demo"):
        assert option(command, "overwrite").is_flag
    for command in ("prepare", "teacher", "evaluate", "report", "demo"):
        seed = option(command, "seed")
        assert seed.default == 0 and seed.help == "Random seed."
