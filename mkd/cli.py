"""The ``mkd`` command line: a thin layer over the package and its MONAI bundles.

Heavy imports (torch, MONAI) happen inside each command so that ``mkd --help``
stays fast. Errors the user can fix (:class:`mkd.errors.MkdError`) become one
``Error: ...`` line and exit status 1; the library names parameters in them
(`` `overwrite=True` ``), the CLI its flags (``--overwrite``: :mod:`mkd.cli_options`).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence

import click

from mkd import __version__
from mkd.bundle import PROFILES, ROLES
from mkd.cli_options import as_flags
from mkd.errors import ExpressionError, MkdError

__all__ = ["main", "cli"]


def _user_errors(func):
    """Turn MkdError (and a full disk or an unwritable folder) into one ``Error:`` line that names flags."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MkdError as err:
            raise click.ClickException(as_flags(str(err))) from None
        except Exception as err:
            found = _storage_error(err)
            if found is None:
                raise
            raise click.ClickException(found) from None

    return wrapper


#: what the CLI adds to a refused expression: the way to run it on purpose
_ALLOW_HINT = "pass --allow-expressions to run it as code on purpose (docs/security.md)"


def allow_expressions_option(func):
    return click.option(
        "--allow-expressions",
        is_flag=True,
        help="Let --set / grid settings hold MONAI expressions ('$...', '@...', '%...') and _target_ mappings. "
        "This runs code: use it only with settings you wrote yourself (docs/security.md).",
    )(func)


def _storage_error(err: BaseException) -> str | None:
    """One line for a full disk or a folder mkd may not write (also when wrapped by MONAI / ignite), else None."""
    import errno
    import os

    full = "free some space or choose another output folder, then run again"
    denied = "fix its permissions or choose a folder you may write to (HOME too), then run again"
    codes = {errno.ENOSPC: ("no space left on the device", full), errno.EDQUOT: ("disk quota exceeded", full),
             errno.EACCES: ("permission denied", denied), errno.EPERM: ("permission denied", denied),
             errno.EROFS: ("read-only file system", denied)}  # fmt: skip
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in codes:
            problem, todo = codes[cause.errno]
            where = cause.filename or "writing the output"
            if cause.errno in (errno.ENOSPC, errno.EDQUOT) and cause.filename:  # often a temporary file's name
                where = f"{os.path.dirname(cause.filename) or '.'} (writing {os.path.basename(cause.filename)})"
            return f"{where}: {problem}; {todo}"
        cause = cause.__cause__ or cause.__context__
    return None


