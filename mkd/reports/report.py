"""``mkd report``: collect a runs folder into thesis-style tables, significance tests and figures.

:func:`collect_runs` reads every finished run of a runs folder (``RUNS/<id>/run.json`` +
``eval/test/summary.json``, the contract of ``docs/architecture.md``) into one tidy
DataFrame; :func:`build_report` turns it into tables (CSV + Markdown), paired tests and
PNG figures, written atomically into ``RUNS/report``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mkd.bundle import KEY_METRIC
from mkd.errors import InputError, MkdError, first_line
from mkd.reports.tables import (
    DEFAULT_METRICS,
    format_table,
    gap_table,
    significance_table,
    summary_table,
    to_markdown,
)

__all__ = [
    "collect_runs",
    "collect_volumes",
    "build_report",
    "check_report_output",
    "ReportResult",
    "VOLUME_METRICS",
    "curve_end_change",
    "convergence_table",
]

logger = logging.getLogger(__name__)

#: per-volume columns of the second table (mean over test volumes, MSD convention); the ``_lcc`` ones
#: (after the largest-connected-component filter, ``mkd infer``'s default) when the evaluations have them.
VOLUME_METRICS: tuple[str, ...] = ("volume_dice", "volume_iou", "volume_hd95", "volume_dice_lcc", "volume_hd95_lcc")
_KIND_RANK = {"teacher": 0, "student": 1, "distill": 2}
_RUN_FIELDS = ("id", "kind", "method", "arch", "teacher", "teacher_arch", "scales", "loss", "pmd", "mode",
               "data_fraction", "seed", "profile", "baseline")  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "x"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err.msg} at line {err.lineno})") from None


def check_evaluation_name(evaluation: str) -> str:
    """``evaluation`` if it names one folder under ``RUN/eval/`` (``test``, ``external``, ...).

    Raises:
        MkdError: an empty name, a path (``/``, ``\\``) or ``.`` / ``..``.
    """
    if not isinstance(evaluation, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", evaluation) or evaluation in (".", ".."):
        raise MkdError(f"`evaluation` {evaluation!r}: expected the name of one folder under RUN/eval/ "
                       "(letters, digits, '_', '-', '.'), e.g. 'test'")  # fmt: skip
    return evaluation


def collect_runs(runs_dir: str | os.PathLike, evaluation: str = "test") -> pd.DataFrame:
    """One row per finished run of ``runs_dir`` (a folder with ``run.json`` and ``eval/<evaluation>/summary.json``).

    ``evaluation`` is the folder under ``RUN/eval/`` to read: ``test`` (what ``mkd ablate``
    writes) or one that ``mkd evaluate --output RUN/eval/NAME`` wrote, e.g. an external test set.

    Columns: ``run_id``, the ``run.json`` fields (``kind, method, arch, teacher, teacher_arch,
    scales`` joined with ``+``, ``loss, pmd, mode, data_fraction, seed, profile``),
    ``baseline_run`` (the run id from ``run.json``) and ``baseline`` (that run's *method*, as
    :func:`mkd.reports.summary_table` wants; blank when the baseline run is not finished),
    ``groups``, the test metrics of :func:`mkd.metrics.flatten_summary` (pooled ``iou, dice,
    recall, precision``; ``volume_*``), ``psnr`` (teachers), the training record
    (``best_val_pooled_dice, best_epoch, epochs, train_seconds``) and ``run_dir``.
    Rows are ordered teachers, student baselines, distillation runs, then by run id.

    Raises:
        InputError: ``runs_dir`` is not a folder, or a run's JSON is unreadable.
    """
    from mkd.metrics import flatten_summary

    runs_dir = Path(runs_dir)
    evaluation = check_evaluation_name(evaluation)
    if not runs_dir.is_dir():
        raise InputError(runs_dir, "runs folder not found")
    rows = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        eval_summary = run_dir / "eval" / evaluation / "summary.json"
        if not (run_dir / "run.json").is_file() or not eval_summary.is_file():
            continue
        info = _read_json(run_dir / "run.json")
        summary = _read_json(eval_summary)
        row: dict[str, Any] = {"run_id": info.get("id", run_dir.name)}
        for k in _RUN_FIELDS[1:]:
            row[k] = info.get(k)
        row["scales"] = "+".join(info.get("scales") or [])
        row["baseline_run"] = row.pop("baseline")
        row["groups"] = "; ".join(info.get("groups") or [])
        row["settings"] = json.dumps(info.get("settings") or {}, sort_keys=True)
        row.update(flatten_summary(summary))
        psnr = summary.get("psnr")
        row["psnr"] = psnr.get("mean") if isinstance(psnr, Mapping) else psnr
        train = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
        row["best_val_pooled_dice"] = train.get("best_val_pooled_dice")
        row["best_epoch"] = train.get("best_epoch")
        row["epochs"] = train.get("epochs")
        row["train_seconds"] = train.get("seconds")
        row["val_last_change"] = curve_end_change(run_dir / "metrics.csv")
        row["run_dir"] = str(run_dir.resolve())
        row["eval_dir"] = str(eval_summary.parent.resolve())
        rows.append(row)
    columns = ["run_id", *_RUN_FIELDS[1:-1], "baseline_run", "baseline", "groups", "settings", *DEFAULT_METRICS,
               *(f"volume_{k}" for k in ("iou", "dice", "recall", "precision", "hd95")), "psnr",
               "best_val_pooled_dice", "best_epoch", "epochs", "train_seconds", "val_last_change",
               "run_dir", "eval_dir"]  # fmt: skip
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=columns)
    method_of = dict(zip(df["run_id"], df["method"]))
    df["baseline"] = [method_of.get(b) if isinstance(b, str) else None for b in df["baseline_run"]]
    df["_rank"] = df["kind"].map(_KIND_RANK).fillna(3)
    df = df.sort_values(["_rank", "run_id"], kind="stable").drop(columns="_rank").reset_index(drop=True)
    for c in (*DEFAULT_METRICS, "psnr", "best_val_pooled_dice", "train_seconds", "val_last_change"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df[[c for c in columns if c in df.columns] + [c for c in df.columns if c not in columns]]


def curve_end_change(metrics_csv: str | os.PathLike, window: int = 3, key: str = "val_pooled_dice") -> float | None:
    """Has the validation curve flattened? Mean of ``key`` over the last ``window`` epochs minus the ``window`` before.

    Near 0 (against the seed-to-seed spread) when training has converged; clearly positive when
    the run stopped while still improving. ``None`` when ``metrics.csv`` is missing, unreadable
    or shorter than ``2 * window`` epochs.

    Example:
        a curve ... 0.80, 0.82, 0.84 | 0.85, 0.85, 0.86 gives (0.85 + 0.85 + 0.86) / 3 - 0.82 = +0.0333.
    """
    try:
        values = pd.read_csv(metrics_csv)[key].astype(float).to_numpy()
    except (OSError, KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if len(values) < 2 * window:
        return None
    return float(values[-window:].mean() - values[-2 * window : -window].mean())


def convergence_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: epochs, best epoch and the end-of-curve change of validation pooled Dice, mean ± std over seeds."""
    rows = []
    for method, block in runs.groupby("method", sort=False):
        change = pd.to_numeric(block.get("val_last_change"), errors="coerce").dropna()
        best = pd.to_numeric(block.get("best_epoch"), errors="coerce").dropna()
        rows.append({
            "method": method, "n_seeds": int(len(block)),
            "epochs": "/".join(str(int(e)) for e in sorted(set(pd.to_numeric(block["epochs"], errors="coerce")
                                                                 .dropna()))),
            "best epoch": ", ".join(str(int(b)) for b in best),
            "val Dice, last 3 epochs - 3 before": (f"{change.mean():+.4f} ± {change.std(ddof=1):.4f}" if len(change) > 1
                                                   else f"{change.mean():+.4f}" if len(change) else ""),
        })  # fmt: skip
    return pd.DataFrame(rows)


