"""Multi-scale contrastive knowledge distillation as a MONAI / ignite event handler.

Attached to a stock :class:`monai.engines.SupervisedTrainer` whose network is
the student, :class:`DistillationHandler` turns the trainer's segmentation loss
``L_seg`` into

    L = w_seg * L_seg + sum over terms t of w_t * loss_t(student input, teacher input)

before backward. The terms are declared, as torchdistill does: a mapping
``{name: {"input": ..., "loss": ..., "weight": ...}}`` where ``input`` is a feature
scale (``enc``, ``bn``, ``dec``: student / teacher features recorded with forward
hooks and brought to a common shape by trainable projector heads
:class:`~mkd.networks.projector.ProjectorHeads`, which must be in the optimiser)
or ``"logits"`` (the student's and teacher's logits). ``loss`` is any callable
(InfoNCE, feature MSE, prediction-map KD, or a new loss class) or the name of one
in :data:`mkd.losses.LOSSES` (built with the term's optional ``kwargs``, see
:func:`resolve_terms`), and ``weight`` its weight. :func:`distillation_terms`
builds the terms of the declared settings (:mod:`mkd.handlers.settings`: ``scales``,
``feature_loss``, ``pmd``, ``weight_overrides``, the recipes); a bundle adds
its own under ``terms`` in ``distill.json``. The student stays a plain logits-out
network, so stock evaluators, metrics, checkpoint savers and inferers work on
it unchanged. The teacher is frozen (eval mode, no gradients); its outputs come
either from a live forward pass or from the teacher cache
(:mod:`mkd.data.teacher_cache`) when the batch carries them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys, min_version, optional_import

from mkd.errors import InputError
from mkd.handlers.csv_logger import LOSS_TERMS_KEY
from mkd.handlers.settings import DEFAULT_RECIPE, RECIPES, THESIS_WEIGHTS, distillation_weights, recipe_setting
from mkd.networks.base import reconstruction
from mkd.networks.projector import pool_spatial

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = [
    "DistillationHandler",
    "LOGITS",
    "distillation_terms",
    "needs_logits",
    "pools_features",
    "resolve_loss",
    "resolve_terms",
    "pool_spatial",
    "THESIS_WEIGHTS",
    "load_teacher",
    "build_projector",
    "distillation_weights",
    "RECIPES",
    "DEFAULT_RECIPE",
    "recipe_setting",
    "transfer_split",
]

logger = logging.getLogger(__name__)

#: the ``input`` of a distillation term that compares the student's and the teacher's logits
LOGITS = "logits"
#: the weight keys that are not feature scales: the trainer's own loss and the terms on the logits
LOGIT_TERMS = ("seg", "pmd", "dice")


def transfer_split(dataset_dir: str | os.PathLike, transfer: bool) -> list[dict]:
    """The unlabelled transfer set of a distillation run (``load_split(dataset_dir, "transfer")``), said in one line.

    Args:
        dataset_dir: a folder written by ``mkd prepare``.
        transfer: the run's ``transfer`` setting (its recipe's by default).

    Returns:
        The transfer items (no ``label`` key), or ``[]`` when ``transfer`` is off.
    """
    if not transfer:
        return []
    from mkd.data import load_split

    items = load_split(dataset_dir, "transfer")
    if items:
        logger.info("transfer set on: the student also learns from the teacher on %d unlabelled slices (training "
                    "patients outside its half and imagesTs; their labels are never read)", len(items))  # fmt: skip
    else:
        logger.info("transfer set on, but %s has no unlabelled slices: the student learns from its labelled "
                    "slices only", dataset_dir)  # fmt: skip
    return items


#: the keys of a declared term; ``kwargs`` is optional (constructor arguments of a loss named by a string)
TERM_KEYS = ("input", "loss", "weight")
_FEATURES = "features"


def resolve_loss(loss: Any, kwargs: Mapping[str, Any] | None = None, where: str = "loss") -> Any:
    """The loss of a distillation term: a name in :data:`mkd.losses.LOSSES` is built with ``kwargs``.

    Plain data is enough to declare a term (``--set 'terms={"cwd": {"input": "logits", "loss": "cwd",
    "weight": 1.0, "kwargs": {"temperature": 4.0}}}'``), without a ``_target_``. Anything that is not a
    string (a loss module or function, e.g. one built by the bundle from a ``_target_``) is returned as is.

    Args:
        loss: a name in ``LOSSES``, or a callable loss.
        kwargs: constructor arguments of a loss named by a string.
        where: what to call the loss in error messages.

    Raises:
        ValueError: an unknown name (the message lists the known ones), ``kwargs`` that are not a mapping,
            that the loss does not take, or given with a loss that is not a name; a loss that is not callable.

    Example:
        >>> resolve_loss("cwd", {"temperature": 2.0})
        CWDLoss(temperature=2.0, reduction='mean')
    """
    from mkd.losses import LOSSES

    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: kwargs must be a mapping of constructor arguments; got {kwargs!r}.")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"{where}: {loss!r} is not a loss in mkd.losses.LOSSES; known: {', '.join(LOSSES)}.")
        cls = LOSSES[loss]
        accepted = inspect.signature(cls).parameters
        unknown = sorted(k for k in (kwargs or {}) if k not in accepted)
        if unknown:
            raise ValueError(f"{where}: {cls.__name__} ({loss!r}) takes no argument {unknown}; it takes "
                             f"{[k for k in accepted if k != 'self']}.")  # fmt: skip
        return cls(**dict(kwargs or {}))
    if kwargs:
        raise ValueError(f"{where}: kwargs are for a loss named by a string (a name in mkd.losses.LOSSES); "
                         f"got a {type(loss).__name__}.")  # fmt: skip
    if not callable(loss):
        raise ValueError(f"{where}: must be a callable loss or a name in mkd.losses.LOSSES; got {loss!r}.")
    return loss


def resolve_terms(terms: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check declared terms and build the losses named by a string (:func:`resolve_loss`).

    Each term is ``{"input": scale or "logits", "loss": callable or name, "weight": float}``, plus
    ``"kwargs"`` for a loss named by a string. A loss class that says where it applies (its ``inputs``:
    ``"features"``, ``"logits"``) must apply to the term's input.

    Returns:
        ``{name: {"input", "loss", "weight"}}`` with every loss a callable and every weight a float.

    Raises:
        ValueError: other keys, a negative weight, an unknown loss name or argument, a loss on an input
            it does not apply to.

    Example:
        >>> terms = resolve_terms({"dist": {"input": "logits", "loss": "dist", "weight": 1}})
        >>> type(terms["dist"]["loss"]).__name__, terms["dist"]["weight"]
        ('DISTLoss', 1.0)
    """
    out: dict[str, dict[str, Any]] = {}
    for name, term in terms.items():
        if not isinstance(term, Mapping) or not set(TERM_KEYS) <= set(term) <= {*TERM_KEYS, "kwargs"}:
            got = sorted(term) if isinstance(term, Mapping) else type(term).__name__
            raise ValueError(f"distillation term {name!r} must have the keys input, loss and weight; got {got} "
                             "(and optionally kwargs, for a loss named by a string).")  # fmt: skip
        if float(term["weight"]) < 0:
            raise ValueError(f"distillation term {name!r}: weight must be >= 0; got {term['weight']}.")
        loss = resolve_loss(term["loss"], term.get("kwargs"), where=f"distillation term {name!r}")
        kind = LOGITS if term["input"] == LOGITS else _FEATURES
        inputs = getattr(loss, "inputs", None)
        if inputs is not None and kind not in inputs:
            raise ValueError(
                f"distillation term {name!r}: {type(loss).__name__} applies to {' or '.join(inputs)}, not to "
                f"input {term['input']!r}; use " + ("input 'logits'" if LOGITS in inputs else "a feature scale")
                + "."
            )  # fmt: skip
        out[name] = {"input": term["input"], "loss": loss, "weight": float(term["weight"])}
    return out


