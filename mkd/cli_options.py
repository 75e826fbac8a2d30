"""What the ``mkd`` commands share: their common options, their error handling, and the table that names
library parameters as flags.

Each shared option (``--data``, ``--output``, ``--device``, ``--overwrite``, ``--seed``, ...)
is declared once here; a command passes only what differs (its help text, its default).
Every command is wrapped in :func:`user_errors`: an error the user can fix is one ``Error:`` line.

Library messages name the parameter a caller can change, in backticks (:class:`mkd.errors.MkdError`):
``pass `overwrite=True` to replace it``. :func:`as_flags` rewrites them with one table,
:data:`PARAMETER_FLAGS`, so that a CLI user reads ``pass --overwrite to replace it``.

Like :mod:`mkd.cli`, this module imports neither torch nor MONAI.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Sequence

import click

from mkd.bundle import PROFILES
from mkd.errors import ExpressionError, MkdError, storage_problem
from mkd.utils import LazyNames

__all__ = [
    "PARAMETER_FLAGS",
    "ONE_LINE_ERRORS",
    "as_flags",
    "user_errors",
    "LazyChoice",
    "distill_settings_options",
    "Numbers",
    "Window",
    "allow_expressions_option",
    "data_option",
    "device_option",
    "output_option",
    "overwrite_option",
    "seed_option",
    "student_options",
    "training_options",
    "OPTIMIZERS",
]

#: library parameter -> the flag that sets it. A message writes `name` (-> the flag), `name=True`
#: (-> the switch), `name=False` (-> its --no- form) or `name=VALUE` (-> the flag and VALUE).
PARAMETER_FLAGS: dict[str, str] = {
    # switches
    "overwrite": "--overwrite",
    "resume": "--resume",
    "skip_existing": "--skip-existing",
    "download": "--download",
    "allow_expressions": "--allow-expressions",
    "allow_student_teacher": "--allow-student-teacher",
    "figures": "--figures",
    "qualitative": "--qualitative",
    # files and folders
    "data_dir": "--data",
    "dataset_dir": "--data",
    "output": "--output",
    "output_dir": "--output",
    "out": "--out",
    "out_dir": "--out",
    "runs_dir": "--runs",
    "input": "--input",
    "input_dir": "--input",
    "root": "--root",
    "source": "--source",
    "decathlon": "--decathlon",
    "preview": "--preview/--png",
    "calibration": "--calibration",
    "teacher_ckpt": "--teacher",
    # settings
    "overrides": "--set",
    "device": "--device",
    "backend": "--backend",
    "threads": "--threads",
    "quantize": "--quantize",
    "arch": "--arch",
    "nproc": "--nproc",
    "jobs": "--jobs",
    "only": "--only",
    "kinds": "--kind",
    "baseline": "--baseline",
    "evaluation": "--evaluation",
    "spacing": "--spacing",
    "channels": "--channels",
    "keep": "--keep",
    "window": "--window",
    "margin": "--margin",
    "size": "--size",
    "label_value": "--label-value",
    "val_fraction": "--val-fraction",
    "test_fraction": "--test-fraction",
}

_PARAMETER = re.compile(r"`([a-z_]+)(=[^`]*)?`")


def as_flags(text: str) -> str:
    """``text`` with each backticked library parameter of :data:`PARAMETER_FLAGS` written as its flag.

    Other backticked text (`` `mkd prepare` ``) and unknown names stay as they are.

    Example:
        >>> as_flags("m.nii.gz: output already exists; pass `overwrite=True` to replace it")
        'm.nii.gz: output already exists; pass --overwrite to replace it'
        >>> as_flags("`device=banana`: unknown device; run `mkd prepare` first (or pass `data_dir`)")
        '--device banana: unknown device; run `mkd prepare` first (or pass --data)'
    """

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in PARAMETER_FLAGS:
            return match.group(0)
        option = PARAMETER_FLAGS[name]
        if value == "=False":
            return "--no-" + option[2:]
        return option if value in (None, "=True") else f"{option} {value[1:]}"

    return _PARAMETER.sub(flag, text)


class LazyChoice(click.Choice):
    """A :class:`click.Choice` over a :class:`mkd.utils.LazyNames`, read when click first needs the choices.

    click >= 8.2 copies its choices into a tuple when the option is declared, which would import the
    registry (torch, MONAI) as soon as ``mkd.cli`` is imported; this keeps ``import mkd.cli`` light.
    """

    def __init__(self, choices, case_sensitive: bool = True) -> None:
        self._lazy = choices
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple:  # type: ignore[override]
        return tuple(self._lazy)


#: what the CLI adds to a refused expression: the way to run it on purpose
_ALLOW_HINT = "pass --allow-expressions to run it as code on purpose (docs/security.md)"


def user_errors(func):
    """Turn MkdError (and a full disk or an unwritable folder) into one ``Error:`` line that names flags."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ExpressionError as err:
            raise click.ClickException(f"{as_flags(str(err))}; {_ALLOW_HINT}") from None
        except MkdError as err:
            raise click.ClickException(as_flags(str(err))) from None
        except Exception as err:
            found = storage_problem(err)
            if found is None:
                raise
            raise click.ClickException(found) from None

    return wrapper