class _EngineErrorFilter(logging.Filter):
    """Drop ignite's and MONAI's ERROR records (StatsHandler logs a whole traceback) about an error the CLI prints.

    They are logged while the exception propagates out of a training engine; when it is an
    :class:`MkdError` or a full disk / permission problem, the command's one ``Error:`` line says it all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(("ignite", "monai")):
            return True
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or not (isinstance(exc, MkdError) or _storage_error(exc) is not None)


_ONE_LINE_ERRORS = _EngineErrorFilter()


def seed_option(func):
    return click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mkd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Multi-task, multi-scale contrastive knowledge distillation for medical image segmentation."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ONE_LINE_ERRORS)
    logging.getLogger("monai.handlers.StatsHandler").addFilter(_ONE_LINE_ERRORS)  # has its own handler


# --- prepare (mkd.data) -------------------------------------------------------


def _prepare_floats(text: str | None, n: int, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise click.BadParameter(f"expected {n} comma-separated numbers, got {text!r}", param_hint=name)
    return values


@cli.command("prepare")
@click.option(
    "--decathlon", metavar="TASK", help="Decathlon task name, e.g. Task09_Spleen: read ROOT/TASK/ or ROOT/TASK.tar."
)
@click.option(
    "--phantom",
    is_flag=True,
    help="Write the built-in synthetic Task09-shaped dataset to ROOT and use it (the default).",
)
@click.option(
    "--source",
    type=click.Path(path_type=str),
    metavar="DIR_OR_TAR",
    help="A Decathlon-layout folder or .tar given directly.",
)
@click.option("--root", type=click.Path(file_okay=False, path_type=str), default=".", show_default=True,
              help="Where the task folder / .tar lives, or gets downloaded, extracted or written.")  # fmt: skip
@click.option(
    "--out", type=click.Path(path_type=str), default="mkd_data", show_default=True, help="Output DATA folder."
)
@click.option(
    "--download", is_flag=True, help="Download the published archive (MONAI's download) when it is not in ROOT."
)
@click.option(
    "--size", type=click.IntRange(8, 4096), default=256, show_default=True, help="In-plane size of the slices."
)
@click.option("--channels", type=click.Choice(["replicate", "2.5d"]), default="replicate", show_default=True,
              help="3 channels: the slice copied 3 times, or slices z-1, z, z+1.")  # fmt: skip
@click.option(
    "--window", default="-57,164", show_default=True, help="HU window LOW,HIGH -> [0, 1], or 'max' (per-volume x/max)."
)
@click.option("--spacing", metavar="X,Y,Z", help="Resample to this voxel size in mm first (0 keeps an axis).")
@click.option("--keep", type=click.Choice(["all", "organ"]), default="all", show_default=True,
              help="Training slices to keep: all, or only those within --margin of the organ.")  # fmt: skip
@click.option(
    "--margin",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="Slices kept around the organ with --keep organ.",
)
@click.option("--label-value", type=int, help="Segment this value of a multi-label mask (label == N).")
@click.option("--student-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Share of the training patients in the student's list.")  # fmt: skip
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the labelled patients for validation.")  # fmt: skip
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the labelled patients for test.")  # fmt: skip
@click.option("--split-file", type=click.Path(dir_okay=False, path_type=str),
              help='JSON {"training": [...], "validation": [...], "test": [...], "student": [...]}.')  # fmt: skip
@click.option("--cases", type=click.IntRange(3), default=None, help="Phantom: labelled volumes  [default: 24]")
@click.option("--shape", metavar="X,Y,Z", default=None, help="Phantom: voxel grid  [default: 128,128,40]")
@seed_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@_user_errors
def prepare_cmd(decathlon, phantom, source, root, out, download, size, channels, window, spacing, keep, margin,
                label_value, student_fraction, val_fraction, test_fraction, split_file, cases, shape, seed,
                overwrite) -> None:  # fmt: skip
    """Cut 3D CT volumes into patient-split 2D slices for training (see docs/prepare.md).

    \b
    Examples:
      mkd prepare --phantom --root sources --out mkd_data --size 96
      mkd prepare --decathlon Task09_Spleen --root ~/msd --out spleen256
      mkd prepare --source my_ct/ --label-value 1 --window -150,250 --out my_data
    """

    from tqdm import tqdm

    if sum(bool(v) for v in (decathlon, phantom, source)) > 1:
        raise click.UsageError("give only one of --decathlon, --phantom, --source")
    if (cases is not None or shape is not None) and (decathlon or source):
        raise click.UsageError("--cases and --shape apply to --phantom only")
    shape_t = _prepare_floats(shape, 3, "--shape")
    spacing_t = _prepare_floats(spacing, 3, "--spacing")
    if spacing_t is not None:
        from mkd.data.checks import check_spacing

        check_spacing(spacing_t)
    if window.strip().lower() != "max":
        lo_hi = _prepare_floats(window, 2, "--window")
        if not lo_hi[0] < lo_hi[1]:
            raise click.BadParameter(f"LOW must be below HIGH, got {window!r}", param_hint="--window")
        window_v = lo_hi
    else:
        window_v = "max"
    from mkd.data import locate_task, prepare_dataset, write_phantom
    from mkd.data.prepare import check_output_dir

    check_output_dir(out, overwrite)
    if overwrite:  # a prepared dataset (prepare.json) or an empty folder; never the current folder or one above it
        from mkd.ownership import check_replaceable

        check_replaceable(out, ("prepare",), option="`out_dir`", legacy=lambda p: (p / "prepare.json").is_file())
    from mkd.data.phantom import PHANTOM_CASES, PHANTOM_SHAPE

    source_info: dict = {}
    if decathlon or source:
        task_dir = locate_task(decathlon=decathlon, source=source, root=root, download=download)
        source_info["source"] = "decathlon" if decathlon else "source"
    else:
        if not phantom:
            click.echo("no --decathlon/--source given: using the built-in phantom", err=True)
        n_cases = PHANTOM_CASES if cases is None else cases
        grid = PHANTOM_SHAPE if shape_t is None else tuple(int(s) for s in shape_t)
        with tqdm(total=None, desc="phantom", unit="vol", leave=False, disable=None) as bar:

            def tick(done, total):
                bar.total = total
                bar.update(1)

            task_dir = write_phantom(root, cases=n_cases, shape=grid, seed=seed, progress=tick)
        source_info.update(source="phantom", phantom={"cases": n_cases, "shape": list(grid), "seed": seed})

    with tqdm(total=None, desc="prepare", unit="vol", disable=None) as bar:

        def step(pid, done, total):
            bar.total = total
            bar.set_postfix_str(pid)
            bar.update(1)

        summary = prepare_dataset(
            task_dir, out, size=size, channels=channels, window=window_v, spacing=spacing_t, keep=keep,
            margin=margin, label_value=label_value, student_fraction=student_fraction,
            val_fraction=val_fraction, test_fraction=test_fraction, split_file=split_file, seed=seed,
            overwrite=overwrite, progress=step, source_info=source_info,
        )  # fmt: skip
    for line in summary.lines():
        click.echo(line)


# --- networks (mkd.networks) --------------------------------------------------


class _Names(Sequence):
    """Choices read from a registry of the package when click first needs them (``import mkd.cli`` stays light).

    Args:
        module: the module holding the registry.
        name: the registry (a mapping or a sequence of names).
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @functools.cached_property
    def _names(self) -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __getitem__(self, index):
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)


_NETWORK_NAMES = _Names("mkd.networks.registry", "NETWORKS")
_NETWORK_PRESETS = _Names("mkd.networks.registry", "PRESET_NAMES")
_TEACHERS = _Names("mkd.networks.registry", "TEACHERS")
_STUDENTS = _Names("mkd.networks.registry", "STUDENTS")
_LOSSES = _Names("mkd.losses", "FEATURE_LOSSES")
_RECIPES = _Names("mkd.handlers.distillation", "RECIPES")
_CONTRASTIVE_MODES = _Names("mkd.losses.infonce", "MODES")
_PROJECTOR_KINDS = _Names("mkd.networks.projector", "KINDS")


