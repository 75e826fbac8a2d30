"""Run mkd's MONAI bundle: compose config files, apply overrides, run in-process or through torchrun.

``bundles/mkd`` is one MONAI bundle with three roles: ``configs/train.json`` holds everything
the roles share, ``teacher.json`` / ``student.json`` / ``distill.json`` only what differs, and the
profiles sizes and epochs. A run merges ``[train, ROLE, profile]`` (:func:`bundle_configs`).
The CLI commands ``mkd teacher``, ``mkd student`` and ``mkd distill`` are thin
wrappers around :func:`run_bundle`. Every run writes its fully merged config
(``config.json``) and the bundle metadata beside its checkpoints, so that
``python -m monai.bundle run --config_file RUN/config.json`` repeats it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mkd.errors import ExpressionError, InputError, MkdError
from mkd.locks import ensure_lock, hold_lock, release_own_lock
from mkd.ownership import RUN_COMMANDS, check_replaceable, legacy_run, mark_owner, owner_of
from mkd.utils import write_json

__all__ = [
    "BUNDLES",
    "ROLES",
    "PROFILES",
    "TRAIN_SPLITS",
    "bundles_dir",
    "bundle_dir",
    "bundle_configs",
    "compose_config",
    "run_bundle",
    "last_checkpoint",
    "resume_point",
    "check_datalist",
    "parse_overrides",
    "summary_lines",
    "resume_lines",
    "check_setting_values",
    "is_expression",
    "check_setting_type",
    "SPECIAL_KEYS",
    "EXPRESSION_PREFIXES",
    "KEY_METRIC",
    "key_metric_score",
    "RUN_LOCK",
    "lock_run",
    "unlock_run",
]

logger = logging.getLogger(__name__)

#: the roles of the bundle ``bundles/mkd``: each is a config file ``configs/ROLE.json`` listed after ``train.json``
ROLES = ("teacher", "student", "distill")
#: what ``mkd teacher|student|distill`` and the ablation grids call a bundle: one role of ``bundles/mkd``
BUNDLES = ROLES
#: the profiles: ``configs/profile_NAME.json``, or ``profile_NAME_ROLE.json`` where a role has its own
PROFILES = ("cpu", "thesis")
#: a student's data fraction -> its datalist split (``train_split``): 0.5 is the prepared ``student`` list (its
#: share is ``mkd prepare --student-fraction``), 1.0 all training patients. ``mkd student`` and the grids use it.
TRAIN_SPLITS = {0.5: "student", 1.0: "training"}
#: the bundle's folder name in :func:`bundles_dir`
BUNDLE = "mkd"
#: the validation metric every bundle selects ``models/model.pt`` on (and the teacher stops early on):
#: Dice of TP / FP / FN pooled over all validation slices, so false positives on slices without
#: the organ count (``MeanDice`` with ``ignore_empty`` skips those slices)
KEY_METRIC = "val_pooled_dice"


#: the lock file a training run holds in its output folder while it runs
RUN_LOCK = "run.lock"


def lock_run(output_dir: str | os.PathLike) -> None:
    """Take ``OUTPUT/run.lock`` unless this process already holds it (a bundle's ``initialize`` step).

    ``mkd teacher|student|distill`` (:func:`run_bundle`) hold the lock themselves; this step
    gives ``python -m monai.bundle run`` the same protection. A run that dies without its
    ``finalize`` leaves the lock behind; the next run on this host takes it over.

    Raises:
        MkdError: another live process holds the lock.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ensure_lock(output_dir / RUN_LOCK, f"run {output_dir.name}")


def unlock_run(output_dir: str | os.PathLike) -> None:
    """Release the lock :func:`lock_run` took (a bundle's ``finalize`` step)."""
    release_own_lock(Path(output_dir) / RUN_LOCK)


def key_metric_score(engine) -> float:
    """The evaluator's :data:`KEY_METRIC` (the ``score_function`` of early stopping)."""
    return float(engine.state.metrics[KEY_METRIC])


def bundles_dir() -> Path:
    """The folder holding the bundles: ``$MKD_BUNDLES`` or ``bundles/`` beside the ``mkd`` package."""
    env = os.environ.get("MKD_BUNDLES")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "bundles"
    if not path.is_dir():
        raise MkdError(f"{path}: bundle folder not found; set MKD_BUNDLES to the repository's bundles/ folder")
    return path


def bundle_dir() -> Path:
    """The bundle ``bundles/mkd`` (``$MKD_BUNDLES/mkd``)."""
    return bundles_dir() / BUNDLE


def bundle_configs(name: str, profile: str | None = "cpu", extra: Sequence[str] = ()) -> list[Path]:
    """The config files of role ``name``, in merge order: ``train.json``, ``NAME.json``, the profile, ``extra``.

    The profile is ``profile_PROFILE_NAME.json`` when the role has its own (the teacher's CPU
    profile), else ``profile_PROFILE.json``.

    Args:
        name: one of :data:`ROLES`.
        profile: ``"cpu"``, ``"thesis"`` or ``None`` (the role's own settings as they are).
        extra: further config names of the bundle, e.g. ``("multi_gpu_train",)`` or ``("evaluate",)``.

    Raises:
        MkdError: unknown role, profile or config name.

    Example:
        >>> [f.name for f in bundle_configs("teacher", "cpu")]
        ['train.json', 'teacher.json', 'profile_cpu_teacher.json']
    """
    if name not in ROLES:
        raise MkdError(f"unknown bundle {name!r}; available: {', '.join(ROLES)}")
    if profile is not None and profile not in PROFILES:
        raise MkdError(f"unknown profile {profile!r}; available: {', '.join(PROFILES)}")
    configs = bundle_dir() / "configs"
    names = ["train", name]
    if profile:
        own = f"profile_{profile}_{name}"
        names.append(own if (configs / f"{own}.json").is_file() else f"profile_{profile}")
    files = [configs / f"{n}.json" for n in names + list(extra)]
    for f in files:
        if not f.is_file():
            raise MkdError(f"{f}: bundle config not found")
    return files


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (``--set``) into ``overrides``; VALUE is read as JSON when it parses, else kept
    as a string.

    Example:
        >>> parse_overrides(["train#epochs=3", "arch=s2", "image_size=[64, 64]"])
        {'train#epochs': 3, 'arch': 's2', 'image_size': [64, 64]}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MkdError(f"`overrides` {pair!r}: expected KEY=VALUE, e.g. `overrides` epochs=3")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


#: keys of a MONAI config mapping that make it an instruction rather than a value: ``_target_`` instantiates
#: (and so runs) any importable callable, the others steer that instantiation
SPECIAL_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")
#: first characters of a string that MONAI does not take as text: ``$`` runs the rest as Python, ``@``
#: references another config item, ``%`` reads an item of another config file
EXPRESSION_PREFIXES = ("$", "@", "%")


def _expression_in(
    value: Any, path: str, special: Callable[[str, Any], str | None] | None = None
) -> tuple[str, str] | None:
    """The first place in ``value`` that MONAI would evaluate: ``(path, why)``, or ``None``.

    ``special(key, value)`` may accept a special key (``_target_`` ...): it returns why the entry is
    refused, or ``None`` to accept it as it is (a teacher bundle's MONAI classes, :mod:`mkd.teachers`).
    Without it every special key is refused.
    """
    if isinstance(value, str):
        if value[:1] in EXPRESSION_PREFIXES:
            shown = value if len(value) <= 60 else value[:57] + "..."
            return path, f"{shown!r} is a MONAI expression or reference ('{value[0]}...'), not a value"
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key) in SPECIAL_KEYS:
                why = "makes the mapping an object MONAI would build (and run)" if special is None else special(
                    str(key), item)  # fmt: skip
                if why:
                    return f"{path}#{key}", f"{key} {why}"
                continue
            found = _expression_in(item, f"{path}#{key}", special)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _expression_in(item, f"{path}#{i}", special)
            if found:
                return found
    return None


