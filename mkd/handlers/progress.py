"""A per-epoch progress bar for MONAI trainers (ignite's tqdm bar, showing the running loss)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from monai.utils import CommonKeys, min_version, optional_import

_ProgressBar, _ = optional_import("ignite.handlers", "0.4.4", min_version, "ProgressBar")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["TrainingProgressBar"]


def _loss(output) -> dict[str, float]:
    first = output[0] if isinstance(output, list) and output else output
    if isinstance(first, dict) and first.get(CommonKeys.LOSS) is not None:
        return {"loss": float(first[CommonKeys.LOSS])}
    return {}


class TrainingProgressBar:
    """One tqdm bar per epoch with the running loss; silent when stderr is not a terminal unless ``always``.

    Args:
        always: show the bar even when stderr is not a terminal (logs, CI).
        rank_zero_only: in a distributed run, only rank 0 shows it.
    """

    def __init__(self, always: bool = False, rank_zero_only: bool = True) -> None:
        self.always = always
        self.rank_zero_only = rank_zero_only

    def attach(self, engine: Engine) -> None:
        import torch.distributed as dist

        if not (self.always or sys.stderr.isatty()):
            return
        if self.rank_zero_only and dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
            return
        _ProgressBar(persist=False, desc="train").attach(engine, output_transform=_loss)