def _shape_str(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "-"
    channels, *spatial = shape
    return f"{channels} x {'x'.join(str(s) for s in spatial)}"


@cli.command("networks")
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True, help="Input side length.")
@click.option(
    "--spatial-dims", type=click.Choice(["2", "3"]), default="2", show_default=True, help="2D or 3D networks."
)
@click.option(
    "--preset",
    type=click.Choice(_NETWORK_PRESETS),
    default="thesis",
    show_default=True,
    help="Width preset: thesis widths, or CPU-sized teachers (medium, small) and tiny test nets.",
)
@click.option(
    "--name", "names", multiple=True, type=click.Choice(_NETWORK_NAMES), help="Only this network (repeatable)."
)
@click.option("--in-channels", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out-channels", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--features", default=None, help="Comma-separated widths overriding the preset, e.g. 16,32,64,128,256.")
@_user_errors
def networks_cmd(
    size: int,
    spatial_dims: str,
    preset: str,
    names: tuple[str, ...],
    in_channels: int,
    out_channels: int,
    features: str | None,
) -> None:
    """Table of the networks: parameters and per-scale feature shapes (C x spatial) at --size.

    Computed on PyTorch's meta device: instant, no memory, even for the 175 M-parameter t2.
    """
    from mkd.networks import describe

    overrides: dict = {"spatial_dims": int(spatial_dims), "in_channels": in_channels, "out_channels": out_channels}
    if features:
        try:
            overrides["features"] = tuple(int(f) for f in features.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{features!r} is not a comma-separated list of integers", param_hint="--features"
            ) from None
    rows = []
    for name in names or _NETWORK_NAMES:
        try:
            info = describe(name, preset, size, **overrides)
        except ValueError as err:
            raise click.ClickException(f"{name}: {err}") from None
        rows.append(
            [
                name,
                f"{info.params / 1e6:.3f} M",
                _shape_str(info.output_shape),
                *(_shape_str(info.features.get(s)) for s in ("enc", "bn", "dec", "recon")),
            ]
        )
    header = ["network", "params", "output", "enc", "bn", "dec", "recon"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    dims = "x".join([str(size)] * int(spatial_dims))
    click.echo(f"preset {preset}, input {in_channels} x {dims}; feature shapes are channels x spatial")
    for r in [header, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# --- teacher / student / distill (bundles) ------------------------------------


def training_options(func):
    """Options shared by the commands that run a training bundle."""
    options = [
        click.option(
            "--data",
            "data_dir",
            type=click.Path(file_okay=False),
            default="mkd_data",
            show_default=True,
            help="Prepared dataset (output of `mkd prepare`).",
        ),
        click.option(
            "--output",
            "output_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Run folder (checkpoints, logs, metrics.csv, config.json). Default: runs/<command>-<arch>.",
        ),
        click.option(
            "--profile",
            type=click.Choice(PROFILES),
            default="cpu",
            show_default=True,
            help="cpu: small input size and epochs, minutes on a laptop; thesis: the thesis protocol (GPU).",
        ),
        click.option("--epochs", type=int, default=None, help="Override the profile's number of epochs."),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any bundle key, e.g. --set train#dataloader#num_workers=2 (repeatable).",
        ),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run in --output."),
        click.option(
            "--nproc",
            type=int,
            default=1,
            show_default=True,
            help="Processes for distributed data parallel training (torchrun; gloo on CPU, nccl on GPU).",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        allow_expressions_option,
        seed_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_training(
    bundle: str,
    arch: str,
    data_dir,
    output_dir,
    profile,
    epochs,
    sets,
    resume,
    overwrite,
    nproc,
    device,
    seed,
    overrides: dict,
    allow_expressions: bool = False,
) -> dict:
    from pathlib import Path

    from mkd.bundle import check_setting_values, parse_overrides, run_bundle

    output = Path(output_dir or f"runs/{bundle}-{arch}")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume exclude each other")
    overrides = {"arch": arch, **overrides}
    if epochs is not None:
        overrides["epochs"] = epochs
    user_sets = parse_overrides(sets)
    if not allow_expressions:
        try:
            check_setting_values(user_sets, "--set")
        except ExpressionError as err:
            raise MkdError(f"{err}; {_ALLOW_HINT}") from None
    overrides.update(user_sets)
    click.echo(f"mkd {bundle}: arch={arch} profile={profile} data={data_dir} output={output}")
    if resume:
        from mkd.bundle import resume_point

        ckpt, truncated = resume_point(output / "models")
        for bad in truncated if ckpt is not None else ():
            click.echo(f"{bad}: truncated (was the run killed while writing it?); skipped")
        if ckpt is not None:
            done = int(Path(ckpt).stem.split("=")[1])
            total = overrides.get("epochs", "?")
            click.echo(f"resuming from {ckpt} (epoch {done} of {total})")
    summary = run_bundle(
        bundle,
        output_dir=output,
        dataset_dir=data_dir,
        profile=profile,
        overrides=overrides,
        resume=resume,
        nproc=nproc,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    keys = [k for k in summary if k.startswith("best_val_")]
    if keys:
        metrics = ", ".join(f"{k[len('best_') :]}={summary[k]:.4f}" for k in keys)
        click.echo(f"best epoch {summary.get('best_epoch')}/{summary.get('epochs')}: {metrics}")
    click.echo(f"checkpoint: {summary['checkpoint']}  ({summary.get('seconds', 0):.0f} s)")


_OPTIMIZERS = {
    "rmsprop": "torch.optim.RMSprop",
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
}


@cli.command()
@click.option(
    "--arch",
    type=click.Choice(_TEACHERS),
    default="t1",
    show_default=True,
    help="t1 multi-task U-Net, t2 multi-task TransUNet, unet single-task baseline.",
)
@click.option("--lambda-rec", type=float, default=None, help="Weight of the reconstruction loss (default 0.2).")
@training_options
@_user_errors
def teacher(arch, lambda_rec, **kwargs):
    """Train a teacher on all training patients (teacher bundle)."""
    overrides: dict = {}
    if lambda_rec is not None:
        overrides["lambda_rec"] = lambda_rec
    _run_training("teacher", arch, overrides=overrides, **kwargs)


def student_options(func):
    """Options shared by `mkd student` and `mkd distill`: the same student, data and optimiser settings."""
    options = [
        click.option("--arch", type=click.Choice(_STUDENTS), default="s1", show_default=True,
                     help="Student network."),
        click.option("--data-fraction", type=click.Choice(["0.5", "1.0"]), default="0.5", show_default=True,
                     help="0.5: the student subset (half the training patients); 1.0: all training patients."),
        click.option("--optimizer", type=click.Choice(sorted(_OPTIMIZERS)), default="rmsprop", show_default=True,
                     help="Keep baseline and distillation runs on the same optimiser for a fair comparison."),
        click.option("--lr", type=float, default=None, help="Learning rate (default 1e-2, as the thesis's students)."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _student_overrides(data_fraction: str, optimizer: str, lr: float | None) -> dict:
    overrides: dict = {
        "train_split": "student" if data_fraction == "0.5" else "training",
        "optimizer#_target_": _OPTIMIZERS[optimizer],
    }
    if lr is not None:
        overrides["learning_rate"] = lr
    return overrides


@cli.command()
@student_options
@training_options
@_user_errors
def student(arch, data_fraction, optimizer, lr, **kwargs):
    """Train the student baseline (student bundle): Dice + BCE loss, student subset, no teacher."""
    _run_training("student", arch, overrides=_student_overrides(data_fraction, optimizer, lr), **kwargs)


def _parse_weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(
                f"{part!r}: expected TERM=NUMBER, e.g. bn=0.2,enc=0.1,pmd=0.2", param_hint="--weights"
            )
    return out


@cli.command()
@click.option(
    "--teacher",
    "teacher_ckpt",
    type=click.Path(dir_okay=False),
    default="runs/teacher-t1/models/model.pt",
    show_default=True,
    help="Teacher checkpoint (from `mkd teacher`).",
)
@click.option(
    "--allow-student-teacher",
    is_flag=True,
    help="Accept a student or distilled checkpoint as --teacher, on purpose (refused otherwise).",
)
@click.option(
    "--scales",
    default="bn",
    show_default=True,
    help="Comma-separated feature scales to distil: any of enc, bn, dec (or 'none' for PMD only).",
)
@click.option(
    "--loss",
    "feature_loss",
    type=click.Choice(_LOSSES),
    default="contrastive",
    show_default=True,
    help="Feature loss: InfoNCE or plain feature regression (FitNets).",
)
@click.option("--pmd/--no-pmd", default=False, show_default=True, help="Add prediction-map distillation (soft KD).")
@click.option(
    "--recipe",
    type=click.Choice(_RECIPES),
    default="pseudo",  # mkd.handlers.DEFAULT_RECIPE (tests/test_cli.py checks that they agree)
    show_default=True,
    help="Default weights, temperatures and transfer set (docs/distill.md): pseudo (B+PMD, Dice against the "
    "teacher's mask, the unlabelled transfer set: the one confirmed better than its baseline), recommended, "
    "transfer, or the thesis's (seg 0.4, bn 0.2, enc 0.1, dec 0.1, pmd 0.2, T 4, tau 0.4, no neighbour mask).",
)
@click.option(
    "--weights",
    default=None,
    metavar="TERM=W,...",
    help="Override weights of seg, pmd, dice (Dice against the teacher's prediction) and the scales, e.g. "
    "bn=0.2,pmd=0.5,dice=1 (default: the recipe's).",
)
@click.option("--tau", type=float, default=None, help="InfoNCE temperature (default: the recipe's).")
@click.option("--pmd-temperature", type=float, default=None, help="PMD temperature T (default: the recipe's).")
@click.option(
    "--neighbours",
    "neighbour_distance",
    type=click.IntRange(min=0),
    default=None,
    help="InfoNCE: slices of the anchor's patient within N slices are not negatives (0: off; default: the recipe's).",
)
@click.option(
    "--transfer/--no-transfer",
    default=None,
    help="Also learn from the teacher on unlabelled slices: training patients outside the student's half "
    "and imagesTs (their labels are never read). Default: the recipe's (on for --recipe transfer and pseudo).",
)
@click.option(
    "--baseline",
    "baseline_ckpt",
    type=click.Path(dir_okay=False),
    default=None,
    help="Baseline student checkpoint: the run warns when the teacher is not better than it.",
)
@click.option(
    "--reference",
    "reference_ckpt",
    type=click.Path(dir_okay=False),
    default=None,
    help="The same student trained on all labels (mkd student --data-fraction 1.0): the run warns when the "
    "teacher is not better than it.",
)
@click.option(
    "--mode",
    type=click.Choice(_CONTRASTIVE_MODES),
    default="image",
    show_default=True,
    help="InfoNCE variant: image-level in-batch (thesis), pixel-level, or supervised (same class).",
)
@click.option(
    "--projector",
    type=click.Choice(_PROJECTOR_KINDS),
    default="linear",
    show_default=True,
    help="Projector heads: 1x1 conv, or conv-ReLU-conv.",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="Compute the teacher's outputs once and reuse them every epoch.",
)
@student_options
@training_options
@_user_errors
def distill(
    teacher_ckpt,
    allow_student_teacher,
    arch,
    scales,
    feature_loss,
    pmd,
    recipe,
    weights,
    tau,
    pmd_temperature,
    neighbour_distance,
    transfer,
    baseline_ckpt,
    reference_ckpt,
    mode,
    projector,
    data_fraction,
    optimizer,
    lr,
    cache,
    **kwargs,
):
    """Distil a frozen teacher into a student (distill bundle).

    Example: mkd distill --teacher runs/teacher-t1/models/model.pt --scales enc,bn --pmd
    """
    from pathlib import Path

    from mkd.handlers import distillation_weights

    scale_list = [] if scales.strip().lower() == "none" else [s.strip() for s in scales.split(",") if s.strip()]
    if not scale_list and not pmd:
        raise click.BadParameter("nothing to distil: give at least one scale or --pmd", param_hint="--scales")
    weight_overrides = _parse_weights(weights)
    try:
        distillation_weights(scale_list, weight_overrides, pmd=pmd, recipe=recipe)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--weights") from None
    if not Path(teacher_ckpt).is_file():
        raise MkdError(f"{teacher_ckpt}: teacher checkpoint not found; train one with `mkd teacher` or pass --teacher")
    overrides: dict = {
        "teacher_ckpt": str(Path(teacher_ckpt).resolve()),
        "allow_student_teacher": allow_student_teacher,
        "scales": scale_list,
        "weight_overrides": weight_overrides,
        "pmd": pmd,
        "feature_loss": feature_loss,
        "recipe": recipe,
        "contrastive_mode": mode,
        "projector_kind": projector,
        "use_cache": cache,
        **_student_overrides(data_fraction, optimizer, lr),
    }
    for key, value in (("temperature", tau), ("pmd_temperature", pmd_temperature),
                       ("neighbour_distance", neighbour_distance)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    if transfer is not None:
        overrides["transfer"] = transfer
    for key, path, option, how in (("baseline_ckpt", baseline_ckpt, "--baseline", "`mkd student`"),
                                   ("reference_ckpt", reference_ckpt, "--reference",
                                    "`mkd student --data-fraction 1.0`")):  # fmt: skip
        if path is None:
            continue
        if not Path(path).is_file():
            raise MkdError(f"{path}: {key.split('_')[0]} checkpoint not found ({option}); train one with {how}")
        overrides[key] = str(Path(path).resolve())
    if kwargs.get("output_dir") is None:
        tag = "+".join(scale_list) or "none"
        kwargs["output_dir"] = f"runs/distill-{arch}-{tag}{'-pmd' if pmd else ''}"
    _run_training("distill", arch, overrides=overrides, **kwargs)


# --- evaluate / infer / export / ablate / report / demo -----------------------


def _metrics_table(rows: dict[str, dict]) -> str:
    """A plain-text table: one row per name, columns IoU / Dice / recall / precision (+ HD95)."""
    cols = ["iou", "dice", "recall", "precision", "hd95"]
    width = max([len(n) for n in rows] + [8])
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>9}" for c in cols)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:9.4f}" if isinstance(v, (int, float)) and v == v else f"{'-':>9}")
        lines.append(f"{name:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


#: the files mkd evaluate writes into its --output folder
_EVALUATION_FILES = ("summary.json", "per_volume.csv", "per_slice.csv")


def _check_evaluation_output(out) -> None:
    """Evaluate rewrites its three files in --output; refuse when they exist and are not an earlier evaluation's."""
    import json

    existing = [out / name for name in _EVALUATION_FILES if (out / name).exists()]
    if not existing:
        return
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not (isinstance(summary, dict) and "pooled" in summary and "per_volume" in summary):
        raise MkdError(f"{existing[0]}: exists and is not from mkd evaluate; evaluate writes "
                       f"{', '.join(_EVALUATION_FILES)} into --output: give it a new folder")  # fmt: skip


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default="mkd_data",
    show_default=True,
    help="Prepared dataset (output of `mkd prepare`).",
)
@click.option("--split", default="test", show_default=True, help="Datalist split to evaluate (test or validation).")
@click.option(
    "--output",
    "output_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write summary.json, per_volume.csv, per_slice.csv. Default: RUN/eval/<split>.",
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@seed_option
@_user_errors
def evaluate(checkpoint, data_dir, split, output_dir, batch_size, device, seed):
    """Metrics of CHECKPOINT on the test patients: pooled (as the thesis), per slice, per volume (+HD95)."""
    from pathlib import Path

    from mkd.evaluation import evaluate_checkpoint
    from mkd.utils import seed_everything

    seed_everything(seed)
    ckpt = Path(checkpoint)
    out = Path(output_dir) if output_dir else ckpt.resolve().parent.parent / "eval" / split
    _check_evaluation_output(out)
    result = evaluate_checkpoint(ckpt, data_dir, split=split, batch_size=batch_size, device=device, progress=True)
    paths = result.write(out)
    s = result.summary
    per_volume = {k: v.get("mean") for k, v in s["per_volume"].items() if isinstance(v, dict)}
    per_slice = {k: v.get("mean") for k, v in s["per_slice_foreground"].items() if isinstance(v, dict)}
    click.echo(
        f"{s['network']['name']} on {split}: {s['slices']} slices of {len(result.segmentation.per_volume)} "
        f"patients, {s['image_size'][0]}x{s['image_size'][1]}"
    )
    rows = {"pooled (thesis)": s["pooled"], "per volume (mean)": per_volume}
    if "per_volume_lcc" in s:
        rows["per volume, largest comp."] = {k: v.get("mean") for k, v in s["per_volume_lcc"].items()}
    rows["per slice (with organ)"] = per_slice
    click.echo(_metrics_table(rows))
    if "per_volume_lcc" in s:
        pv = result.segmentation.per_volume
        click.echo("per volume (HD95 in mm; _lcc: largest 3D connected component, as mkd infer):")
        click.echo(pv[["patient", "dice", "dice_lcc", "hd95", "hd95_lcc"]].to_string(index=False, float_format="%.4f"))
    if "psnr" in s:
        click.echo(f"reconstruction PSNR: {s['psnr']['mean']:.2f} dB")
    click.echo(f"wrote {paths['summary']}")


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="mkd_demo",
    show_default=True,
    help="Demo folder: phantom, prepared data, runs and report.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--teacher-epochs", type=int, default=None, help="Teacher epochs (default: the CPU profile's).")
@click.option(
    "--student-epochs",
    type=int,
    default=None,
    help="Epochs of the baseline and the distilled students (default: the CPU profile's).",
)
@seed_option
@_user_errors
def demo(out, overwrite, teacher_epochs, student_epochs, seed):
    """The main job on the embedded phantom: prepare, teacher, student, distil, evaluate, report (CPU profile)."""
    from mkd.demo import run_demo

    result = run_demo(
        out,
        seed=seed,
        overwrite=overwrite,
        teacher_epochs=teacher_epochs,
        student_epochs=student_epochs,
        echo=click.echo,
    )
    report = result["report"]
    click.echo("")
    click.echo("Pooled test metrics (as the thesis):")
    click.echo(report["markdown"])
    volume_md = report.files.get("volume.md")
    if volume_md is not None and volume_md.is_file():
        click.echo("Per-volume test metrics (MSD convention, HD95 in mm):")
        click.echo(volume_md.read_text())
    click.echo("")
    for path in report.get("figures", []):
        click.echo(f"figure: {path}")
    for path in report.get("tables", []):
        click.echo(f"table:  {path}")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result["steps"].items())
    click.echo(f"demo finished in {result['seconds']:.0f} s ({steps})")


@cli.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False), default=None,
              help="Runs folder, one sub-folder per run. Default: runs/<grid file name>.")  # fmt: skip
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Prepared dataset. Default: the grid's 'data', else mkd_data.")  # fmt: skip
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="Override the grid's profile.")  # fmt: skip
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at once, each in a worker process (a distillation run waits for its teacher).")  # fmt: skip
@click.option("--only", multiple=True, metavar="RUN_ID",
              help="Run only this run (repeatable); its teacher must be done. What --print-commands uses.")  # fmt: skip
@click.option("--kind", "kinds", multiple=True, type=click.Choice(ROLES),
              help="Only runs of this kind (repeatable), e.g. stage 1: --kind teacher --kind student.")  # fmt: skip
@click.option("--print-commands", is_flag=True,
              help="Print one self-contained command per pending run, in dependency order, and exit.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="List the runs of the grid and their state; run nothing.")
@click.option("--seed-offset", type=int, default=0, show_default=True,
              help="Add to every seed of the grid (run seeds 3, 4, 5 of a [0, 1, 2] grid with 3).")  # fmt: skip
@click.option("--resume", is_flag=True,
              help="Continue half-trained runs from their last epoch checkpoint; default: restart them.")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@allow_expressions_option
@_user_errors
def ablate(grid, runs_dir, data_dir, profile, jobs, only, kinds, print_commands, dry_run, seed_offset, resume,
           device, allow_expressions):  # fmt: skip
    """Run a grid of teachers, student baselines and distillation runs (see docs/ablate.md).

    Each run goes to RUNS/<run id> with its run.json, training output and test
    evaluation; finished runs are skipped, so running the same grid again does
    nothing new. Afterwards: mkd report RUNS.

    \b
    Examples:
      mkd ablate grids/thesis_cpu.yaml --runs runs_cpu --dry-run
      mkd ablate grids/thesis_cpu.yaml --runs runs_cpu --jobs 4
      mkd ablate grids/thesis.yaml --runs runs_gpu --data spleen256 --print-commands > jobs.txt
    """
    from pathlib import Path

    from mkd.ablation import (
        MANY_RUNS,
        format_commands,
        load_grid,
        run_ablation,
        run_command,
        run_status,
        validate_grid,
    )

    try:
        spec = load_grid(grid, profile=profile, seed_offset=seed_offset, allow_expressions=allow_expressions)
    except ExpressionError as err:
        raise MkdError(f"{err}; {_ALLOW_HINT}") from None
    runs = Path(runs_dir or f"runs/{Path(grid).stem}")
    data = Path(data_dir or spec.data or "mkd_data")
    dev = None if device == "auto" else device
    selected = [r for r in spec.runs if (not only or r.id in only) and (not kinds or r.kind in kinds)]
    for run_id in only:
        spec[run_id]  # an unknown id is an error
    validate_grid(spec, selected)  # unknown settings keys and wrong types, as a real run would find them
    if len(spec.runs) > MANY_RUNS:
        click.echo(f"warning: {grid} expands to {len(spec.runs)} runs ({len(spec.seeds)} seeds); check 'seeds' "
                   f"before running it", err=True)  # fmt: skip
    status = run_status(spec, runs)
    if dry_run:
        counts = spec.count()
        click.echo(f"grid {grid}: profile {spec.profile}, seeds {spec.seeds}, {counts['teacher']} teachers, "
                   f"{counts['student']} student baselines, {counts['distill']} distillation runs")  # fmt: skip
        width = max([len(r.id) for r in selected] + [6])
        for r in selected:
            click.echo(f"{status[r.id]:8} {r.id:{width}}  {r.method}")
        pending = sum(status[r.id] != "done" for r in selected)
        click.echo(f"{len(selected)} runs: {len(selected) - pending} done, {pending} pending (runs folder {runs})")
        if pending:
            from mkd.bundle import check_datalist

            try:
                check_datalist(data, ["training", "validation", "test"])
            except MkdError as err:  # what a real run would stop at
                click.echo(f"warning: a real run would stop here: {as_flags(str(err))}", err=True)
        return
    if print_commands:
        pending = [r for r in selected if status[r.id] != "done"]
        for kind in ROLES:
            block = [r for r in pending if r.kind == kind]
            if not block:
                continue
            note = {"teacher": "stage 1: teachers", "student": "stage 1: student baselines (independent)",
                    "distill": "stage 2: distillation runs (each needs its teacher from stage 1)"}[kind]  # fmt: skip
            click.echo(f"# {note}: {len(block)} commands", err=True)
            for line in format_commands(run_command(spec, r.id, runs, data, dev, resume) for r in block):
                click.echo(line)
        click.echo(f"# {len(pending)} pending runs; then: mkd report {runs}", err=True)
        return
    result = run_ablation(spec, runs, data, jobs=jobs, only=only, kinds=kinds or None, device=dev, resume=resume,
                          progress=click.echo)  # fmt: skip
    elsewhere = f", {len(result.elsewhere)} running elsewhere" if result.elsewhere else ""
    click.echo(f"ablate: {len(result.ran)} ran, {len(result.done)} already done, {len(result.failed)} failed, "
               f"{len(result.blocked)} blocked{elsewhere} ({result.seconds:.0f} s); runs folder {runs}")  # fmt: skip
    if result.failed:
        for run_id, err in result.failed.items():
            click.echo(f"  failed: {run_id}: {err}", err=True)
        raise MkdError(f"{len(result.failed)} run(s) failed; fix and run the same command again to redo them")
    if result.elsewhere:
        click.echo(f"{len(result.elsewhere)} run(s) are being trained by another process; run the same command "
                   "again once they are done")  # fmt: skip
    elif not only:
        click.echo(f"next: mkd report {runs}")


@cli.command()
@click.argument("runs_dir", type=click.Path(file_okay=False))
@click.option("--output", "output_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (replaced). Default: RUNS_DIR/report.")  # fmt: skip
@click.option("--baseline", default=None, metavar="METHOD",
              help="Compare every student-side method with this method (e.g. 'S1 (100%)') instead of its own "
                   "matching baseline.")  # fmt: skip
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Prepared dataset for the qualitative panels. Default: the runs' evaluation data.")  # fmt: skip
@click.option("--slices", "n_slices", type=click.IntRange(min=1), default=4, show_default=True,
              help="Test slices in the qualitative panels (largest organ of the first test patients).")  # fmt: skip
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write the PNG figures.")
@click.option("--qualitative/--no-qualitative", default=True, show_default=True,
              help="Run the checkpoints for the qualitative and reconstruction panels.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="Device for the qualitative panels.")
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), default=None,
              help="Report only the runs of this grid (a runs folder shared by several grids).")  # fmt: skip
@seed_option
@_user_errors
def report(runs_dir, output_dir, baseline, data_dir, n_slices, figures, qualitative, device, seed, grid_file):
    """Thesis-style tables, paired tests and figures of the finished runs in RUNS_DIR.

    Rows = method; pooled IoU / Dice / recall / precision, mean ± std over seeds and
    % change against the matching student baseline; per-volume Dice / IoU / HD95;
    paired tests over seeds and over test volumes with bootstrap confidence intervals
    (--seed seeds the bootstrap). Writes CSV, Markdown and PNG files into RUNS_DIR/report.
    """
    from mkd.reports import build_report

    only = None
    if grid_file is not None:
        from mkd.ablation import load_grid

        # the report reads run ids only and runs none of the settings: a grid run with --allow-expressions is fine
        only = [r.id for r in load_grid(grid_file, allow_expressions=True).runs]
    result = build_report(runs_dir, output_dir, baseline=baseline, figures=figures, qualitative=qualitative,
                          n_slices=n_slices, data_dir=data_dir, device=device, seed=seed, only=only)  # fmt: skip
    click.echo(result.markdown)
    for note in result.notes:
        click.echo(f"note: {note}")
    for run, why in result.left_out.items():
        click.echo(f"left out: {run}: {why}")
    click.echo(f"{len(result.runs)} runs{f', {len(result.left_out)} left out' if result.left_out else ''}; "
               f"report in {result.output_dir}:")  # fmt: skip
    click.echo(f"  {result.files['report.md']}")
    for name in ("summary.csv", "volume.csv", "significance_seeds.csv", "significance_volumes.csv"):
        click.echo(f"  {result.files[name]}")
    if result.figures:
        click.echo(f"  {len(result.figures)} figures in {result.output_dir / 'figures'}")


# --- infer / export (mkd.inference, mkd.export) ---


def _check_mask_replaceable(path) -> None:
    """``--overwrite`` replaces a mask (a uint8 NIfTI, what infer writes), never a CT or another file."""
    import nibabel as nib

    from mkd.errors import InputError

    try:
        dtype = nib.load(str(path)).get_data_dtype()
    except Exception:  # noqa: BLE001 - unreadable: not a mask infer wrote
        dtype = None
    if dtype is None or dtype.kind != "u" or dtype.itemsize != 1:
        what = f"a {dtype} NIfTI (a CT?)" if dtype is not None else "not a NIfTI mask"
        raise InputError(path, f"is {what}, not a uint8 mask written by mkd infer; --overwrite replaces only masks: "
                         "give --output another name")  # fmt: skip


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="CT volume: NIfTI file (.nii/.nii.gz), DICOM series folder, or ITK-readable file; "
                   "or a folder of NIfTI files (one mask each).")  # fmt: skip
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="Mask to write (.nii or .nii.gz): uint8, the input's shape, affine and voxel order; "
                   "for a folder --input, the folder the masks go to (same file names).")  # fmt: skip
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Prepared dataset whose prepare.json gives the preprocessing (window, channels, ...).")  # fmt: skip
@click.option("--window", default=None, help="HU window LOW,HIGH or 'max'  [default: checkpoint, --data, else -57,164]")
@click.option("--channels", type=click.Choice(["replicate", "2.5d"]), default=None,
              help="Slice channels  [default: checkpoint, --data, else replicate]")  # fmt: skip
