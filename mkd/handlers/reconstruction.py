"""Reconstruction head of the multi-task teachers, as MONAI engine handlers.

The multi-task teachers return segmentation logits only, so stock MONAI
engines, metrics and savers work on them unchanged. Their reconstruction is
read with a :class:`~mkd.networks.FeatureRecorder` on the ``recon`` scale:

* :class:`ReconstructionLossHandler` (trainer) adds ``weight * MSE(recon, image)``
  to the segmentation loss before backward;
* :class:`ReconstructionOutputHandler` (evaluator) puts the reconstruction in
  ``engine.state.output["recon"]`` so that MONAI's ``PeakSignalToNoiseRatio``
  metric handler can score it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys, min_version, optional_import

from mkd.handlers.csv_logger import LOSS_TERMS_KEY

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["ReconstructionLossHandler", "ReconstructionOutputHandler", "RECON_KEY"]

RECON_KEY = "recon"


class _RecordingHandler:
    """Switch a ``recon`` feature recorder on for the forward pass of each iteration."""

    scale = "recon"

    def __init__(self, network: torch.nn.Module) -> None:
        from mkd.networks import FeatureRecorder

        self.network = network
        self.recorder = FeatureRecorder(network, [self.scale])
        self._stack = contextlib.ExitStack()

    def _start(self, engine: Engine) -> None:
        self._stack.close()
        self._stack.enter_context(self.recorder.recording())

    def _stop(self) -> torch.Tensor:
        features = dict(self.recorder.features)
        self._stack.close()
        if self.scale not in features:
            raise RuntimeError(
                f"the network ({type(self.network).__name__}) produced no reconstruction during forward; "
                "is it a multi-task teacher with reconstruct=True?"
            )
        return features[self.scale]

    def _close(self, engine: Engine) -> None:
        self._stack.close()
        self.recorder.close()


class ReconstructionLossHandler(_RecordingHandler):
    """Add ``weight * MSE(reconstruction, input image)`` to the trainer's loss before backward.

    The segmentation part and the reconstruction part are logged separately
    as ``seg`` and ``recon`` loss terms.

    Args:
        network: the multi-task network being trained (may be DDP-wrapped).
        weight: λ_rec, the weight of the reconstruction MSE (0.2 in the thesis).

    Raises:
        ValueError: ``weight`` is negative.
    """

    def __init__(self, network: torch.nn.Module, weight: float = 0.2) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        super().__init__(network)
        self.weight = float(weight)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._add_loss)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _add_loss(self, engine: Engine) -> None:
        recon = self._stop().float()
        image = engine.state.output[CommonKeys.IMAGE].float()
        if recon.shape != image.shape:
            raise ValueError(
                f"reconstruction shape {tuple(recon.shape)} differs from image shape {tuple(image.shape)}."
            )
        seg_loss = engine.state.output[CommonKeys.LOSS]
        rec_loss = F.mse_loss(recon, image)
        engine.state.output[CommonKeys.LOSS] = seg_loss + self.weight * rec_loss
        setattr(engine.state, LOSS_TERMS_KEY, {"seg": seg_loss.detach(), "recon": rec_loss.detach()})


class ReconstructionOutputHandler(_RecordingHandler):
    """Expose the reconstruction of each evaluation batch as ``engine.state.output["recon"]``.

    Use with ``monai.handlers.PeakSignalToNoiseRatio(max_val=1.0,
    output_transform=from_engine(["recon", "image"]))``.

    Args:
        network: the multi-task network being evaluated.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._store)

    def _store(self, engine: Engine) -> None:
        engine.state.output[RECON_KEY] = self._stop().detach().float()