class _EngineErrorFilter(logging.Filter):
    """Drop ignite's and MONAI's ERROR records (StatsHandler logs a whole traceback) about an error the CLI prints.

    They are logged while the exception propagates out of a training engine; when it is an
    :class:`MkdError` or a full disk / permission problem, the command's one ``Error:`` line says it all.
    It also writes the parameters that mkd's own log records name (`` `threads=8` ``) as flags (:func:`as_flags`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("mkd") and "`" in str(record.msg):
            # the library's warnings name parameters (`threads=8`); on the command line they read as flags
            record.msg, record.args = as_flags(record.getMessage()), None
        if record.levelno < logging.ERROR or not record.name.startswith(("ignite", "monai")):
            return True
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or not (isinstance(exc, MkdError) or storage_problem(exc) is not None)


#: the filter :func:`mkd.cli.cli` puts on the log handlers
ONE_LINE_ERRORS = _EngineErrorFilter()


#: the help of --data where it is a dataset to train or evaluate on
PREPARED_HELP = "Prepared dataset (output of `mkd prepare`)."


def data_option(help: str = PREPARED_HELP, default: str | None = "mkd_data"):
    """``--data DATA_DIR``: a prepared dataset (the ``data_dir`` of the library)."""
    return click.option("--data", "data_dir", type=click.Path(file_okay=False), default=default,
                        show_default=default is not None, help=help)  # fmt: skip


def output_option(help: str, name: str = "output_dir", type: click.ParamType | None = None, **kwargs):
    """``--output``: where a command writes (a folder unless ``type`` says otherwise); no default unless given."""
    kwargs.setdefault("default", None)
    return click.option("--output", name, type=type or click.Path(file_okay=False), help=help, **kwargs)


def device_option(default: str = "auto", help: str = "auto, cpu, cuda or cuda:N."):
    """``--device``: where the networks run (:func:`mkd.utils.resolve_device`)."""
    return click.option("--device", default=default, show_default=True, help=help)


def overwrite_option(help: str):
    """``--overwrite``: replace what the command wrote before (never another file or folder)."""
    return click.option("--overwrite", is_flag=True, help=help)


def seed_option(func):
    """``--seed``: the random seed."""
    return click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(func)


def allow_expressions_option(func):
    """``--allow-expressions``: settings may hold code (docs/security.md)."""
    return click.option(
        "--allow-expressions",
        is_flag=True,
        help="Let --set / grid settings hold MONAI expressions ('$...', '@...', '%...') and _target_ mappings. "
        "This runs code: use it only with settings you wrote yourself (docs/security.md).",
    )(func)


class Numbers(click.ParamType):
    """Comma-separated numbers (``X,Y,Z``) -> a tuple of floats (of ints with ``integers``).

    Args:
        n: how many; ``None``: one or more.
        integers: whole numbers only.
        words: values passed through as they are (``"none"``).
    """

    name = "numbers"

    def __init__(self, n: int | None = None, integers: bool = False, words: Sequence[str] = ()) -> None:
        self.n, self.integers, self.words = n, integers, tuple(words)

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or value.strip().lower() in self.words:
            return value
        try:
            values = tuple((int if self.integers else float)(v) for v in value.split(","))
        except ValueError:
            values = ()
        if self.n is None and not values:
            self.fail(f"{value!r} is not a comma-separated list of {'integers' if self.integers else 'numbers'}",
                      param, ctx)  # fmt: skip
        if self.n is not None and len(values) != self.n:
            self.fail(f"expected {self.n} comma-separated numbers, got {value!r}", param, ctx)
        return values


class Window(click.ParamType):
    """An HU window ``LOW,HIGH`` -> ``(low, high)``, or ``max`` (:func:`mkd.data.transforms.parse_window`)."""

    name = "window"

    def convert(self, value, param, ctx):
        from mkd.data.transforms import parse_window

        try:
            return parse_window(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def training_options(func):
    """Options shared by the commands that run a training bundle."""
    options = [
        data_option(),
        output_option("Run folder (checkpoints, logs, metrics.csv, config.json). Default: runs/<command>-<arch>."),
        click.option("--profile", type=click.Choice(PROFILES), default="cpu", show_default=True,
                     help="cpu: small input size and epochs, minutes on a laptop; thesis: the thesis protocol (GPU)."),
        click.option("--epochs", type=int, default=None, help="Override the profile's number of epochs."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any bundle key, e.g. --set train#dataloader#num_workers=2 (repeatable)."),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."),
        overwrite_option("Replace an existing run in --output."),
        click.option("--nproc", type=int, default=1, show_default=True,
                     help="Processes for distributed data parallel training (torchrun; gloo on CPU, nccl on GPU)."),
        device_option(),
        allow_expressions_option,
        seed_option,
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


#: ``--optimizer`` choices -> the bundle's ``optimizer#_target_``
OPTIMIZERS = {
    "rmsprop": "torch.optim.RMSprop",
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
}

_STUDENTS = LazyNames("mkd.networks.registry", "STUDENTS")


def student_options(func):
    """Options shared by `mkd student` and `mkd distill`: the same student, data and optimiser settings."""
    options = [
        click.option("--arch", type=LazyChoice(_STUDENTS), default="s1", show_default=True,
                     help="Student network."),
        click.option("--data-fraction", type=click.Choice(["0.5", "1.0"]), default="0.5", show_default=True,
                     help="0.5: the student subset (half the training patients); 1.0: all training patients."),
        click.option("--optimizer", type=click.Choice(sorted(OPTIMIZERS)), default="rmsprop", show_default=True,
                     help="Keep baseline and distillation runs on the same optimiser for a fair comparison."),
        click.option("--lr", type=float, default=None, help="Learning rate (default 1e-2, as the thesis's students)."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


# --- distillation settings (mkd.handlers.settings) ----------------------------


class _ScalesType(click.ParamType):
    """``--scales``: comma-separated scale names, or ``none`` (PMD only)."""

    name = "scales"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        return [] if value.strip().lower() == "none" else [s.strip() for s in value.split(",") if s.strip()]


class _WeightsType(click.ParamType):
    """``--weight-overrides`` / ``--weights``: ``TERM=W,...``."""

    name = "weights"

    def convert(self, value, param, ctx):
        if isinstance(value, dict) or not value:
            return dict(value or {})
        out = {}
        for part in value.split(","):
            key, sep, number = part.partition("=")
            try:
                out[key.strip()] = float(number)
            except ValueError:
                sep = ""
            if not sep:
                self.fail(f"{part!r}: expected TERM=NUMBER, e.g. bn=0.2,enc=0.1,pmd=0.2", param, ctx)
        return out


def _setting_option(setting):
    """The option of one declared distillation setting: its flag (and aliases), its type, no default (not given)."""
    kwargs: dict = {"default": None, "help": setting.help, "show_default": setting.default_text}
    if setting.type is bool:
        decls = [f"{flag}/--no-{flag[2:]}" for flag in (setting.flag, *setting.aliases)]
    else:
        decls = [setting.flag, *setting.aliases]
        types = {list: _ScalesType(), dict: _WeightsType(), float: float, int: click.IntRange(min=setting.minimum)}
        # a registry's names (LazyNames) are read when click needs them: asking their length here would import it
        choices = isinstance(setting.choices, LazyNames) or len(setting.choices) > 0
        kwargs["type"] = types.get(setting.type) or (LazyChoice(setting.choices) if choices else str)
        if setting.type is dict:
            kwargs["metavar"] = "TERM=W,..."
    return click.option(*decls, setting.name, **kwargs)


def distill_settings_options(func):
    """One option per declared distillation setting (:data:`mkd.handlers.settings.SETTINGS`), named after its bundle
    key; none has a default of its own, so the command knows which were given."""
    from mkd.handlers.settings import SETTINGS

    for setting in reversed(SETTINGS.values()):
        func = _setting_option(setting)(func)
    return func
