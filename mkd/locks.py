"""Run locks: one process at a time per run, shared by ``mkd ablate`` and the training commands.

A lock is a small JSON file (host, pid, start time) created with ``O_CREAT | O_EXCL``,
which shared file systems such as NFS honour. A lock left by a process that no longer
exists on this host (a killed job) is taken over; a lock from another host is only
reported, since its process cannot be checked from here.

Taking over is atomic: a process removes a stale lock only while it holds the takeover
guard (``fcntl.flock`` on a hidden sibling file, released by the kernel if the process
dies) and after reading the lock again under it, so of several processes that find the
same stale lock exactly one gets it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mkd.errors import LockedError, MkdError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: takeover is not guarded
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "hold_lock",
    "acquire_lock",
    "release_lock",
    "ensure_lock",
    "release_own_lock",
    "lock_owner",
    "held_elsewhere",
    "HELD_LOCK_ENV",
]

logger = logging.getLogger(__name__)

#: set by a process that holds a lock for the children it launches (torchrun workers), so that
#: their own lock step sees the lock as theirs
HELD_LOCK_ENV = "MKD_HELD_LOCK"

#: lock files this process holds: resolved path -> who took it ("with" or "step")
_HELD: dict[str, str] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def lock_owner(path: str | os.PathLike) -> dict:
    """The ``{"host", "pid", "started"}`` recorded in a lock file (``{}`` when unreadable)."""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(owner: dict, host: str) -> bool:
    """The lock's process was on this host and has exited."""
    return owner.get("host") == host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"])


def held_elsewhere(path: str | os.PathLike) -> dict | None:
    """The owner of lock ``path`` when another live process (or one on another host) holds it, else ``None``."""
    path = Path(path)
    if not path.exists():
        return None
    owner = lock_owner(path)
    host = socket.gethostname()
    if _stale(owner, host) or (owner.get("host") == host and owner.get("pid") == os.getpid()):
        return None
    return owner


@contextmanager
def _takeover_guard(path: Path) -> Iterator[None]:
    """Hold ``.<lock name>.takeover`` beside ``path`` exclusively (``fcntl.flock``) while the block runs.

    The guard file is removed while still held; a process that locked a removed file
    (its inode no longer at the path) tries again, so two processes never both hold it.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    guard = path.with_name(f".{path.name}.takeover")
    while True:
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(guard).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                continue  # the holder before us removed this guard file
            try:
                yield
            finally:
                guard.unlink(missing_ok=True)
            return
        finally:
            os.close(fd)


def acquire_lock(path: str | os.PathLike, what: str) -> Path:
    """Create the lock file ``path`` for this process, taking over one whose process has exited.

    Args:
        path: the lock file.
        what: the locked thing, for the message (``"run teacher-t1-seed0"``).

    Raises:
        LockedError: ``path`` is held by a live process (or by one on another host); the
            message names its pid, host and start time.
    """
    path = Path(path)
    host = socket.gethostname()
    mine = json.dumps({"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock_owner(path)
            if _stale(owner, host):
                with _takeover_guard(path):
                    # read again under the guard: another process may have taken it over meanwhile
                    owner = lock_owner(path)
                    if not path.exists() or _stale(owner, host):
                        if path.exists():
                            logger.info("%s: taking over a lock left by pid %d, which has exited", what, owner["pid"])
                        path.unlink(missing_ok=True)
                        try:
                            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                        except FileExistsError:
                            continue  # a process that never saw the stale lock created one: look again
                        with os.fdopen(fd, "w") as f:
                            f.write(mine)
                        return path
                continue
            if not owner and not path.exists():
                continue  # released between our create and our read
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('started', '?')}"
            raise LockedError(
                f"{path}: {what} is being run by {who}; wait for it, or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return path
    raise MkdError(f"{path}: could not take the lock for {what}; try again")  # pragma: no cover - a race


def release_lock(path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    path = Path(path)
    owner = lock_owner(path)
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    _HELD.pop(str(path.resolve()), None)


@contextmanager
def hold_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock file ``path`` while the block runs; it is removed when the block ends, also on error.

    Raises:
        LockedError: see :func:`acquire_lock`.
    """
    path = acquire_lock(path, what)
    key = str(path.resolve())
    _HELD[key] = "with"
    previous = os.environ.get(HELD_LOCK_ENV)
    os.environ[HELD_LOCK_ENV] = key
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(HELD_LOCK_ENV, None)
        else:
            os.environ[HELD_LOCK_ENV] = previous
        release_lock(path)


def ensure_lock(path: str | os.PathLike, what: str) -> bool:
    """Take ``path`` unless this process (or the process that launched it) already holds it.

    The lock step of a bundle's ``initialize`` section: a run started by ``mkd`` already
    holds its lock; one started by ``python -m monai.bundle run`` takes it here.

    Returns:
        True when this call took the lock (release it with :func:`release_own_lock`).
    """
    key = str(Path(path).resolve())
    if key in _HELD:
        return False
    if os.environ.get(HELD_LOCK_ENV) == key and Path(key).exists():
        owner = lock_owner(key)
        if isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"]):
            return False  # a torchrun worker: the launching mkd process holds it
    acquire_lock(path, what)
    _HELD[key] = "step"
    return True


def release_own_lock(path: str | os.PathLike) -> None:
    """Release ``path`` if :func:`ensure_lock` took it (a bundle's ``finalize`` section)."""
    if _HELD.get(str(Path(path).resolve())) == "step":
        release_lock(path)
