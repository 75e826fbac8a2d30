"""Ablation grids: expand a YAML grid into teacher, student-baseline and distillation runs, and run them.

This is what ``mkd ablate`` runs. A grid (see ``docs/ablate.md``) names teachers,
students, data fractions, seeds and blocks of distillation configurations; every
list-valued setting of a block is expanded as a cartesian product. Each run gets a
deterministic, readable id and its own folder ``RUNS/<id>`` (the *runs folder*
contract of ``docs/architecture.md``)::

    RUNS/<id>/run.json                what the run is (kind, method label, arch, teacher, baseline, ...)
    RUNS/<id>/config.json, metrics.csv, summary.json, models/model.pt, logs/   (mkd.bundle.run_bundle)
    RUNS/<id>/eval/test/summary.json, per_volume.csv, per_slice.csv           (mkd.evaluation)

A run is *done* when ``eval/test/summary.json`` exists; done runs are skipped, so
running a grid twice does nothing new. Teachers come first, then the student
baselines, then the distillation runs, each of which needs its teacher done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkd.bundle import BUNDLES, TRAIN_SPLITS
from mkd.bundle import PROFILES as BUNDLE_PROFILES
from mkd.errors import ExpressionError, InputError, LockedError, MkdError

__all__ = [
    "KINDS",
    "RunSpec",
    "Grid",
    "AblationResult",
    "AblationPlan",
    "plan_ablation",
    "select_runs",
    "load_grid",
    "expand_grid",
    "is_done",
    "run_status",
    "execute_run",
    "run_ablation",
    "run_command",
    "run_lock",
    "format_commands",
    "validate_grid",
    "GRID_MAX_BYTES",
    "MANY_RUNS",
]

logger = logging.getLogger(__name__)

#: kinds of runs = the bundles that train them, in the order they are run (a distillation run needs its teacher).
KINDS = BUNDLES
#: scale order in ids and labels: the thesis writes B -> B + E -> E + D -> D.
SCALE_ORDER = ("bn", "enc", "dec")
SCALE_LETTERS = {"bn": "B", "enc": "E", "dec": "D"}
#: the teacher name of a self-training block: the block's own baseline student (same seed and
#: data) teaches a fresh student, on the same terms as a teacher would: the control that
#: separates "the teacher knows more" from "more images" (docs/distill.md).
SELF = "self"
#: data fraction -> datalist split (:data:`mkd.bundle.TRAIN_SPLITS`)
FRACTIONS = TRAIN_SPLITS
PROFILES = BUNDLE_PROFILES
#: the largest grid file read (a grid is a page of YAML; this stops a file built to exhaust memory)
GRID_MAX_BYTES = 1 << 20
#: more runs than this in one grid is most likely a typo in ``seeds``; ``mkd ablate`` warns
MANY_RUNS = 1000
#: the comment above each stage of :meth:`AblationPlan.commands`
_STAGES = {
    "teacher": "stage 1: teachers",
    "student": "stage 1: student baselines (independent)",
    "distill": "stage 2: distillation runs (each needs its teacher from stage 1)",
}

_TOP_KEYS = {
    "profile", "data", "seeds", "teacher_seed", "data_fractions", "settings", "teachers", "students",
    "baselines", "distill", "recipe",
}  # fmt: skip
#: the keys of a distill block besides the distillation settings (mkd.handlers.settings.SETTINGS, by bundle key)
_BLOCK_KEYS = {"table", "teacher", "student", "data_fraction", "settings", "tag"}
#: the distillation settings a block may list values of (expanded as a cartesian product); ``scales`` is required.
#: The others are bundle overrides of the block (``weight_overrides``; ``temperature`` ... join its ``settings``).
_EXPANDED = ("scales", "pmd", "feature_loss", "contrastive_mode", "recipe", "transfer")
_SETTINGS_KEYS = {"all", "teacher", "student", "distill"}
#: bundle keys set by the grid itself; settings may not override them.
_RESERVED = {
    "arch", "train_split", "teacher_ckpt", "scales", "pmd", "feature_loss", "contrastive_mode",
    "weight_overrides", "seed", "output_dir", "dataset_dir", "bundle_root", "resume", "recipe", "transfer",
    "baseline_ckpt", "reference_ckpt", "allow_student_teacher",
}  # fmt: skip
#: run.json fields that must agree between a finished run and the grid that asks for it.
_IDENTITY = ("kind", "arch", "teacher", "scales", "loss", "pmd", "mode", "data_fraction", "seed", "profile",
             "weights", "settings", "recipe", "transfer")  # fmt: skip


@dataclass
class RunSpec:
    """One run of a grid: a teacher, a student baseline or a distillation run.

    Attributes:
        id: folder name in the runs folder, e.g. ``distill-s1-t1-bn+pmd-contrastive-f0.5-seed0``.
        kind: ``teacher``, ``student`` or ``distill`` (the bundle that trains it).
        method: row label of the report tables, e.g. ``KD(T1,S1) B+PMD``; the same for every seed.
        arch: network (``t1``, ``t2``, ``unet``, ``s1``, ``s2``).
        seed: training seed.
        profile: ``cpu`` or ``thesis``.
        teacher: run id of the teacher (distillation runs).
        teacher_arch: the teacher's network.
        scales: distilled feature scales, in the order ``bn, enc, dec``.
        loss: feature loss (``contrastive``, ``mse``, ...; the setting ``feature_loss``); ``None`` when no
            feature scale is distilled.
        pmd: prediction-map distillation on (the recipe's unless the block says).
        mode: InfoNCE variant (``image``, ``pixel``, ``supervised``; ``contrastive_mode``); ``None`` when no
            feature scale is distilled.
        data_fraction: 0.5 (the prepared ``student`` list) or 1.0 (all training patients).
        baseline: run id of the matching student baseline (same arch, fraction, seed, profile).
        weights: loss weight overrides (``{term: weight}``) of a distillation run.
        settings: further bundle overrides (``--set``) of this run.
        groups: the grid blocks (thesis tables) that list this run.
        recipe: distillation recipe (``mkd.handlers.RECIPES``); ``None`` = the default recipe.
        transfer: the student also learns from the teacher on unlabelled slices (the recipe's unless the block
            says).
    """

    id: str
    kind: str
    method: str
    arch: str
    seed: int
    profile: str
    teacher: str | None = None
    teacher_arch: str | None = None
    scales: tuple[str, ...] = ()
    loss: str | None = None
    pmd: bool = False
    mode: str | None = None
    data_fraction: float | None = None
    baseline: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    recipe: str | None = None
    transfer: bool = False

    @property
    def reference(self) -> str | None:
        """The run id of the baseline's student trained on all training labels (same arch, seed, profile)."""
        if self.baseline is None or f"-f{self.data_fraction}-" not in self.baseline:
            return None
        return self.baseline.replace(f"-f{self.data_fraction}-", "-f1.0-")

    @property
    def depends_on(self) -> str | None:
        """The run that must be done first (the teacher of a distillation run)."""
        return self.teacher if self.kind == "distill" else None

    def run_json(self) -> dict[str, Any]:
        """The ``run.json`` of this run (the runs-folder contract)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "method": self.method,
            "arch": self.arch,
            "teacher": self.teacher,
            "teacher_arch": self.teacher_arch,
            "scales": list(self.scales),
            "loss": self.loss,
            "pmd": self.pmd,
            "mode": self.mode,
            "data_fraction": self.data_fraction,
            "seed": self.seed,
            "profile": self.profile,
            "baseline": self.baseline,
            "weights": dict(self.weights),
            "settings": dict(self.settings),
            "groups": list(self.groups),
            "recipe": self.recipe,
            "transfer": self.transfer,
        }

    def bundle_overrides(self, runs_dir: str | os.PathLike) -> dict[str, Any]:
        """The ``{bundle key: value}`` overrides that :func:`mkd.bundle.run_bundle` gets for this run."""
        out = dict(self.settings)
        out["arch"] = self.arch
        if self.kind in ("student", "distill"):
            out["train_split"] = FRACTIONS[float(self.data_fraction)]
        if self.kind == "distill":
            teacher_ckpt = Path(runs_dir).resolve() / str(self.teacher) / "models" / "model.pt"
            out.update(
                teacher_ckpt=str(teacher_ckpt),
                scales=list(self.scales),
                pmd=self.pmd,
                weight_overrides=dict(self.weights),
                transfer=self.transfer,
            )
            from mkd.handlers.settings import SETTINGS

            # at its declared default a feature setting is left to the bundle (the same value), so that the bundle
            # sees only what the run uses (an MSE run's "image" mode is no InfoNCE variant given to it)
            for key, value in (("feature_loss", self.loss), ("contrastive_mode", self.mode)):
                if value not in (None, SETTINGS[key].default):
                    out[key] = value
            if self.recipe is not None:
                out["recipe"] = self.recipe
            if self.teacher == self.baseline:  # self-training: a student checkpoint teaches, on purpose
                out["allow_student_teacher"] = True
            baseline_ckpt = Path(runs_dir).resolve() / str(self.baseline) / "models" / "model.pt"
            if baseline_ckpt.is_file():  # for the teacher check's warning only (docs/distill.md)
                out["baseline_ckpt"] = str(baseline_ckpt)
            reference = Path(runs_dir).resolve() / self.reference / "models" / "model.pt" if self.reference else None
            if reference is not None and reference.is_file():  # the same student trained on all labels
                out["reference_ckpt"] = str(reference)
        return out


@dataclass
class Grid:
    """An expanded grid: its runs in dependency order (teachers, student baselines, distillation)."""

    runs: list[RunSpec]
    profile: str = "cpu"
    seeds: list[int] = field(default_factory=list)
    data: str | None = None
    path: Path | None = None
    seed_offset: int = 0
    allow_expressions: bool = False

    def __post_init__(self) -> None:
        self._by_id = {r.id: r for r in self.runs}

    def __getitem__(self, run_id: str) -> RunSpec:
        try:
            return self._by_id[run_id]
        except KeyError:
            raise MkdError(f"no run {run_id!r} in the grid; it has {len(self.runs)} runs, e.g. "
                           f"{', '.join(r.id for r in self.runs[:3])}") from None  # fmt: skip

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._by_id

    def count(self) -> dict[str, int]:
        """Number of runs per kind."""
        return {k: sum(r.kind == k for r in self.runs) for k in KINDS}


# --- grid file --------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_keys(where: str, mapping: Any, allowed: Iterable[str]) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise MkdError(f"{where}: expected a mapping, got {type(mapping).__name__} {mapping!r}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise MkdError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}")
    return dict(mapping)


def _fraction(value: Any, where: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = None
    if f not in FRACTIONS:
        raise MkdError(f"{where}: data fraction must be 0.5 (the prepared student list) or 1.0 (all training "
                       f"patients), got {value!r}")  # fmt: skip
    return f


def _scale_set(value: Any, where: str) -> tuple[str, ...]:
    """``"bn"``, ``"bn+enc"``, ``"none"`` or a list of names -> canonical tuple in the order bn, enc, dec."""
    if isinstance(value, (list, tuple)):
        names = [str(v).strip().lower() for v in value]
    else:
        text = str(value).strip().lower()
        names = [] if text in ("none", "", "pmd") else [n.strip() for n in text.split("+")]
    bad = [n for n in names if n not in SCALE_ORDER]
    if bad:
        raise MkdError(f"{where}: unknown scale(s) {bad} in {value!r}; scales are {', '.join(SCALE_ORDER)} "
                       "joined with '+', e.g. bn+enc, or 'none' for PMD only")  # fmt: skip
    return tuple(s for s in SCALE_ORDER if s in names)


def _settings(value: Any, where: str, allow_expressions: bool = False) -> dict[str, Any]:
    out = _check_keys(where, value, set(value or {}))
    reserved = sorted(set(out) & _RESERVED)
    if reserved:
        raise MkdError(f"{where}: {', '.join(reserved)} set by the grid itself (teacher, students, scales, ...); "
                       "remove them from settings")  # fmt: skip
    if not allow_expressions:
        from mkd.bundle import check_setting_values

        check_setting_values(out, where)
    return out


def _named(value: Any, where: str, kind: str, allow_expressions: bool = False) -> dict[str, dict[str, Any]]:
    """``[t1, t2]`` or ``{t1: {arch: t1, settings: {...}}}`` -> ``{key: {"arch", "settings"}}``."""
    from mkd.networks import STUDENTS, TEACHERS

    allowed = TEACHERS if kind == "teacher" else STUDENTS
    if value is None:
        return {}
    items = {str(v): {} for v in value} if isinstance(value, (list, tuple)) else dict(_check_keys(where, value, value))
    out = {}
    for key, entry in items.items():
        entry = _check_keys(f"{where}.{key}", entry or {}, {"arch", "settings"})
        arch = str(entry.get("arch", key))
        if arch not in allowed:
            raise MkdError(f"{where}.{key}: arch {arch!r} is not a {kind}; {kind}s: {', '.join(allowed)}")
        if not key.replace("_", "").isalnum():
            raise MkdError(f"{where}: name {key!r} must be letters, digits and '_' (it goes into run ids)")
        settings = _settings(entry.get("settings"), f"{where}.{key}.settings", allow_expressions)
        out[key] = {"arch": arch, "settings": settings}
    return out


def _label(key: str, arch: str) -> str:
    return "U-Net" if key == "unet" else key.upper()


def _tag(block: Mapping[str, Any]) -> str:
    if block.get("tag"):
        tag = str(block["tag"])
        if not tag.replace("_", "").replace(".", "").isalnum():
            raise MkdError(f"distill tag {tag!r} must be letters, digits, '.' and '_' (it goes into run ids)")
        return tag
    # hashed under the block's old key "weights", so that a run keeps its id whichever name the grid uses
    extra = {k: block[key] for k, key in (("weights", "weight_overrides"), ("settings", "settings")) if block.get(key)}
    if not extra:
        return ""
    return "x" + hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]


def _block_settings(raw: Any, where: str) -> dict[str, Any]:
    """A distill block with its distillation settings under their bundle keys (``loss`` -> ``feature_loss``, ...).

    The settings that are not expanded and not ``weight_overrides`` (``temperature``, ``dice_hard``, ...) join the
    block's ``settings``, where a block could always give them.
    """
    from mkd.handlers.settings import SETTINGS

    aliases = {a: s.name for s in SETTINGS.values() for a in s.grid_aliases}
    block = _check_keys(where, raw, _BLOCK_KEYS | set(SETTINGS) | set(aliases))
    for alias, name in aliases.items():
        if alias in block and name in block:
            raise MkdError(f"{where}: give {name} once ({alias} is its old name)")
        if alias in block:
            block[name] = block.pop(alias)
    moved = {k: block.pop(k) for k in SETTINGS if k in block and k not in (*_EXPANDED, "weight_overrides")}
    settings = dict(block.get("settings") or {})
    twice = sorted(set(moved) & set(settings))
    if twice:
        raise MkdError(f"{where}: {', '.join(twice)} given as a block key and under settings; give it once")
    if moved:
        block["settings"] = {**settings, **moved}
    return block


def _distill_settings(where: str, given: Mapping[str, Any]):
    """:func:`mkd.handlers.settings.distillation_settings` of a grid run; a problem is an error naming the block."""
    from mkd.bundle import is_expression
    from mkd.handlers.settings import SETTINGS, SettingsError, distillation_settings

    # a value MONAI evaluates (--allow-expressions) is checked by the bundle when the run starts
    given = {k: v for k, v in given.items() if k in SETTINGS and not is_expression(v)}
    try:
        return distillation_settings(**given)
    except SettingsError as err:
        raise MkdError(f"{where}: {err}") from None


def _transfer_part(recipe: str | None, transfer: bool) -> str:
    """The recipe and transfer-set part of a distillation run id: ``-transfer`` names the transfer set once."""
    part = f"-{recipe}" if recipe else ""
    if transfer and recipe != "transfer":
        return part + "-transfer"
    return part + ("-notransfer" if not transfer and recipe == "transfer" else "")


def load_grid(
    path: str | os.PathLike,
    profile: str | None = None,
    seed_offset: int = 0,
    allow_expressions: bool = False,
) -> Grid:
    """Read a grid YAML file and expand it (see :func:`expand_grid` and ``docs/ablate.md``).

    A grid is data: the file may be at most :data:`GRID_MAX_BYTES`, YAML anchors and aliases
    (``&a`` / ``*a``, which let a few lines expand into gigabytes) are refused, and its
    settings take plain values unless ``allow_expressions`` (see :func:`expand_grid`).

    Raises:
        InputError: missing, too large or unparsable file, an anchor or alias, an invalid grid.
        ExpressionError: a setting MONAI would run as code (the message starts with the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "grid file not found")
    size = path.stat().st_size
    if size > GRID_MAX_BYTES:
        raise InputError(path, f"grid file of {size} bytes; a grid may be at most {GRID_MAX_BYTES} bytes")
    config = _read_grid_yaml(path)
    try:
        grid = expand_grid(config or {}, profile=profile, seed_offset=seed_offset,
                           allow_expressions=allow_expressions)  # fmt: skip
    except ExpressionError as err:
        raise ExpressionError(f"{path}: {err}") from None
    except MkdError as err:
        raise InputError(path, str(err)) from None
    grid.path = path.resolve()
    return grid


def _read_grid_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a grid file, refusing anchors and aliases (one line naming the file and line)."""
    import yaml

    class GridLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
                raise InputError(path, f"line {event.start_mark.line + 1}: YAML {kind} "
                                 f"'{'*' if kind == 'alias' else '&'}{event.anchor}'; a grid is plain data, "
                                 "write the values out")  # fmt: skip
            return super().compose_node(parent, index)

    try:
        text = path.read_bytes()[: GRID_MAX_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return yaml.load(text, Loader=GridLoader)  # noqa: S506 - a SafeLoader without anchors and aliases
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({' '.join(str(err).split())})") from None


def expand_grid(
    config: Mapping[str, Any], profile: str | None = None, seed_offset: int = 0, allow_expressions: bool = False
) -> Grid:
    """Expand a grid mapping into its runs, in dependency order.

    Teachers: one run per teacher, trained with ``teacher_seed`` (default 0) and shared by
    every seed of the students; ``teacher_seed: each`` trains one teacher per seed instead.
    Student baselines: one per (student, data fraction, seed), for the top-level
    ``data_fractions`` and for every fraction a distillation run uses. Distillation: the
    cartesian product of each block's list-valued settings and the seeds; each run's distillation
    settings (bundle keys, :data:`mkd.handlers.settings.SETTINGS`) are checked as ``mkd distill``
    checks them (:func:`mkd.handlers.settings.distillation_settings`).

    Args:
        config: the parsed YAML (see ``docs/ablate.md``).
        profile: override of the grid's ``profile``.
        seed_offset: added to every seed (and to ``teacher_seed: each`` teachers), to run
            further seeds of the same grid.
        allow_expressions: let ``settings`` hold MONAI expressions and ``_target_`` mappings
            (:func:`mkd.bundle.check_setting_values`); this runs code.

    Raises:
        MkdError: unknown keys, unknown networks or scales, duplicate ids with different settings, distillation
            settings that do not hold together (a given setting a run does not use, ...).
        ExpressionError: a setting MONAI would run as code, without ``allow_expressions``.
    """
    config = _check_keys("grid", config, _TOP_KEYS)
    profile = str(profile or config.get("profile", "cpu"))
    if profile not in PROFILES:
        raise MkdError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    seeds = [int(s) + int(seed_offset) for s in _as_list(config.get("seeds", [0]))]
    if not seeds or len(set(seeds)) != len(seeds):
        raise MkdError(f"seeds must be a non-empty list of distinct integers, got {config.get('seeds')!r}")
    teacher_seed = config.get("teacher_seed", 0)
    if teacher_seed != "each" and not isinstance(teacher_seed, int):
        raise MkdError(f"teacher_seed must be an integer or 'each', got {teacher_seed!r}")
    fractions = [_fraction(f, "data_fractions") for f in _as_list(config.get("data_fractions", [0.5]))]
    settings = _check_keys("settings", config.get("settings"), _SETTINGS_KEYS)
    common = {k: _settings(settings.get(k), f"settings.{k}", allow_expressions) for k in sorted(_SETTINGS_KEYS)}
    teachers = _named(config.get("teachers"), "teachers", "teacher", allow_expressions)
    students = _named(config.get("students"), "students", "student", allow_expressions)
    blocks = config.get("distill") or []
    default_recipe = config.get("recipe")
    if default_recipe is not None:
        _distill_settings("grid", {"recipe": default_recipe})
    if not isinstance(blocks, list):
        raise MkdError(f"distill: expected a list of blocks, got {type(blocks).__name__}")
    if blocks and not teachers:
        raise MkdError("distill blocks need at least one entry under teachers")
    if (blocks or config.get("baselines", True)) and not students:
        raise MkdError("students: give at least one student (s1, s2)")

    runs: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> RunSpec:
        old = runs.get(spec.id)
        if old is None:
            runs[spec.id] = spec
            return spec
        if {k: old.run_json()[k] for k in _IDENTITY} != {k: spec.run_json()[k] for k in _IDENTITY}:
            raise MkdError(f"two grid entries give run id {spec.id!r} different settings; give one a 'tag'")
        old.groups.extend(g for g in spec.groups if g not in old.groups)
        return old

    def teacher_run(key: str, seed: int) -> RunSpec:
        t = teachers[key]
        tseed = seed if teacher_seed == "each" else int(teacher_seed)
        return add(RunSpec(
            id=f"teacher-{key}-seed{tseed}", kind="teacher", method=_label(key, t["arch"]), arch=t["arch"],
            seed=tseed, profile=profile, settings={**common["all"], **common["teacher"], **t["settings"]},
        ))  # fmt: skip

    def student_run(key: str, fraction: float, seed: int) -> RunSpec:
        s = students[key]
        label = _label(key, s["arch"]) + (" (100%)" if fraction == 1.0 else "")
        return add(RunSpec(
            id=f"student-{key}-f{fraction}-seed{seed}", kind="student", method=label, arch=s["arch"], seed=seed,
            profile=profile, data_fraction=fraction,
            settings={**common["all"], **common["student"], **s["settings"]},
        ))  # fmt: skip

    for key in teachers:
        for seed in seeds if teacher_seed == "each" else [int(teacher_seed)]:
            teacher_run(key, seed)
    if config.get("baselines", True):
        for key in students:
            for fraction in fractions:
                for seed in seeds:
                    student_run(key, fraction, seed)

    distill_runs: list[RunSpec] = []
    for i, raw in enumerate(blocks):
        where = f"distill[{i}]"
        block = _block_settings(raw, where)
        if "scales" not in block:
            raise MkdError(f"{where}: 'scales' is required (e.g. scales: [bn, enc, bn+enc+dec])")
        group = str(block.get("table", f"block {i + 1}"))
        t_keys = [str(t) for t in _as_list(block.get("teacher", list(teachers)))]
        s_keys = [str(s) for s in _as_list(block.get("student", list(students)))]
        for k, known, what in ((t_keys, {**teachers, SELF: {}}, "teachers"), (s_keys, students, "students")):
            bad = [x for x in k if x not in known]
            if bad:
                raise MkdError(f"{where}: {bad} not under {what} ({', '.join(known)})")
        scale_sets = [_scale_set(v, where) for v in _as_list(block["scales"])]
        # an omitted setting is not given: the recipe's (pmd, transfer) or the declared default (feature_loss, ...)
        loss_list, mode_list, pmd_list, transfer_list = (
            _as_list(block.get(k)) for k in ("feature_loss", "contrastive_mode", "pmd", "transfer")
        )
        # a block's own recipe goes into ids and labels; the grid's default recipe does not
        named_recipe = "recipe" in block
        recipe_list = _as_list(block["recipe"]) if named_recipe else [default_recipe]
        frac_list = [_fraction(f, where) for f in _as_list(block.get("data_fraction", fractions))]
        weights = _check_keys(f"{where}.weight_overrides", block.get("weight_overrides"),
                              set(block.get("weight_overrides") or {}))  # fmt: skip
        extra = _settings(block.get("settings"), f"{where}.settings", allow_expressions)
        tag = _tag(block)
        product = itertools.product(t_keys, s_keys, scale_sets, pmd_list, loss_list, mode_list, frac_list,
                                    recipe_list, transfer_list, seeds)  # fmt: skip
        for tkey, skey, scales, pmd, loss, mode, fraction, recipe, transfer, seed in product:
            s = students[skey]
            settings = {**common["all"], **common["student"], **s["settings"], **common["distill"], **extra}
            given = {**settings, "scales": list(scales), "pmd": pmd, "feature_loss": loss, "contrastive_mode": mode,
                     "recipe": recipe, "transfer": transfer, "weight_overrides": weights or None}  # fmt: skip
            resolved = _distill_settings(where, given)
            pmd, transfer = resolved["pmd"], resolved["transfer"]
            # no feature loss without a feature scale: a PMD-only run names none
            loss, mode = (resolved["feature_loss"], resolved["contrastive_mode"]) if scales else (None, None)
            baseline = student_run(skey, fraction, seed)
            # self-training: the baseline student of the same seed teaches a fresh copy of itself
            teacher = baseline if tkey == SELF else teacher_run(tkey, seed)
            scale_tag = "+".join(scales) + ("+pmd" if pmd and scales else "pmd" if pmd else "")
            letters = "+".join(SCALE_LETTERS[s] for s in scales) + ("+PMD" if pmd and scales else "PMD" if pmd else "")
            method = (f"Self-training({_label(skey, baseline.arch)}) {letters}" if tkey == SELF
                      else f"KD({_label(tkey, teacher.arch)},{_label(skey, baseline.arch)}) {letters}")  # fmt: skip
            method += " MSE" if loss == "mse" else ""
            method += f" {mode}" if mode not in (None, "image") else ""
            method += " (100%)" if fraction == 1.0 else ""
            method += f" ({recipe} recipe)" if recipe and named_recipe else ""
            method += " +transfer" if transfer else ""
            method += f" [{tag}]" if tag else ""
            features = f"-{loss}" + (f"-{mode}" if mode != "image" else "") if scales else ""
            run_id = f"distill-{skey}-{tkey}-{scale_tag}{features}-f{fraction}"
            run_id += _transfer_part(recipe if named_recipe else None, transfer)
            run_id += (f"-{tag}" if tag else "") + f"-seed{seed}"
            spec = RunSpec(
                id=run_id, kind="distill", method=method, arch=baseline.arch, seed=seed, profile=profile,
                teacher=teacher.id, teacher_arch=teacher.arch, scales=scales, loss=loss, pmd=pmd, mode=mode,
                data_fraction=fraction, baseline=baseline.id, weights={k: float(v) for k, v in weights.items()},
                settings=settings, groups=[group], recipe=recipe, transfer=transfer,
            )  # fmt: skip
            spec = add(spec)
            if spec not in distill_runs:
                distill_runs.append(spec)
            for dep in {id(d): d for d in (teacher, baseline)}.values():
                if group not in dep.groups:
                    dep.groups.append(group)

    ordered = [r for k in ("teacher", "student") for r in runs.values() if r.kind == k] + distill_runs
    data = config.get("data")
    return Grid(ordered, profile=profile, seeds=seeds, data=None if data is None else str(data),
                seed_offset=int(seed_offset), allow_expressions=allow_expressions)  # fmt: skip


# --- state of a runs folder -------------------------------------------------------------


def is_done(run_dir: str | os.PathLike) -> bool:
    """A run is done when its test evaluation (``eval/test/summary.json``) exists."""
    return (Path(run_dir) / "eval" / "test" / "summary.json").is_file()


def _trained(run_dir: Path) -> bool:
    """Training finished: ``run_bundle`` writes ``summary.json`` after the last epoch."""
    return (run_dir / "summary.json").is_file() and (run_dir / "models" / "model.pt").is_file()


def _read_run_json(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _identity_diff(old: Mapping[str, Any], spec: RunSpec) -> list[str]:
    """run.json fields that decide what is trained and differ between ``old`` and ``spec``."""
    new = spec.run_json()
    return [k for k in _IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]


def _check_identity(spec: RunSpec, run_dir: Path) -> None:
    old = _read_run_json(run_dir)
    if old is None:
        return
    new = spec.run_json()
    diff = _identity_diff(old, spec)
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} in the grid" for k in diff)
        raise MkdError(f"{run_dir}: a finished run with other settings ({details}); use another runs folder "
                       "(`runs_dir`) or delete that run folder")  # fmt: skip


def run_status(grid: Grid, runs_dir: str | os.PathLike) -> dict[str, str]:
    """``{run id: "done" | "running" | "pending" | "waiting"}``.

    running = another live process holds the run's lock (a lock left by an exited process on this
    host does not count); waiting = pending and its teacher is not done yet.
    """
    from mkd.locks import held_elsewhere

    runs_dir = Path(runs_dir)
    out = {}
    for r in grid.runs:
        if is_done(runs_dir / r.id):
            out[r.id] = "done"
        elif held_elsewhere(runs_dir / f"{r.id}.lock") is not None:  # not a lock left by an exited process
            out[r.id] = "running"
        elif r.depends_on and not is_done(runs_dir / r.depends_on):
            out[r.id] = "waiting"
        else:
            out[r.id] = "pending"
    return out


def validate_grid(grid: Grid, runs: Iterable[RunSpec] | None = None) -> None:
    """Check every run's settings against its bundle as a real run would, without running anything.

    Each distinct (kind, profile, settings) is composed with :func:`mkd.bundle.compose_config`:
    an unknown key is named with the bundle's top-level keys, a value of the wrong type (an
    integer setting given a string) is refused as ``--set`` refuses it. ``mkd ablate
    --dry-run`` and a real ``mkd ablate`` call this before anything runs.

    Raises:
        MkdError: ``run ID: ...``, naming the first bad run and setting.
    """
    from mkd.bundle import bundle_configs, compose_config

    seen: set[str] = set()
    for r in grid.runs if runs is None else runs:
        sig = json.dumps([r.kind, r.profile, r.settings], sort_keys=True, default=str)
        if sig in seen:
            continue
        seen.add(sig)
        try:
            compose_config(bundle_configs(r.kind, r.profile), r.settings, label="setting")
        except MkdError as err:
            where = f"{grid.path}: " if grid.path is not None else ""
            raise MkdError(f"{where}run {r.id}: {err}") from None


# --- running ----------------------------------------------------------------------------


@contextmanager
def run_lock(runs_dir: str | os.PathLike, run_id: str) -> Iterator[Path]:
    """Hold ``RUNS/<id>.lock`` while a run trains, so two processes never run the same id.

    See :func:`mkd.locks.hold_lock`: created atomically, removed when the block ends (also
    on error); a lock left by an exited process on this host is taken over, one from another
    host is only reported.

    Raises:
        MkdError: the run is locked by a live process (or by one on another host).
    """
    from mkd.locks import hold_lock

    with hold_lock(Path(runs_dir) / f"{run_id}.lock", f"run {run_id}") as path:
        yield path


def execute_run(
    spec: RunSpec,
    runs_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    device: str | None = None,
    resume: bool = False,
) -> str:
    """Train and evaluate one run into ``RUNS/<id>``; returns ``"done"`` (already) or ``"ran"``.

    A finished run (``eval/test/summary.json``) is left alone (after checking that its
    ``run.json`` agrees with ``spec``). A run whose training finished but whose evaluation
    is missing is only evaluated. Any other half-finished folder is deleted and the run
    starts over, or, with ``resume``, continues from its last epoch checkpoint.

    While it trains, the run holds ``RUNS/<id>.lock`` (:func:`run_lock`), so a second
    process asked for the same run (another ``mkd ablate`` on the same runs folder, or a
    cluster job started twice) fails at once instead of training over it.

    Raises:
        MkdError: the teacher of a distillation run is not done, a finished run differs from
            ``spec``, or another process holds the run's lock.
    """
    from mkd.utils import write_json

    runs_dir = Path(runs_dir).resolve()
    run_dir = runs_dir / spec.id
    if is_done(run_dir):
        _check_identity(spec, run_dir)
        old = _read_run_json(run_dir)
        if old is not None and old != spec.run_json():  # labels or groups changed: refresh them
            write_json(run_dir / "run.json", spec.run_json())
        return "done"
    if spec.depends_on and not is_done(runs_dir / spec.depends_on):
        raise MkdError(f"run {spec.id} needs teacher run {spec.depends_on}, which is not done; run it first "
                       f"(`only={spec.depends_on}`)")  # fmt: skip
    runs_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(runs_dir, spec.id):
        if is_done(run_dir):  # another process finished it between the check above and the lock
            return "done"
        return _train_and_evaluate(spec, runs_dir, run_dir, data_dir, device, resume)


def _train_and_evaluate(spec: RunSpec, runs_dir: Path, run_dir: Path, data_dir, device, resume) -> str:
    from mkd.bundle import last_checkpoint, run_bundle
    from mkd.evaluation import evaluate_checkpoint
    from mkd.ownership import mark_owner, owner_of
    from mkd.utils import atomic_dir, write_json

    t0 = time.perf_counter()
    train = True
    resume_now = False
    if run_dir.exists():
        old = _read_run_json(run_dir)
        same = old is not None and not _identity_diff(old, spec)
        if same and _trained(run_dir):
            train = False
            logger.info("%s: training finished earlier; evaluating only", spec.id)
        elif same and resume and last_checkpoint(run_dir / "models") is not None:
            resume_now = True
            logger.info("%s: resuming from %s", spec.id, last_checkpoint(run_dir / "models"))
        else:
            from mkd.ownership import RUN_COMMANDS, check_replaceable, legacy_run

            # a folder of this name that no run wrote (a user's files) is reported, not deleted
            check_replaceable(run_dir, RUN_COMMANDS, option="`runs_dir`", keep={"dataset": data_dir}, legacy=legacy_run,
                              by="mkd ablate")  # fmt: skip
            logger.info("%s: removing a half-finished run folder and starting over", spec.id)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if owner_of(run_dir) is None:
        mark_owner(run_dir, spec.kind)  # what a later restart or --overwrite may replace
    write_json(run_dir / "run.json", spec.run_json())
    if train:
        run_bundle(
            spec.kind,
            output_dir=run_dir,
            dataset_dir=data_dir,
            profile=spec.profile,
            overrides=spec.bundle_overrides(runs_dir),
            resume=resume_now,
            seed=spec.seed,
            device=device,
        )
        shutil.rmtree(run_dir / "teacher_cache", ignore_errors=True)  # a cache; can be large
    result = evaluate_checkpoint(run_dir / "models" / "model.pt", data_dir, split="test", device=device)
    with atomic_dir(run_dir / "eval" / "test", overwrite=True) as tmp:
        result.write(tmp)
    logger.info("%s: done in %.0f s", spec.id, time.perf_counter() - t0)
    return "ran"


def run_command(
    grid: Grid,
    run_id: str,
    runs_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    device: str | None = None,
    resume: bool = False,
    program: Sequence[str] = ("mkd",),
) -> list[str]:
    """The self-contained command (argv) that runs one run of ``grid``: ``mkd ablate GRID --only ID ...``."""
    if grid.path is None:
        raise MkdError("a grid given as a mapping has no file for the per-run command; save it as YAML first")
    cmd = [*program, "ablate", str(grid.path), "--runs", str(Path(runs_dir).resolve()),
           "--data", str(Path(data_dir).resolve()), "--profile", grid.profile, "--only", run_id]  # fmt: skip
    if grid.seed_offset:
        cmd += ["--seed-offset", str(grid.seed_offset)]
    if device not in (None, "auto"):
        cmd += ["--device", str(device)]
    if resume:
        cmd += ["--resume"]
    if grid.allow_expressions:
        cmd += ["--allow-expressions"]
    return cmd


@dataclass
class AblationResult:
    """What :func:`run_ablation` did.

    Attributes:
        planned: every run id of the grid (or of ``only``), in dependency order.
        done: runs that were finished before this call (skipped).
        ran: runs trained and evaluated by this call.
        failed: ``{run id: error message}``.
        blocked: runs not started because their teacher failed or is running elsewhere.
        pending: runs that were not done when the call started.
        elsewhere: runs skipped because another process (a parallel ``mkd ablate``) holds their lock.
        seconds: wall time of the call.
        runs_dir: the runs folder, as given.
        only: the run ids asked for (empty: the whole grid or ``kinds``).
    """

    planned: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runs_dir: Path | None = None
    only: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary: the counts, then what to do next (nothing more after a failure: see :meth:`failure_lines`)."""
        elsewhere = f", {len(self.elsewhere)} running elsewhere" if self.elsewhere else ""
        counts = f"{len(self.ran)} ran, {len(self.done)} already done, {len(self.failed)} failed, {len(self.blocked)}"
        out = [f"ablate: {counts} blocked{elsewhere} ({self.seconds:.0f} s); runs folder {self.runs_dir}"]
        if self.failed:
            return out
        if self.elsewhere:
            out.append(f"{len(self.elsewhere)} run(s) are being trained by another process; run the same command "
                       "again once they are done")  # fmt: skip
        elif not self.only:
            out.append(f"next: mkd report {self.runs_dir}")
        return out

    def failure_lines(self) -> list[str]:
        """One indented line per failed run: ``  failed: ID: error``."""
        return [f"  failed: {run_id}: {err}" for run_id, err in self.failed.items()]


