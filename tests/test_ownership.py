"""``--overwrite`` and ``mkd report`` delete only folders an mkd command wrote (issue 18); nothing here trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_nifti

from mkd.cli import cli
from mkd.errors import MkdError
from mkd.ownership import OWNER_FILE, check_replaceable, mark_owner, owner_of


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _project(root: Path) -> dict[str, Path]:
    """A project folder: notes, a prepared dataset (prepare.json), an ablate runs folder with one finished run."""
    (root / "notes.txt").write_text("three months of notes")
    data = root / "mkd_data"
    data.mkdir()
    (data / "prepare.json").write_text("{}")
    (data / "datalist.json").write_text("{}")
    run = root / "runs" / "student-s1-f0.5-seed0"
    (run / "eval" / "test").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"id": run.name, "kind": "student"}))
    (run / "eval" / "test" / "summary.json").write_text("{}")
    return {"notes": root / "notes.txt", "data": data, "runs": root / "runs", "run": run}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_markers_name_the_command_and_only_marked_or_empty_folders_are_replaceable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    assert owner_of(run) is None
    check_replaceable(run, ("student",))  # empty: fine
    (run / "mine.txt").write_text("x")
    with pytest.raises(MkdError) as err:
        check_replaceable(run, ("student",))
    assert str(err.value) == (
        f"{run}: not written by mkd student (no {OWNER_FILE}) and not empty; `overwrite=True` replaces only a "
        "folder written by mkd student: choose another `output_dir`, or move its files away yourself"
    )  # the library names its parameters; the CLI's tests below read the flags
    mark_owner(run, "demo")
    with pytest.raises(MkdError, match=r"run: written by mkd demo and not empty; `overwrite=True` replaces only"):
        check_replaceable(run, ("student",))
    mark_owner(run, "student")
    assert owner_of(run) == "student"
    check_replaceable(run, ("student", "teacher"))


def test_training_overwrite_never_deletes_the_current_folder_the_dataset_or_foreign_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = _project(tmp_path)
    before = _files(tmp_path)
    res = _invoke("student", "--data", "mkd_data", "--output", ".", "--overwrite")
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == (
        f"Error: {tmp_path}: is the current folder; --overwrite never replaces it: give --output a new or empty folder"
    )
    res = _invoke("student", "--data", "mkd_data", "--output", "mkd_data", "--overwrite")
    assert res.output.splitlines()[-1] == (
        f"Error: {project['data']}: is the dataset {project['data']}; --overwrite never replaces it: give --output "
        "a new or empty folder"
    )
    res = _invoke("teacher", "--data", "mkd_data", "--output", "runs", "--overwrite")
    assert res.exit_code == 1 and res.output.splitlines()[-1].startswith(
        f"Error: {project['runs']}: not written by mkd teacher / mkd student / mkd distill (no {OWNER_FILE}) and "
        "not empty; --overwrite replaces only a folder written by mkd teacher / mkd student / mkd distill"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    res = _invoke("student", "--data", project["data"], "--output", tmp_path, "--overwrite")
    assert "is a folder above the current folder; --overwrite never replaces it" in res.output
    sub.rmdir()
    assert _files(tmp_path) == before  # nothing deleted, nothing written
    # a training run folder (marked, or older: its config.json names it) passes the check: the run goes on to
    # read the dataset, which this fake one lacks, before anything is deleted
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"bundle_root": "b", "output_dir": str(old.resolve())}))
    res = _invoke("student", "--data", "mkd_data", "--output", "old-run", "--overwrite")
    assert res.exit_code == 1 and "split 'student' is missing or empty" in res.output, res.output
    assert (old / "config.json").is_file()


def test_demo_overwrite_replaces_only_a_demo_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Results}")
    res = _invoke("demo", "--out", thesis, "--overwrite")
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"Error: {thesis}: not written by mkd demo (no {OWNER_FILE}) and not empty; --overwrite replaces only a "
        "folder written by mkd demo: choose another --out, or move its files away yourself"
    )
    assert (thesis / "thesis.tex").read_text() == "\\chapter{Results}"
    res = _invoke("demo", "--out", ".", "--overwrite")
    assert res.exit_code == 1 and "is the current folder; --overwrite never replaces it: give --out" in res.output

    # a folder the demo wrote is replaced, and the new one is marked at once (stopped here before the phantom)
    import mkd.data

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(mkd.data, "write_phantom", stop)
    from mkd.demo import run_demo

    old = tmp_path / "demo"
    old.mkdir()
    mark_owner(old, "demo")
    (old / "stale.txt").write_text("from the last demo")
    with pytest.raises(Stop):
        run_demo(old, overwrite=True, echo=lambda line: None)
    assert sorted(p.name for p in old.iterdir()) == [OWNER_FILE] and owner_of(old) == "demo"


def test_report_never_replaces_runs_or_foreign_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = _project(tmp_path)
    runs = project["runs"]
    before = _files(tmp_path)
    res = _invoke("report", runs, "--output", runs)
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"Error: {runs}: is the runs folder; a report never replaces it: give --output a new folder "
        "(default: RUNS/report)"
    )
    res = _invoke("report", runs, "--output", tmp_path)
    assert res.output.strip() == (
        f"Error: {tmp_path}: holds the runs folder {runs}; a report never replaces it: give --output a new folder "
        "(default: RUNS/report)"
    )
    other = tmp_path / "other_runs"
    (other / "teacher-t1-seed0").mkdir(parents=True)
    (other / "teacher-t1-seed0" / "run.json").write_text("{}")
    res = _invoke("report", runs, "--output", other)
    assert res.output.strip() == (
        f"Error: {other}: holds run folders (teacher-t1-seed0); a report never replaces them: give --output a new "
        "folder (default: RUNS/report)"
    )
    res = _invoke("report", runs, "--output", project["run"] / "report")
    assert res.output.strip() == (
        f"Error: {project['run'] / 'report'}: is inside the run {project['run']}; a report never writes into a run: "
        "give --output a new folder (default: RUNS/report)"
    )
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n.md").write_text("mine")
    res = _invoke("report", runs, "--output", notes)
    assert res.output.strip() == (
        f"Error: {notes}: not written by mkd report (no {OWNER_FILE}) and not empty; mkd report replaces only a "
        "folder written by mkd report: choose another --output, or move its files away yourself"
    )
    assert _files(tmp_path) - {"other_runs", "other_runs/teacher-t1-seed0", "other_runs/teacher-t1-seed0/run.json",
                               "notes", "notes/n.md"} == before  # fmt: skip


def test_prepare_overwrite_never_replaces_the_current_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prepare.json").write_text("{}")
    monkeypatch.chdir(data)
    res = _invoke("prepare", "--phantom", "--root", tmp_path / "src", "--out", ".", "--overwrite")
    assert res.exit_code == 1
    assert res.output.strip() == (
        "Error: .: is the current folder; --overwrite never replaces it: give --out a new or empty folder"
    )
    assert (data / "prepare.json").is_file() and not (tmp_path / "src").exists()


def test_infer_output_equal_to_input_is_refused_without_suggesting_overwrite(tmp_path):
    ct = write_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    before = ct.read_bytes()
    for extra in ([], ["--overwrite"]):
        res = _invoke("infer", tmp_path / "model.pt", "--input", ct, "--output", ct, *extra)
        assert res.exit_code == 1
        assert res.output.strip() == (
            f"Error: {ct}: is the --input volume; the mask would replace the CT: give --output another file name"
        )
    res = _invoke("infer", tmp_path / "model.pt", "--input", ct, "--output", tmp_path / "notes.txt")
    assert res.exit_code == 1 and "output must be a NIfTI file ending in .nii or .nii.gz" in res.output
    other = write_nifti(tmp_path / "other_ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    res = _invoke("infer", tmp_path / "model.pt", "--input", ct, "--output", other, "--overwrite")
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"Error: {other}: is a int16 NIfTI (a CT?), not a uint8 mask written by mkd infer; --overwrite replaces "
        "only masks: give --output another name"
    )
    assert ct.read_bytes() == before and other.is_file()


def test_the_library_checks_a_mask_output_before_the_work_and_names_its_parameters(tmp_path):
    """mkd.inference.check_mask_output / check_preview_path: what mkd infer checks before the model loads."""
    from mkd.inference import check_folder_job, check_mask_output, check_preview_path

    ct = write_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(MkdError) as err:
        check_mask_output(ct, ct, overwrite=True)
    assert (
        str(err.value) == f"{ct}: is the `input` volume; the mask would replace the CT: give `output` another file name"
    )
    mask = write_nifti(tmp_path / "mask.nii.gz", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(MkdError) as err:
        check_mask_output(ct, mask)
    assert str(err.value) == f"{mask}: output already exists; pass `overwrite=True` to replace it"
    assert check_mask_output(ct, mask, overwrite=True) == mask  # an earlier mask is replaced
    other = write_nifti(tmp_path / "other.nii.gz", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(MkdError) as err:
        check_mask_output(ct, other, overwrite=True)
    assert str(err.value) == (
        f"{other}: is a int16 NIfTI (a CT?), not a uint8 mask written by mkd infer; `overwrite=True` replaces "
        "only masks: give `output` another name"
    )
    # a folder job: an existing output that is not a mask stops it, naming the folder parameter
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "a.nii.gz", np.zeros((8, 8, 4), np.int16))
    write_nifti(tmp_path / "out" / "a.nii.gz", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(MkdError, match="replaces only masks: give `output_dir` another name"):
        check_folder_job(tmp_path / "in", tmp_path / "out", overwrite=True)
    assert check_folder_job(tmp_path / "in", tmp_path / "out", skip_existing=True) == [tmp_path / "in" / "a.nii.gz"]
    with pytest.raises(MkdError) as err:
        check_preview_path(tmp_path / "p.jpg")
    assert str(err.value) == f"{tmp_path / 'p.jpg'}: `preview` must be a file name ending in .png"
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n and the rest")
    with pytest.raises(MkdError, match="preview already exists; pass `overwrite=True` to replace it"):
        check_preview_path(png)
    assert check_preview_path(png, overwrite=True) == png


def test_ablate_does_not_delete_a_run_folder_it_did_not_write(tmp_path):
    from mkd.ablation import execute_run, expand_grid

    spec = expand_grid({"teachers": ["t1"], "students": ["s1"]})["student-s1-f0.5-seed0"]
    run = tmp_path / "runs" / spec.id
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("not a run")
    with pytest.raises(MkdError) as err:
        execute_run(spec, tmp_path / "runs", tmp_path / "data")
    assert str(err.value) == (
        f"{run}: not written by mkd teacher / mkd student / mkd distill (no {OWNER_FILE}) and not empty; mkd ablate "
        "replaces only a folder written by mkd teacher / mkd student / mkd distill: choose another `runs_dir`, or "
        "move its files away yourself"
    )
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_evaluate_does_not_rewrite_files_it_did_not_write(tmp_path):
    out = tmp_path / "paper"
    out.mkdir()
    (out / "summary.json").write_text('{"abstract": "mine"}')
    res = _invoke("evaluate", tmp_path / "model.pt", "--data", tmp_path / "data", "--output", out)
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"Error: {out / 'summary.json'}: exists and is not from mkd evaluate; evaluate writes summary.json, "
        "per_volume.csv, per_slice.csv into --output: give it a new folder"
    )
    assert (out / "summary.json").read_text() == '{"abstract": "mine"}'
    # an earlier evaluation is rewritten (the checkpoint is read next: here it is missing)
    (out / "summary.json").write_text('{"pooled": {}, "per_volume": {}}')
    res = _invoke("evaluate", tmp_path / "model.pt", "--data", tmp_path / "data", "--output", out)
    assert res.exit_code == 1 and "exists and is not from mkd evaluate" not in res.output


def test_infer_preview_never_replaces_a_volume_or_another_file(tmp_path):
    ct = write_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    before = ct.read_bytes()
    args = ["infer", tmp_path / "model.pt", "--input", ct, "--output", tmp_path / "mask.nii.gz"]
    res = _invoke(*args, "--png", ct, "--overwrite")
    assert (
        res.exit_code == 1 and res.output.strip() == f"Error: {ct}: --preview/--png must be a file name ending in .png"
    )
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"my own figure, not a PNG")
    res = _invoke(*args, "--png", figure)
    assert res.output.strip() == f"Error: {figure}: preview already exists; pass --overwrite to replace it"
    res = _invoke(*args, "--png", figure, "--overwrite")
    assert res.output.strip() == (
        f"Error: {figure}: is not a PNG image; --overwrite replaces only an earlier preview: give --preview/--png "
        "another name"
    )
    assert ct.read_bytes() == before and figure.read_bytes() == b"my own figure, not a PNG"
