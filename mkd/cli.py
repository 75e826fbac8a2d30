"""The ``mkd`` command line: a thin layer over the package and its MONAI bundles.

Heavy imports (torch, MONAI) happen inside each command so that ``mkd --help``
stays fast. Errors the user can fix (:class:`mkd.errors.MkdError`) become one
``Error: ...`` line and exit status 1; the library names parameters in them
(`` `overwrite=True` ``), the CLI its flags (``--overwrite``: :mod:`mkd.cli_options`).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import click

from mkd import __version__
from mkd.bundle import PROFILES, ROLES, TRAIN_SPLITS
from mkd.cli_options import ONE_LINE_ERRORS as _ONE_LINE_ERRORS
from mkd.cli_options import (
    OPTIMIZERS,
    LazyChoice,
    Numbers,
    Window,
    allow_expressions_option,
    as_flags,
    data_option,
    device_option,
    distill_settings_options,
    output_option,
    overwrite_option,
    seed_option,
    student_options,
    training_options,
)
from mkd.cli_options import user_errors as _user_errors
from mkd.errors import MkdError
from mkd.utils import LazyNames

__all__ = ["main", "cli"]


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


@contextlib.contextmanager
def _bar(desc: str, leave: bool = True, quiet: bool = False):
    """A tqdm bar (volumes) for a library's ``progress(done, total)`` or ``progress(name, done, total)``."""
    from tqdm import tqdm

    with tqdm(total=None, desc=desc, unit="vol", leave=leave, disable=True if quiet else None) as bar:

        def tick(*args) -> None:
            bar.total = args[-1]
            if len(args) == 3:
                bar.set_postfix_str(args[0])
            bar.update(1)

        yield tick


@cli.command("prepare")
@click.option("--decathlon", metavar="TASK",
              help="Decathlon task name, e.g. Task09_Spleen: read ROOT/TASK/ or ROOT/TASK.tar.")  # fmt: skip
@click.option("--phantom", is_flag=True,
              help="Write the built-in synthetic Task09-shaped dataset to ROOT and use it (the default).")  # fmt: skip
@click.option("--source", type=click.Path(path_type=str), metavar="DIR_OR_TAR",
              help="A Decathlon-layout folder or .tar given directly.")  # fmt: skip
@click.option("--root", type=click.Path(file_okay=False, path_type=str), default=".", show_default=True,
              help="Where the task folder / .tar lives, or gets downloaded, extracted or written.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=str), default="mkd_data", show_default=True,
              help="Output DATA folder.")  # fmt: skip
@click.option("--download", is_flag=True,
              help="Download the published archive (MONAI's download) when it is not in ROOT.")  # fmt: skip
@click.option("--size", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="In-plane size of the slices.")  # fmt: skip
@click.option("--channels", type=click.Choice(["replicate", "2.5d"]), default="replicate", show_default=True,
              help="3 channels: the slice copied 3 times, or slices z-1, z, z+1.")  # fmt: skip
@click.option("--window", type=Window(), metavar="TEXT", default="-57,164", show_default=True,
              help="HU window LOW,HIGH -> [0, 1], or 'max' (per-volume x/max).")  # fmt: skip
@click.option("--spacing", type=Numbers(3), metavar="X,Y,Z",
              help="Resample to this voxel size in mm first (0 keeps an axis).")  # fmt: skip
@click.option("--keep", type=click.Choice(["all", "organ"]), default="all", show_default=True,
              help="Training slices to keep: all, or only those within --margin of the organ.")  # fmt: skip
@click.option("--margin", type=click.IntRange(0), default=5, show_default=True,
              help="Slices kept around the organ with --keep organ.")  # fmt: skip
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
@click.option("--shape", type=Numbers(3), metavar="X,Y,Z", default=None,
              help="Phantom: voxel grid  [default: 128,128,40]")  # fmt: skip
