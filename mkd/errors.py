"""Exceptions that the CLI turns into one-line messages and a non-zero exit."""

from __future__ import annotations

from os import PathLike

__all__ = ["MkdError", "InputError", "ExpressionError", "LockedError", "first_line", "output_exists", "storage_problem"]


class MkdError(Exception):
    """Base class for errors that are the user's to fix (bad input, bad option).

    The CLI prints ``Error: <message>`` on one line and exits with status 1; it
    never prints a traceback for these.

    A message names what the caller can change by its Python parameter, in backticks:
    `` `overwrite=True` ``, `` `device=cpu` ``, `` `data_dir` ``. A Python user reads the
    parameter they passed; the CLI rewrites each backticked parameter into its flag
    (``--overwrite``, ``--device cpu``, ``--data``) with one table, :data:`mkd.cli_options.PARAMETER_FLAGS`.
    Only backticked names are rewritten, so a path or a setting key quoted in the message stays as it is.
    """


class InputError(MkdError, ValueError):
    """A file or folder given to mkd is missing, unreadable or inconsistent.

    Args:
        path: the offending file or folder; it starts the message.
        problem: what is wrong with it, in a few words.

    Example:
        >>> str(InputError("data/labelsTr/spleen_3.nii.gz", "label values {0, 1, 2}; expected {0, 1}"))
        'data/labelsTr/spleen_3.nii.gz: label values {0, 1, 2}; expected {0, 1}'
    """

    def __init__(self, path: str | PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ExpressionError(MkdError):
    """A setting that MONAI would run as code (``"$..."``, ``"@..."``, ``"%..."``, ``_target_``).

    Settings (``--set``, a grid's ``settings``) are values; the message names the setting.
    The CLI adds how to run it on purpose (``--allow-expressions``).
    """


class LockedError(MkdError):
    """A run (or another locked thing) is held by another live process, or by one on another host."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters, for a one-line error.

    Library errors (nibabel, ITK, ONNX, ...) often span many lines; mkd's messages quote only the first.

    Example:
        >>> first_line(OSError("truncated gzip stream\\nat offset 120"))
        'truncated gzip stream'
        >>> first_line(KeyError())
        'KeyError'
    """
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def output_exists(path: str | PathLike) -> MkdError:
    """The error for an output that exists while ``overwrite`` is false (one wording for every writer).

    Example:
        >>> str(output_exists("mask.nii.gz"))
        'mask.nii.gz: output already exists; pass `overwrite=True` to replace it'
    """
    return MkdError(f"{path}: output already exists; pass `overwrite=True` to replace it")


def storage_problem(err: BaseException) -> str | None:
    """One line for a full disk or a folder mkd may not write (also when wrapped by MONAI / ignite), else ``None``.

    The chain of causes is searched for an ``OSError`` of no space, quota, permission or a read-only
    file system; the line names the folder (a temporary file's folder for a full disk) and what to do.
    """
    import errno
    import os

    full = "free some space or choose another output folder, then run again"
    denied = "fix its permissions or choose a folder you may write to (HOME too), then run again"
    codes = {errno.ENOSPC: ("no space left on the device", full), errno.EDQUOT: ("disk quota exceeded", full),
             errno.EACCES: ("permission denied", denied), errno.EPERM: ("permission denied", denied),
             errno.EROFS: ("read-only file system", denied)}  # fmt: skip
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in codes:
            problem, todo = codes[cause.errno]
            where = cause.filename or "writing the output"
            if cause.errno in (errno.ENOSPC, errno.EDQUOT) and cause.filename:  # often a temporary file's name
                where = f"{os.path.dirname(cause.filename) or '.'} (writing {os.path.basename(cause.filename)})"
            return f"{where}: {problem}; {todo}"
        cause = cause.__cause__ or cause.__context__
    return None
