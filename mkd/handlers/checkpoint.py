"""MONAI's CheckpointSaver with atomic writes.

MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)``, straight
to the final file name. A run killed while a checkpoint is being written (a SIGKILL,
a cluster's time limit, a full disk) then leaves a truncated ``checkpoint_epoch=N.pt``.
With ``n_saved=1`` the previous epoch's file has already been deleted, so ``--resume``
has nothing to continue from. :class:`AtomicCheckpointSaver` is the same handler, but
every file is written to a temporary file in the same folder and renamed into place
when complete (ignite's ``DiskSaver(atomic=True)``), and the file it replaces is
deleted only after that (ignite's ``Checkpoint`` deletes it first). A checkpoint
either exists whole or not at all, and the newest complete one is always on disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import min_version, optional_import

from mkd.utils import umask_mode

DiskSaver, _ = optional_import("ignite.handlers", "0.4.4", min_version, "DiskSaver")

__all__ = ["AtomicCheckpointSaver"]


class _AtomicDiskSaver(DiskSaver):
    """ignite's atomic DiskSaver with MONAI's optional fixed file name, removing old files last.

    ignite's ``Checkpoint`` asks for the outgoing file to be removed *before* it saves the
    new one; this saver defers that removal until the new file is complete.
    """

    def __init__(self, dirname: str, filename: str | None = None, keep_one: bool = False) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.keep_one = keep_one
        self._outgoing: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        umask_mode(os.path.join(self.dirname, filename), directory=False)  # ignite's temp file was 0o600
        for old in self._outgoing:
            if old != filename:  # the same name was just replaced atomically
                super().remove(old)
        self._outgoing = []
        if self.keep_one:
            self._remove_earlier_runs_files(filename)

    def _remove_earlier_runs_files(self, filename: str) -> None:
        """Delete ``<prefix>=N.pt`` files of the same series that ignite does not track.

        ignite only deletes files it saved in this process: after ``--resume`` the checkpoint
        resumed from (and any truncated one beside it) would otherwise stay forever.
        """
        m = re.fullmatch(r"(.*=)\d+(\.\w+)", filename)
        if m is None:
            return
        series = re.compile(re.escape(m.group(1)) + r"\d+" + re.escape(m.group(2)))
        for other in os.listdir(self.dirname):
            if other != filename and series.fullmatch(other):
                super().remove(other)

    def remove(self, filename: str) -> None:
        self._outgoing.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` whose files are written atomically.

    Same arguments and behaviour as MONAI's handler; only the writing differs.

    Raises:
        RuntimeError: the installed MONAI builds its savers differently (nothing to make atomic).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint")
        checkpoints = [c for c in (getattr(self, name, None) for name in names) if c is not None]
        if not checkpoints:
            raise RuntimeError("AtomicCheckpointSaver: this MONAI version's CheckpointSaver has no savers to replace")
        for name, ckpt in zip(names, (getattr(self, name, None) for name in names)):
            if ckpt is None:
                continue
            old = ckpt.save_handler
            keep_one = name == "_interval_checkpoint" and ckpt.n_saved == 1
            ckpt.save_handler = _AtomicDiskSaver(str(old.dirname), getattr(old, "filename", None), keep_one)
