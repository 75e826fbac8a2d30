"""Issue 18: a broken network, checkpoint, device or output folder stops in one line, before the work.

Each test builds what it needs in ``tmp_path`` (tiny volumes, random-weight checkpoints); none trains.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mkd.cli import cli
from mkd.errors import InputError, MkdError
from mkd.networks import build, load_network, save_checkpoint


def _one_error_line(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.fixture
def ct(tmp_path) -> Path:
    """A 24x24x4 CT in HU: air around a soft-tissue block."""
    vol = np.full((24, 24, 4), -1000, np.int16)
    vol[6:18, 6:18] = 60
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


@pytest.fixture
def s1_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "s1.pt", build("s1"), run={"image_size": [16, 16]})


def _nan_checkpoint(path: Path, name: str = "s1", **meta) -> Path:
    torch.manual_seed(0)
    net = build(name, preset="tiny") if name != "s1" else build("s1")
    with torch.no_grad():
        next(iter(net.parameters())).fill_(float("nan"))
    return save_checkpoint(path, net, **meta)


def _infer(ckpt, ct, out, *extra):
    args = ["infer", str(ckpt), "--input", str(ct), "--output", str(out), "--backend", "torch", *extra]
    if "--device" not in extra:
        args += ["--device", "cpu"]
    return CliRunner().invoke(cli, args)


# --- non-finite input and output --------------------------------------------------------------------


def test_infer_refuses_an_infinite_voxel(s1_ckpt, ct, tmp_path):
    """One +Inf voxel with --window max: mkd infer still wrote a mask."""
    vol = np.asanyarray(nib.load(ct).dataobj).astype(np.float32)
    vol[3, 3, 1] = np.inf
    bad = tmp_path / "inf.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(bad))
    out = tmp_path / "mask.nii.gz"
    line = _one_error_line(_infer(s1_ckpt, bad, out, "--window", "max"))
    assert line == (
        f"Error: {bad}: 1 infinite voxel(s) of 2304; mkd refuses non-finite values (they would become NaN slices "
        "and empty masks): fix or re-export the volume"
    )
    assert not out.exists()


class NaNNet(nn.Module):
    """Finite input, NaN output: what a diverged network gives."""

    in_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * float("nan")


def test_a_network_with_nan_output_stops_instead_of_writing_an_empty_mask(ct, tmp_path):
    from mkd.inference import Segmenter

    seg = Segmenter(NaNNet(), size=16, device="cpu", backend="torch")
    with pytest.raises(MkdError) as err:
        seg.segment_to_file(ct, tmp_path / "mask.nii.gz")
    assert str(err.value) == (
        "NaNNet: the network's output holds 1024 NaN or infinite value(s) of 1024 (slices 0-3); its weights are "
        "broken (a diverged run?): retrain it or use an earlier checkpoint"
    )
    assert not (tmp_path / "mask.nii.gz").exists()


def test_segment_to_file_with_overwrite_never_replaces_a_ct_or_its_input(s1_ckpt, ct, tmp_path):
    """The Python path checked less than mkd infer: ``overwrite=True`` replaced any file, a CT included."""
    import nibabel as nib

    from mkd.inference import Segmenter

    seg = Segmenter(s1_ckpt, device="cpu", backend="torch")
    other_ct = tmp_path / "other_ct.nii.gz"
    other_ct.write_bytes(Path(ct).read_bytes())
    before = other_ct.read_bytes()
    with pytest.raises(MkdError) as err:
        seg.segment_to_file(ct, other_ct, overwrite=True)
    dtype = nib.load(str(other_ct)).get_data_dtype()
    assert str(err.value) == (
        f"{other_ct}: is a {dtype} NIfTI (a CT?), not a uint8 mask written by mkd infer; `overwrite=True` replaces "
        "only masks: give `output` another name"
    )
    assert other_ct.read_bytes() == before
    with pytest.raises(MkdError) as err:
        seg.segment_to_file(ct, ct, overwrite=True)
    assert str(err.value) == (
        f"{ct}: is the `input` volume; the mask would replace the CT: give `output` another file name"
    )
    assert seg.segment_to_file(ct, tmp_path / "mask.nii.gz").mask.dtype.kind in "ub"  # a mask is still written
    assert seg.segment_to_file(ct, tmp_path / "mask.nii.gz", overwrite=True).mask is not None  # and replaced


def test_a_checkpoint_with_nan_weights_is_refused_by_infer(ct, tmp_path):
    """mkd infer wrote an empty mask (exit 0) from a checkpoint with NaN weights."""
    ckpt = _nan_checkpoint(tmp_path / "nan.pt", run={"image_size": [16, 16]})
    out = tmp_path / "mask.nii.gz"
    line = _one_error_line(_infer(ckpt, ct, out))
    assert line == (
        f"Error: {ckpt}: 432 weight(s) are NaN or infinite, in 1 tensor(s) (first: encoder.0.0.conv.weight); the run "
        "diverged or the file is damaged: retrain, or use an earlier checkpoint"
    )
    assert not out.exists()


def test_evaluate_refuses_nan_weights_and_a_non_finite_output(tiny_prepared, tmp_path):
    """mkd evaluate reported Dice 0 for a checkpoint with NaN weights."""
    ckpt = _nan_checkpoint(tmp_path / "nan.pt", run={"image_size": [32, 32]})
    r = CliRunner().invoke(cli, ["evaluate", str(ckpt), "--data", str(tiny_prepared), "--device", "cpu",
                                 "--output", str(tmp_path / "eval")])  # fmt: skip
    assert _one_error_line(r).startswith(f"Error: {ckpt}: 432 weight(s) are NaN or infinite")
    assert not (tmp_path / "eval").exists()
    # finite weights, overflowing output
    torch.manual_seed(0)
    net = build("s1")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1e30)
    big = save_checkpoint(tmp_path / "big.pt", net, run={"image_size": [32, 32]})
    r = CliRunner().invoke(cli, ["evaluate", str(big), "--data", str(tiny_prepared), "--device", "cpu",
                                 "--output", str(tmp_path / "eval")])  # fmt: skip
    line = _one_error_line(r)
    assert line.startswith(f"Error: {big}: the network's output holds ") and line.endswith(
        "its weights are broken (a diverged run?): retrain it or use an earlier checkpoint"
    )
    assert not (tmp_path / "eval").exists()


def test_teacher_check_with_a_nan_teacher_names_the_problem():
    """A NaN teacher gave "bad bundle setting: 'list' argument must have no negative elements"."""
    from mkd.handlers.teacher_check import TeacherCheck

    batches = [{"image": torch.rand(2, 3, 16, 16), "label": torch.zeros(2, 1, 16, 16)}]
    with pytest.raises(MkdError) as err:
        TeacherCheck(NaNNet(), batches).check()
    assert str(err.value) == (
        "teacher check: the network's output holds 512 NaN or infinite value(s) on 2 validation slices; its weights "
        "are broken (a diverged run?): retrain it or use an earlier checkpoint"
    )


def test_distill_from_a_nan_teacher_is_refused_before_training(tiny_prepared, tmp_path):
    from mkd.bundle import run_bundle

    teacher = _nan_checkpoint(tmp_path / "t1.pt", "t1", run={"role": "teacher", "image_size": [32, 32]})
    with pytest.raises(InputError, match=r"t1.pt: \d+ weight\(s\) are NaN or infinite"):
        run_bundle("distill", tmp_path / "run", tiny_prepared, overrides={
            "teacher_ckpt": str(teacher), "image_size": [32, 32], "epochs": 1, "batch_size": 8})  # fmt: skip
    assert not (tmp_path / "run").exists()


# --- checkpoint metadata ------------------------------------------------------------------------------


def test_checkpoint_metadata_asking_for_an_absurd_network_is_refused_before_allocating(tmp_path):
    ckpt = torch.load(save_checkpoint(tmp_path / "s1.pt", build("s1")), weights_only=True)
    ckpt["network"]["kwargs"]["features"] = [4096, 8192, 16384]
    torch.save(ckpt, tmp_path / "huge.pt")
    with pytest.raises(InputError) as err:
        load_network(tmp_path / "huge.pt")
    assert str(err.value).startswith(f"{tmp_path / 'huge.pt'}: its network metadata ('s1', kwargs ")
    assert "refused before allocating: the metadata does not match the weights" in str(err.value)
    assert "(13.8 GB as float32) but the file holds 0.1 M;" in str(err.value)


def test_checkpoint_image_size_beyond_4096_is_one_line(ct, tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "s1.pt", build("s1"), run={"image_size": [100000, 100000]})
    r = _infer(ckpt, ct, tmp_path / "mask.nii.gz")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "image_size must be two integers (H, W) from 1 to 4096, got [100000, 100000] (from the checkpoint)" in (
        r.output
    )


def test_infer_refuses_a_spacing_that_makes_an_absurd_grid(s1_ckpt, ct, tmp_path):
    line = _one_error_line(_infer(s1_ckpt, ct, tmp_path / "mask.nii.gz", "--spacing", "1e-3,1e-3,0"))
    assert line == (  # the option, as mkd prepare says it (it said "spacing 0.001,..." here)
        f"Error: {ct}: --spacing 0.001,0.001,0 would resample this 24x24x4 volume to 24000x24000x4 = 2.3e+09 voxels "
        "(limit 1e+09); give a voxel size in mm, e.g. 1,1,2, or 0 to keep an axis"
    )


# --- output folder: write permission and free space, checked before the work --------------------------


def test_read_only_output_folder_is_found_before_the_model_loads(s1_ckpt, ct, tmp_path, monkeypatch):
    """A read-only output folder was found only after segmenting the whole volume (41-line traceback)."""
    import mkd.inference.predictor

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == ro:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(mkd.inference.Segmenter, "segment", lambda *a, **k: pytest.fail("segmented anyway"))
    line = _one_error_line(_infer(s1_ckpt, ct, ro / "mask.nii.gz"))
    assert line == f"Error: {ro}: cannot write the mask here (Permission denied); choose another folder"
    # the library path checks too, before loading the volume
    from mkd.inference import Segmenter

    monkeypatch.setattr(mkd.inference.predictor, "load_volume", lambda *a: pytest.fail("loaded anyway"))
    with pytest.raises(MkdError, match="cannot write the mask here"):
        Segmenter(s1_ckpt, device="cpu", backend="torch").segment_to_file(ct, ro / "sub" / "mask.nii.gz")


def test_unwritable_checkpoint_folder_and_home_are_one_line(s1_ckpt, ct, tmp_path, monkeypatch):
    """The ONNX graph cache had nowhere to go: 64 lines of traceback."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == s1_ckpt.parent else real(p, mode))
    blocker = tmp_path / "home"
    blocker.write_text("a file where HOME's cache would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    out = tmp_path / "out" / "mask.nii.gz"
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", str(ct), "--output", str(out), "--backend",
                                 "onnxruntime", "--device", "cpu"])  # fmt: skip
    assert _one_error_line(r) == (
        f"Error: {s1_ckpt.parent} and {blocker / 'mkd' / 'onnx'}: neither folder is writable, so the ONNX graph of "
        "s1.pt cannot be cached; set XDG_CACHE_HOME to a writable folder, or pass --backend torch"
    )
    assert not out.exists()