@click.option("--spacing", metavar="X,Y,Z|none", default=None,
              help="Voxel size in mm to resample to, or 'none'  [default: checkpoint, --data, else none]")  # fmt: skip
@click.option("--size", type=click.IntRange(8, 4096), default=None,
              help="Network input size if the checkpoint lacks run.image_size  [default: --data's, 256]")  # fmt: skip
@click.option("--lcc/--no-lcc", default=None,
              help="Keep only the largest 3D connected component of the mask  [default: on for single-organ "
                   "networks (one output channel)]")  # fmt: skip
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="auto: ONNX Runtime on a CPU when installed (pip install 'mkd[onnx]'), else PyTorch.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the network  [default: the cores this process may use]")  # fmt: skip
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Students only: ONNX Runtime static int8 quantisation, calibrated on --calibration.")  # fmt: skip
@click.option("--calibration", type=click.Path(exists=True), default=None,
              help="int8 calibration data: a prepared dataset (its training slices), a folder of NIfTI CTs or "
                   "one CT  [default: --data]")  # fmt: skip
@click.option("--preview", "--png", "preview", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG of the mask over the CT at three axial levels (radiological view).")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per forward  [default: 8 on a CPU, 32 on a GPU]")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace existing output file(s).")
@click.option("--skip-existing", is_flag=True,
              help="Folder input: keep masks that already exist (continue an interrupted batch).")  # fmt: skip