def select_runs(grid: Grid, only: Sequence[str] = (), kinds: Sequence[str] | None = None) -> list[RunSpec]:
    """The runs of ``grid`` with an id in ``only`` and a kind in ``kinds`` (empty: all), in dependency order.

    Raises:
        MkdError: an id of ``only`` is not in the grid (the message gives a few of its ids).
    """
    for run_id in only:
        grid[run_id]  # raises for an unknown id
    return [r for r in grid.runs if (not only or r.id in only) and (not kinds or r.kind in kinds)]


@dataclass
class AblationPlan:
    """The selected runs of a grid and their state in a runs folder: what ``mkd ablate`` would do.

    Made by :func:`plan_ablation`; :meth:`lines` is the listing of ``--dry-run``, :meth:`commands` the
    per-run commands of ``--print-commands``.

    Attributes:
        grid: the expanded grid.
        runs_dir: the runs folder.
        selected: the runs asked for (:func:`select_runs`), in dependency order.
        status: ``{run id: state}`` of every run of the grid (:func:`run_status`).
        name: the grid as the user named it, for the messages (default: its file).
    """

    grid: Grid
    runs_dir: Path
    selected: list[RunSpec]
    status: dict[str, str]
    name: str = ""

    @property
    def pending(self) -> list[RunSpec]:
        """The selected runs that are not done."""
        return [r for r in self.selected if self.status[r.id] != "done"]

    def warnings(self) -> list[str]:
        """``warning: ...`` lines about the grid itself (more than :data:`MANY_RUNS` runs: a typo in ``seeds``?)."""
        if len(self.grid.runs) <= MANY_RUNS:
            return []
        return [f"warning: {self.name} expands to {len(self.grid.runs)} runs ({len(self.grid.seeds)} seeds); check "
                "'seeds' before running it"]  # fmt: skip

    def lines(self) -> list[str]:
        """The grid's counts, one line per selected run (state, id, method) and the done / pending counts."""
        counts = self.grid.count()
        out = [f"grid {self.name}: profile {self.grid.profile}, seeds {self.grid.seeds}, {counts['teacher']} teachers, "
               f"{counts['student']} student baselines, {counts['distill']} distillation runs"]  # fmt: skip
        width = max([len(r.id) for r in self.selected] + [6])
        out += [f"{self.status[r.id]:8} {r.id:{width}}  {r.method}" for r in self.selected]
        pending = len(self.pending)
        out.append(f"{len(self.selected)} runs: {len(self.selected) - pending} done, {pending} pending (runs folder "
                   f"{self.runs_dir})")  # fmt: skip
        return out

    def data_warning(self, data_dir: str | os.PathLike) -> str | None:
        """``warning: a real run would stop here: ...`` when runs are pending and ``data_dir`` is no dataset."""
        if not self.pending:
            return None
        from mkd.bundle import check_datalist

        try:
            check_datalist(data_dir, ["training", "validation", "test"])
        except MkdError as err:
            return f"warning: a real run would stop here: {err}"
        return None

    def commands(self, data_dir: str | os.PathLike, device: str | None = None, resume: bool = False) -> list[str]:
        """One shell command per pending run (:func:`run_command`), by stage; ``# ...`` lines head each stage.

        The ``#`` lines are comments for the person reading them (``mkd ablate`` writes them to stderr,
        so that stdout is only commands); the last one says what to run when all are done.
        """
        out = []
        for kind, note in _STAGES.items():
            block = [r for r in self.pending if r.kind == kind]
            if block:
                out.append(f"# {note}: {len(block)} commands")
                out += format_commands(run_command(self.grid, r.id, self.runs_dir, data_dir, device, resume)
                                       for r in block)  # fmt: skip
        out.append(f"# {len(self.pending)} pending runs; then: mkd report {self.runs_dir}")
        return out


