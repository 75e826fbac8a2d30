"""Every bad input: one `Error: <file>: <problem>` line, exit 1, nothing left behind."""

from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_nifti

from mkd.cli import cli


def _run(args, out):
    before = set(os.listdir(out.parent))
    r = CliRunner().invoke(cli, ["prepare", *args, "--out", str(out), "--size", "16"])
    after = set(os.listdir(out.parent))
    return r, after - before


def _assert_error(r, new, expected):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.output
    assert expected in lines[0], lines[0]
    assert not new, f"left behind: {new}"


def test_missing_task_folder(tmp_path):
    r, new = _run(["--source", str(tmp_path / "nope")], tmp_path / "data")
    _assert_error(r, new, f"{tmp_path / 'nope'}: no such task folder or .tar archive")
    r, new = _run(["--decathlon", "Task09_Spleen", "--root", str(tmp_path)], tmp_path / "data")
    _assert_error(r, new, f"{tmp_path / 'Task09_Spleen'}: no such folder; pass --download, or download")
    assert "Task09_Spleen.tar" in r.output and "410d4a301da4e5b2f6f86ec3ddba524e" in r.output


def test_missing_dataset_json(make_task, tmp_path):
    task = make_task()
    (task / "dataset.json").unlink()
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{task / 'dataset.json'}: missing")


def test_listed_file_missing(make_task, tmp_path):
    task = make_task()
    (task / "labelsTr" / "case_2.nii.gz").unlink()
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{task / 'labelsTr' / 'case_2.nii.gz'}: listed in dataset.json but missing")


def test_truncated_and_corrupt_nifti(make_task, tmp_path):
    task = make_task()
    f = task / "imagesTr" / "case_3.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{f}: cannot read NIfTI (corrupt or truncated file)")
    f.write_bytes(gzip.compress(b"not a nifti header" * 30))
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{f}: cannot read NIfTI")


def test_shape_and_affine_mismatch(make_task, tmp_path):
    task = make_task()
    lbl = task / "labelsTr" / "case_1.nii.gz"
    write_nifti(lbl, np.zeros((16, 16, 5), np.uint8))
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{lbl}: shape (16, 16, 5) does not match its image (16, 16, 6) (case_1.nii.gz)")
    shifted = np.eye(4)
    shifted[0, 3] = 2.5
    write_nifti(lbl, np.zeros((16, 16, 6), np.uint8), shifted)
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{lbl}: affine differs from its image's (case_1.nii.gz) by up to 2.5 mm")


def test_multilabel_without_label_value_then_with_it(make_task, tmp_path):
    task = make_task()
    lbl = task / "labelsTr" / "case_0.nii.gz"
    mask = np.zeros((16, 16, 6), np.uint8)
    mask[2:6, 2:6] = 1
    mask[8:12, 8:12, 1:3] = 2
    write_nifti(lbl, mask)
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(
        r, new, f"{lbl}: label values {{0, 1, 2}}; expected {{0, 1}} (pass --label-value N to segment label N)"
    )
    r, new = _run(["--source", str(task), "--label-value", "2", "--split-file", str(_split(tmp_path))], tmp_path / "d2")
    assert r.exit_code == 0, r.output
    stored = np.load(tmp_path / "d2" / "labels" / "case_0.npy")
    assert stored[:, 0].sum(axis=(1, 2)).tolist() == [0, 16, 16, 0, 0, 0]  # 4x4 of label 2 at z=1,2 (16->16 px)
    r, new = _run(["--source", str(task), "--label-value", "7"], tmp_path / "d3")
    _assert_error(r, new, "--label-value 7: no voxel has this value in any label file")


def _split(tmp_path):
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"training": ["case_0", "case_1"], "validation": ["case_2"], "test": ["case_3"]}))
    return f


def test_nan_voxels(make_task, tmp_path):
    task = make_task()
    img = task / "imagesTr" / "case_4.nii.gz"
    vol = np.zeros((16, 16, 6), np.float32)
    vol[3, 4, 5] = np.nan
    vol[0, 0, 0] = np.nan
    write_nifti(img, vol)
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, f"{img}: 2 NaN voxel(s)")


