"""mkd.metrics.summary: the table mkd evaluate prints and the check of its output folder, from Python."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from mkd.errors import MkdError
from mkd.metrics.summary import (
    EVALUATION_FILES,
    check_evaluation_output,
    evaluation_dir,
    evaluation_lines,
    metrics_table,
)


def test_metrics_table_has_fixed_columns_and_dashes_for_missing_values():
    table = metrics_table({"pooled (thesis)": {"iou": 0.5, "dice": 2 / 3, "precision": math.nan}, "x": {"hd95": 12}})
    assert table.splitlines() == [
        "                       iou       dice     recall  precision       hd95",
        "pooled (thesis)     0.5000     0.6667          -          -          -",
        "x                        -          -          -          -    12.0000",
    ]


def test_evaluation_dir_defaults_to_the_runs_own_eval_folder(tmp_path):
    ckpt = tmp_path / "run" / "models" / "model.pt"
    assert evaluation_dir(ckpt, "validation") == (tmp_path / "run" / "eval" / "validation").resolve()
    assert evaluation_dir(ckpt, "test", tmp_path / "mine") == tmp_path / "mine"


def test_check_evaluation_output_replaces_only_an_earlier_evaluation(tmp_path):
    check_evaluation_output(tmp_path / "missing")  # nothing there
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check_evaluation_output(out)  # other files do not matter
    (out / "per_slice.csv").write_text("a")
    with pytest.raises(MkdError) as err:
        check_evaluation_output(out)
    assert str(err.value) == (
        f"{out / 'per_slice.csv'}: exists and is not from mkd evaluate; evaluate writes summary.json, "
        "per_volume.csv, per_slice.csv into `output_dir`: give it a new folder"
    )  # mkd evaluate says --output (tests/test_ownership.py)
    (out / "summary.json").write_text(json.dumps({"pooled": {}, "per_volume": {}}))
    check_evaluation_output(out)
    assert EVALUATION_FILES == ("summary.json", "per_volume.csv", "per_slice.csv")


def test_evaluation_lines_of_a_single_organ_network():
    metrics = {"iou": 0.5, "dice": 0.6, "recall": 0.7, "precision": 0.8}
    per_volume = pd.DataFrame({"patient": ["p1", "p2"], "dice": [0.6, 0.7], "dice_lcc": [0.65, 0.7],
                               "hd95": [3.0, 4.5], "hd95_lcc": [2.0, 4.5]})  # fmt: skip
    summary = {
        "network": {"name": "s1"}, "split": "test", "slices": 32, "image_size": [64, 64], "pooled": metrics,
        "per_volume": {"dice": {"mean": 0.65}, "hd95": {"mean": 3.75}},
        "per_volume_lcc": {"dice": {"mean": 0.675}}, "per_slice_foreground": {"dice": {"mean": 0.5}},
    }  # fmt: skip
    lines = evaluation_lines(SimpleNamespace(summary=summary, segmentation=SimpleNamespace(per_volume=per_volume)))
    assert len(lines) == 4  # no PSNR: not a multi-task teacher
    assert lines[0] == "s1 on test: 32 slices of 2 patients, 64x64"
    assert lines[1].splitlines()[1:] == [
        "pooled (thesis)               0.5000     0.6000     0.7000     0.8000          -",
        "per volume (mean)                  -     0.6500          -          -     3.7500",
        "per volume, largest comp.          -     0.6750          -          -          -",
        "per slice (with organ)             -     0.5000          -          -          -",
    ]
    assert lines[2] == "per volume (HD95 in mm; _lcc: largest 3D connected component, as mkd infer):"
    assert lines[3].splitlines() == [
        "patient   dice  dice_lcc   hd95  hd95_lcc",
        "     p1 0.6000    0.6500 3.0000    2.0000",
        "     p2 0.7000    0.7000 4.5000    4.5000",
    ]
    summary["psnr"] = {"mean": 21.456}
    result = SimpleNamespace(summary=summary, segmentation=SimpleNamespace(per_volume=per_volume))
    assert evaluation_lines(result)[-1] == "reconstruction PSNR: 21.46 dB"