def test_a_full_disk_is_found_before_segmenting(s1_ckpt, ct, tmp_path, monkeypatch):
    import mkd.inference

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    monkeypatch.setattr(mkd.inference.Segmenter, "segment", lambda *a, **k: pytest.fail("segmented anyway"))
    out = tmp_path / "mask.nii"
    line = _one_error_line(_infer(s1_ckpt, ct, out))
    assert line == (
        f"Error: {tmp_path}: 100 B free, about 2.6 KB needed for the mask; free some space or choose another folder"
    )
    assert not out.exists()


def test_disk_full_while_writing_is_one_line(s1_ckpt, ct, tmp_path, monkeypatch):
    """Disk full while writing the mask printed 44 lines."""
    import mkd.inference.predictor

    out = tmp_path / "mask.nii.gz"

    def save_mask(mask, volume, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mkd.inference.predictor, "save_mask", save_mask)
    line = _one_error_line(_infer(s1_ckpt, ct, out))
    assert line == (
        f"Error: {tmp_path} (writing mask.nii.gz): no space left on the device; free some space or choose another "
        "output folder, then run again"
    )


def test_training_engine_errors_are_not_logged_as_tracebacks_before_the_one_line():
    """Disk full during training printed 138 lines: MONAI's StatsHandler logs the whole traceback first."""
    from mkd.cli import _ONE_LINE_ERRORS

    def record(name, exc_info=None):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, "Exception: boom", None, exc_info)

    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/models/tmp1234")
    except OSError:
        import sys

        assert not _ONE_LINE_ERRORS.filter(record("monai.handlers.StatsHandler", sys.exc_info()))
        assert not _ONE_LINE_ERRORS.filter(record("ignite.engine.engine.SupervisedTrainer"))  # inside the except
        assert _ONE_LINE_ERRORS.filter(record("mkd.bundle"))  # mkd's own records stay
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        assert _ONE_LINE_ERRORS.filter(record("ignite.engine.engine.SupervisedTrainer"))  # a bug keeps its traceback