def test_empty_split(make_task, tmp_path):
    task = make_task(n=2)
    r, new = _run(["--source", str(task)], tmp_path / "data")
    _assert_error(r, new, "2 labelled patient(s) cannot fill non-empty training / validation / test splits")
    task3 = make_task(n=3, name="Task98_Three")
    r, new = _run(["--source", str(task3), "--val-fraction", "0"], tmp_path / "data")
    _assert_error(r, new, "every split needs at least one patient")


def test_rerun_needs_overwrite(make_task, tmp_path):
    task = make_task()
    out = tmp_path / "data"
    r, _ = _run(["--source", str(task)], out)
    assert r.exit_code == 0, r.output
    stamp = (out / "datalist.json").stat().st_mtime_ns
    r, new = _run(["--source", str(task)], out)
    _assert_error(r, new, f"{out}: output already exists; pass --overwrite to replace it")
    assert (out / "datalist.json").stat().st_mtime_ns == stamp
    r, new = _run(["--source", str(task), "--overwrite", "--seed", "5"], out)
    assert r.exit_code == 0 and not new
    assert sorted(os.listdir(out)) == ["datalist.json", "images", "labels", "manifest.csv", "prepare.json"]


def test_overwrite_replaces_only_a_prepared_or_empty_folder(make_task, tmp_path):
    """--overwrite deleted any folder, including one mkd never made (issue 12, case 10)."""
    task = make_task()
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work\n")
    r, new = _run(["--source", str(task), "--overwrite"], mine)
    _assert_error(r, new, f"{mine}: not written by `mkd prepare` (no prepare.json) and not empty; --overwrite")
    assert sorted(os.listdir(mine)) == ["chapter1.tex"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    r, new = _run(["--source", str(task), "--overwrite"], a_file)
    _assert_error(r, new, f"{a_file}: not a folder; --overwrite replaces only a dataset written by `mkd prepare`")
    assert a_file.read_text() == "keep\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    r, _ = _run(["--source", str(task), "--overwrite"], empty)
    assert r.exit_code == 0, r.output
    assert (empty / "prepare.json").is_file()


def test_failure_late_in_the_run_removes_the_temp_dir(make_task, tmp_path):
    """The bad case is the last one processed: earlier volumes were already written to the temp dir."""
    task = make_task()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["case_0", "case_1"], "validation": ["case_2"], "test": ["case_4"]}))
    write_nifti(task / "labelsTr" / "case_4.nii.gz", np.full((16, 16, 6), 3, np.uint8))
    r, new = _run(["--source", str(task), "--split-file", str(split)], tmp_path / "data")
    _assert_error(r, new, "case_4.nii.gz: label values {3}")


def test_corrupt_archive_md5(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "Task09_Spleen.tar").write_bytes(b"\0" * 4096)
    r, new = _run(["--decathlon", "Task09_Spleen", "--root", str(root)], tmp_path / "data")
    _assert_error(
        r, new, f"{root / 'Task09_Spleen.tar'}: MD5 does not match the published 410d4a301da4e5b2f6f86ec3ddba524e"
    )
    assert sorted(os.listdir(root)) == ["Task09_Spleen.tar"]


def test_tar_source_is_extracted(make_task, tmp_path):
    import tarfile

    task = make_task()
    archive = tmp_path / "Task99_Test.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname="Task99_Test")
    root = tmp_path / "root"
    r, new = _run(["--source", str(archive), "--root", str(root)], tmp_path / "data")
    assert r.exit_code == 0, r.output
    assert (root / "Task99_Test" / "dataset.json").is_file()
    assert [p for p in os.listdir(root) if p.startswith(".")] == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/Task09_Spleen.tar", "http://mkd-offline.invalid/Task09_Spleen.tar"]
)
def test_download_offline_fails_fast(tmp_path, monkeypatch, url):
    import mkd.data.decathlon as dec

    monkeypatch.setitem(dec.DECATHLON_URLS, "Task09_Spleen", url)
    monkeypatch.setattr(dec, "CONNECT_TIMEOUT", 1.0)
    root = tmp_path / "root"
    t0 = time.perf_counter()
    r, new = _run(["--decathlon", "Task09_Spleen", "--root", str(root), "--download"], tmp_path / "data")
    assert time.perf_counter() - t0 < 5
    _assert_error(r, new, f"cannot download {url} (")
    assert f"put it at {root / 'Task09_Spleen.tar'} or extract it to {root / 'Task09_Spleen'}/" in r.output
