"""Private helpers shared by the mkd losses: reduction handling and float32 computation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from monai.utils import LossReduction

__all__ = ["check_reduction", "reduce", "float32_compute"]

#: MONAI's loss reductions: ``none``, ``mean``, ``sum``
_REDUCTIONS = tuple(r.value for r in LossReduction)


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of ``"none"``, ``"mean"``, ``"sum"``.

    Raises:
        ValueError: for any other value.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {_REDUCTIONS}.")
    return reduction


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` (``"none"``, ``"mean"`` or ``"sum"``) to a tensor of per-element losses."""
    if reduction == LossReduction.MEAN:
        return loss.mean()
    if reduction == LossReduction.SUM:
        return loss.sum()
    return loss


@contextlib.contextmanager
def float32_compute(device: torch.device) -> Iterator[None]:
    """Switch autocast off on ``device`` so that float32 inputs stay float32 inside the block."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to switch off
        ctx = contextlib.nullcontext()
    with ctx:
        yield
