"""TeacherCheck: the teacher's validation Dice and calibration at the start of a distillation run, and its warning."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mkd.handlers import TeacherCheck, validation_quality
from mkd.networks import build, save_checkpoint


def _batches():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 16, 16, generator=g)
    label = (image[:, :1] > 0.7).float()
    return [{"image": image[:3], "label": label[:3]}, {"image": image[3:], "label": label[3:]}]


class _Oracle(torch.nn.Module):
    """A 'teacher' whose logits are +-10 exactly where the label is: pooled Dice 1."""

    def forward(self, x):
        return 20.0 * ((x[:, :1] > 0.7).float() - 0.5)


def test_validation_quality_of_a_perfect_segmenter():
    q = validation_quality(_Oracle(), _batches())
    assert q["dice"] == pytest.approx(1.0) and q["slices"] == 6
    assert q["background_median"] == pytest.approx(-10.0) and q["foreground_median"] == pytest.approx(10.0)
    assert q["ece"] < 1e-3


def test_warns_when_the_teacher_is_no_better_than_the_baseline_student(tmp_path, caplog):
    torch.manual_seed(0)
    student = build("s1")
    baseline = save_checkpoint(tmp_path / "baseline.pt", student)
    same = build("s1")
    same.load_state_dict(student.state_dict())  # a 'teacher' that is the student itself
    check = TeacherCheck(same, _batches(), baseline_ckpt=baseline, output_file=tmp_path / "check.json")
    with caplog.at_level(logging.WARNING, logger="mkd.handlers.teacher_check"):
        report = check.check()
    assert report["teacher"]["dice"] == pytest.approx(report["baseline"]["dice"])
    assert len(check.warnings) == 1 and "no better than the student it is meant to teach" in check.warnings[0]
    assert str(baseline) in caplog.text and "\n" not in check.warnings[0]  # one line, naming the baseline
    assert json.loads((tmp_path / "check.json").read_text())["baseline"]["checkpoint"] == str(baseline)


def test_no_warning_for_a_teacher_better_than_its_student(tmp_path):
    torch.manual_seed(0)
    baseline = save_checkpoint(tmp_path / "baseline.pt", build("s1"))
    check = TeacherCheck(_Oracle(), _batches(), baseline_ckpt=baseline)
    report = check.check()
    assert report["teacher"]["dice"] == pytest.approx(1.0) and report["baseline"]["dice"] < 0.99
    assert check.warnings == []


def test_warns_at_the_end_when_the_distilled_student_caught_up():
    class _State:
        best_metric = 0.9

    class _Evaluator:
        state = _State()

    teacher = build("s1")
    check = TeacherCheck(teacher, _batches(), evaluator=_Evaluator())
    check.check()
    check.compare_with_result()
    assert check.report["student_best_val"] == 0.9
    assert len(check.warnings) == 1 and "nothing left to teach" in check.warnings[0]


def test_warns_when_the_teacher_is_no_better_than_the_student_trained_on_all_labels(tmp_path):
    torch.manual_seed(0)
    student = build("s1")
    baseline = save_checkpoint(tmp_path / "baseline.pt", build("s1"))
    reference = save_checkpoint(tmp_path / "all_labels.pt", student)
    same = build("s1")
    same.load_state_dict(student.state_dict())  # the teacher is exactly the all-labels student
    check = TeacherCheck(same, _batches(), reference_ckpt=reference, output_file=tmp_path / "check.json")
    report = check.check()
    assert report["reference"]["dice"] == pytest.approx(report["teacher"]["dice"])
    assert len(check.warnings) == 1 and "no better than the student trained on all labels" in check.warnings[0]
    assert str(reference) in check.warnings[0] and "\n" not in check.warnings[0]
    assert json.loads((tmp_path / "check.json").read_text())["reference"]["checkpoint"] == str(reference)
    # a teacher better than both: no warning, both measured
    check = TeacherCheck(_Oracle(), _batches(), baseline_ckpt=baseline, reference_ckpt=reference)
    report = check.check()
    assert check.warnings == [] and {"teacher", "baseline", "reference"} <= set(report)
