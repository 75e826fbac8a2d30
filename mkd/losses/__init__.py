"""mkd.losses: the distillation losses (InfoNCE, prediction-map KD, feature MSE, CWD, DIST, pair-wise and
region affinity) and the labelled-only wrapper.

:data:`LOSSES` names the distillation losses. A declared term of ``distill.json`` (``terms``, see
:class:`mkd.handlers.DistillationHandler`) may name its loss by one of these names (plus ``kwargs``),
and the ones that apply to feature scales are ``mkd distill --loss`` / grid ``loss`` choices. A class's
``inputs`` says where it applies: ``"features"`` (a scale), ``"logits"``, or both; a class without it is a
feature loss. A new distillation loss needs no entry here to be used: declare it as a term with a
``_target_``; add it here to name it by a string.
"""

from __future__ import annotations

from mkd.losses.affinity import PairwiseAffinityLoss
from mkd.losses.cwd import CWDLoss
from mkd.losses.dist import DISTLoss
from mkd.losses.feature_mse import FeatureMSELoss
from mkd.losses.infonce import InfoNCELoss, sample_locations
from mkd.losses.labelled import LabelledOnly, labelled_mask
from mkd.losses.pmd import PMDLoss
from mkd.losses.region_affinity import RegionAffinityLoss
from mkd.losses.soft_dice import SoftDiceKD

#: distillation losses by name: ``contrastive`` (InfoNCE, the thesis), ``mse`` (FitNets feature regression),
#: ``cwd`` (channel-wise distribution, features or logits), ``dist`` (Pearson relations, logits only),
#: ``affinity`` (pair-wise location affinity, raw features), ``region_affinity`` (EMKD, raw features + labels),
#: ``soft_dice`` (batch Dice against the teacher's prediction, logits only)
LOSSES: dict[str, type] = {
    "contrastive": InfoNCELoss,
    "mse": FeatureMSELoss,
    "cwd": CWDLoss,
    "dist": DISTLoss,
    "affinity": PairwiseAffinityLoss,
    "region_affinity": RegionAffinityLoss,
    "soft_dice": SoftDiceKD,
}

#: the names of :data:`LOSSES` that apply to a feature scale: the choices of ``--loss`` and a grid's ``loss``
#: (a logits-only loss such as ``dist`` is declared as a term on ``"logits"`` instead)
FEATURE_LOSSES: tuple[str, ...] = tuple(
    n for n, c in LOSSES.items() if "features" in getattr(c, "inputs", ("features",))
)

__all__ = [
    "SoftDiceKD",
    "LOSSES",
    "FEATURE_LOSSES",
    "InfoNCELoss",
    "PMDLoss",
    "FeatureMSELoss",
    "CWDLoss",
    "DISTLoss",
    "PairwiseAffinityLoss",
    "RegionAffinityLoss",
    "LabelledOnly",
    "labelled_mask",
    "sample_locations",
]
