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


def _race_worker(root: str, trials: int, barrier, results) -> None:
    """Take over the stale lock of every trial at the same moment as the other workers."""
    from pathlib import Path

    from mkd.locks import acquire_lock

    for t in range(trials):
        barrier.wait()
        try:
            acquire_lock(Path(root) / f"{t}.lock", f"run {t}")
            won = True
        except MkdError:  # held by the winner
            won = False
        results.put((t, os.getpid(), won))


def test_exactly_one_of_several_processes_takes_over_a_stale_lock(tmp_path):
    """Two processes that found a lock left by a dead process both took it (36 of 200 trials, issue 18)."""
    import multiprocessing
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    trials, workers = 300, 4
    for t in range(trials):
        (tmp_path / f"{t}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "x"}))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), trials, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(trials * workers)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners: dict[int, list[int]] = {}
    for t, pid, won in outcomes:
        winners.setdefault(t, [])
        if won:
            winners[t].append(pid)
    double = {t: pids for t, pids in winners.items() if len(pids) != 1}
    assert not double, f"{len(double)} of {trials} trials without exactly one owner: {dict(list(double.items())[:3])}"
    for t, (pid,) in winners.items():
        assert json.loads((tmp_path / f"{t}.lock").read_text())["pid"] == pid
    assert not list(tmp_path.glob(".*.takeover"))  # the guards are gone
