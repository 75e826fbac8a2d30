"""A batch-level random transform (the MixUp / CutMix of slice pairs) applied to a trainer's batch.

Attached to a stock :class:`monai.engines.SupervisedTrainer`, :class:`BatchAugmentation` replaces
``engine.state.batch`` at ``ITERATION_STARTED``, before the trainer's ``prepare_batch``. Everything
after it sees the transformed batch: the student's forward, the supervised loss and, in a
distillation run, the live teacher, which :class:`~mkd.handlers.DistillationHandler` runs on the very
input tensor the student received (the trainer's ``output["image"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["BatchAugmentation"]


class BatchAugmentation:
    """Apply a random transform to every training batch before the step (e.g. :class:`mkd.data.RandMixSlicesd`).

    Args:
        transform: called as ``transform(batch)`` on the collated batch dict, returning the new batch.
        seed: seed of the transform's random state (``transform.set_random_state(seed)``) when the run
            starts. ``None`` draws it from torch's default generator without advancing it, as MONAI's
            ``DataLoader`` seeds its transforms, so ``monai.utils.set_determinism(seed)`` fixes it and a run
            without this handler draws the same numbers as before.

    Raises:
        ValueError: ``transform`` is not callable.

    Example (in a bundle)::

        {"_target_": "mkd.handlers.BatchAugmentation", "transform": "$mkd.data.batch_mix('consistent')"}
    """

    def __init__(self, transform: Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]], seed: int | None = None):
        if not callable(transform):
            raise ValueError(f"transform must be callable on a batch dict, got {type(transform).__name__}")
        self.transform = transform
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._seed)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _seed(self, engine: Engine | None = None) -> None:
        if not hasattr(self.transform, "set_random_state"):
            return
        seed = self.seed
        if seed is None:
            with torch.random.fork_rng(devices=[]):
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.transform.set_random_state(seed=seed)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        if not isinstance(batch, Mapping):
            raise ValueError(f"{type(self).__name__} needs a dict batch, got {type(batch).__name__}")
        engine.state.batch = self.transform(batch)
