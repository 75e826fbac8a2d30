"""mkd.losses: the distillation losses (InfoNCE, prediction-map KD, feature MSE) and the labelled-only wrapper.

:data:`LOSSES` names the feature losses (``mkd distill --loss``, the ablation grids' ``loss``).
A new distillation loss needs no entry here to be used: declare it as a term of
``distill.json`` (``terms``, see :class:`mkd.handlers.DistillationHandler`); add it here to
make it a ``--loss`` choice.
"""

from __future__ import annotations

from mkd.losses.feature_mse import FeatureMSELoss
from mkd.losses.infonce import InfoNCELoss, sample_locations
from mkd.losses.labelled import LabelledOnly, labelled_mask
from mkd.losses.pmd import PMDLoss

#: feature losses by name: ``contrastive`` (InfoNCE, the thesis) and ``mse`` (FitNets feature regression)
LOSSES: dict[str, type] = {"contrastive": InfoNCELoss, "mse": FeatureMSELoss}

__all__ = ["LOSSES", "InfoNCELoss", "PMDLoss", "FeatureMSELoss", "LabelledOnly", "labelled_mask", "sample_locations"]
