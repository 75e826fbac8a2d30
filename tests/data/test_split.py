"""Patient-level split and the student subset."""

from __future__ import annotations

import json

import pytest

from mkd.data.split import read_split_file, split_patients, student_subset
from mkd.errors import InputError, MkdError

IDS = [f"spleen_{i}" for i in (2, 3, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 27)]


def test_split_is_by_patient_deterministic_and_order_free():
    a = split_patients(IDS, 0.2, 0.2, seed=3)
    assert a == split_patients(list(reversed(IDS)), 0.2, 0.2, seed=3)
    assert a != split_patients(IDS, 0.2, 0.2, seed=4)
    assert [len(a[k]) for k in ("training", "validation", "test")] == [12, 4, 4]
    assert sorted(sum(a.values(), []), key=IDS.index) == IDS


def test_student_subset_is_half_of_training_and_seeded():
    train = split_patients(IDS, seed=0)["training"]
    s = student_subset(train, 0.5, seed=0)
    assert set(s) <= set(train) and len(s) == 6
    assert s == student_subset(list(reversed(train)), 0.5, seed=0)
    assert student_subset(train, 1.0) == sorted(train, key=IDS.index)
    assert len(student_subset([f"p{i}" for i in range(25)], 0.5)) == 13  # 41-patient Task09: 25 training -> 13


def test_empty_split_is_an_error():
    with pytest.raises(MkdError, match="every split needs at least one patient"):
        split_patients(IDS[:2])
    with pytest.raises(MkdError, match="0 / 1 / 1"):
        split_patients(IDS[:2], 0.2, 0.2)


def test_split_file_errors(tmp_path):
    f = tmp_path / "s.json"
    for spec, msg in [
        ({"training": ["spleen_2"], "validation": ["spleen_3"]}, "no 'test' list"),
        (
            {"training": ["spleen_2"], "validation": ["spleen_3"], "test": ["spleen_99"]},
            "not in the dataset: spleen_99",
        ),
        (
            {"training": ["spleen_2"], "validation": ["spleen_2"], "test": ["spleen_3"]},
            "in both 'training' and 'validation'",
        ),
        (
            {"training": ["spleen_2"], "validation": ["spleen_3"], "test": ["spleen_6"], "student": ["spleen_3"]},
            "must be training",
        ),
        ({"training": [], "validation": ["spleen_3"], "test": ["spleen_6"]}, "non-empty list"),
    ]:
        f.write_text(json.dumps(spec))
        with pytest.raises(InputError, match=msg) as err:
            read_split_file(f, IDS)
        assert str(err.value).startswith(str(f))