@seed_option
@overwrite_option("Replace an existing --out folder.")
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
    if sum(bool(v) for v in (decathlon, phantom, source)) > 1:
        raise click.UsageError("give only one of --decathlon, --phantom, --source")
    if (cases is not None or shape is not None) and (decathlon or source):
        raise click.UsageError("--cases and --shape apply to --phantom only")
    from mkd.data import find_task, prepare_dataset
    from mkd.data.checks import check_spacing
    from mkd.data.prepare import check_output_dir

    check_spacing(spacing)  # these two before any volume is read or written
    check_output_dir(out, overwrite)
    if not (decathlon or source or phantom):
        click.echo("no --decathlon/--source given: using the built-in phantom", err=True)
    with _bar("phantom", leave=False, quiet=bool(decathlon or source)) as tick:
        task_dir, source_info = find_task(decathlon=decathlon, source=source, root=root, download=download,
                                          cases=cases, shape=shape, seed=seed, progress=tick)  # fmt: skip
    with _bar("prepare") as step:
        summary = prepare_dataset(
            task_dir, out, size=size, channels=channels, window=window, spacing=spacing, keep=keep,
            margin=margin, label_value=label_value, student_fraction=student_fraction,
            val_fraction=val_fraction, test_fraction=test_fraction, split_file=split_file, seed=seed,
            overwrite=overwrite, progress=step, source_info=source_info,
        )  # fmt: skip
    for line in summary.lines():
        click.echo(line)


# --- networks (mkd.networks) --------------------------------------------------


_NETWORK_NAMES = LazyNames("mkd.networks.registry", "NETWORKS")
_NETWORK_PRESETS = LazyNames("mkd.networks.registry", "PRESET_NAMES")
_TEACHERS = LazyNames("mkd.networks.registry", "TEACHERS")
_PROJECTOR_KINDS = LazyNames("mkd.networks.projector", "KINDS")


@cli.command("networks")
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True, help="Input side length.")
@click.option("--spatial-dims", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="2D or 3D networks.")  # fmt: skip
@click.option(
    "--preset",
    type=LazyChoice(_NETWORK_PRESETS),
    default="thesis",
    show_default=True,
    help="Width preset: thesis widths, or CPU-sized teachers (medium, small) and tiny test nets.",
)
@click.option("--name", "names", multiple=True, type=LazyChoice(_NETWORK_NAMES),
              help="Only this network (repeatable).")  # fmt: skip
@click.option("--in-channels", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out-channels", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--features", type=Numbers(integers=True), metavar="TEXT", default=None,
              help="Comma-separated widths overriding the preset, e.g. 16,32,64,128,256.")  # fmt: skip
@_user_errors
def networks_cmd(size, spatial_dims, preset, names, in_channels, out_channels, features) -> None:
    """Table of the networks: parameters and per-scale feature shapes (C x spatial) at --size.

    Computed on PyTorch's meta device: instant, no memory, even for the 175 M-parameter t2.
    """
    from mkd.networks import network_table

    overrides: dict = {"spatial_dims": int(spatial_dims), "in_channels": in_channels, "out_channels": out_channels}
    if features:
        overrides["features"] = features
    for line in network_table(names, preset, size, **overrides):
        click.echo(line)


# --- teacher / student / distill (bundles) ------------------------------------


def _run_training(bundle: str, arch: str, data_dir, output_dir, profile, epochs, sets, resume, overwrite, nproc,
                  device, seed, overrides: dict, allow_expressions: bool = False) -> dict:  # fmt: skip
    from pathlib import Path

    from mkd.bundle import check_setting_values, parse_overrides, resume_lines, run_bundle, summary_lines

    output = Path(output_dir or f"runs/{bundle}-{arch}")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume exclude each other")
    overrides = {"arch": arch, **overrides}
    if epochs is not None:
        overrides["epochs"] = epochs
    user_sets = parse_overrides(sets)
    if not allow_expressions:
        check_setting_values(user_sets, "--set")
    overrides.update(user_sets)
    click.echo(f"mkd {bundle}: arch={arch} profile={profile} data={data_dir} output={output}")
    for line in resume_lines(output / "models", overrides.get("epochs", "?")) if resume else ():
        click.echo(line)
    summary = run_bundle(bundle, output_dir=output, dataset_dir=data_dir, profile=profile, overrides=overrides,
                         resume=resume, nproc=nproc, seed=seed, device=device, overwrite=overwrite)  # fmt: skip
    for line in summary_lines(summary):
        click.echo(line)
    return summary


