"""How long a run trains: a fixed number of optimiser steps per epoch, and a stopping rule that survives noise.

Two things decide whether a comparison of students is fair and whether a teacher is trained
to convergence (docs/training.md, "Schedule and stopping"):

- :func:`steps_per_epoch` makes the number of optimiser steps of an epoch a setting of its own
  (bundle key ``epoch_splits``), instead of a side effect of the training list's length. A
  baseline student and a distilled student with the unlabelled transfer set then take the
  same number of steps, and see the same learning-rate schedule, although the distilled
  student's list is longer.
- :class:`SmoothedEarlyStopping` stops a run only after ``min_epochs`` and only when an
  exponential moving average of the key metric has not improved for ``patience``
  validations. A raw validation curve of a small network on a few patients jumps by 0.3-0.5
  Dice between epochs; "3 epochs without a new best" then stops a run that is still learning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["steps_per_epoch", "SmoothedEarlyStopping"]

logger = logging.getLogger(__name__)


def steps_per_epoch(
    dataset_dir: str | os.PathLike,
    splits: Sequence[str] | None,
    batch_size: int,
    world_size: int | None = None,
) -> int | None:
    """Optimiser steps of one epoch when an epoch is defined by datalist lists rather than the training list.

    Args:
        dataset_dir: a folder written by ``mkd prepare``.
        splits: lists whose slices make one epoch, e.g. ``["student", "transfer"]``; ``None`` or
            empty: one pass over the training loader (the trainer's own epoch length).
        batch_size: slices per step (per process).
        world_size: processes of a distributed run; default: ``torch.distributed``'s when it is
            initialised, else 1.

    Returns:
        ``floor(slices / (batch_size * world_size))`` (at least 1), or ``None`` for one pass.

    Raises:
        ValueError: a non-positive ``batch_size`` or an unknown list name.

    Example:
        >>> steps_per_epoch("mkd_data", ["student", "transfer"], 16)  # doctest: +SKIP
        45
    """
    if not splits:
        return None
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    from mkd.data import load_split

    if isinstance(splits, str):
        splits = [splits]
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    slices = sum(len(load_split(dataset_dir, str(s))) for s in splits)
    return max(1, slices // (int(batch_size) * max(1, int(world_size))))


class SmoothedEarlyStopping:
    """Stop training when the smoothed validation score stops improving, never before ``min_epochs``.

    After each validation the score ``x_t`` (by default the key metric) updates an exponential
    moving average ``m_t = smoothing * m_{t-1} + (1 - smoothing) * x_t`` (``m_1 = x_1``). A
    validation counts as an improvement when ``m_t > best + min_delta``; training stops at the
    first validation that comes after at least ``min_epochs`` trainer epochs and after
    ``patience`` validations in a row without an improvement. ``smoothing = 0`` and
    ``min_epochs = 0`` give ignite's ``EarlyStopping``. Model selection is not affected: the
    best checkpoint is still chosen on the raw key metric.

    Attach it to the *evaluator* (as MONAI's ``EarlyStopHandler``) and give it the trainer.

    Args:
        patience: validations without improvement of the smoothed score before stopping (> 0).
        score_function: ``engine -> float``, higher is better.
        trainer: the trainer to stop; or :meth:`set_trainer` later.
        min_epochs: no stop before the trainer has run this many epochs.
        smoothing: weight of the past in the moving average, in ``[0, 1)``.
        min_delta: an improvement must be larger than this.

    Attributes:
        history: ``[(epoch, score, smoothed), ...]`` of every validation seen.
        stopped_epoch: the trainer epoch at which it stopped training, or ``None``.

    Example:
        >>> stop = SmoothedEarlyStopping(patience=3, score_function=lambda e: 0.0, min_epochs=10)
        >>> [stop.update(x, epoch=i + 1) for i, x in enumerate([0.2, 0.49, 0.04, 0.63, 0.49, 0.6, 0.2])]
        [False, False, False, False, False, False, False]
    """

    def __init__(
        self,
        patience: int,
        score_function: Callable[[Engine], float],
        trainer: Engine | None = None,
        min_epochs: int = 0,
        smoothing: float = 0.0,
        min_delta: float = 0.0,
    ) -> None:
        if int(patience) < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if int(min_epochs) < 0:
            raise ValueError(f"min_epochs must be >= 0, got {min_epochs!r}")
        if float(min_delta) < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.patience = int(patience)
        self.score_function = score_function
        self.trainer = trainer
        self.min_epochs = int(min_epochs)
        self.smoothing = float(smoothing)
        self.min_delta = float(min_delta)
        self.history: list[tuple[int, float, float]] = []
        self.best: float | None = None
        self.counter = 0
        self.stopped_epoch: int | None = None

    def set_trainer(self, trainer: Engine) -> None:
        self.trainer = trainer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def update(self, score: float, epoch: int) -> bool:
        """Feed one validation score seen after trainer epoch ``epoch``; return whether to stop now."""
        score = float(score)
        if not math.isfinite(score):  # a NaN validation is no improvement and no smoothing input
            self.counter += 1
            smoothed = self.history[-1][2] if self.history else float("nan")
        else:
            prev = next((h[2] for h in reversed(self.history) if math.isfinite(h[2])), None)
            smoothed = score if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * score
            if self.best is None or smoothed > self.best + self.min_delta:
                self.best, self.counter = smoothed, 0
            else:
                self.counter += 1
        self.history.append((int(epoch), score, smoothed))
        return int(epoch) >= self.min_epochs and self.counter >= self.patience

    def __call__(self, engine: Engine) -> None:
        if self.trainer is None:
            raise RuntimeError("SmoothedEarlyStopping has no trainer; call set_trainer(trainer) first")
        epoch = int(self.trainer.state.epoch)
        if self.update(self.score_function(engine), epoch):
            self.stopped_epoch = epoch
            logger.info(
                "early stopping at epoch %d: the smoothed validation score (%.4f) has not improved on %.4f for %d "
                "validations (smoothing %.2f, at least %d epochs)",
                epoch, self.history[-1][2], self.best if self.best is not None else float("nan"), self.counter,
                self.smoothing, self.min_epochs,
            )  # fmt: skip
            self.trainer.terminate()

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
        self.best = state.get("best")
        self.counter = int(state.get("counter", 0))
