"""The table that names library parameters as the ``mkd`` command line's flags.

Library messages name the parameter a caller can change, in backticks (:class:`mkd.errors.MkdError`):
``pass `overwrite=True` to replace it``. :func:`as_flags` rewrites them with one table,
:data:`PARAMETER_FLAGS`, so that a CLI user reads ``pass --overwrite to replace it``.

Like :mod:`mkd.cli`, this module imports neither torch nor MONAI.
"""

from __future__ import annotations

import re

__all__ = ["PARAMETER_FLAGS", "as_flags"]

#: library parameter -> the flag that sets it. A message writes `name` (-> the flag), `name=True`
#: (-> the switch) or `name=VALUE` (-> the flag and VALUE).
PARAMETER_FLAGS: dict[str, str] = {
    # switches
    "overwrite": "--overwrite",
    "resume": "--resume",
    "skip_existing": "--skip-existing",
    "download": "--download",
    "allow_expressions": "--allow-expressions",
    "allow_student_teacher": "--allow-student-teacher",
    # files and folders
    "data_dir": "--data",
    "dataset_dir": "--data",
    "output": "--output",
    "output_dir": "--output",
    "out": "--out",
    "out_dir": "--out",
    "runs_dir": "--runs",
    "input": "--input",
    "input_dir": "--input",
    "root": "--root",
    "source": "--source",
    "decathlon": "--decathlon",
    "preview": "--preview/--png",
    "calibration": "--calibration",
    "teacher_ckpt": "--teacher",
    # settings
    "overrides": "--set",
    "device": "--device",
    "backend": "--backend",
    "threads": "--threads",
    "quantize": "--quantize",
    "arch": "--arch",
    "nproc": "--nproc",
    "jobs": "--jobs",
    "only": "--only",
    "kinds": "--kind",
    "baseline": "--baseline",
    "spacing": "--spacing",
    "channels": "--channels",
    "keep": "--keep",
    "margin": "--margin",
    "size": "--size",
    "label_value": "--label-value",
    "val_fraction": "--val-fraction",
    "test_fraction": "--test-fraction",
}

_PARAMETER = re.compile(r"`([a-z_]+)(=[^`]*)?`")


def as_flags(text: str) -> str:
    """``text`` with each backticked library parameter of :data:`PARAMETER_FLAGS` written as its flag.

    Other backticked text (```mkd prepare```) and unknown names stay as they are.

    Example:
        >>> as_flags("m.nii.gz: output already exists; pass `overwrite=True` to replace it")
        'm.nii.gz: output already exists; pass --overwrite to replace it'
        >>> as_flags("`device=banana`: unknown device; run `mkd prepare` first (or pass `data_dir`)")
        '--device banana: unknown device; run `mkd prepare` first (or pass --data)'
    """

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in PARAMETER_FLAGS:
            return match.group(0)
        option = PARAMETER_FLAGS[name]
        return option if value in (None, "=True") else f"{option} {value[1:]}"

    return _PARAMETER.sub(flag, text)