@cli.command()
@click.option("--arch", type=LazyChoice(_TEACHERS), default="t1", show_default=True,
              help="t1 multi-task U-Net, t2 multi-task TransUNet, unet single-task baseline.")  # fmt: skip
@click.option("--lambda-rec", type=float, default=None, help="Weight of the reconstruction loss (default 0.2).")
@training_options
@_user_errors
def teacher(arch, lambda_rec, **kwargs):
    """Train a teacher on all training patients (teacher bundle)."""
    overrides: dict = {}
    if lambda_rec is not None:
        overrides["lambda_rec"] = lambda_rec
    _run_training("teacher", arch, overrides=overrides, **kwargs)


def _student_overrides(data_fraction: str, optimizer: str, lr: float | None) -> dict:
    overrides: dict = {
        "train_split": TRAIN_SPLITS[float(data_fraction)],
        "optimizer#_target_": OPTIMIZERS[optimizer],
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


class _SettingsUsageError(click.ClickException):
    """Distillation settings that do not hold together: one ``Error:`` line, exit status 2 (a usage error)."""

    exit_code = 2


@cli.command()
@click.option(
    "--teacher",
    "teacher_ckpt",
    type=click.Path(),
    default="runs/teacher-t1/models/model.pt",
    show_default=True,
    help="Teacher: a checkpoint of `mkd teacher`, a MONAI bundle folder or a TorchScript file, 2D or 3D "
    "(docs/teachers.md).",
)
@click.option(
    "--teacher-label",
    type=click.IntRange(min=0),
    default=None,
    help="The organ's output channel of a multi-class bundle / TorchScript teacher (default: 1 of 2 channels).",
)
@click.option(
    "--allow-student-teacher",
    is_flag=True,
    help="Accept a student or distilled checkpoint as --teacher, on purpose (refused otherwise).",
)
@distill_settings_options
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
    "--projector",
    type=LazyChoice(_PROJECTOR_KINDS),
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
    teacher_label,
    allow_student_teacher,
    baseline_ckpt,
    reference_ckpt,
    projector,
    arch,
    data_fraction,
    optimizer,
    lr,
    cache,
    **kwargs,
):
    """Distil a frozen teacher into a student (distill bundle).

    With no settings it runs the default recipe as it was measured (docs/distill.md): B+PMD, Dice against
    the teacher's mask, the unlabelled transfer set.

    Example: mkd distill --teacher runs/teacher-t1/models/model.pt --scales enc,bn --recipe thesis
    """
    from pathlib import Path

    from mkd.bundle import is_expression, parse_overrides
    from mkd.handlers.settings import SETTINGS, SettingsError, distillation_settings

    given = {name: value for name in SETTINGS if (value := kwargs.pop(name)) is not None}
    # a setting given with --set as well wins, as over any option; an expression is checked when it runs
    sets = {k: v for k, v in parse_overrides(kwargs["sets"]).items() if k in SETTINGS and not is_expression(v)}
    try:
        settings = distillation_settings(**{**given, **sets})
        if "scales" in settings.given and Path(teacher_ckpt).exists():
            from mkd.teachers.load import fit_to_teacher

            fit_to_teacher(settings, teacher_ckpt)  # scales given for a bundle / TorchScript teacher: refused here
    except SettingsError as err:
        raise _SettingsUsageError(str(err)) from None
    if not Path(teacher_ckpt).exists():
        raise MkdError(f"{teacher_ckpt}: teacher checkpoint not found; train one with `mkd teacher` or pass --teacher")
    overrides: dict = {
        "teacher_ckpt": str(Path(teacher_ckpt).resolve()),
        "teacher_label": teacher_label,
        "allow_teacher_expressions": bool(kwargs.get("allow_expressions")),
        "allow_student_teacher": allow_student_teacher,
        **given,  # the settings given; the bundle resolves the others the same way
        "projector_kind": projector,
        "use_cache": cache,
        **_student_overrides(data_fraction, optimizer, lr),
    }
    for key, path, option, how in (("baseline_ckpt", baseline_ckpt, "--baseline", "`mkd student`"),
                                   ("reference_ckpt", reference_ckpt, "--reference",
                                    "`mkd student --data-fraction 1.0`")):  # fmt: skip
        if path is None:
            continue
        if not Path(path).is_file():
            raise MkdError(f"{path}: {key.split('_')[0]} checkpoint not found ({option}); train one with {how}")
        overrides[key] = str(Path(path).resolve())
    if kwargs.get("output_dir") is None:
        from mkd.teachers.load import teacher_kind

        # a bundle or TorchScript teacher distils its logits only (mkd.teachers.fit_to_teacher)
        scales = settings["scales"] if teacher_kind(teacher_ckpt) == "mkd" else []
        tag = "+".join(scales) or "none"
        kwargs["output_dir"] = f"runs/distill-{arch}-{tag}{'-pmd' if settings['pmd'] else ''}"
    _run_training("distill", arch, overrides=overrides, **kwargs)


