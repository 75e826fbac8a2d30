"""mkd evaluate: metrics of a checkpoint on the test patients, checked against answers known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mkd.cli import cli
from mkd.data import load_split
from mkd.evaluation import evaluate_checkpoint
from mkd.networks import build, save_checkpoint

SIZE = 32


def _constant_student(path, value: float):
    """An s1 whose logits are `value` everywhere: the classifier's weights zeroed, its bias set."""
    net = build("s1")
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(value)
    return save_checkpoint(path, net, run={"image_size": [SIZE, SIZE]})


def _test_labels(data_dir):
    """Test labels at SIZE x SIZE, per patient: what the evaluation compares against."""
    from mkd.evaluation import slice_transform

    t = slice_transform([SIZE, SIZE])
    out = {}
    for item in load_split(data_dir, "test"):
        out.setdefault(item["patient"], []).append(t(item)["label"].numpy())
    return {p: np.stack(v) for p, v in out.items()}


def test_all_foreground_prediction_gives_recall_one_and_precision_the_label_fraction(tiny_prepared, tmp_path):
    ckpt = _constant_student(tmp_path / "all.pt", 20.0)
    result = evaluate_checkpoint(ckpt, tiny_prepared, split="test", batch_size=7)
    labels = _test_labels(tiny_prepared)
    n_label = sum(float(v.sum()) for v in labels.values())
    n_pixels = sum(v.size for v in labels.values())
    pooled = result.summary["pooled"]
    assert pooled["recall"] == pytest.approx(1.0)
    assert pooled["precision"] == pytest.approx(n_label / n_pixels)
    assert pooled["dice"] == pytest.approx(2 * n_label / (n_label + n_pixels))
    per_volume = result.segmentation.per_volume.set_index("patient")
    for patient, lab in labels.items():  # per volume: Dice = 2 L / (L + N) of that patient alone
        expected = 2 * lab.sum() / (lab.sum() + lab.size)
        assert per_volume.loc[patient, "dice"] == pytest.approx(expected, rel=1e-6)
        # the whole volume is one component: the filter changes nothing
        assert per_volume.loc[patient, "dice_lcc"] == per_volume.loc[patient, "dice"]
        assert per_volume.loc[patient, "pred_voxels_lcc"] == lab.size
    assert result.summary["per_volume_lcc"]["hd95"]["n"] == len(labels)
    assert result.summary["slices"] == sum(len(v) for v in labels.values())


def test_empty_prediction_gives_zero_recall_and_writes_the_files(tiny_prepared, tmp_path):
    ckpt = _constant_student(tmp_path / "none.pt", -20.0)
    runner = CliRunner()
    out = tmp_path / "eval"
    res = runner.invoke(cli, ["evaluate", str(ckpt), "--data", str(tiny_prepared), "--output", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pooled"]["recall"] == 0.0 and summary["pooled"]["dice"] == 0.0
    assert summary["split"] == "test" and summary["network"]["name"] == "s1"
    assert (out / "per_volume.csv").is_file() and (out / "per_slice.csv").is_file()
    assert "pooled (thesis)" in res.output and "per volume, largest comp." in res.output
    header = next(line for line in res.output.splitlines() if line.split()[:2] == ["patient", "dice"])
    assert header.split() == ["patient", "dice", "dice_lcc", "hd95", "hd95_lcc"]


def test_onnxruntime_runner_gives_the_torch_metrics(tiny_prepared, tmp_path):
    pytest.importorskip("onnxruntime")
    from mkd.inference import Segmenter

    torch.manual_seed(3)
    ckpt = save_checkpoint(tmp_path / "s.pt", build("s1"), run={"image_size": [SIZE, SIZE]})
    ref = evaluate_checkpoint(ckpt, tiny_prepared).segmentation.per_slice
    seg = Segmenter(ckpt, backend="onnxruntime", device="cpu", threads=1)
    got = evaluate_checkpoint(ckpt, tiny_prepared, runner=seg.backend).segmentation.per_slice
    assert (got[["tp", "fp", "fn"]].to_numpy() == ref[["tp", "fp", "fn"]].to_numpy()).all()


def test_teacher_evaluation_reports_reconstruction_psnr(tiny_prepared, tmp_path):
    teacher = build("t1", preset="tiny")
    ckpt = save_checkpoint(tmp_path / "t.pt", teacher, run={"image_size": [SIZE, SIZE]})
    result = evaluate_checkpoint(ckpt, tiny_prepared, split="validation")
    assert result.summary["psnr"]["n"] == result.summary["slices"]
    assert np.isfinite(result.summary["psnr"]["mean"])


def test_missing_checkpoint_is_a_one_line_error(tiny_prepared, tmp_path):
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "gone.pt"), "--data", str(tiny_prepared)])
    assert res.exit_code == 1
    assert res.output.strip().startswith("Error: ") and "gone.pt" in res.output
    assert len(res.output.strip().splitlines()) == 1
