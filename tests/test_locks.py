"""mkd.locks: the one lock implementation of mkd ablate and the training commands."""

from __future__ import annotations

import json
import os
import socket

import pytest

from mkd.errors import MkdError
from mkd.locks import ensure_lock, hold_lock, release_own_lock


def _foreign_live_lock(path):
    """A lock held by another live process on this host: the parent of this test process."""
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "12:00"}))


def test_the_bundle_lock_step_is_a_no_op_inside_a_held_lock_and_takes_a_free_one(tmp_path):
    lock = tmp_path / "run.lock"
    with hold_lock(lock, "run x"):
        assert ensure_lock(lock, "run x") is False  # mkd's run_bundle holds it; the bundle's initialize step
        release_own_lock(lock)  # ... and its finalize step leave it alone
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    assert ensure_lock(lock, "run x") is True  # python -m monai.bundle run: the step takes it
    release_own_lock(lock)
    assert not lock.exists()


def test_the_bundle_lock_step_refuses_a_live_owner(tmp_path):
    lock = tmp_path / "run.lock"
    _foreign_live_lock(lock)
    with pytest.raises(MkdError) as err:
        ensure_lock(lock, "run x")
    assert str(err.value) == (
        f"{lock}: run x is being run by pid {os.getppid()} on {socket.gethostname()} since 12:00; wait for it, "
        "or delete the lock file if that process is gone"
    )
    release_own_lock(lock)  # not ours: kept
    assert json.loads(lock.read_text())["pid"] == os.getppid()