# --- evaluate / infer / export / ablate / report / demo -----------------------


@cli.command()
@click.argument("checkpoint", type=click.Path())
@data_option()
@click.option("--split", default="test", show_default=True, help="Datalist split to evaluate (test or validation).")
@click.option(
    "--teacher-label",
    type=click.IntRange(min=0),
    default=None,
    help="CHECKPOINT is a bundle / TorchScript teacher: its organ's output channel (docs/teachers.md).",
)
@output_option("Where to write summary.json, per_volume.csv, per_slice.csv. Default: RUN/eval/<split>.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@device_option()
@seed_option
@_user_errors
def evaluate(checkpoint, data_dir, split, teacher_label, output_dir, batch_size, device, seed):
    """Metrics of CHECKPOINT on the test patients: pooled (as the thesis), per slice, per volume (+HD95).

    CHECKPOINT may also be a MONAI bundle folder or a TorchScript file (a teacher from outside mkd), scored on
    the same slices.
    """
    from mkd.evaluation import evaluate_checkpoint
    from mkd.metrics.summary import check_evaluation_output, evaluation_dir, evaluation_lines
    from mkd.utils import seed_everything

    seed_everything(seed)
    out = evaluation_dir(checkpoint, split, output_dir)
    check_evaluation_output(out)
    result = evaluate_checkpoint(checkpoint, data_dir, split=split, batch_size=batch_size, device=device,
                                 progress=True, teacher_label=teacher_label)  # fmt: skip
    paths = result.write(out)
    for line in [*evaluation_lines(result), f"wrote {paths['summary']}"]:
        click.echo(line)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="mkd_demo", show_default=True,
              help="Demo folder: phantom, prepared data, runs and report.")  # fmt: skip
@overwrite_option("Replace an existing demo folder.")
@click.option("--teacher-epochs", type=int, default=None, help="Teacher epochs (default: the CPU profile's).")
@click.option("--student-epochs", type=int, default=None,
              help="Epochs of the baseline and the distilled students (default: the CPU profile's).")  # fmt: skip
@seed_option
@_user_errors
def demo(out, overwrite, teacher_epochs, student_epochs, seed):
    """The main job on the embedded phantom: prepare, teacher, student, distil, evaluate, report (CPU profile)."""
    from mkd.demo import demo_lines, run_demo

    result = run_demo(out, seed=seed, overwrite=overwrite, teacher_epochs=teacher_epochs,
                      student_epochs=student_epochs, echo=click.echo)  # fmt: skip
    for line in demo_lines(result):
        click.echo(line)