def plan_ablation(
    grid: Grid,
    runs_dir: str | os.PathLike,
    only: Sequence[str] = (),
    kinds: Sequence[str] | None = None,
    name: str | None = None,
) -> AblationPlan:
    """Select the runs (:func:`select_runs`), check their settings against the bundles (:func:`validate_grid`),
    and read their state in ``runs_dir``; nothing runs.

    Example:
        >>> plan = plan_ablation(load_grid("grids/smoke.yaml"), "runs_smoke")  # doctest: +SKIP
        >>> print("\n".join(plan.lines()))  # doctest: +SKIP

    Raises:
        MkdError: an unknown id in ``only``, an unknown setting or one of the wrong type.
    """
    selected = select_runs(grid, only, kinds)
    validate_grid(grid, selected)  # unknown settings keys and wrong types, as a real run would find them
    runs_dir = Path(runs_dir)
    return AblationPlan(grid, runs_dir, selected, run_status(grid, runs_dir), name or str(grid.path))


def run_ablation(
    grid: Grid,
    runs_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    jobs: int = 1,
    only: Sequence[str] = (),
    kinds: Sequence[str] | None = None,
    device: str | None = None,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
) -> AblationResult:
    """Run every pending run of ``grid`` (or of ``only`` / ``kinds``), skipping the done ones.

    With ``jobs == 1`` the runs execute one after the other in this process. With
    ``jobs > 1`` up to ``jobs`` worker processes each run one self-contained command
    (:func:`run_command`); a distillation run starts once its teacher is done. Each worker's
    output goes to ``RUNS/.logs/<id>.log`` and its torch threads are limited to
    ``cpu_count // jobs`` unless ``OMP_NUM_THREADS`` is set. A failed run does not stop
    the others; runs whose teacher failed are reported as blocked.

    Args:
        grid: the expanded grid.
        runs_dir: the runs folder.
        data_dir: the prepared dataset.
        jobs: number of runs at once.
        only: run ids to run (their teachers must be done).
        kinds: restrict to these kinds (``teacher``, ``student``, ``distill``).
        device: ``cpu``, ``cuda``, ... or ``None`` (automatic).
        resume: continue half-trained runs from their last epoch instead of starting over.
        progress: called with one line of text per event (start, done, failure).

    Returns:
        An :class:`AblationResult`.
    """
    say = progress or logger.info
    if jobs < 1:
        raise MkdError(f"`jobs` must be >= 1, got {jobs}")
    given, runs_dir = Path(runs_dir), Path(runs_dir).resolve()
    selected = select_runs(grid, only, kinds)
    t0 = time.perf_counter()
    result = AblationResult(planned=[r.id for r in selected], runs_dir=given, only=list(only))
    pending: list[RunSpec] = []
    for r in selected:
        if is_done(runs_dir / r.id):
            _check_identity(r, runs_dir / r.id)
            result.done.append(r.id)
        else:
            pending.append(r)
    result.pending = [r.id for r in pending]
    if only:
        for r in pending:
            if r.depends_on and r.depends_on not in result.pending and not is_done(runs_dir / r.depends_on):
                raise MkdError(f"run {r.id} needs teacher run {r.depends_on}, which is not done; run it first "
                               f"(`only={r.depends_on}`)")  # fmt: skip
    elif kinds:
        for r in pending:
            if r.depends_on and not is_done(runs_dir / r.depends_on) and r.depends_on not in result.pending:
                raise MkdError(f"run {r.id} needs teacher run {r.depends_on}, which is not done and not selected "
                               "(add `kinds=teacher`)")  # fmt: skip
    say(f"{len(selected)} runs: {len(result.done)} done, {len(pending)} pending")
    if not pending:
        result.seconds = round(time.perf_counter() - t0, 1)
        return result
    from mkd.bundle import check_datalist

    validate_grid(grid, pending)
    check_datalist(data_dir, ["training", "validation", "test"])
    runs_dir.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        _run_sequential(pending, grid, runs_dir, data_dir, device, resume, result, say)
    else:
        _run_parallel(pending, grid, runs_dir, data_dir, device, resume, jobs, result, say)
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def _blocked(spec: RunSpec, result: AblationResult) -> bool:
    return spec.depends_on is not None and (
        spec.depends_on in result.failed or spec.depends_on in result.blocked or spec.depends_on in result.elsewhere
    )