@_user_errors
def infer(checkpoint, input_path, output_path, data_dir, window, channels, spacing, size, lcc, backend, threads,
          quantize, calibration, preview, batch_size, device, overwrite, skip_existing):  # fmt: skip
    """Segment a CT volume (or a folder of them) with CHECKPOINT and write the mask(s) (see docs/infer.md).

    \b
    Examples:
      mkd infer runs/distill-s1-bn/models/model.pt --input ct.nii.gz --output ct_spleen.nii.gz --data mkd_data
      mkd infer model.pt --input dicom/series_3/ --output series_3_spleen.nii.gz --png series_3.png
      mkd infer model.pt --input imagesTs/ --output predictions/ --skip-existing --backend torch --threads 2
    """
    import math
    from pathlib import Path

    window_v = None
    if window is not None:
        from mkd.data.transforms import parse_window

        try:
            window_v = parse_window(window)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--window") from None
    spacing_v = spacing
    if spacing is not None and spacing.strip().lower() not in ("none", "native"):
        spacing_v = _prepare_floats(spacing, 3, "--spacing")
    output = Path(output_path)

    from mkd.inference import Segmenter, check_folder_job, is_volume_folder

    batch = is_volume_folder(input_path)
    if batch and preview:
        raise click.UsageError("--preview/--png takes one volume; a folder --input writes many masks")
    if batch:
        volumes = check_folder_job(input_path, output, overwrite, skip_existing)  # before the model loads
        for existing in (output / v.name for v in volumes) if overwrite else ():
            if existing.exists():
                _check_mask_replaceable(existing)
    else:
        from mkd.errors import InputError
        from mkd.inference import NIFTI_SUFFIXES

        # what --overwrite could never fix is said first: the input itself, or a file infer does not write
        if Path(input_path).exists() and output.exists() and output.resolve() == Path(input_path).resolve():
            raise InputError(output, "is the --input volume; the mask would replace the CT: give --output another "
                             "file name")  # fmt: skip
        if not output.name.lower().endswith(NIFTI_SUFFIXES):
            raise InputError(output, f"output must be a NIfTI file ending in {' or '.join(NIFTI_SUFFIXES)}")
        if output.is_dir():
            raise InputError(output, "is a folder; expected an output file name")
        if output.exists() and not overwrite:
            raise MkdError(f"{output}: output already exists; pass --overwrite to replace it")
        if output.exists():
            _check_mask_replaceable(output)
        from mkd.utils import check_writable

        check_writable(output.parent, "mask")  # before the model loads
    if preview:  # a PNG, written over an earlier preview only (it was written over any file, the CT included)
        from mkd.errors import InputError

        png = Path(preview)
        if png.suffix.lower() != ".png":
            raise InputError(png, "--preview/--png must be a file name ending in .png")
        if png.exists() and not overwrite:
            raise MkdError(f"{png}: preview already exists; pass --overwrite to replace it")
        if png.exists() and (not png.is_file() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
            raise InputError(png, "is not a PNG image; --overwrite replaces only an earlier preview: give --preview "
                             "another name")  # fmt: skip

    try:
        seg = Segmenter(checkpoint, data_dir=data_dir, window=window_v, channels=channels, spacing=spacing_v,
                        size=size, device=device, batch_size=batch_size, lcc=lcc, backend=backend, threads=threads,
                        quantize=quantize, calibration=calibration)  # fmt: skip
    except ValueError as err:
        if isinstance(err, MkdError):
            raise
        raise click.UsageError(as_flags(str(err))) from None
    if batch:
        click.echo(f"backend: {seg.describe()}")
        click.echo(f"largest connected component: {'on' if seg.lcc else 'off'}")
        click.echo(f"preprocessing: {seg.settings.describe()}")
        done = seg.segment_folder(input_path, output, overwrite=overwrite, skip_existing=skip_existing,
                                  progress=click.echo)  # fmt: skip
        seconds = sum(r.seconds for r in done.written)
        click.echo(f"wrote {len(done.written)} masks to {output} ({seconds:.1f} s), {len(done.skipped)} kept, "
                   f"{len(done.failed)} failed")  # fmt: skip
        if done.failed:
            for err in done.failed.values():
                click.echo(f"  failed: {err}", err=True)
            raise MkdError(f"{len(done.failed)} of {len(done.failed) + len(done.written) + len(done.skipped)} "
                           f"volumes in {input_path} failed; see above")  # fmt: skip
        return
    result = seg.segment_to_file(input_path, output, overwrite=overwrite)
    click.echo(f"backend: {seg.describe()}")
    click.echo(f"largest connected component: {'on' if seg.lcc else 'off'}")
    click.echo(f"preprocessing: {seg.settings.describe()}")
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    shape = "x".join(str(s) for s in result.shape)
    click.echo(f"wrote {output}: {shape} uint8, {result.foreground} foreground voxels "
               f"({result.foreground / max(math.prod(result.shape), 1):.2%})")  # fmt: skip
    click.echo(f"time per volume: {result.seconds:.2f} s for {result.slices} slices on {seg.device} ({parts})")
    if preview:
        from mkd.inference import load_volume
        from mkd.reports.figures import plot_mask_preview

        vol = load_volume(input_path)
        png = plot_mask_preview(vol.data, result.mask, vol.affine, preview, title=Path(input_path).name)
        click.echo(f"wrote {png}: the mask over the CT at three axial levels (anterior up, patient's right left)")


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), default="torchscript", show_default=True,
              help="TorchScript (torch.jit.trace) or ONNX (needs the extra: pip install 'mkd[onnx]').")  # fmt: skip