@cli.command()
@click.argument("grid", type=click.Path(dir_okay=False))
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False), default=None,
              help="Runs folder, one sub-folder per run. Default: runs/<grid file name>.")  # fmt: skip
@data_option("Prepared dataset. Default: the grid's 'data', else mkd_data.", default=None)
@click.option("--profile", type=click.Choice(PROFILES), default=None, help="Override the grid's profile.")
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
@device_option()
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

    from mkd.ablation import load_grid, plan_ablation, run_ablation

    spec = load_grid(grid, profile=profile, seed_offset=seed_offset, allow_expressions=allow_expressions)
    runs = Path(runs_dir or f"runs/{Path(grid).stem}")
    data = Path(data_dir or spec.data or "mkd_data")
    dev = None if device == "auto" else device
    plan = plan_ablation(spec, runs, only, kinds, name=grid)
    for line in plan.warnings():
        click.echo(line, err=True)
    if dry_run:
        for line in plan.lines():
            click.echo(line)
        warning = plan.data_warning(data)
        if warning is not None:
            click.echo(as_flags(warning), err=True)
    elif print_commands:
        for line in plan.commands(data, dev, resume):
            click.echo(line, err=line.startswith("#"))  # stdout: only the commands
    else:
        result = run_ablation(spec, runs, data, jobs=jobs, only=only, kinds=kinds or None, device=dev, resume=resume,
                              progress=click.echo)  # fmt: skip
        for line in result.lines():
            click.echo(line)
        for line in result.failure_lines():
            click.echo(line, err=True)
        if result.failed:
            raise MkdError(f"{len(result.failed)} run(s) failed; fix and run the same command again to redo them")


@cli.command()
@click.argument("runs_dir", type=click.Path(file_okay=False))
@output_option("Report folder (replaced). Default: RUNS_DIR/report.")
@click.option("--baseline", default=None, metavar="METHOD",
              help="Compare every student-side method with this method (e.g. 'S1 (100%)') instead of its own "
                   "matching baseline.")  # fmt: skip
@data_option("Prepared dataset for the qualitative panels. Default: the runs' evaluation data.", default=None)
@click.option("--slices", "n_slices", type=click.IntRange(min=1), default=4, show_default=True,
              help="Test slices in the qualitative panels (largest organ of the first test patients).")  # fmt: skip
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write the PNG figures.")
@click.option("--qualitative/--no-qualitative", default=True, show_default=True,
              help="Run the checkpoints for the qualitative and reconstruction panels.")  # fmt: skip
@device_option("cpu", "Device for the qualitative panels.")
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), default=None,
              help="Report only the runs of this grid (a runs folder shared by several grids).")  # fmt: skip
@click.option("--evaluation", default="test", show_default=True, metavar="NAME",
              help="Report each run's RUN/eval/NAME/ instead of its own test split, e.g. an external test set "
                   "written by `mkd evaluate CKPT --data OTHER --output RUN/eval/NAME`.")  # fmt: skip
@seed_option
@_user_errors
def report(
    runs_dir, output_dir, baseline, data_dir, n_slices, figures, qualitative, device, seed, grid_file, evaluation
):
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
                          n_slices=n_slices, data_dir=data_dir, device=device, seed=seed, only=only,
                          evaluation=evaluation)  # fmt: skip
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


def _describe(seg) -> None:
    click.echo(f"backend: {seg.describe()}")
    click.echo(f"largest connected component: {'on' if seg.lcc else 'off'}")
    click.echo(f"preprocessing: {seg.settings.describe()}")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="CT volume: NIfTI file (.nii/.nii.gz), DICOM series folder, or ITK-readable file; "
                   "or a folder of NIfTI files (one mask each).")  # fmt: skip
