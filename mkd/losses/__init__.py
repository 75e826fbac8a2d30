"""mkd.losses: the distillation losses (InfoNCE, prediction-map KD, feature MSE) and the labelled-only wrapper."""

from __future__ import annotations

from mkd.losses.feature_mse import FeatureMSELoss
from mkd.losses.infonce import InfoNCELoss, sample_locations
from mkd.losses.labelled import LabelledOnly, labelled_mask
from mkd.losses.pmd import PMDLoss

__all__ = ["InfoNCELoss", "PMDLoss", "FeatureMSELoss", "LabelledOnly", "labelled_mask", "sample_locations"]