def _why_blocked(spec: RunSpec, result: AblationResult) -> str:
    if spec.depends_on in result.elsewhere:
        return f"skipped, teacher {spec.depends_on} is running elsewhere; run the same command again once it is done"
    return f"skipped, teacher {spec.depends_on} failed"


def _elsewhere(runs_dir: Path, run_id: str) -> str | None:
    """``"pid P on HOST since T"`` when another live process holds the run's lock, else ``None``."""
    from mkd.locks import held_elsewhere

    owner = held_elsewhere(runs_dir / f"{run_id}.lock")
    if owner is None:
        return None
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('started', '?')}"


def _run_sequential(pending, grid, runs_dir, data_dir, device, resume, result, say) -> None:
    n = len(pending)
    for i, spec in enumerate(pending, 1):
        if _blocked(spec, result):
            result.blocked.append(spec.id)
            say(f"[{i}/{n}] {spec.id}: {_why_blocked(spec, result)}")
            continue
        say(f"[{i}/{n}] {spec.id} ({spec.method}, seed {spec.seed}) ...")
        t = time.perf_counter()
        try:
            execute_run(spec, runs_dir, data_dir, device=device, resume=resume)
        except LockedError as err:  # a parallel mkd ablate (or a cluster job) is training it: not a failure
            result.elsewhere.append(spec.id)
            who = _elsewhere(runs_dir, spec.id) or str(err)
            say(f"[{i}/{n}] {spec.id}: running elsewhere ({who}); skipped")
            continue
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid
            result.failed[spec.id] = f"{type(err).__name__}: {err}"
            say(f"[{i}/{n}] {spec.id}: FAILED: {err}")
            logger.debug("run %s failed", spec.id, exc_info=True)
            continue
        result.ran.append(spec.id)
        say(f"[{i}/{n}] {spec.id}: done in {time.perf_counter() - t:.0f} s")


