"""Patient-level train / validation / test split and the student's subset of the training patients."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mkd.errors import InputError, MkdError

__all__ = ["SPLITS", "read_split_file", "split_patients", "student_subset"]

#: Split names, in datalist order.
SPLITS = ("training", "validation", "test")


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def student_subset(training: Sequence[str], fraction: float = 0.5, seed: int = 0) -> list[str]:
    """The student's patients: ``round(fraction * len(training))`` (at least 1) training patients, chosen from ``seed``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"student fraction must be in (0, 1], got {fraction}")
    ordered = sorted(training, key=_natural_key)
    n = min(len(ordered), max(1, _round_half_up(fraction * len(ordered))))
    rng = np.random.default_rng([int(seed), 2])
    chosen = set(rng.permutation(len(ordered))[:n].tolist())
    return [p for i, p in enumerate(ordered) if i in chosen]


def split_patients(
    patients: Sequence[str], val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """Split patient ids at random (from ``seed``) into training / validation / test.

    Each non-zero fraction gets ``round(fraction * n)`` patients, at least one;
    the rest train. The result does not depend on the order of ``patients``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each in natural order.

    Raises:
        MkdError: a split would be empty.
        ValueError: fractions outside [0, 1) or summing to 1 or more.
    """
    for name, f in (("val", val_fraction), ("test", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"`{name}_fraction` must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction} + {test_fraction}")
    ordered = sorted(set(patients), key=_natural_key)
    n = len(ordered)
    n_val = max(1, _round_half_up(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, _round_half_up(test_fraction * n)) if test_fraction > 0 else 0
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise MkdError(
            f"{n} labelled patient(s) cannot fill non-empty training / validation / test splits "
            f"with `val_fraction={val_fraction}` `test_fraction={test_fraction}` "
            f"(would be {max(n_train, 0)} / {n_val} / {n_test}); every split needs at least one patient"
        )
    order = np.random.default_rng([int(seed), 1]).permutation(n)
    test = {ordered[i] for i in order[:n_test]}
    val = {ordered[i] for i in order[n_test : n_test + n_val]}
    return {
        "training": [p for p in ordered if p not in test and p not in val],
        "validation": [p for p in ordered if p in val],
        "test": [p for p in ordered if p in test],
    }


def _normalise_id(entry) -> str:
    from mkd.data.decathlon import case_id

    if isinstance(entry, dict):
        entry = entry.get("image", entry.get("patient"))
    if not isinstance(entry, str):
        raise TypeError(type(entry).__name__)
    return case_id(entry)


def read_split_file(path: str | os.PathLike, patients: Sequence[str]) -> dict[str, list[str]]:
    """Read a user's split: JSON ``{"training": [...], "validation": [...], "test": [...], "student": [...]?}``.

    Entries are patient ids (``spleen_3``) or case paths (``imagesTr/spleen_3.nii.gz``);
    ``"student"`` is optional. Patients of the dataset not listed anywhere are left out.

    Returns:
        The lists as given (ids normalised), with ``"student"`` only when the file has it.

    Raises:
        InputError: unreadable file, a missing or empty split, an unknown patient,
            a patient in two splits, or student patients outside the training list.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such split file") from None
    except (OSError, ValueError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(path, 'expected a JSON object {"training": [...], "validation": [...], "test": [...]}')
    known = set(patients)
    out: dict[str, list[str]] = {}
    for name in (*SPLITS, "student"):
        if name not in raw:
            if name == "student":
                continue
            raise InputError(path, f"no {name!r} list")
        entries = raw[name]
        if not isinstance(entries, list) or not entries:
            raise InputError(path, f"{name!r} must be a non-empty list of patient ids")
        try:
            ids = [_normalise_id(e) for e in entries]
        except TypeError as err:
            raise InputError(path, f"{name!r} holds a {err}; expected patient ids") from None
        unknown = [p for p in ids if p not in known]
        if unknown:
            raise InputError(path, f"{name!r} names patient(s) not in the dataset: {', '.join(unknown[:5])}")
        if len(set(ids)) != len(ids):
            raise InputError(path, f"{name!r} lists a patient twice")
        out[name] = ids
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = sorted(set(out[a]) & set(out[b]), key=_natural_key)
            if both:
                raise InputError(path, f"patient(s) in both {a!r} and {b!r}: {', '.join(both[:5])}")
    if "student" in out and not set(out["student"]) <= set(out["training"]):
        extra = sorted(set(out["student"]) - set(out["training"]), key=_natural_key)
        raise InputError(path, f"'student' patients must be training patients: {', '.join(extra[:5])}")
    return out