def is_expression(value: Any) -> bool:
    """Whether MONAI would evaluate ``value`` or something in it (``"$..."``, ``"@..."``, ``"%..."``, ``_target_``).

    Example:
        >>> is_expression("$1 + 1"), is_expression({"bn": 0.2}), is_expression(["a", {"_target_": "os.system"}])
        (True, False, True)
    """
    return _expression_in(value, "") is not None


def check_setting_values(settings: Mapping[str, Any], where: str = "setting") -> None:
    """Refuse settings that MONAI would run as code: settings are JSON / YAML values only.

    A string starting with ``$`` (Python), ``@`` (a reference) or ``%`` (a macro), a mapping
    with one of :data:`SPECIAL_KEYS` (``_target_`` builds any importable callable), at any depth,
    lists included, and a key whose path names a special key (``optimizer#_target_``) are
    refused. Plain strings (``"contrastive"``, ``"cuda"``), numbers, lists and mappings pass.
    Bundle config files are code; settings from the command line or a grid file are data.

    Args:
        settings: ``{bundle key: value}``.
        where: what the settings are, for the message (``"--set"``, ``"settings.all"``).

    Raises:
        ExpressionError: e.g. ``settings.all epochs: "$__import__('os')..." is a MONAI expression
            or reference ('$...'), not a value; settings take plain values``.
    """
    for key, value in settings.items():
        special = next((part for part in str(key).split("#") if part in SPECIAL_KEYS), None)
        found: tuple[str, str] | None = None
        if special is not None:
            found = (str(key), f"{special} makes the item an object MONAI would build (and run)")
        else:
            found = _expression_in(value, str(key))
        if found:
            path, why = found
            raise ExpressionError(f"{where} {path}: {why}; settings take plain values (numbers, strings, lists, "
                                  "mappings)")  # fmt: skip