def test_unwritable_run_folder_and_full_disk_stop_a_training_run_before_it_starts(tiny_prepared, tmp_path, monkeypatch):
    from mkd.bundle import run_bundle

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MkdError) as err:
        run_bundle("student", blocker / "run", tiny_prepared, overrides={"image_size": [32, 32], "epochs": 1})
    assert str(err.value) == (
        f"{blocker / 'run'} (in {blocker}): cannot write the run here (a file is in the way); choose another folder"
    )
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        MkdError, match=r"models: 1000 B free, about [\d.]+ MB needed for the run's checkpoints; free some"
    ):
        run_bundle("student", tmp_path / "run", tiny_prepared, overrides={"image_size": [32, 32], "epochs": 1})
    assert not (tmp_path / "run").exists()


# --- settings checked before training -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bundle", "size", "message"),
    [
        ("student", [0, 0], "image_size=[0, 0]: must be two integers [H, W] from 4 to 4096 for 's1' (it downsamples "
                            "by 4; other sizes are padded); e.g. `overrides` image_size=[96,96]"),
        ("teacher", [8, 8], "image_size=[8, 8]: must be two integers [H, W] from 16 to 4096 for 't1' (it downsamples "
                            "by 16; other sizes are padded); e.g. `overrides` image_size=[96,96]"),
        ("student", [32], "image_size=[32]: must be two integers [H, W] from 4 to 4096 for 's1' (it downsamples by 4; "
                          "other sizes are padded); e.g. `overrides` image_size=[96,96]"),
    ],
)  # fmt: skip
def test_image_size_is_checked_before_training(tiny_prepared, tmp_path, bundle, size, message):
    """--set image_size=[0,0] trained and exited 0; mkd evaluate then failed with ZeroDivisionError."""
    from mkd.bundle import run_bundle

    with pytest.raises(MkdError) as err:
        run_bundle(bundle, tmp_path / "run", tiny_prepared, overrides={"image_size": size, "epochs": 1})
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["banana", "cuda", "cuda:7"])
def test_device_is_one_line_naming_the_option(tiny_prepared, s1_ckpt, ct, tmp_path, device):
    """--device banana / cuda without CUDA printed 31-80 lines of traceback."""
    from mkd.utils import resolve_device

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "banana":  # a Python caller reads its parameter, a CLI user the option
        python = f"`device={device}`: unknown device; valid values: auto, cpu, cuda or cuda:N"
        expected = f"--device {device}: unknown device; valid values: auto, cpu, cuda or cuda:N"
    else:
        python = f"`device={device}`: CUDA is not available on this machine; use `device=cpu` (or auto)"
        expected = f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)"
    with pytest.raises(MkdError) as err:
        resolve_device(device)
    assert str(err.value) == python
    r = _infer(s1_ckpt, ct, tmp_path / "mask.nii.gz", "--device", device)
    assert _one_error_line(r) == f"Error: {expected}"
    r = CliRunner().invoke(cli, ["evaluate", str(s1_ckpt), "--data", str(tiny_prepared), "--device", device])
    assert _one_error_line(r) == f"Error: {expected}"
    r = CliRunner().invoke(cli, ["student", "--data", str(tiny_prepared), "--output", str(tmp_path / "run"),
                                 "--device", device])  # fmt: skip
    assert _one_error_line(r) == f"Error: {expected}"
    assert not (tmp_path / "run").exists()


