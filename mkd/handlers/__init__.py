"""MONAI / ignite event handlers: reconstruction loss, distillation, per-epoch CSV logging, atomic checkpoints."""

from __future__ import annotations

from mkd.handlers.batch_augmentation import BatchAugmentation
from mkd.handlers.checkpoint import AtomicCheckpointSaver
from mkd.handlers.csv_logger import LOSS_TERMS_KEY, EpochCSVLogger
from mkd.handlers.distillation import (
    DEFAULT_RECIPE,
    LOGITS,
    RECIPES,
    THESIS_WEIGHTS,
    DistillationHandler,
    build_projector,
    distillation_terms,
    distillation_weights,
    load_teacher,
    needs_logits,
    pool_spatial,
    pools_features,
    recipe_setting,
    resolve_loss,
    resolve_terms,
    transfer_split,
)
from mkd.handlers.progress import TrainingProgressBar
from mkd.handlers.reconstruction import RECON_KEY, ReconstructionLossHandler, ReconstructionOutputHandler
from mkd.handlers.schedule import SmoothedEarlyStopping, steps_per_epoch
from mkd.handlers.settings import SETTINGS, DistillSettings, Setting, SettingsError, distillation_settings
from mkd.handlers.teacher_check import TeacherCheck, validation_quality

__all__ = [
    "AtomicCheckpointSaver",
    "BatchAugmentation",
    "DistillationHandler",
    "TeacherCheck",
    "validation_quality",
    "THESIS_WEIGHTS",
    "RECIPES",
    "DEFAULT_RECIPE",
    "recipe_setting",
    "SETTINGS",
    "Setting",
    "SettingsError",
    "DistillSettings",
    "distillation_settings",
    "transfer_split",
    "build_projector",
    "distillation_weights",
    "distillation_terms",
    "LOGITS",
    "needs_logits",
    "load_teacher",
    "pool_spatial",
    "pools_features",
    "resolve_loss",
    "resolve_terms",
    "EpochCSVLogger",
    "LOSS_TERMS_KEY",
    "RECON_KEY",
    "ReconstructionLossHandler",
    "ReconstructionOutputHandler",
    "TrainingProgressBar",
    "SmoothedEarlyStopping",
    "steps_per_epoch",
]