def left_out_runs(runs_dir: str | os.PathLike, evaluation: str = "test") -> dict[str, str]:
    """``{folder name: why}`` for each run folder of ``runs_dir`` that :func:`collect_runs` leaves out.

    A run folder is one with ``run.json`` (``mkd ablate``), or with ``models/model.pt`` or
    ``config.json`` (a training run); other folders (the report itself) are not runs.

    Example:
        >>> left_out_runs("runs")  # doctest: +SKIP
        {'student-s1-f0.5-seed1': 'training not finished (no models/model.pt)'}
    """
    runs_dir = Path(runs_dir)
    out: dict[str, str] = {}
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        has_info = (run_dir / "run.json").is_file()
        trained = (run_dir / "models" / "model.pt").is_file()
        if has_info and (run_dir / "eval" / evaluation / "summary.json").is_file():
            continue
        if not has_info:
            if trained or (run_dir / "config.json").is_file():
                out[run_dir.name] = "no run.json (not a run of mkd ablate, so its method and seed are unknown)"
        elif (runs_dir / f"{run_dir.name}.lock").exists() or (run_dir / "run.lock").exists():
            out[run_dir.name] = "still running (its lock file exists)"
        elif evaluation != "test" and (trained or (run_dir / "eval" / "test" / "summary.json").is_file()):
            out[run_dir.name] = (
                f"no eval/{evaluation}/summary.json (mkd evaluate --output RUN/eval/{evaluation} writes it)"
            )
        elif not trained:
            out[run_dir.name] = "training not finished (no models/model.pt)"
        else:
            out[run_dir.name] = (
                "evaluation missing (no eval/test/summary.json); mkd ablate on this runs folder evaluates it"
            )
    return out