def test_threads_beyond_the_machine_warn(caplog):
    from mkd.inference import Segmenter

    n = (os.cpu_count() or 1) + 3
    with caplog.at_level(logging.WARNING, logger="mkd"):
        Segmenter(NaNNet(), size=16, device="cpu", backend="torch", threads=n)
    assert [r.getMessage() for r in caplog.records] == [
        f"--threads {n} is more than the {os.cpu_count()} CPU cores of this machine; the network runs no faster "
        "(often slower) with more threads than cores"
    ]


# --- resume -------------------------------------------------------------------------------------------


def _resume(tiny_prepared, run, **overrides):
    from mkd.bundle import run_bundle

    return run_bundle("student", run, tiny_prepared, resume=True,
                      overrides={"image_size": [32, 32], "epochs": 2, **overrides})  # fmt: skip


def test_resume_with_another_arch_is_one_line(tiny_prepared, tmp_path):
    """--resume --arch s2 on an s1 run printed 235 lines (load_state_dict's key list)."""
    run = tmp_path / "run"
    epoch = save_checkpoint(run / "models" / "checkpoint_epoch=1.pt", build("s1"))
    with pytest.raises(MkdError) as err:
        _resume(tiny_prepared, run, arch="s2")
    assert str(err.value) == (
        f"{epoch}: the run in {run} trains 's1', not 's2'; resume it with `arch=s1`, or start a new s2 run with "
        "`overwrite=True` (or another `output_dir`)"
    )
    r = CliRunner().invoke(cli, ["student", "--arch", "s2", "--resume", "--data", str(tiny_prepared), "--output",
                                 str(run), "--set", "image_size=[32,32]"])  # fmt: skip
    assert _one_error_line(r) == (
        f"Error: {epoch}: the run in {run} trains 's1', not 's2'; resume it with --arch s1, or start a new s2 run "
        "with --overwrite (or another --output)"
    )
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoint_epoch=1.pt", "models"]


