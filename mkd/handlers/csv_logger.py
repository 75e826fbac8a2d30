"""Per-epoch CSV log of training losses and validation metrics."""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import CommonKeys, min_version, optional_import

from mkd.utils import atomic_file

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["EpochCSVLogger", "LOSS_TERMS_KEY"]

#: attribute of ``engine.state`` where handlers put the named loss terms of the
#: current iteration (a ``{name: scalar tensor}`` dict) so that they are logged
#: separately. (Not in ``engine.state.output``: MONAI decollates that per slice.)
LOSS_TERMS_KEY = "loss_terms"

logger = logging.getLogger(__name__)


class EpochCSVLogger:
    """Write one CSV row per training epoch: mean loss, each named loss term, lr, time and validation metrics.

    Attach it to the trainer *after* the ``ValidationHandler`` so that the row
    of an epoch carries that epoch's validation metrics. Named loss terms are
    read from ``engine.state.loss_terms`` (filled by
    :class:`~mkd.handlers.ReconstructionLossHandler` and
    :class:`~mkd.handlers.DistillationHandler`); with ``log_dir`` they also go
    to TensorBoard, per iteration (``iteration/<term>``) and per epoch
    (``epoch/<term>``). On resume, rows of epochs that will run again are dropped.

    Args:
        filename: path of the CSV file.
        evaluator: the validation engine whose ``state.metrics`` are logged
            (``None`` logs training columns only).
        log_dir: TensorBoard folder for the loss terms (``None``: CSV only).
        rank_zero_only: in a distributed run, only rank 0 writes.
    """

    def __init__(
        self,
        filename: str | os.PathLike,
        evaluator: Engine | None = None,
        log_dir: str | os.PathLike | None = None,
        rank_zero_only: bool = True,
    ):
        self.filename = Path(filename)
        self.evaluator = evaluator
        self.log_dir = log_dir
        self._writer = None
        self.rank_zero_only = rank_zero_only
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._t0 = 0.0
        self._lr: float | None = None
        self._trimmed = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _writes(self) -> bool:
        if not self.rank_zero_only:
            return True
        return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0
        )

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.log_dir is None or not self._writes():
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_scalar(tag, value, step)

    def _close(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _started(self, engine: Engine) -> None:
        self._trimmed = False

    def _trim(self, engine: Engine) -> None:
        # at the first epoch of a run (after any checkpoint was restored at STARTED),
        # drop the rows of epochs that will run again
        self._trimmed = True
        if self.filename.exists() and self._writes():
            with open(self.filename, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < engine.state.epoch]
            self._rewrite(rows)

    def _epoch_started(self, engine: Engine) -> None:
        if not self._trimmed:
            self._trim(engine)
        self._sums.clear()
        self._count = 0
        self._t0 = time.perf_counter()
        optimizer = getattr(engine, "optimizer", None)
        self._lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None

    def _iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        first = output[0] if isinstance(output, list) and output else output  # decollated or not
        if isinstance(first, dict) and first.get(CommonKeys.LOSS) is not None:
            self._sums["train_loss"] += float(first[CommonKeys.LOSS])
        terms = getattr(engine.state, LOSS_TERMS_KEY, None) or {}
        for name, value in terms.items():
            self._sums[f"train_{name}"] += float(value)
            self._scalar(f"iteration/{name}", float(value), engine.state.iteration)
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        if not self._writes():
            return
        row: dict[str, Any] = {"epoch": engine.state.epoch}
        row.update({k: v / max(self._count, 1) for k, v in self._sums.items()})
        for name, value in row.items():
            if name.startswith("train_") and name != "train_loss":
                self._scalar(f"epoch/{name[len('train_') :]}", value, engine.state.epoch)
        row["epoch_time_s"] = round(time.perf_counter() - self._t0, 3)
        if self._lr is not None:
            row["lr"] = self._lr  # the rate this epoch trained with
        if self.evaluator is not None and self.evaluator.state.epoch == engine.state.epoch:
            for name, value in self.evaluator.state.metrics.items():
                if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                    row[name] = float(value)
        rows = []
        if self.filename.exists():
            with open(self.filename, newline="") as fh:
                rows = list(csv.DictReader(fh))
        rows.append(row)
        self._rewrite(rows)
        msg = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items())
        logger.info("epoch summary: %s", msg)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        fields: list[str] = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        with atomic_file(self.filename, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