def collect_volumes(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-volume test metrics of every run of ``runs`` (``per_volume.csv`` in its ``eval_dir``), a row per volume.

    Columns: ``run_id, method, baseline, seed, patient`` and the metrics ``iou, dice,
    recall, precision, hd95``. Runs without the file are left out.
    """
    frames = []
    for row in runs.itertuples(index=False):
        path = Path(getattr(row, "eval_dir", None) or Path(row.run_dir) / "eval" / "test") / "per_volume.csv"
        if not path.is_file():
            continue
        pv = pd.read_csv(path)
        keep = [c for c in ("patient", "iou", "dice", "recall", "precision", "hd95", "dice_lcc", "hd95_lcc")
                if c in pv.columns]  # fmt: skip
        pv = pv[keep].copy()
        pv.insert(0, "seed", row.seed)
        pv.insert(0, "baseline", row.baseline)
        pv.insert(0, "method", row.method)
        pv.insert(0, "run_id", row.run_id)
        frames.append(pv)
    if not frames:
        return pd.DataFrame(columns=["run_id", "method", "baseline", "seed", "patient", "iou", "dice", "hd95"])
    return pd.concat(frames, ignore_index=True)


@dataclass
class ReportResult:
    """What :func:`build_report` produced.

    Attributes:
        output_dir: the report folder.
        runs: the tidy runs table (:func:`collect_runs`, after ``baseline`` overrides).
        frames: the tables as DataFrames: ``summary`` (pooled metrics per method), ``volume``
            (per-volume metrics), ``significance_seeds``, ``significance_volumes``,
            ``per_volume`` (tidy), and ``group:<name>`` per grid block.
        markdown: the main table as Markdown, with its footnote (what ``mkd report`` prints).
        files: name -> path of every CSV / Markdown / PNG written.
        notes: what was skipped and why (e.g. qualitative panels without checkpoints).
        left_out: run folders not in the report, with the reason (:func:`left_out_runs`).

    ``result["markdown"]`` and ``result.get("figures", [])`` work too (dict-style access to
    the attributes and properties).
    """

    output_dir: Path
    runs: pd.DataFrame
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    markdown: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``result[key]`` or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    @property
    def figures(self) -> list[Path]:
        """The PNG files written."""
        return [p for p in self.files.values() if p.suffix == ".png"]

    @property
    def tables(self) -> list[Path]:
        """The CSV and Markdown files written (the main table first)."""
        return [p for p in self.files.values() if p.suffix in (".csv", ".md")]


def _method_order(runs: pd.DataFrame) -> list[str]:
    """Teachers, then each baseline followed by the methods compared with it (in run order)."""
    methods = list(dict.fromkeys(runs["method"]))
    base = {}
    for m in methods:
        named = runs.loc[runs["method"] == m, "baseline"].dropna()
        base[m] = named.iloc[0] if len(named) else None
    kind = {m: runs.loc[runs["method"] == m, "kind"].iloc[0] for m in methods}
    order = [m for m in methods if kind[m] == "teacher" and base[m] is None]
    for b in [m for m in methods if base[m] is None and m not in order]:
        order.append(b)
        order += [m for m in methods if base[m] == b and m not in order]
    order += [m for m in methods if m not in order]
    return order


def _pcell(sig: pd.DataFrame, method: str, metric: str) -> str:
    if sig.empty:
        return ""
    hit = sig[(sig["method"] == method) & (sig["metric"] == metric)]
    if hit.empty or not np.isfinite(hit["pvalue"].iloc[0]):
        return ""
    r = hit.iloc[0]
    mark = {"ttest": "t", "wilcoxon": "W"}.get(r["test"], r["test"])
    return f"{r['pvalue']:.3f} ({mark}); Δ {r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def _footnote(sig: pd.DataFrame, pairs: str, metric: str) -> str:
    if sig.empty:
        return f"No method has a finished baseline to compare with; no test on {metric}."
    used = sorted(set(sig.loc[sig["metric"] == metric, "test"]))
    names = {"ttest": "paired t-test (t, scipy.stats.ttest_rel)",
             "wilcoxon": "Wilcoxon signed-rank test (W, scipy.stats.wilcoxon)"}  # fmt: skip
    n = sig.loc[sig["metric"] == metric, "n"]
    conf = sig["confidence"].iloc[0] if "confidence" in sig else 0.95
    npairs = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}-{int(n.max())}"
    return (
        f"p: two-sided {' / '.join(names.get(t, t) for t in used)} of {metric} against the baseline, paired over "
        f"{pairs} ({npairs} pairs; t-test below 6 pairs, Wilcoxon from 6). "
        f"Δ: mean paired difference (method - baseline) with a {int(round(100 * conf))}% percentile-bootstrap "
        "confidence interval. Mean ± sample std over seeds; % change of the mean against the baseline's mean. "
        "All metrics and Holm-adjusted p-values are in the significance CSV files."
    )


def _display(summary: pd.DataFrame, sig: pd.DataFrame, metric: str, header: str) -> pd.DataFrame:
    table = format_table(summary)
    table[header] = [_pcell(sig, m, metric) for m in summary["method"]]
    return table


def _group_tables(runs: pd.DataFrame, metrics: Sequence[str]) -> dict[str, pd.DataFrame]:
    """One summary table per grid block (``groups``), with the baselines its methods compare with."""
    names = list(dict.fromkeys(g.strip() for gs in runs["groups"].fillna("") for g in gs.split(";") if g.strip()))
    out = {}
    for g in names:
        member = runs["groups"].fillna("").map(lambda s, g=g: g in [x.strip() for x in s.split(";")])
        methods = set(runs.loc[member, "method"])
        methods |= set(runs.loc[member, "baseline"].dropna())
        sub = runs[runs["method"].isin(methods)]
        if sub["baseline"].notna().any():  # a block of teachers only is not a comparison table
            out[g] = summary_table(sub, metrics)
    return out


def _legacy_report(folder: Path) -> bool:
    """A report folder written before markers existed: its ``report.md`` and ``runs.csv``."""
    return (folder / "report.md").is_file() and (folder / "runs.csv").is_file()


def check_report_output(runs_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Refuse a report folder that would delete runs or files the report did not write.

    The report folder (replaced as a whole) may not be the runs folder, a folder above it,
    a folder holding run folders (``*/run.json``) or a folder inside a run; an existing one
    is replaced only when a report wrote it (``.mkd-owner.json``, :mod:`mkd.ownership`) or it
    is empty.

    Raises:
        MkdError: one line naming the folder and what to do.
    """
    from mkd.ownership import check_replaceable, is_within

    runs_dir, output_dir = Path(runs_dir), Path(output_dir)
    runs_real, out_real = runs_dir.resolve(), output_dir.resolve()
    if is_within(runs_real, out_real):
        what = "is the runs folder" if runs_real == out_real else f"holds the runs folder {runs_real}"
        raise MkdError(f"{output_dir}: {what}; a report never replaces it: give `output_dir` a new folder "
                       "(default: RUNS/report)")  # fmt: skip
    for parent in [out_real, *out_real.parents]:
        if parent == runs_real:
            break
        if (parent / "run.json").is_file():
            raise MkdError(f"{output_dir}: is inside the run {parent}; a report never writes into a run: give "
                           "`output_dir` a new folder (default: RUNS/report)")  # fmt: skip
    if output_dir.is_dir() and not output_dir.is_symlink():
        held = sorted(p.name for p in output_dir.iterdir() if (p / "run.json").is_file())
        if held:
            names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise MkdError(f"{output_dir}: holds run folders ({names}); a report never replaces them: give "
                           "`output_dir` a new folder (default: RUNS/report)")  # fmt: skip
    check_replaceable(output_dir, ("report",), keep={"runs folder": runs_dir}, legacy=_legacy_report,
                      by="mkd report")  # fmt: skip


def build_report(
    runs_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    baseline: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    figures: bool = True,
    qualitative: bool = True,
    n_slices: int = 4,
    data_dir: str | os.PathLike | None = None,
    device: str | None = "cpu",
    n_resamples: int = 10_000,
    seed: int = 0,
    only: Sequence[str] | None = None,
    evaluation: str = "test",
) -> ReportResult:
    """Tables, paired tests and figures of every finished run of ``runs_dir``, written into ``output_dir``.

    Files (all written into a temporary folder and moved into place at the end):

    - ``summary.csv`` / ``.md``: rows = method, pooled IoU / Dice / recall / precision (as the
      thesis), mean ± std over seeds, % change against the matching baseline student, and the
      seed-paired test of Dice (column ``p dice (seeds)``).
    - ``volume.csv`` / ``.md``: per-volume Dice, IoU, HD95 (mean over test volumes), and Dice and
      HD95 after the largest-connected-component filter (``*_lcc``), with the volume-paired test of Dice.
    - ``significance_seeds.csv`` / ``.md`` and ``significance_volumes.csv`` / ``.md``: every
      method against its baseline, every metric (:func:`mkd.reports.significance_table`).
    - ``groups/<block>.csv`` / ``.md``: one table per grid block (thesis table).
    - ``runs.csv``, ``per_volume.csv``: the tidy inputs; ``report.md``: everything in one page.
    - ``left_out.csv``: run folders not in the report and why (evaluation missing, training
      not finished, still running, no ``run.json``); also listed in ``report.md``.
    - ``figures/``: training curves per method, validation Dice per epoch per baseline group,
      ablation bar charts, qualitative panels and teacher reconstructions (the last two need
      the checkpoints and the prepared data; without them they are skipped with a note).

    Args:
        runs_dir: the runs folder (``mkd ablate --runs``).
        output_dir: default ``RUNS/report``; replaced if it exists and a report wrote it
            (:func:`check_report_output`).
        baseline: compare every student-side method with this method instead of its own
            matching baseline (e.g. ``"S1 (100%)"``).
        metrics: pooled metric columns of the main table.
        figures: write the PNG figures.
        qualitative: run the checkpoints for qualitative / reconstruction panels.
        n_slices: test slices in the qualitative panels (the slice with the largest organ
            of each of the first ``n_slices`` test patients, by patient id).
        data_dir: the prepared dataset; default the one recorded in the evaluations.
        device: for the qualitative panels.
        n_resamples: bootstrap resamples of the confidence intervals.
        seed: seed of the bootstrap.
        only: report only these run ids (e.g. the runs of one grid sharing a runs folder with others).
        evaluation: the folder under each ``RUN/eval/`` whose metrics are reported: ``test`` (the
            run's own test split), or e.g. an external test set written by ``mkd evaluate --output
            RUN/eval/NAME``; the tables then say which.

    Returns:
        A :class:`ReportResult`.

    Raises:
        MkdError: no finished run, ``baseline`` is not a method of the runs, or ``output_dir``
            is not a folder a report may replace (:func:`check_report_output`).
    """
    from mkd.ownership import mark_owner
    from mkd.utils import atomic_dir, atomic_file

    runs_dir = Path(runs_dir)
    output_dir = Path(output_dir) if output_dir is not None else runs_dir / "report"
    if runs_dir.is_dir():
        check_report_output(runs_dir, output_dir)
    runs = collect_runs(runs_dir, evaluation)
    left_out = left_out_runs(runs_dir, evaluation)
    if only is not None:
        runs = runs[runs["run_id"].isin(set(only))].reset_index(drop=True)
        left_out = {k: v for k, v in left_out.items() if k in set(only)}
    if runs.empty:
        why = f"; left out: {', '.join(f'{k} ({v})' for k, v in left_out.items())}" if left_out else ""
        raise MkdError(
            f"{runs_dir}: no finished runs (a run is a folder with run.json and eval/{evaluation}/summary.json){why}"
        )
    notes: list[str] = []
    missing = runs.loc[runs["baseline_run"].notna() & runs["baseline"].isna(), "baseline_run"].unique()
    if len(missing):
        notes.append(f"baseline run(s) not finished, those methods have no % change: {', '.join(missing)}")
    if baseline is not None:
        if baseline not in set(runs["method"]):
            raise MkdError(f"`baseline` {baseline!r} is not a method of the runs; methods: "
                           f"{', '.join(dict.fromkeys(runs['method']))}")  # fmt: skip
        side = (runs["kind"] != "teacher") & (runs["method"] != baseline)
        runs.loc[side, "baseline"] = baseline
        runs.loc[runs["method"] == baseline, "baseline"] = None
    order = _method_order(runs)
    runs = runs.iloc[np.argsort([order.index(m) for m in runs["method"]], kind="stable")].reset_index(drop=True)

    volumes = collect_volumes(runs)
    volume_metrics = [m for m in VOLUME_METRICS if m in runs.columns and runs[m].notna().any()]
    all_metrics = [*metrics, *volume_metrics]
    summary = summary_table(runs, metrics)
    volume = summary_table(runs, volume_metrics)
    sig_seeds = significance_table(runs, all_metrics, pair_on="seed", n_resamples=n_resamples, seed=seed)
    vol_metrics = [m for m in ("dice", "iou", "hd95") if m in volumes.columns]
    sig_volumes = (significance_table(volumes, vol_metrics, pair_on="patient", n_resamples=n_resamples, seed=seed)
                   if not volumes.empty else significance_table(runs.iloc[:0], (), pair_on="seed"))  # fmt: skip
    main_display = _display(summary, sig_seeds, "dice", "p dice (seeds)")
    volume_display = _display(volume, sig_volumes, "dice", "p dice (volumes)")
    seeds = sorted(set(runs["seed"]))
    markdown = to_markdown(main_display) + "\n" + _footnote(sig_seeds, "seeds", "dice") + "\n"
    volume_md = to_markdown(volume_display) + "\n" + _footnote(sig_volumes, "test volumes (each averaged over "
                                                                         "seeds)", "dice") + "\n"  # fmt: skip
    groups = _group_tables(runs, metrics)
    method_of = dict(zip(runs["run_id"], runs["method"]))
    runs["teacher_method"] = [method_of.get(t) if isinstance(t, str) else None for t in runs["teacher"]]
    gap = gap_table(runs, [m for m in ("dice", "volume_dice") if m in runs.columns])
    gap_md = to_markdown(_gap_display(gap)) + "\n" if not gap.empty else ""
    convergence = convergence_table(runs)

    frames: dict[str, pd.DataFrame] = {"summary": summary, "volume": volume, "significance_seeds": sig_seeds,
                                       "significance_volumes": sig_volumes, "per_volume": volumes,
                                       "gap": gap}  # fmt: skip
    frames.update({f"group:{g}": t for g, t in groups.items()})
    files: dict[str, Path] = {}
    with atomic_dir(output_dir, overwrite=True) as tmp:
        mark_owner(tmp, "report")  # what a later report may replace

        def text(name: str, rel: str, body: str) -> None:
            with atomic_file(tmp / rel) as fh:
                fh.write(body)
            files[name] = output_dir / rel

        def csv(name: str, rel: str, df: pd.DataFrame) -> None:
            with atomic_file(tmp / rel) as fh:
                df.to_csv(fh, index=False)
            files[name] = output_dir / rel

        csv("summary.csv", "summary.csv", summary)
        text("summary.md", "summary.md", markdown)
        csv("volume.csv", "volume.csv", volume)
        text("volume.md", "volume.md", volume_md)
        for name, sig in (("significance_seeds", sig_seeds), ("significance_volumes", sig_volumes)):
            csv(f"{name}.csv", f"{name}.csv", sig)
            text(f"{name}.md", f"{name}.md", to_markdown(sig))
        if not gap.empty:
            csv("gap.csv", "gap.csv", gap)
            text("gap.md", "gap.md", gap_md)
        csv("runs.csv", "runs.csv", runs)
        csv("convergence.csv", "convergence.csv", convergence)
        if left_out:
            left_df = pd.DataFrame({"run": list(left_out), "reason": list(left_out.values())})
            csv("left_out.csv", "left_out.csv", left_df)
        csv("per_volume.csv", "per_volume.csv", volumes)
        group_md = []
        for g, t in groups.items():
            rel = f"groups/{_slug(g)}"
            csv(f"group:{g}.csv", rel + ".csv", t)
            body = to_markdown(format_table(t))
            text(f"group:{g}.md", rel + ".md", body)
            group_md.append(f"### {g}\n\n{body}")
        if figures:
            _figures(runs, summary, volume, tmp, output_dir, files, notes, qualitative, n_slices, data_dir, device)
            if not gap.empty:
                from mkd.reports.figures import plot_gap_recovered

                plot_gap_recovered(
                    gap,
                    tmp / "figures" / "gap_recovered.png",
                    metrics=[c[: -len("_recovered")] for c in gap.columns if c.endswith("_recovered")],
                )
                files["gap_recovered"] = output_dir / "figures" / "gap_recovered.png"
        page = [f"# Report of {runs_dir.resolve()}", "",
                f"{len(runs)} finished runs, {len(order)} methods, seeds {seeds}"
                f"{f'; {len(left_out)} run(s) left out (see below)' if left_out else ''}.", "",
                *([f"Test metrics from each run's `eval/{evaluation}/` (its evaluation named {evaluation!r}, "
                   f"data {', '.join(sorted(_recorded_data(runs)))}), not its own test split.", ""]
                  if evaluation != "test" else []),
                "## Pooled test metrics (as the thesis)", "", markdown,
                "## Per-volume test metrics (MSD convention)", "", volume_md]  # fmt: skip
        if gap_md:
            page += ["## Teacher-student gap recovered, (KD - S) / (T - S)", "", gap_md]
        page += ["## Has training converged? (validation pooled Dice at the end of each run)", "",
                 to_markdown(convergence), ""]  # fmt: skip
        if group_md:
            page += ["## Tables by grid block", "", *group_md]
        pngs = [(k, p) for k, p in files.items() if p.suffix == ".png"]
        if pngs:
            page += ["## Figures", ""] + [f"![{k}]({p.relative_to(output_dir).as_posix()})" for k, p in pngs] + [""]
        if left_out:
            page += ["## Runs left out", ""] + [f"- {k}: {v}" for k, v in left_out.items()] + [""]
        if notes:
            page += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        text("report.md", "report.md", "\n".join(page))
    return ReportResult(output_dir, runs, frames, markdown, files, notes, left_out)


def _recorded_data(runs: pd.DataFrame) -> set[str]:
    """The prepared datasets recorded in the runs' evaluations (``summary.json`` ``data``)."""
    return {str(_read_json(Path(d) / "summary.json").get("data") or "?") for d in runs["eval_dir"]}


def _gap_display(gap: pd.DataFrame) -> pd.DataFrame:
    """The gap table for reading: ``0.812 (S 0.780, T 0.880): +0.32`` per metric."""
    out = gap[["method", "teacher", "n_seeds"]].copy()
    for k in [c[: -len("_recovered")] for c in gap.columns if c.endswith("_recovered")]:
        out[f"{k} recovered"] = [
            f"{kd:.3f} (S {b:.3f}, T {t:.3f}): " + ("n/a" if not np.isfinite(r) else f"{r:+.2f}")
            for kd, b, t, r in zip(gap[f"{k}_kd"], gap[f"{k}_baseline"], gap[f"{k}_teacher"], gap[f"{k}_recovered"])
        ]
    return out


# --- figures ----------------------------------------------------------------------------


def _figures(runs, summary, volume, tmp, output_dir, files, notes, qualitative, n_slices, data_dir, device) -> None:
    from mkd.reports.figures import plot_ablation, plot_training_curves

    def put(name: str, rel: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, tmp / rel, **kwargs)
        except (ValueError, OSError, KeyError) as err:
            notes.append(f"{rel} skipped: {err}")
            return
        files[name] = output_dir / rel

    # training curves: the first seed of each method
    for method, block in runs.groupby("method", sort=False):
        csv = Path(block["run_dir"].iloc[0]) / "metrics.csv"
        if csv.is_file():
            seed = block["seed"].iloc[0]
            put(f"curves:{method}", f"figures/curves/{_slug(method)}.png", plot_training_curves, read_metrics(csv),
                title=f"{method} (seed {seed})")  # fmt: skip
        else:
            notes.append(f"training curves of {method}: no metrics.csv in {block['run_dir'].iloc[0]}")
    # per baseline group: validation Dice per epoch (mean over seeds) and the ablation bar charts
    bases = [m for m in summary["method"] if summary.loc[summary["method"] == m, "baseline"].isna().all()
             and (summary["baseline"] == m).any()]  # fmt: skip
    for b in bases:
        members = [b, *summary.loc[summary["baseline"] == b, "method"]]
        curves = {}
        for m in members:
            logs = []
            for d in runs.loc[runs["method"] == m, "run_dir"]:
                p = Path(d) / "metrics.csv"
                if p.is_file():
                    df = read_metrics(p)
                    if KEY_METRIC in df:
                        logs.append(df.set_index("epoch")[KEY_METRIC])
            if logs:
                curves[m] = pd.concat(logs, axis=1).mean(axis=1)
        if curves:
            history = pd.DataFrame(curves).rename_axis("epoch").reset_index()
            put(f"val_dice:{b}", f"figures/val_dice_{_slug(b)}.png", plot_training_curves, history,
                title=f"validation pooled Dice per epoch (mean over seeds), baseline {b}")  # fmt: skip
        sub = summary[summary["method"].isin(members)]
        put(f"ablation:{b}", f"figures/ablation_dice_{_slug(b)}.png", plot_ablation, sub, metric="dice",
            baseline=b, title=f"pooled test Dice, mean ± std over seeds (baseline {b})")  # fmt: skip
        vsub = volume[volume["method"].isin(members)]
        put(f"ablation_volume:{b}", f"figures/ablation_volume_dice_{_slug(b)}.png", plot_ablation, vsub,
            metric="volume_dice", baseline=b, title=f"per-volume test Dice (baseline {b})")  # fmt: skip
    if not bases:
        put("ablation", "figures/ablation_dice.png", plot_ablation, summary, metric="dice")
    if qualitative:
        try:
            _qualitative(runs, summary, tmp, output_dir, files, notes, n_slices, data_dir, device)
        except (MkdError, OSError, ValueError, KeyError) as err:
            notes.append(f"qualitative panels skipped: {err}")
    else:
        notes.append("qualitative panels and teacher reconstructions skipped (`qualitative=False`)")


def _pick_slices(data_dir: Path, n: int) -> list[dict]:
    """The slice with the largest organ of each of the first ``n`` test patients (by id); items of the datalist."""
    from mkd.data import load_split
    from mkd.data.prepare import load_manifest

    manifest = load_manifest(data_dir)
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise MkdError(f"{data_dir}: no test slices in manifest.csv")
    test = test.sort_values(["patient", "fg_pixels", "row"], ascending=[True, False, True], kind="stable")
    best = test.groupby("patient", sort=True).head(1)
    picked = list(best.itertuples(index=False))[:n]
    if len(picked) < n:  # fewer test patients than slices wanted: the next-largest slices overall
        rest = test.drop(best.index).sort_values(["fg_pixels", "patient", "row"], ascending=[False, True, True])
        picked += list(rest.itertuples(index=False))[: n - len(picked)]
    items = {(d["patient"], int(d["slice"])): d for d in load_split(data_dir, "test")}
    return [items[(str(r.patient), int(r.row))] for r in picked]


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """A run's ``metrics.csv`` (one row per epoch, an ``epoch`` column).

    Raises:
        InputError: the file is empty, not a CSV table, or has no ``epoch`` column; the message
            says to re-run the run or delete the file.
    """
    todo = "re-run that run, or delete the file to report without its training curves"
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise InputError(path, f"empty or not a CSV table ({first_line(err, 120)}); {todo}") from None
    if "epoch" not in df.columns or df["epoch"].isna().any():
        raise InputError(path, f"no 'epoch' column (or empty epochs): not a metrics.csv written by mkd; {todo}")
    return df


def _predict(checkpoint: Path, items: list[dict], display: Sequence[int], device, recon: bool = False):
    """Run a checkpoint on ``items`` at its training size; probabilities at ``display`` size, reconstruction, input.

    Raises:
        MkdError: the network's output is NaN or infinite (as ``mkd evaluate``).
    """
    import torch
    import torch.nn.functional as F

    from mkd.data.transforms import slice_transform
    from mkd.inference.predictor import predict_slices
    from mkd.networks import CheckpointRecord, load_network

    model, ckpt = load_network(checkpoint, map_location="cpu")
    model.to(device).eval()
    size = list(CheckpointRecord.from_checkpoint(ckpt).image_size or display)
    transform = slice_transform(size)
    batch = [transform(dict(d)) for d in items]
    images = torch.stack([torch.as_tensor(b["image"]) for b in batch])
    where = f"test slices of {', '.join(sorted({str(d['patient']) for d in items}))}"
    out = predict_slices(model, images, None, len(images), device, checkpoint, where=where, recon=recon)
    prob = out.probs
    if list(prob.shape[-2:]) != list(display):
        prob = F.interpolate(prob, size=list(display), mode="nearest")
    return prob, None if out.recon is None else out.recon.cpu(), images


def _qualitative(runs, summary, tmp, output_dir, files, notes, n_slices, data_dir, device) -> None:
    import torch

    from mkd.data.transforms import slice_transform
    from mkd.reports.figures import plot_qualitative, plot_reconstructions

    if data_dir is None:
        recorded = [_read_json(Path(d) / "summary.json").get("data") for d in runs["eval_dir"]]
        data_dir = next((d for d in recorded if d and Path(d).is_dir()), None)
        if data_dir is None:
            notes.append("qualitative panels skipped: the prepared dataset recorded in the evaluations is not "
                         "there (pass `data_dir`)")  # fmt: skip
            return
    data_dir = Path(data_dir)
    ckpt_of = {r.run_id: Path(r.run_dir) / "models" / "model.pt" for r in runs.itertuples(index=False)}
    absent = [k for k, p in ckpt_of.items() if not p.is_file()]
    if absent:
        notes.append(f"no checkpoint (models/model.pt) in {len(absent)} run(s), left out of the panels: "
                     f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")  # fmt: skip
    have = runs[[p.is_file() for p in ckpt_of.values()]]
    if have.empty:
        notes.append("qualitative panels and teacher reconstructions skipped: no checkpoints")
        return
    items = _pick_slices(data_dir, n_slices)
    labels = [f"{d['patient']} z={d['z']}" for d in items]

    def first(method: str, seed=None):
        sel = have[(have["method"] == method) & ((have["seed"] == seed) if seed is not None else True)]
        return None if sel.empty else sel.sort_values("seed").iloc[0]

    # per baseline: the baseline, its best distilled method (highest mean pooled Dice), the teacher
    made = 0
    for b in [m for m in summary["method"] if (summary["baseline"] == m).any()]:
        cands = summary[summary["baseline"] == b].sort_values("dice_mean", ascending=False, kind="stable")
        for m in cands["method"]:
            kd = first(m)
            base = first(b, kd["seed"]) if kd is not None else None
            if kd is None or base is None:
                continue
            size = list(_read_json(Path(base["eval_dir"]) / "summary.json").get("image_size")
                        or [64, 64])  # fmt: skip
            ground = [slice_transform(size)(dict(d)) for d in items]
            images = torch.stack([torch.as_tensor(g["image"]) for g in ground])
            masks = {"ground truth": torch.stack([torch.as_tensor(g["label"]) for g in ground])}
            masks[f"{b} (seed {base['seed']})"] = _predict(ckpt_of[base["run_id"]], items, size, device)[0]
            masks[f"{m} (seed {kd['seed']})"] = _predict(ckpt_of[kd["run_id"]], items, size, device)[0]
            teacher = have[have["run_id"] == kd["teacher"]]
            if not teacher.empty:
                t = teacher.iloc[0]
                masks[f"teacher {t['method']}"] = _predict(ckpt_of[t["run_id"]], items, size, device)[0]
            rel = f"figures/qualitative_{_slug(m)}.png"
            plot_qualitative(images, masks, tmp / rel, reference="ground truth", row_labels=labels)
            files[f"qualitative:{m}"] = output_dir / rel
            made += 1
            break
    if not made:
        notes.append("qualitative panels skipped: no distilled student with a finished baseline and checkpoints")
    # teacher reconstructions (multi-task teachers, first seed)
    for t in have[have["kind"] == "teacher"].groupby("method", sort=False).head(1).itertuples(index=False):
        from mkd.networks import CheckpointRecord, load_network

        model, ckpt = load_network(ckpt_of[t.run_id], map_location="cpu")
        if "recon" not in getattr(model, "feature_scales", {}):
            continue
        size = list(CheckpointRecord.from_checkpoint(ckpt).image_size or [64, 64])
        _, rec, images = _predict(ckpt_of[t.run_id], items, size, device, recon=True)
        rel = f"figures/reconstruction_{_slug(t.method)}.png"
        plot_reconstructions(images, rec, tmp / rel, row_labels=labels)
        files[f"reconstruction:{t.method}"] = output_dir / rel