@click.option("--output", "output_path", type=click.Path(dir_okay=False), default=None,
              help="File to write. Default: beside CHECKPOINT, <stem>.ts.pt or <stem>.onnx.")  # fmt: skip
@click.option("--size", type=click.IntRange(8, 4096), default=None,
              help="Square input size  [default: the checkpoint's run.image_size, else 256]")  # fmt: skip
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the export's logits with PyTorch's (batch sizes 1 and 3).")  # fmt: skip
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Tolerance of the check.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@_user_errors
def export_cmd(checkpoint, fmt, output_path, size, check, atol, overwrite):
    """Export CHECKPOINT's network (logits, dynamic batch, fixed H x W) for deployment (see docs/export.md)."""
    from mkd.export import export_checkpoint

    result = export_checkpoint(checkpoint, fmt, output_path, size=size, check=check, atol=atol, overwrite=overwrite)
    shape = result.metadata["input"]["shape"]
    click.echo(f"wrote {result.path} ({fmt}): input image {shape[0]} x {' x '.join(map(str, shape[1:]))}, "
               f"output logits; metadata under '{'mkd.json' if fmt == 'torchscript' else 'mkd'}'")  # fmt: skip
    if result.max_abs_diff is not None:
        click.echo(f"check: max |export - PyTorch| = {result.max_abs_diff:.2e} (atol {atol:g})")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mkd`` console script."""
    cli.main(args=argv, prog_name="mkd", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