class Payload:
    """A pickled object: weights-only loading refuses it."""


def test_resume_of_a_pickle_payload_checkpoint_is_one_line_without_pytorchs_advice(tiny_prepared, tmp_path):
    """--resume of a pickle-payload checkpoint printed 119 lines repeating PyTorch's weights_only advice."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    epoch = run / "models" / "checkpoint_epoch=1.pt"
    torch.save({"model": build("s1").state_dict(), "evil": Payload()}, epoch)
    r = CliRunner().invoke(cli, ["student", "--resume", "--data", str(tiny_prepared), "--output", str(run),
                                 "--set", "image_size=[32,32]"])  # fmt: skip
    line = _one_error_line(r)
    assert line == (
        f"Error: {epoch}: cannot read: holds Python objects (test_bad_input.Payload) besides tensors and plain data; "
        "mkd loads checkpoints weights-only and never runs code from a file. Re-save it as a state dict "
        "(mkd.networks.save_checkpoint) where it was made"
    )
    assert "weights_only" not in r.output


# --- mkd report: a broken metrics.csv ---------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "empty or not a CSV table (No columns to parse from file)"),
    (b"\x00\xff\xfe garbage\n", "empty or not a CSV table ('utf-8' codec can't decode byte 0xff in position 1: invalid "
                              "start byte)"),
    (b"loss,dice\n0.5,0.1\n", "no 'epoch' column (or empty epochs): not a metrics.csv written by mkd"),
    (b'epoch,val\n1,"0.5\n', "empty or not a CSV table (Error tokenizing data. C error: EOF inside string starting "
                              "at row 1)"),
])  # fmt: skip
def test_report_with_a_corrupt_metrics_csv_is_one_line(tmp_path, content, problem):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reports"))
    try:
        from test_report import DICE, SEEDS, _write_run
    finally:
        sys.path.pop(0)
    root = tmp_path / "runs"
    runs = [_write_run(root, method, seed) for method in DICE for seed in SEEDS]
    (runs[0] / "metrics.csv").write_bytes(content)
    r = CliRunner().invoke(cli, ["report", str(root), "--no-qualitative"])
    assert _one_error_line(r) == (
        f"Error: {runs[0] / 'metrics.csv'}: {problem}; re-run that run, or delete the file to report without its "
        "training curves"
    )
