"""What an evaluation says in text, and the folder it writes: ``mkd evaluate`` prints :func:`evaluation_lines`.

:func:`mkd.evaluation.evaluate_checkpoint` computes the metrics and ``EvaluationResult.write``
writes :data:`EVALUATION_FILES`; this module gives the plain-text table of a summary and checks
the output folder before the work, so that a Python caller and the CLI share both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mkd.errors import MkdError

__all__ = ["EVALUATION_FILES", "TABLE_COLUMNS", "metrics_table", "evaluation_dir", "check_evaluation_output",
           "evaluation_lines"]  # fmt: skip

#: the files an evaluation writes into its folder
EVALUATION_FILES = ("summary.json", "per_volume.csv", "per_slice.csv")
#: the columns of :func:`metrics_table`
TABLE_COLUMNS = ("iou", "dice", "recall", "precision", "hd95")


def metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per name, columns :data:`TABLE_COLUMNS` (``-`` for a missing or NaN value).

    Example:
        >>> print(metrics_table({"pooled": {"iou": 0.5, "dice": 2 / 3}}))
                       iou       dice     recall  precision       hd95
        pooled      0.5000     0.6667          -          -          -
    """
    width = max([len(n) for n in rows] + [8])
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>9}" for c in TABLE_COLUMNS)]
    for name, row in rows.items():
        cells = []
        for c in TABLE_COLUMNS:
            v = row.get(c)
            cells.append(f"{v:9.4f}" if isinstance(v, (int, float)) and v == v else f"{'-':>9}")
        lines.append(f"{name:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def evaluation_dir(
    checkpoint: str | os.PathLike, split: str = "test", output_dir: str | os.PathLike | None = None
) -> Path:
    """``output_dir``, else the run's own ``RUN/eval/<split>`` (``RUN/models/model.pt`` -> ``RUN``).

    A bundle folder (a teacher from outside mkd) gets ``BUNDLE/eval/<split>``, as a model-zoo bundle's own
    evaluation writes to ``BUNDLE/eval``.
    """
    if output_dir:
        return Path(output_dir)
    if Path(checkpoint).is_dir():
        return Path(checkpoint).resolve() / "eval" / split
    return Path(checkpoint).resolve().parent.parent / "eval" / split


def check_evaluation_output(output_dir: str | os.PathLike) -> None:
    """Refuse a folder whose :data:`EVALUATION_FILES` exist and are not an earlier evaluation's.

    An evaluation rewrites its three files; an earlier evaluation (a ``summary.json`` with ``pooled``
    and ``per_volume``) is replaced, any other file of those names is kept.

    Raises:
        MkdError: one line naming the first such file.
    """
    out = Path(output_dir)
    existing = [out / name for name in EVALUATION_FILES if (out / name).exists()]
    if not existing:
        return
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not (isinstance(summary, dict) and "pooled" in summary and "per_volume" in summary):
        raise MkdError(f"{existing[0]}: exists and is not from mkd evaluate; evaluate writes "
                       f"{', '.join(EVALUATION_FILES)} into `output_dir`: give it a new folder")  # fmt: skip


def _means(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.get("mean") for k, v in metrics.items() if isinstance(v, dict)}


def evaluation_lines(result: Any) -> list[str]:
    """What an evaluation says: the network and split, the metrics table, per-volume HD95, PSNR.

    Args:
        result: an :class:`mkd.evaluation.EvaluationResult`.
    """
    s = result.summary
    lines = [f"{s['network']['name']} on {s['split']}: {s['slices']} slices of {len(result.segmentation.per_volume)} "
             f"patients, {s['image_size'][0]}x{s['image_size'][1]}"]  # fmt: skip
    rows = {"pooled (thesis)": s["pooled"], "per volume (mean)": _means(s["per_volume"])}
    if "per_volume_lcc" in s:
        rows["per volume, largest comp."] = _means(s["per_volume_lcc"])
    rows["per slice (with organ)"] = _means(s["per_slice_foreground"])
    lines.append(metrics_table(rows))
    if "per_volume_lcc" in s:
        pv = result.segmentation.per_volume[["patient", "dice", "dice_lcc", "hd95", "hd95_lcc"]]
        lines.append("per volume (HD95 in mm; _lcc: largest 3D connected component, as mkd infer):")
        lines.append(pv.to_string(index=False, float_format="%.4f"))
    if "psnr" in s:
        lines.append(f"reconstruction PSNR: {s['psnr']['mean']:.2f} dB")
    return lines