def compose_config(
    files: Sequence[os.PathLike],
    overrides: Mapping[str, Any] | None = None,
    strict: bool = True,
    label: str = "`overrides`",
):
    """Merge config files and apply overrides into a :class:`monai.bundle.ConfigParser`.

    Args:
        files: config files, later ones override earlier ones.
        overrides: ``{id: value}`` with MONAI ids (``"train#trainer#max_epochs"``).
        strict: an override whose id is not in the merged config is an error
            (this catches typos such as ``epochz=3``).
        label: what the overrides are called in a message: the parameter `` "`overrides`" `` (the CLI says
            ``--set``), a grid's ``"settings.all"``.

    Raises:
        MkdError: an unknown key when ``strict``.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    bundle = _role_of(files)
    for key, value in (overrides or {}).items():
        if strict and key not in parser:
            top = sorted(k for k in parser.config if not k.startswith("_"))
            raise MkdError(f"unknown bundle key {key!r} (in {bundle}); top-level keys: {', '.join(top)}")
        if strict:
            check_setting_type(key, value, parser[key], bundle, label=label)
        parser[key] = value
    return parser


def _role_of(files: Sequence[os.PathLike]) -> str:
    """The role a list of config files runs (``student`` for ``[train.json, student.json, ...]``), for messages."""
    stems = [Path(f).stem for f in files]
    return next((s for s in stems if s in ROLES), Path(files[0]).parent.parent.name)


_KINDS: tuple[tuple[str, Any], ...] = (
    ("true or false", lambda v: isinstance(v, bool)),
    ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    ("a string", lambda v: isinstance(v, str)),
    ("a list", lambda v: isinstance(v, list)),
    ("a mapping", lambda v: isinstance(v, dict)),
)


def _kind(value: Any) -> str | None:
    return next((name for name, test in _KINDS if test(value)), None)


#: settings that a profile sets but ``null`` turns off (``--set epoch_splits=null``: one pass per epoch)
NULLABLE = frozenset({"epoch_splits"})


def check_setting_type(key: str, value: Any, current: Any, bundle: str = "the", label: str = "`overrides`") -> None:
    """Refuse an override whose type differs from the bundle's setting (``overrides={"epochs": "abc"}``).

    An integer is accepted for a number; a setting that is ``null`` or computed (``"$..."``,
    ``"@..."``), and a value that is itself an expression or reference, are not checked.

    Raises:
        MkdError: e.g. `` `overrides` epochs="abc": epochs is an integer in the student bundle (25), got a
            string``.
    """
    computed = lambda v: isinstance(v, str) and v[:1] in ("$", "@", "%")  # noqa: E731
    if current is None or computed(current) or computed(value) or (value is None and key in NULLABLE):
        return
    wanted = _kind(current)
    if wanted is None or dict(_KINDS)[wanted](value):
        return
    raise MkdError(
        f"{label} {key}={json.dumps(value)}: {key} is {wanted} in the {bundle} bundle ({json.dumps(current)}), "
        f"got {_kind(value) or type(value).__name__}"
    )


def _epoch_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint_epoch=N.pt`` files of ``ckpt_dir``, oldest epoch first."""
    found = []
    for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resume_point(ckpt_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint_epoch=N.pt`` and the truncated ones newer than it.

    ``torch.save`` writes a zip archive; a file cut off while being written (a killed run)
    has no zip directory and is passed over for the newest complete one.
    """
    files = _epoch_files(ckpt_dir)
    valid = [p for p in files if zipfile.is_zipfile(p)]
    last = valid[-1] if valid else None
    newer_bad = [str(p) for p in files[files.index(last) + 1 :]] if last is not None else [str(p) for p in files]
    return (None if last is None else str(last)), newer_bad


def resume_lines(ckpt_dir: str | os.PathLike, epochs: Any = "?") -> list[str]:
    """What a run resumed from ``ckpt_dir`` says first: the truncated checkpoints passed over, its start epoch.

    Empty when there is no complete checkpoint (:func:`run_bundle` then says why it cannot resume).
    """
    ckpt, truncated = resume_point(ckpt_dir)
    if ckpt is None:
        return []
    lines = [f"{bad}: truncated (was the run killed while writing it?); skipped" for bad in truncated]
    done = int(Path(ckpt).stem.split("=")[1])
    return [*lines, f"resuming from {ckpt} (epoch {done} of {epochs})"]


def last_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (the resume point), or ``None``."""
    return resume_point(ckpt_dir)[0]


def check_datalist(dataset_dir: str | os.PathLike, splits: Sequence[str]) -> None:
    """Fail early with a clear message when the prepared dataset or one of its splits is missing or empty.

    Raises:
        InputError: no ``datalist.json`` in ``dataset_dir``, a split missing or empty, or a slice
            file of the splits missing (the message names the first and counts them).
    """
    path = Path(dataset_dir) / "datalist.json"
    if not path.is_file():
        raise InputError(path, "datalist not found; run `mkd prepare` first (or pass `data_dir`)")
    try:
        datalist = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    for split in splits:
        if not datalist.get(split):
            available = [k for k, v in datalist.items() if isinstance(v, list) and v]
            raise InputError(path, f"split {split!r} is missing or empty; non-empty splits: {', '.join(available)}")
    listed = dict.fromkeys(
        item[key] for split in splits for item in datalist[split] if isinstance(item, dict)
        for key in ("image", "label") if isinstance(item.get(key), str)
    )  # fmt: skip
    missing = [f for f in listed if not (Path(dataset_dir) / f).is_file()]
    if missing:
        raise InputError(
            Path(dataset_dir) / missing[0],
            f"slice file listed in datalist.json ({'/'.join(splits)}) is missing; {len(missing)} of the "
            f"{len(listed)} files of those splits are missing; run `mkd prepare` again",
        )


def run_bundle(
    name: str,
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    profile: str | None = "cpu",
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    nproc: int = 1,
    extra_configs: Sequence[str] = (),
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run one of mkd's bundles and return a summary of the run.

    The merged config is saved as ``OUTPUT/config.json`` (with the metadata as
    ``OUTPUT/metadata.json``) and then run: in this process when ``nproc == 1``,
    otherwise through ``torchrun`` with the bundle's ``multi_gpu_train.json``.
    While it runs, the run holds ``OUTPUT/run.lock`` (:func:`mkd.locks.hold_lock`): a second
    run into the same folder stops at once, naming the lock's owner (host, pid).

    Args:
        name: bundle name (``teacher``, ``student``, ``distill``).
        output_dir: where checkpoints (``models/``), logs, ``metrics.csv`` and ``config.json`` go.
        dataset_dir: a folder written by ``mkd prepare``.
        profile: ``cpu`` or ``thesis``.
        overrides: further ``{bundle id: value}`` settings (``--set``).
        resume: continue from the last checkpoint in ``output_dir``.
        nproc: number of processes (DDP; gloo on CPU, nccl on GPU).
        extra_configs: further bundle config names merged after the profile.
        seed: random seed.
        device: ``cpu``, ``cuda``, ``cuda:1`` ... or ``None`` for automatic.
        overwrite: delete an earlier run in ``output_dir`` first (once the lock is held). Only a
            folder that a training run wrote (its ``.mkd-owner.json``, :mod:`mkd.ownership`) or an
            empty one is replaced; never the current folder, the dataset or a folder above them.

    Returns:
        dict with ``output_dir``, ``checkpoint`` (best on validation), ``best_epoch``,
        ``best_val_pooled_dice`` (:data:`KEY_METRIC`) and the other ``best_val_*`` metrics of that epoch,
        ``epochs`` and ``seconds``.

    An error raised before the first epoch is saved (a bad setting, a bad teacher, missing
    data) removes what the run wrote (``config.json``, ``metadata.json``, logs), so the next
    attempt starts clean.

    Raises:
        MkdError / InputError: bad options, missing data, nothing to resume, existing output,
            another process running in ``output_dir``.
    """
    output_dir = Path(output_dir).resolve()
    dataset_dir = Path(dataset_dir).resolve()
    if nproc < 1:
        raise MkdError(f"`nproc` must be >= 1, got {nproc}")
    if overwrite and resume:
        raise MkdError("`overwrite=True` and `resume=True` exclude each other")
    if overwrite:  # replace only a training run (or an empty folder), never the data or the current folder
        check_replaceable(output_dir, RUN_COMMANDS, keep={"dataset": dataset_dir}, legacy=legacy_run)
    extra = list(extra_configs) + (["multi_gpu_train"] if nproc > 1 else [])
    files = bundle_configs(name, profile, extra)
    settings: dict[str, Any] = {
        "bundle_root": str(files[0].parent.parent),
        "output_dir": str(output_dir),
        "dataset_dir": str(dataset_dir),
        "seed": int(seed),
        "resume": bool(resume),
    }
    if device not in (None, "auto"):
        from mkd.utils import resolve_device

        resolve_device(device)  # --device banana, or cuda without CUDA: one line before anything runs
        settings["device"] = f"$torch.device({device!r})"
    settings.update(overrides or {})
    parser = compose_config(files, settings)
    ckpt_dir = Path(parser.get_parsed_content("ckpt_dir"))
    check_datalist(dataset_dir, [parser["train_split"], parser["val_split"]])
    _check_before_training(parser, output_dir, ckpt_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with hold_lock(output_dir / RUN_LOCK, f"run {output_dir.name}"):
            if overwrite:
                _remove(e for e in output_dir.iterdir() if e.name != RUN_LOCK)
            before = {e.name for e in output_dir.iterdir()}
            if owner_of(output_dir) not in RUN_COMMANDS:
                mark_owner(output_dir, name)  # what --overwrite may replace later
            saved = _epoch_checkpoints(ckpt_dir)
            try:
                return _run_locked(name, parser, files, output_dir, dataset_dir, ckpt_dir, resume, nproc)
            except BaseException:
                if _epoch_checkpoints(ckpt_dir).items() <= saved.items():  # failed before its first epoch ended
                    _remove(e for e in output_dir.iterdir() if e.name not in before)
                raise
    except BaseException:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _remove(entries) -> None:
    for entry in list(entries):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _epoch_checkpoints(ckpt_dir: Path) -> dict[str, int]:
    """``{file name: mtime_ns}`` of the ``checkpoint_epoch=N.pt`` files in ``ckpt_dir``."""
    if not ckpt_dir.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in ckpt_dir.glob("checkpoint_epoch=*.pt")}


def _run_locked(name, parser, files, output_dir: Path, dataset_dir: Path, ckpt_dir: Path, resume, nproc):
    """The part of :func:`run_bundle` done while holding the run's lock."""
    if resume:
        last, truncated = resume_point(ckpt_dir)
        if last is None and truncated:
            raise InputError(
                truncated[-1], "truncated or not a checkpoint (was the run killed while writing it?) and no earlier "
                "complete checkpoint_epoch=N.pt to resume from; start the run again with `overwrite=True`"
            )  # fmt: skip
        if last is None:
            raise MkdError(f"{ckpt_dir}: nothing to resume (no checkpoint_epoch=N.pt); run without `resume=True`")
        for bad in truncated:
            logger.info("%s: truncated (was the run killed while writing it?); resuming from %s", bad, last)
        _check_resume(last, parser, output_dir)
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise MkdError(
            f"{output_dir}: holds an earlier run; pass `resume=True` to continue it or `overwrite=True` to replace it"
        )

    config_file = output_dir / "config.json"
    meta_file = output_dir / "metadata.json"
    write_json(config_file, parser.config)
    write_json(meta_file, json.loads((files[0].parent / "metadata.json").read_text()))

    t0 = time.perf_counter()
    if nproc == 1:
        _run_in_process(parser)
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "monai.bundle", "run", "--config_file", str(config_file), "--meta_file", str(meta_file),
        ]  # fmt: skip
        logger.info("launching %s", " ".join(cmd))
        result = subprocess.run(cmd, check=False)  # the workers see HELD_LOCK_ENV: the lock is this process's
        if result.returncode != 0:
            raise MkdError(f"distributed run failed (exit {result.returncode}); see the log above")
    summary = summarize_run(output_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(output_dir / "summary.json", summary)
    return summary


def _run_in_process(parser) -> None:
    """Run ``initialize``, ``run`` and ``finalize`` of a parsed bundle config, as ``monai.bundle run`` does."""
    try:
        for section in ("initialize", "run"):
            if section in parser:
                parser.get_parsed_content(section, lazy=True)
    except Exception as err:
        # MONAI wraps errors raised while resolving the config ("Failed to evaluate ...");
        # surface the user's error (bad checkpoint, missing data) instead of the wrapper
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, MkdError):
            if isinstance(cause, ValueError) and cause.__cause__ is None:
                # a bad setting rejected by a constructor (unknown arch, bad weight, ...)
                raise MkdError(f"bad bundle setting: {cause}") from err
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    finally:
        if "finalize" in parser:
            parser.get_parsed_content("finalize", lazy=True)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What a finished run says: the best epoch and its validation metrics, the checkpoint and the time.

    Args:
        summary: what :func:`run_bundle` returned.
    """
    keys = [k for k in summary if k.startswith("best_val_")]
    lines = []
    if keys:
        metrics = ", ".join(f"{k[len('best_') :]}={summary[k]:.4f}" for k in keys)
        lines.append(f"best epoch {summary.get('best_epoch')}/{summary.get('epochs')}: {metrics}")
    lines.append(f"checkpoint: {summary['checkpoint']}  ({summary.get('seconds', 0):.0f} s)")
    return lines


def summarize_run(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``metrics.csv`` of a finished run: best :data:`KEY_METRIC`, its epoch, number of epochs."""
    import pandas as pd

    output_dir = Path(output_dir)
    summary: dict[str, Any] = {"output_dir": str(output_dir), "checkpoint": str(output_dir / "models" / "model.pt")}
    csv = output_dir / "metrics.csv"
    if csv.is_file():
        df = pd.read_csv(csv)
        summary["epochs"] = int(df["epoch"].max()) if len(df) else 0
        if KEY_METRIC in df and df[KEY_METRIC].notna().any():
            best = df.loc[df[KEY_METRIC].idxmax()]
            summary["best_epoch"] = int(best["epoch"])
            for col in df.columns:
                if col.startswith("val_"):
                    summary[f"best_{col}"] = float(best[col])
    return summary


def _check_before_training(parser, output_dir: Path, ckpt_dir: Path) -> None:
    """Settings and space checked before a run starts: ``image_size``, writable run and checkpoint folders, space.

    Raises:
        MkdError: an ``image_size`` the network cannot take, an output folder mkd may not write, or too
            little free space for the checkpoints (estimated from the network's size on the meta device).
    """
    import torch

    from mkd.networks import build
    from mkd.utils import check_free_space, check_writable

    size = parser.get_parsed_content("image_size")
    arch = parser.get_parsed_content("arch")
    try:
        with torch.device("meta"):  # nothing allocated
            net = build(arch, preset=parser.get_parsed_content("network_preset"),
                        **parser.get_parsed_content("network_kwargs"))  # fmt: skip
    except (TypeError, ValueError, KeyError):
        return  # a bad network setting: reported where the network is built
    low = int(getattr(net, "size_divisor", 1))
    ok = isinstance(size, (list, tuple)) and len(size) == 2
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and low <= s <= 4096 for s in size)
    if not ok:
        raise MkdError(
            f"image_size={json.dumps(size)}: must be two integers [H, W] from {low} to 4096 for {arch!r} (it "
            f"downsamples by {low}; other sizes are padded); e.g. `overrides` image_size=[96,96]"
        )
    check_writable(output_dir, "run")
    check_writable(ckpt_dir, "checkpoints")
    params = sum(p.numel() for p in net.parameters())
    # model.pt and checkpoint_epoch=N.pt (with up to two optimizer states each), each written beside the old one
    check_free_space(ckpt_dir, params * 4 * 8 + 10 * 2**20, "run's checkpoints")