def _takes(loss: Any) -> set[str]:
    """The parameter names of a loss's ``forward`` (or of the callable itself)."""
    return set(inspect.signature(getattr(loss, "forward", loss)).parameters)


def _projected(loss: Any) -> bool:
    """Whether a feature term's loss gets the projector's embeddings (default) or the raw features."""
    return bool(getattr(loss, "projected", True))


def _term_pools(loss: Any, projector_kind: str | None) -> bool:
    """Whether a feature term may pool its features *before* projection without changing its value.

    Image-level InfoNCE compares one embedding per slice: the spatial mean of the projected
    feature map (a loss says so with ``image_level``). A linear head (1x1 conv) commutes with that
    mean, so pooling first gives the same loss for a fraction of the cost, and the teacher cache
    can store one vector per slice and scale. Not for the mlp heads, the pixel / supervised
    variants or the MSE loss, which need the maps.
    """
    return bool(getattr(loss, "image_level", False)) and projector_kind == "linear"


def pools_features(terms: Mapping[str, Mapping[str, Any]], projector_kind: str | None) -> bool:
    """Whether every feature term of ``terms`` pools before projection (the teacher cache then stores vectors).

    ``terms`` as declared (losses may be named by a string). A loss on raw features (``projected`` false:
    the affinity losses) needs the maps, so the cache then stores them unpooled.
    """
    return _pools(resolve_terms(terms), projector_kind)