@output_option("Mask to write (.nii or .nii.gz): uint8, the input's shape, affine and voxel order; for a folder "
               "--input, the folder the masks go to (same file names).", "output_path", click.Path(),
               required=True)  # fmt: skip
@data_option("Prepared dataset whose prepare.json gives the preprocessing (window, channels, ...).", default=None)
@click.option("--window", type=Window(), metavar="TEXT", default=None,
              help="HU window LOW,HIGH or 'max'  [default: checkpoint, --data, else -57,164]")  # fmt: skip
@click.option("--channels", type=click.Choice(["replicate", "2.5d"]), default=None,
              help="Slice channels  [default: checkpoint, --data, else replicate]")  # fmt: skip
@click.option("--spacing", type=Numbers(3, words=("none", "native")), metavar="X,Y,Z|none", default=None,
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
@click.option("--quantize", type=click.Choice(["int8", "bf16"]), default=None,
              help="int8: students only, ONNX Runtime static quantisation calibrated on --calibration; bf16: "
                   "PyTorch autocast, on CPUs with native bf16 (AVX-512 BF16, AMX).")  # fmt: skip
@click.option("--calibration", type=click.Path(exists=True), default=None,
              help="int8 calibration data: a prepared dataset (its training slices), a folder of NIfTI CTs or "
                   "one CT  [default: --data]")  # fmt: skip
@click.option("--preview", "--png", "preview", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG of the mask over the CT at three axial levels (radiological view).")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Slices per forward  [default: 8 on a CPU, 32 on a GPU]")  # fmt: skip
@device_option()
@overwrite_option("Replace existing output file(s).")
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

    from mkd.inference import Segmenter, check_folder_job, check_mask_output, check_preview_path, is_volume_folder

    output = Path(output_path)
    batch = is_volume_folder(input_path)
    if batch and preview:
        raise click.UsageError("--preview/--png takes one volume; a folder --input writes many masks")
    # the library's checks of the output(s), before the model loads
    if batch:
        check_folder_job(input_path, output, overwrite, skip_existing)
    else:
        check_mask_output(input_path, output, overwrite)
    if preview:
        check_preview_path(preview, overwrite)
    try:
        seg = Segmenter(checkpoint, data_dir=data_dir, window=window, channels=channels, spacing=spacing,
                        size=size, device=device, batch_size=batch_size, lcc=lcc, backend=backend, threads=threads,
                        quantize=quantize, calibration=calibration)  # fmt: skip
    except ValueError as err:
        if isinstance(err, MkdError):
            raise
        raise click.UsageError(as_flags(str(err))) from None
    if batch:
        _describe(seg)
        done = seg.segment_folder(input_path, output, overwrite=overwrite, skip_existing=skip_existing,
                                  progress=click.echo)  # fmt: skip
        seconds = sum(r.seconds for r in done.written)
        click.echo(f"wrote {len(done.written)} masks to {output} ({seconds:.1f} s), {len(done.skipped)} kept, "
                   f"{len(done.failed)} failed")  # fmt: skip
        for err in done.failed.values():
            click.echo(f"  failed: {err}", err=True)
        if done.failed:
            raise MkdError(f"{len(done.failed)} of {len(done.failed) + len(done.written) + len(done.skipped)} "
                           f"volumes in {input_path} failed; see above")  # fmt: skip
        return
    result = seg.segment_to_file(input_path, output, overwrite=overwrite)
    _describe(seg)
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
@output_option("File to write. Default: beside CHECKPOINT, <stem>.ts.pt or <stem>.onnx.", "output_path",
               click.Path(dir_okay=False))  # fmt: skip
@click.option("--size", type=click.IntRange(8, 4096), default=None,
              help="Square input size  [default: the checkpoint's run.image_size, else 256]")  # fmt: skip
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the export's logits with PyTorch's (batch sizes 1 and 3).")  # fmt: skip
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Tolerance of the check.")
@overwrite_option("Replace an existing --output file.")
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