def _check_resume(last: str, parser, output_dir: Path) -> None:
    """The checkpoint to resume from is weights-only readable and holds the network this run builds.

    Raises:
        InputError: an unreadable or pickle-payload checkpoint (mkd's one line, never PyTorch's advice).
        MkdError: the run was trained with another ``--arch`` (or other network settings).
    """
    from mkd.networks.checkpoint import load_checkpoint

    ckpt = load_checkpoint(last, map_location="cpu")
    had = ckpt.get("network") if isinstance(ckpt.get("network"), Mapping) else {}
    arch = parser.get_parsed_content("arch")
    name = had.get("name")
    if name and name != arch:
        raise MkdError(
            f"{last}: the run in {output_dir} trains {name!r}, not {arch!r}; resume it with `arch={name}`, or "
            f"start a new {arch} run with `overwrite=True` (or another `output_dir`)"
        )
    kwargs = had.get("kwargs")
    if name and isinstance(kwargs, Mapping):
        wanted = parser.get_parsed_content("network_info").state_dict()["kwargs"]
        if dict(kwargs) != wanted:
            raise MkdError(
                f"{last}: the run in {output_dir} trains {name!r} with {dict(kwargs)}, this one asks for {wanted}; "
                "resume it with the same network settings (network_preset, network_kwargs), or use `overwrite=True`"
            )
