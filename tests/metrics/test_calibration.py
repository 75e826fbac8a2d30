"""Expected calibration error and logit medians, on values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mkd.metrics.calibration import expected_calibration_error, logit_summary


def test_ece_by_hand():
    # bin [0.9, 1.0): two pixels, confidence 0.9, one foreground -> |0.5 - 0.9| = 0.4, weight 2/4
    # bin [0.1, 0.2): two pixels, confidence 0.1, none foreground -> |0 - 0.1| = 0.1, weight 2/4
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.25)
    # perfectly calibrated: confidence 0.25 and a quarter of the pixels foreground
    assert expected_calibration_error([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0.0)
    # p == 1 falls in the last bin, not out of range
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([0.5, 0.5], [1, 1], bins=1) == pytest.approx(0.5)


def test_under_confident_teacher_has_a_larger_ece_than_a_confident_one():
    y = np.array([1] * 10 + [0] * 90)
    confident = np.where(y == 1, 0.97, 0.02)
    weak = np.where(y == 1, 0.70, 0.39)  # the under-trained teacher's soft targets at T = 4 (issue 9)
    assert expected_calibration_error(weak, y) > 0.3 > 0.05 > expected_calibration_error(confident, y)


def test_logit_medians_and_errors():
    assert logit_summary(np.array([-4.0, -2.0, 3.0, 5.0]), np.array([0, 0, 1, 1])) == {
        "background_median": -3.0,
        "foreground_median": 4.0,
    }
    assert logit_summary([-1.0, -2.0], [0, 0])["foreground_median"] is None
    with pytest.raises(ValueError, match="one size"):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError, match="bins=0"):
        expected_calibration_error([0.5], [1], bins=0)
