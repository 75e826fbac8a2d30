"""Which mkd command wrote a folder, so that ``--overwrite`` deletes only what mkd wrote.

Every folder an mkd command may later replace carries :data:`OWNER_FILE`
(``.mkd-owner.json``: ``{"command": ..., "mkd": version, "created": ...}``), written
when the command creates it. ``--overwrite`` replaces a folder only when it is empty or
its marker names one of the commands that may replace it (:func:`check_replaceable`), and
never the current folder, a folder above it, or a folder the command reads (the dataset,
the runs folder) or one above those. ``mkd prepare`` keeps its own marker, ``prepare.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from mkd.errors import MkdError

__all__ = ["OWNER_FILE", "RUN_COMMANDS", "mark_owner", "owner_of", "check_replaceable", "is_within", "legacy_run"]

#: the marker file of a folder written by an mkd command
OWNER_FILE = ".mkd-owner.json"
#: the commands whose output is a training run folder (one may replace another's)
RUN_COMMANDS = ("teacher", "student", "distill")


def mark_owner(folder: str | os.PathLike, command: str) -> Path:
    """Write ``FOLDER/.mkd-owner.json`` naming ``command`` (the folder must exist)."""
    from mkd import __version__
    from mkd.utils import write_json

    path = Path(folder) / OWNER_FILE
    write_json(path, {"command": command, "mkd": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path


def owner_of(folder: str | os.PathLike) -> str | None:
    """The command recorded in ``FOLDER/.mkd-owner.json``, or ``None`` (no marker, unreadable)."""
    try:
        data = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    command = data.get("command") if isinstance(data, dict) else None
    return command if isinstance(command, str) else None


def legacy_run(folder: Path) -> bool:
    """A training run folder written before markers existed.

    Its ``config.json`` (written by :func:`mkd.bundle.run_bundle`) records this very folder as
    ``output_dir``, or its ``run.json`` (``mkd ablate``'s) has this folder's name as ``id``, or
    it holds nothing but a run's ``run.lock``.
    """
    folder = Path(folder)
    for name, key, want in (("config.json", "output_dir", str(folder.resolve())), ("run.json", "id", folder.name)):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key) == want and (name == "run.json" or "bundle_root" in data):
            return True
    return {p.name for p in folder.iterdir()} == {"run.lock"}


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_replaceable(
    folder: str | os.PathLike,
    commands: Collection[str],
    option: str = "`output_dir`",
    keep: Mapping[str, str | os.PathLike | None] | None = None,
    legacy: Callable[[Path], bool] | None = None,
    by: str = "`overwrite=True`",
) -> None:
    """Refuse to replace ``folder`` unless it is missing, empty, or was written by one of ``commands``.

    Never replaced, whatever its marker: a file or link, the current folder or a folder above
    it, and a folder of ``keep`` (``{"dataset": DATA, "runs folder": RUNS}``) or a folder above
    one of them.

    Args:
        folder: the folder that ``--overwrite`` would replace.
        commands: the commands whose marker makes ``folder`` replaceable (``("demo",)``).
        option: the parameter that named ``folder``, in backticks for the message (:class:`mkd.errors.MkdError`).
        keep: folders the command must not delete, by what they are.
        legacy: ``folder -> bool``: the folder was written by one of ``commands`` before
            markers existed (an unambiguous file of theirs).
        by: what would replace it, for the message (`` "`overwrite=True`" ``, ``"mkd report"``).

    Raises:
        MkdError: one line naming the folder, why it is kept and what to do.
    """
    path = Path(folder)
    if not path.exists() and not path.is_symlink():
        return
    names = " / ".join(f"mkd {c}" for c in commands)
    if path.is_symlink() or not path.is_dir():
        raise MkdError(f"{path}: not a folder; {by} replaces only a folder written by {names}: choose "
                       f"another {option}")  # fmt: skip
    real = path.resolve()
    if is_within(Path.cwd().resolve(), real):
        here = "the current folder" if real == Path.cwd().resolve() else "a folder above the current folder"
        raise MkdError(f"{path}: is {here}; {by} never replaces it: give {option} a new or empty folder")
    for what, other in (keep or {}).items():
        if other is None:
            continue
        other = Path(other).resolve()
        if is_within(other, real):
            rel = "is" if other == real else "holds"
            raise MkdError(f"{path}: {rel} the {what} {other}; {by} never replaces it: give {option} a new "
                           "or empty folder")  # fmt: skip
    if not any(path.iterdir()):
        return
    if owner_of(path) in commands or (legacy is not None and legacy(path)):
        return
    found = owner_of(path)
    why = f"written by mkd {found}" if found else f"not written by {names} (no {OWNER_FILE})"
    raise MkdError(f"{path}: {why} and not empty; {by} replaces only a folder written by {names}: choose "
                   f"another {option}, or move its files away yourself")  # fmt: skip