def _run_parallel(pending, grid, runs_dir, data_dir, device, resume, jobs, result, say) -> None:
    logs = runs_dir / ".logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    queue = list(pending)
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    n, started = len(pending), 0
    while queue or running:
        for spec in list(queue):
            if len(running) >= jobs:
                break
            if _blocked(spec, result):
                queue.remove(spec)
                result.blocked.append(spec.id)
                say(f"{spec.id}: {_why_blocked(spec, result)}")
                continue
            if spec.depends_on and not is_done(runs_dir / spec.depends_on):
                continue  # its teacher is still queued or running
            queue.remove(spec)
            who = _elsewhere(runs_dir, spec.id)
            if who is not None:
                result.elsewhere.append(spec.id)
                say(f"{spec.id}: running elsewhere ({who}); skipped")
                continue
            cmd = run_command(grid, spec.id, runs_dir, data_dir, device, resume, program=(sys.executable, "-m", "mkd"))
            log = open(logs / f"{spec.id}.log", "w")  # noqa: SIM115 - closed when the worker ends
            running[spec.id] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                time.perf_counter())  # fmt: skip
            started += 1
            say(f"[{started}/{n}] {spec.id} started (log: {logs / (spec.id + '.log')})")
        if queue and not running:  # nothing can start: a teacher outside the selection is missing
            for spec in queue:
                result.blocked.append(spec.id)
            break
        time.sleep(0.2)
        for run_id, (proc, log, t) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[run_id]
            if proc.returncode == 0 and is_done(runs_dir / run_id):
                result.ran.append(run_id)
                say(f"{run_id}: done in {time.perf_counter() - t:.0f} s")
            elif proc.returncode == 0 and _elsewhere(runs_dir, run_id) is not None:
                result.elsewhere.append(run_id)  # taken by another process between our check and the worker's
                say(f"{run_id}: running elsewhere ({_elsewhere(runs_dir, run_id)}); skipped")
            else:
                tail = (logs / f"{run_id}.log").read_text(errors="replace").strip().splitlines()[-1:]
                result.failed[run_id] = f"exit {proc.returncode}: {tail[0] if tail else ''}"
                say(f"{run_id}: FAILED (exit {proc.returncode}); see {logs / (run_id + '.log')}")


def format_commands(commands: Iterable[Sequence[str]]) -> list[str]:
    """Shell-quoted command lines."""
    return [shlex.join(list(c)) for c in commands]
