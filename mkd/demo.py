"""The main job end to end on the embedded phantom: what ``mkd demo`` runs.

phantom -> prepare -> a small ablation grid (teacher T1, baseline student S1,
two distilled S1) -> evaluation on the test patients -> report. The grid runs
through the same machinery as ``mkd ablate`` (:data:`DEMO_GRID`), so the demo
folder is an ordinary runs folder that ``mkd report`` and ``mkd ablate`` read.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkd.errors import MkdError
from mkd.utils import write_json

__all__ = ["DEMO_GRID", "run_demo", "demo_lines"]

logger = logging.getLogger(__name__)

#: The demo's grid (the schema of ``mkd ablate``, docs/ablate.md): the thesis's best
#: T1 -> S1 setting (B->B + PMD) with the default recipe (``pseudo``: plus Dice against the teacher's
#: mask on the student's slices and the unlabelled transfer set) against the baseline S1
#: trained with the same data, optimiser, schedule, epochs, loss and selection. (More
#: settings or seeds: ``mkd ablate``; the demo must finish in 10 minutes on two cores.)
DEMO_GRID: dict[str, Any] = {
    "profile": "cpu",
    "seeds": [0],
    "data_fractions": [0.5],
    "teachers": ["t1"],
    "students": ["s1"],
    # the CPU profile's teacher trains for up to 30 epochs (at least 12) and its students for 15 epochs of
    # 45 steps: about 25 minutes here. The demo caps the teacher at 12 epochs and both students at 6 (their
    # cosine schedules then end there; the students still take equal steps) to fit 10 minutes
    "settings": {"all": {}, "teacher": {"epochs": 12}, "student": {"epochs": 6}},
    "distill": [{"table": "demo", "scales": ["bn"], "pmd": True, "recipe": "pseudo", "transfer": True}],
}


def run_demo(
    out: str | Path = "mkd_demo",
    seed: int = 0,
    overwrite: bool = False,
    cases: int | None = None,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole method on the phantom with the CPU profile; return the report.

    Args:
        out: demo folder (``raw/`` phantom, ``data/`` prepared slices, ``runs/`` with ``runs/report/``).
        seed: seed of the phantom, the split and every training run.
        overwrite: replace an existing demo folder, only one the demo wrote (its ``.mkd-owner.json``,
            :mod:`mkd.ownership`) or an empty one.
        cases: phantom cases (default: the phantom's default).
        teacher_epochs: override the CPU profile's teacher epochs.
        student_epochs: override the epochs of the baseline and the distilled students (always shared).
        overrides: bundle overrides applied to every training run (tests use tiny sizes).
        echo: where progress lines go.

    Returns:
        ``{"report": ReportResult, "seconds": total, "steps": {step: seconds}, "runs": path}``.

    Raises:
        MkdError: the folder exists and ``overwrite`` is false, or a run failed.
    """
    from mkd.ablation import expand_grid, run_ablation
    from mkd.data import prepare_dataset, write_phantom
    from mkd.ownership import check_replaceable, mark_owner
    from mkd.reports import build_report

    out = Path(out).resolve()
    if out.exists():
        if not overwrite:
            raise MkdError(f"{out}: demo folder exists; pass `overwrite=True` to replace it")
        # only a folder the demo wrote (or an empty one): never a folder of the user's files
        check_replaceable(out, ("demo",), option="`out`", legacy=lambda p: (p / "demo.json").is_file())
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_owner(out, "demo")
    t_start = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        echo(f"[{time.perf_counter() - t_start:5.0f} s] {name}")
        t0 = time.perf_counter()
        result = fn()
        steps[name] = round(time.perf_counter() - t0, 1)
        return result

    phantom_kwargs = {"cases": cases} if cases else {}
    task = step(
        "phantom: writing synthetic abdominal CT", lambda: write_phantom(out / "raw", seed=seed, **phantom_kwargs)
    )
    data = out / "data"
    prepared = step("prepare: patient split, 96x96 slices (every slice, with and without spleen)",
                    lambda: prepare_dataset(task, data, size=96, seed=seed))  # fmt: skip
    echo(
        "        " + "; ".join(f"{k} {v} slices ({prepared.patients[k]} patients)" for k, v in prepared.slices.items())
    )

    grid_config = copy.deepcopy(DEMO_GRID)
    grid_config["seeds"] = [seed]
    grid_config["settings"]["all"].update(overrides or {})
    if teacher_epochs is not None:
        grid_config["settings"]["teacher"]["epochs"] = teacher_epochs
    if student_epochs is not None:
        grid_config["settings"]["student"]["epochs"] = student_epochs
    grid = expand_grid(grid_config)
    runs = out / "runs"
    result = step(
        f"train and evaluate {len(grid.runs)} runs: " + ", ".join(r.id for r in grid.runs),
        lambda: run_ablation(grid, runs, data, progress=lambda msg: echo(f"        {msg}")),
    )
    if result.failed or result.blocked or result.elsewhere:
        raise MkdError(f"demo runs failed: {result.failed or result.blocked or result.elsewhere}; see {runs}")
    report = step("report: tables and figures", lambda: build_report(runs))
    seconds = round(time.perf_counter() - t_start, 1)
    write_json(out / "demo.json", {"seconds": seconds, "steps": steps, "seed": seed, "grid": grid_config})
    return {"report": report, "seconds": seconds, "steps": steps, "runs": str(runs)}


def demo_lines(result: dict[str, Any]) -> list[str]:
    """What ``mkd demo`` says at the end: the pooled and per-volume tables, the files, the time per step.

    Args:
        result: what :func:`run_demo` returned.
    """
    report = result["report"]
    lines = ["", "Pooled test metrics (as the thesis):", report["markdown"]]
    volume_md = report.files.get("volume.md")
    if volume_md is not None and volume_md.is_file():
        lines += ["Per-volume test metrics (MSD convention, HD95 in mm):", volume_md.read_text()]
    lines.append("")
    lines += [f"figure: {path}" for path in report.get("figures", [])]
    lines += [f"table:  {path}" for path in report.get("tables", [])]
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result["steps"].items())
    lines.append(f"demo finished in {result['seconds']:.0f} s ({steps})")
    return lines
