"""MONAI / ignite event handlers: reconstruction loss, distillation, per-epoch CSV logging, atomic checkpoints."""

from __future__ import annotations

from mkd.handlers.checkpoint import AtomicCheckpointSaver
from mkd.handlers.csv_logger import LOSS_TERMS_KEY, EpochCSVLogger
from mkd.handlers.distillation import (
    THESIS_WEIGHTS,
    DistillationHandler,
    build_projector,
    distillation_weights,
    load_teacher,
    pool_spatial,
    pools_features,
)
from mkd.handlers.progress import TrainingProgressBar
from mkd.handlers.reconstruction import RECON_KEY, ReconstructionLossHandler, ReconstructionOutputHandler

__all__ = [
    "AtomicCheckpointSaver",
    "DistillationHandler",
    "THESIS_WEIGHTS",
    "build_projector",
    "distillation_weights",
    "load_teacher",
    "pool_spatial",
    "pools_features",
    "EpochCSVLogger",
    "LOSS_TERMS_KEY",
    "RECON_KEY",
    "ReconstructionLossHandler",
    "ReconstructionOutputHandler",
    "TrainingProgressBar",
]
