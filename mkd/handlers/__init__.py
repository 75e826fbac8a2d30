"""MONAI / ignite event handlers: reconstruction loss, distillation, per-epoch CSV logging, atomic checkpoints.

The names are imported on first use (:pep:`562`), so that ``mkd.handlers.settings`` (the distillation
settings the CLI builds its options from) is read without importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: public name -> the submodule that defines it
_WHERE = {
    "AtomicCheckpointSaver": "mkd.handlers.checkpoint",
    "BatchAugmentation": "mkd.handlers.batch_augmentation",
    "DistillationHandler": "mkd.handlers.distillation",
    "TeacherCheck": "mkd.handlers.teacher_check",
    "validation_quality": "mkd.handlers.teacher_check",
    "THESIS_WEIGHTS": "mkd.handlers.distillation",
    "RECIPES": "mkd.handlers.distillation",
    "DEFAULT_RECIPE": "mkd.handlers.distillation",
    "recipe_setting": "mkd.handlers.distillation",
    "SETTINGS": "mkd.handlers.settings",
    "Setting": "mkd.handlers.settings",
    "SettingsError": "mkd.handlers.settings",
    "DistillSettings": "mkd.handlers.settings",
    "distillation_settings": "mkd.handlers.settings",
    "transfer_split": "mkd.handlers.distillation",
    "build_projector": "mkd.handlers.distillation",
    "distillation_weights": "mkd.handlers.distillation",
    "distillation_terms": "mkd.handlers.distillation",
    "LOGITS": "mkd.handlers.distillation",
    "needs_logits": "mkd.handlers.distillation",
    "load_teacher": "mkd.handlers.distillation",
    "pool_spatial": "mkd.handlers.distillation",
    "pools_features": "mkd.handlers.distillation",
    "resolve_loss": "mkd.handlers.distillation",
    "resolve_terms": "mkd.handlers.distillation",
    "EpochCSVLogger": "mkd.handlers.csv_logger",
    "LOSS_TERMS_KEY": "mkd.handlers.csv_logger",
    "RECON_KEY": "mkd.handlers.reconstruction",
    "ReconstructionLossHandler": "mkd.handlers.reconstruction",
    "ReconstructionOutputHandler": "mkd.handlers.reconstruction",
    "TrainingProgressBar": "mkd.handlers.progress",
    "SmoothedEarlyStopping": "mkd.handlers.schedule",
    "steps_per_epoch": "mkd.handlers.schedule",
}

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