def _pools(terms: Mapping[str, Mapping[str, Any]], projector_kind: str | None) -> bool:
    return all(_term_pools(t["loss"], projector_kind) for t in terms.values() if t["input"] != LOGITS)


def needs_logits(terms: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a weighted term of ``terms`` needs the teacher's logits (the teacher cache then stores them).

    True for a term on ``"logits"`` and for a feature term whose loss's ``forward`` takes ``teacher_logits``
    (region affinity: the teacher's prediction stands in for missing labels). ``terms`` as declared.
    """
    return _needs_logits(resolve_terms(terms))


def _needs_logits(terms: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(
        float(t["weight"]) > 0 and (t["input"] == LOGITS or "teacher_logits" in _takes(t["loss"]))
        for t in terms.values()
    )


def distillation_terms(
    weights: Mapping[str, float],
    loss: str = "contrastive",
    temperature: float = 0.4,
    mode: str = "image",
    symmetric: bool = False,
    max_samples: int = 1024,
    pmd_temperature: float = 4.0,
    neighbour_distance: int = 0,
    dice_hard: bool = False,
) -> dict[str, dict[str, Any]]:
    """The terms of a run's settings: one ``LOSS_SCALE`` term per weighted scale, ``pmd`` and ``dice`` on the logits.

    The values are resolved ones (:func:`mkd.handlers.settings.distillation_settings`, which refuses a given
    setting the run does not use): the feature loss gets each of them that its constructor takes, so a
    recipe's default it does not take (an MSE run's ``temperature``) is simply not used.

    Args:
        weights: ``{term: weight}`` of :func:`distillation_weights` (``seg``, the scales, ``pmd`` and, when
            given, ``dice``: batch Dice against the teacher's prediction, :class:`~mkd.losses.SoftDiceKD`).
        loss: a name in :data:`mkd.losses.LOSSES` (the setting ``feature_loss``), the feature loss of every scale.
        temperature, mode, symmetric, max_samples, neighbour_distance: settings of the feature
            loss; each is given to it when its constructor takes that argument.
        pmd_temperature: the temperature of :class:`~mkd.losses.PMDLoss`.
        dice_hard: the ``dice`` term's target is the teacher's thresholded mask (pseudo-labels), not its
            probabilities.

    Returns:
        ``{name: {"input": scale or "logits", "loss": module, "weight": float}}``, the scales in
        the order of ``weights``, then ``pmd``, then ``dice``.

    Raises:
        ValueError: ``loss`` is not in :data:`mkd.losses.LOSSES`, or it does not apply to feature scales
            (``dist``: declare it as a term on the logits).

    Example:
        >>> terms = distillation_terms({"seg": 1.0, "bn": 0.2, "pmd": 1.0})
        >>> {k: (t["input"], type(t["loss"]).__name__, t["weight"]) for k, t in terms.items()}
        {'contrastive_bn': ('bn', 'InfoNCELoss', 0.2), 'pmd': ('logits', 'PMDLoss', 1.0)}
    """
    from monai.utils import look_up_option

    from mkd.losses import LOSSES, PMDLoss, SoftDiceKD

    feature_loss = look_up_option(loss, LOSSES)
    if _FEATURES not in getattr(feature_loss, "inputs", (_FEATURES,)):
        raise ValueError(
            f"loss={loss!r} ({feature_loss.__name__}) compares predictions, not feature scales; declare it as a "
            f'term on the logits instead, in the setting `terms`: {{"{loss}": {{"input": "logits", "loss": "{loss}", '
            f'"weight": 1.0}}}}.'
        )
    settings = {"temperature": temperature, "mode": mode, "symmetric": symmetric, "max_samples": max_samples,
                "neighbour_distance": neighbour_distance}  # fmt: skip
    accepted = inspect.signature(feature_loss).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    terms = {
        f"{loss}_{scale}": {"input": scale, "loss": feature_loss(**kwargs), "weight": float(w)}
        for scale, w in weights.items()
        if scale not in LOGIT_TERMS
    }
    if "pmd" in weights:
        terms["pmd"] = {"input": LOGITS, "loss": PMDLoss(temperature=pmd_temperature), "weight": float(weights["pmd"])}
    if "dice" in weights:
        terms["dice"] = {"input": LOGITS, "loss": SoftDiceKD(hard=dice_hard), "weight": float(weights["dice"])}
    return terms


def load_teacher(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    image_size: Sequence[int] | None = None,
    allow_student: bool = False,
) -> torch.nn.Module:
    """Load a teacher checkpoint (weights only), frozen and in eval mode.

    The checkpoint's role (``run.role``, see :func:`mkd.networks.checkpoint_role`) must be
    ``teacher``: a student or distilled checkpoint is refused unless ``allow_student``
    (``--allow-student-teacher``). A checkpoint without a recorded role is taken as a
    teacher when it holds a teacher architecture (t1, t2, unet; with a warning) and as a
    student when it holds s1 or s2.

    Args:
        path: a checkpoint written by the teacher bundle (``models/model.pt``).
        device: where to put the teacher.
        image_size: the slice size of the distillation run; when the checkpoint records the
            size its teacher was trained on, a different one is an error.
        allow_student: accept a student or distilled checkpoint as the teacher, on purpose.

    Raises:
        InputError: missing or unreadable checkpoint, not a teacher, or a teacher-student
            input-size mismatch.
    """
    from mkd.networks import STUDENTS, CheckpointRecord, checkpoint_role, load_network

    if not os.path.isfile(path):
        raise InputError(path, "teacher checkpoint not found; train one with `mkd teacher` (or pass `teacher_ckpt`)")
    teacher, ckpt = load_network(path, map_location="cpu")
    role = checkpoint_role(ckpt)
    if role is None:
        role = "student" if teacher.network_name in STUDENTS else "teacher"
        logger.warning("%s records no role (teacher / student / distilled); taken as a %s (%r network)",
                       path, role, teacher.network_name)  # fmt: skip
    if role != "teacher" and not allow_student:
        raise InputError(
            path, f"is a {role} checkpoint ({teacher.network_name!r}), not a teacher; pass a checkpoint of "
            "`mkd teacher`, or `allow_student_teacher=True` to distil from it on purpose"
        )  # fmt: skip
    trained = CheckpointRecord.from_checkpoint(ckpt).image_size
    if image_size is not None and trained is not None and list(trained) != list(image_size):
        raise InputError(
            path,
            f"teacher was trained on {'x'.join(map(str, trained))} slices but this run feeds "
            f"{'x'.join(map(str, image_size))}; use the same image_size (or profile) as the teacher",
        )
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_projector(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    scales: Sequence[str],
    embed_dim: int = 128,
    kind: str = "linear",
    project: str = "both",
):
    """Projector heads sized from the student's and teacher's channel counts at ``scales``."""
    from mkd.networks import feature_channels
    from mkd.networks.projector import ProjectorHeads

    scales = list(scales)
    if not scales:
        # PMD-only runs have no feature scale: an empty module keeps checkpoints uniform
        return torch.nn.Module()
    return ProjectorHeads(
        feature_channels(student, scales),
        feature_channels(teacher, scales),
        embed_dim=embed_dim,
        kind=kind,
        project=project,
        spatial_dims=int(getattr(student, "spatial_dims", 2)),
    )


class DistillationHandler:
    """Add declared distillation terms to a trainer's segmentation loss.

    Args:
        teacher: the frozen teacher (any mkd network; DDP-wrapping is not needed, it is not trained).
        student: the trainer's network (may be DDP-wrapped).
        projector: trainable projector heads covering the scales of the feature terms (must be in the
            optimiser); ``None`` or an empty module when every term compares logits.
        terms: ``{name: {"input": scale or "logits", "loss": callable or name, "weight": float}}``, plus
            ``"kwargs"`` for a loss named by a string in :data:`mkd.losses.LOSSES` (:func:`resolve_terms`;
            :func:`distillation_terms` builds the CLI's). A feature term's loss is called as
            ``loss(student_embedding, teacher_embedding, **extras)`` (the raw student feature and the teacher
            feature on the student's grid instead when the loss's ``projected`` is false), a logits term's as
            ``loss(student_logits, teacher_logits, **extras)``; the extras are the ones the loss's ``forward``
            takes: ``labels`` (the batch's labels), ``teacher_logits`` (feature terms), and ``groups`` /
            ``positions`` (the batch's ``patient`` and ``z``) when its ``neighbour_distance`` is above 0.
            Terms of weight 0 are not computed. ``name`` is the column of the logged loss term (``train_NAME``).
        seg_weight: the weight of the trainer's own (segmentation) loss.

    Raises:
        ValueError: a term without ``input`` / ``loss`` / ``weight`` or with other keys, a negative
            weight, an unknown loss name, an unknown scale (the message lists the valid ones), projected
            feature terms without a projector.

    Example (in a bundle)::

        {"_target_": "mkd.handlers.DistillationHandler", "teacher": "@teacher", "student": "@network",
         "projector": "@projector", "seg_weight": 1.0,
         "terms": {"contrastive_bn": {"input": "bn", "weight": 0.2,
                                      "loss": {"_target_": "mkd.losses.InfoNCELoss", "temperature": 0.4}},
                   "pmd": {"input": "logits", "weight": 1.0, "loss": {"_target_": "mkd.losses.PMDLoss"}}}}
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        projector: torch.nn.Module | None,
        terms: Mapping[str, Mapping[str, Any]],
        seg_weight: float = 1.0,
    ) -> None:
        from mkd.networks import FeatureRecorder

        weighted = {k: t for k, t in resolve_terms(terms).items() if t["weight"] > 0}
        self.terms: dict[str, dict[str, Any]] = {k: {**t, "takes": _takes(t["loss"])} for k, t in weighted.items()}
        self.seg_weight = float(seg_weight)
        self.scales = list(dict.fromkeys(t["input"] for t in self.terms.values() if t["input"] != LOGITS))
        self.needs_logits = _needs_logits(weighted)
        self.teacher = teacher
        self.student = student
        self.projector = projector
        projected = [t for t in self.terms.values() if t["input"] != LOGITS and _projected(t["loss"])]
        if projected and not isinstance(projector, torch.nn.Module):
            raise ValueError("a projector (ProjectorHeads) is required when feature scales are weighted.")
        kind = getattr(projector, "kind", None)
        for term in self.terms.values():
            term["pool"] = _term_pools(term["loss"], kind)
        self.pool = _pools(weighted, kind)
        # both recorders resolve the scale names now, so a typo fails before any training
        self.student_recorder = FeatureRecorder(student, self.scales) if self.scales else None
        self.teacher_recorder = FeatureRecorder(teacher, self.scales, detach=True) if self.scales else None
        self._stack = contextlib.ExitStack()
        self.live_steps = 0
        self.cached_steps = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._freeze_teacher)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._add_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._sync_projector_grads)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _freeze_teacher(self, engine: Engine | None = None) -> None:
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _start(self, engine: Engine) -> None:
        self._stack.close()
        if self.student_recorder is not None:
            self._stack.enter_context(self.student_recorder.recording())

    def _teacher_outputs(self, engine: Engine, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """Teacher features and logits: from the batch (cache) when present, else a live forward."""
        from mkd.data.teacher_cache import CACHE_PREFIX

        batch = engine.state.batch if isinstance(engine.state.batch, Mapping) else {}
        keys = [CACHE_PREFIX + s for s in self.scales] + ([CACHE_PREFIX + LOGITS] if self.needs_logits else [])
        if keys and all(k in batch for k in keys):
            self.cached_steps += 1
            feats = {s: batch[CACHE_PREFIX + s].to(images.device) for s in self.scales}
            logits = batch[CACHE_PREFIX + LOGITS].to(images.device) if self.needs_logits else None
            return feats, logits
        self.live_steps += 1
        self.teacher.eval()
        with reconstruction(self.teacher, False), torch.no_grad(), contextlib.ExitStack() as stack:
            if self.teacher_recorder is not None:
                stack.enter_context(self.teacher_recorder.recording())
            logits = self.teacher(images)
            feats = dict(self.teacher_recorder.features) if self.teacher_recorder is not None else {}
        return feats, logits

    def _add_loss(self, engine: Engine) -> None:
        from mkd.networks.projector import match_spatial

        output = engine.state.output
        student_feats = dict(self.student_recorder.features) if self.student_recorder is not None else {}
        self._stack.close()
        seg_loss = output[CommonKeys.LOSS]
        images = output[CommonKeys.IMAGE]
        teacher_feats, teacher_logits = self._teacher_outputs(engine, images)
        total = self.seg_weight * seg_loss
        logged: dict[str, torch.Tensor] = {"seg": seg_loss.detach()}
        for name, term in self.terms.items():
            extras = self._extras(engine, output, term, teacher_logits)
            if term["input"] == LOGITS:
                value = term["loss"](output[CommonKeys.PRED], teacher_logits, **extras)
            else:
                scale = term["input"]
                s_feat, t_feat = student_feats[scale], teacher_feats[scale]
                if not _projected(term["loss"]):  # raw features (affinities): the teacher on the student's grid
                    s_emb, t_emb = s_feat, match_spatial(t_feat, s_feat.shape[2:]).to(s_feat.dtype)
                else:
                    if term["pool"]:  # image-level InfoNCE with linear heads: pool, then project (same, cheaper)
                        if any(d != 1 for d in t_feat.shape[2:]):  # a live teacher map (the cache stores it pooled)
                            t_feat = pool_spatial(match_spatial(t_feat, s_feat.shape[2:]))
                        s_feat = pool_spatial(s_feat)
                    s_emb, t_emb = self.projector(scale, s_feat, t_feat)
                value = term["loss"](s_emb, t_emb, **extras)
            total = total + term["weight"] * value
            logged[name] = value.detach()
        output[CommonKeys.LOSS] = total
        setattr(engine.state, LOSS_TERMS_KEY, logged)

    def _extras(
        self, engine: Engine, output: Mapping[str, Any], term: Mapping[str, Any], teacher_logits: Any = None
    ) -> dict[str, Any]:
        """The keyword arguments a term's loss takes: ``labels``, ``teacher_logits`` (feature terms; a logits
        term gets them as its second argument), and the neighbour mask's batch keys."""
        extras: dict[str, Any] = {}
        if "labels" in term["takes"]:
            extras["labels"] = output.get(CommonKeys.LABEL)
        if "teacher_logits" in term["takes"] and term["input"] != LOGITS:
            extras["teacher_logits"] = teacher_logits
        distance = getattr(term["loss"], "neighbour_distance", 0)
        if distance and {"groups", "positions"} <= term["takes"]:
            batch = engine.state.batch if isinstance(engine.state.batch, Mapping) else {}
            missing = [k for k in ("patient", "z") if k not in batch]
            if missing:
                raise ValueError(
                    f"neighbour_distance={distance} needs the batch keys 'patient' and 'z' (the datalist of "
                    f"`mkd prepare` has them); missing: {missing}. Set neighbour_distance=0 to switch the "
                    "neighbour mask off."
                )
            extras.update(groups=batch["patient"], positions=batch["z"])
        return extras

    def _sync_projector_grads(self, engine: Engine) -> None:
        """Average the projector's gradients over processes (the student is DDP-wrapped, the projector is not)."""
        dist = torch.distributed
        if self.projector is None or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world < 2:
            return
        for p in self.projector.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    def close(self, engine: Engine | None = None) -> None:
        """Remove the forward hooks (called when the run completes)."""
        self._stack.close()
        for rec in (self.student_recorder, self.teacher_recorder):
            if rec is not None:
                rec.close()
        if self.live_steps or self.cached_steps:
            logger.info("distillation: %d steps from the teacher cache, %d live", self.cached_steps, self.live_steps)
