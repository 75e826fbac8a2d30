"""``mkd export`` / mkd.export: TorchScript and ONNX give PyTorch's logits, carry metadata, fail cleanly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mkd.cli import cli
from mkd.errors import MkdError
from mkd.export import export_checkpoint, export_model, read_metadata, verify
from mkd.networks import build, load_network, save_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight s1 (64x64) and a tiny-preset t1 (teacher, 32x32) checkpoints."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    s1 = build("s1")
    # non-trivial BatchNorm statistics, so eval-mode export is really checked
    for m in s1.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return {
        "s1": save_checkpoint(
            root / "s1.pt",
            s1,
            run={"image_size": [64, 64]},
            preprocessing={"window": [-57, 164], "channels": "replicate", "size": 64},
        ),
        "t1": save_checkpoint(root / "t1.pt", build("t1", preset="tiny"), run={"image_size": [32, 32]}),
    }


def _logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_network(ckpt)
    if hasattr(model, "reconstruct"):
        model.reconstruct = False
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["s1", "t1"])
def test_torchscript_gives_pytorchs_logits_with_a_dynamic_batch(checkpoints, tmp_path, name):
    result = export_checkpoint(checkpoints[name], "torchscript", tmp_path / f"{name}.ts.pt")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    size = 64 if name == "s1" else 32
    module = torch.jit.load(str(result.path))
    for n in (1, 5):
        x = torch.rand(n, 3, size, size)
        torch.testing.assert_close(module(x), _logits(checkpoints[name], x), atol=1e-4, rtol=1e-4)
    extra = {"mkd.json": ""}
    torch.jit.load(str(result.path), _extra_files=extra)
    meta = json.loads(extra["mkd.json"])
    assert meta["network"]["name"] == name and meta["input"]["shape"] == ["batch", 3, size, size]
    assert meta == read_metadata(result.path)


@pytest.mark.parametrize("name", ["s1", "t1"])
def test_onnx_runtime_gives_pytorchs_logits(checkpoints, tmp_path, name):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    result = export_checkpoint(checkpoints[name], "onnx", tmp_path / f"{name}.onnx")
    size = 64 if name == "s1" else 32
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for n in (1, 4):
        x = torch.rand(n, 3, size, size)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(got, _logits(checkpoints[name], x), atol=1e-4, rtol=1e-4)
    meta = read_metadata(result.path)
    assert meta["network"]["name"] == name and meta["input"]["shape"][2:] == [size, size]
    if name == "s1":
        assert meta["preprocessing"]["window"] == [-57, 164]


def test_cli_export_default_output_and_errors(checkpoints, tmp_path):
    import shutil

    ckpt = tmp_path / "model.pt"
    shutil.copy(checkpoints["s1"], ckpt)
    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "torchscript", "--size", "32"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "model.ts.pt").is_file() and "max |export - PyTorch|" in r.output
    assert read_metadata(tmp_path / "model.ts.pt")["input"]["shape"][2:] == [32, 32]
    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "torchscript"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "tflite"])
    assert r.exit_code == 2 and "tflite" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(cli, ["export", str(bad), "--output", str(tmp_path / "bad.onnx")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bad}: cannot read") and len(r.output.splitlines()) == 1
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(MkdError, match="unknown export format"):
        export_checkpoint(ckpt, "tflite")


def test_failed_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    model, _ = load_network(checkpoints["s1"])

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(RuntimeError):
        export_model(model, "torchscript", tmp_path / "m.pt", (64, 64))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # verify compares with the given network: another network's weights do not pass
    other = build("s1")
    path = export_model(model, "torchscript", tmp_path / "m.pt", (64, 64), check=False).path
    with pytest.raises(MkdError, match="differ from PyTorch"):
        verify(path, other, (64, 64))


def test_onnx_export_without_onnx_says_which_extra(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(MkdError, match=r"mkd\[onnx\]"):
        export_checkpoint(checkpoints["s1"], "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_overwrite_replaces_an_export_never_a_checkpoint(checkpoints, tmp_path):
    """--overwrite onto another run's model.pt deleted that checkpoint (issue 18)."""
    import shutil

    other = tmp_path / "other_model.pt"
    shutil.copy(checkpoints["t1"], other)
    before = other.read_bytes()
    r = CliRunner().invoke(cli, ["export", str(checkpoints["s1"]), "--output", str(other), "--overwrite", "--no-check"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {other}: not a TorchScript or ONNX export (a checkpoint or another file?); --overwrite replaces "
        "only an export: give --output another name"
    )
    assert other.read_bytes() == before
    out = tmp_path / "s1.ts.pt"
    for _ in range(2):  # an export is replaced
        r = CliRunner().invoke(cli, ["export", str(checkpoints["s1"]), "--output", str(out), "--overwrite",
                                     "--no-check", "--size", "32"])  # fmt: skip
        assert r.exit_code == 0, r.output
