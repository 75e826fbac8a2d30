"""Report figures (PNG, matplotlib without pyplot: no display, no global state).

- :func:`plot_training_curves`: losses, validation metrics and epoch time / learning rate per epoch
  from a CSV log, each on its own axes.
- :func:`plot_qualitative`: the same test slices under CT / ground truth / students / teacher.
- :func:`plot_reconstructions`: a teacher's reconstructions next to its inputs, with PSNR.
- :func:`plot_ablation`: bar chart of a metric per method, mean ± std over seeds.
- :func:`plot_mask_preview`: a mask over its CT at three axial levels (``mkd infer --preview``).

Every slice is shown in the **radiological convention** (anterior up, the patient's right on the
image's left) by one function, :func:`radiological`, from RAS-ordered arrays (``mkd prepare``
stores slices in RAS order; :func:`to_ras` reorients any volume by its affine).

Each function writes its PNG atomically and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "plot_training_curves",
    "training_curve_panels",
    "plot_qualitative",
    "plot_reconstructions",
    "plot_ablation",
    "plot_mask_preview",
    "preview_panels",
    "radiological",
    "to_ras",
]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | PathLike) -> Path:
    from mkd.utils import atomic_file

    path = Path(path)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        return x.float().numpy()
    return np.asarray(x)


def _gray(images: Any) -> np.ndarray:
    """``(N, H, W)`` from ``(N, C, H, W)`` (middle channel) or ``(N, H, W)`` / ``(H, W)``."""
    a = _numpy(images).astype(np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4:
        a = a[:, a.shape[1] // 2]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, C, H, W), (N, H, W) or (H, W), got shape {a.shape}")
    return a


def radiological(slices: Any) -> np.ndarray:
    """Axial slice(s) for display in the radiological convention: anterior up, patient's right on the left.

    Args:
        slices: array ``(..., X, Y)`` whose last two axes are RAS-ordered (index increasing to the
            patient's right and anterior), as ``mkd prepare`` stores slices and :func:`to_ras` gives.

    Returns:
        ``(..., Y, X)``: row 0 is the most anterior row, column 0 the patient's rightmost column
        (``imshow`` draws row 0 at the top).
    """
    a = np.asarray(slices)
    return np.swapaxes(a[..., ::-1, ::-1], -1, -2)


def to_ras(volume: Any, affine: Any) -> np.ndarray:
    """A 3D volume reoriented (exact flips and axis swaps, nibabel) to RAS voxel order by its affine."""
    import nibabel as nib

    data = _numpy(volume)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.apply_orientation(data, nib.orientations.ornt_transform(ornt, ras))


def preview_panels(ct: Any, mask: Any, affine: Any, levels: int = 3) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The axial panels of :func:`plot_mask_preview`: ``(ct, mask, z)`` per level, in display orientation.

    The levels are spread over the mask's axial extent (25, 50 and 75 % of the slices that hold
    foreground, for ``levels=3``), or over the whole volume when the mask is empty; ``z`` is the
    RAS slice index (0 = most inferior).
    """
    ct_ras = to_ras(ct, affine).astype(np.float32)
    mask_ras = to_ras(mask, affine) > 0
    if ct_ras.shape != mask_ras.shape:
        raise ValueError(f"mask shape {mask_ras.shape} differs from the CT's {ct_ras.shape}")
    zs = np.flatnonzero(mask_ras.any(axis=(0, 1)))
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, ct_ras.shape[2] - 1)
    picks = sorted({int(round(lo + (hi - lo) * (i + 1) / (levels + 1))) for i in range(levels)})
    return [(radiological(ct_ras[:, :, z]), radiological(mask_ras[:, :, z]), z) for z in picks]


def plot_mask_preview(
    ct: Any,
    mask: Any,
    affine: Any,
    path: str | PathLike,
    *,
    levels: int = 3,
    window: tuple[float, float] = (-160.0, 240.0),
    title: str | None = None,
) -> Path:
    """A mask (red) over its CT at ``levels`` axial levels, radiological convention (see :func:`preview_panels`).

    Args:
        ct: the CT volume (HU), any voxel order.
        mask: the mask, same grid.
        affine: the volume's voxel-to-world (RAS mm) affine.
        path: PNG to write.
        levels: number of axial levels.
        window: HU shown black..white (default: abdomen, W 400 L 40).
        title: figure title.

    Returns:
        ``path``.
    """
    panels = preview_panels(ct, mask, affine, levels)
    fig = _figure(3.0 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (img, m, z) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        overlay = np.zeros((*m.shape, 4), dtype=np.float32)
        overlay[m] = (1.0, 0.1, 0.1, 0.45)
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(f"axial z={z}, {int(m.sum())} voxels", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
        ax.text(0.5, 0.98, "A", transform=ax.transAxes, color="yellow", fontsize=9, ha="center", va="top")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


#: columns of a training log drawn on the time / learning-rate panel (``EpochCSVLogger`` writes these two)
_TIME_COLUMNS = ("epoch_time_s",)
_RATE_COLUMNS = ("lr", "learning_rate")


def training_curve_panels(history: pd.DataFrame, x: str = "epoch") -> dict[str, list[str]]:
    """Which panel of :func:`plot_training_curves` each numeric column of a training log goes to.

    Columns whose name contains ``loss`` or starts with ``train_`` (the named loss terms ``EpochCSVLogger``
    writes, e.g. ``train_infonce``) go to ``"loss"``, the epoch's wall time (``epoch_time_s``) and
    the learning rate (``lr``) to ``"time / learning rate"`` (seconds on the left axis, the rate on the
    right), every other numeric column to ``"metric"``. Panels without a column are left out; columns
    that are all empty are not drawn.

    Example:
        >>> log = pd.DataFrame({"epoch": [1], "train_loss": [0.9], "lr": [0.01], "val_pooled_dice": [0.5]})
        >>> training_curve_panels(log)
        {'loss': ['train_loss'], 'metric': ['val_pooled_dice'], 'time / learning rate': ['lr']}
    """
    cols = [
        c for c in history.columns if c != x and pd.api.types.is_numeric_dtype(history[c]) and history[c].notna().any()
    ]
    schedule = [c for c in cols if c in _TIME_COLUMNS or c in _RATE_COLUMNS]
    losses = [c for c in cols if ("loss" in c.lower() or c.startswith("train_")) and c not in schedule]
    metrics = [c for c in cols if c not in losses and c not in schedule]
    panels = {"loss": losses, "metric": metrics, "time / learning rate": schedule}
    return {name: group for name, group in panels.items() if group}


def _draw(ax: Any, df: pd.DataFrame, x: str, columns: Sequence[str], label: str, color_offset: int = 0) -> list:
    lines = []
    for i, c in enumerate(columns):
        sel = df[[x, c]].dropna()
        lines += ax.plot(sel[x], sel[c], marker="o" if len(sel) < 30 else None, markersize=3, label=c,
                         color=f"C{i + color_offset}")  # fmt: skip
    ax.set_ylabel(label)
    return lines


def plot_training_curves(
    history: pd.DataFrame | str | PathLike,
    path: str | PathLike,
    *,
    x: str = "epoch",
    title: str | None = None,
) -> Path:
    """Training curves: losses, metrics, and epoch time with the learning rate, each panel its own y-axis.

    The panels are those of :func:`training_curve_panels`: loss columns; validation metrics; the
    epoch's wall time (seconds, left axis) with the learning rate (right axis, a twin axis).
    Quantities of different units never share a y-axis.

    Args:
        history: per-epoch log (DataFrame or CSV path) with an ``x`` column, e.g.
            ``epoch, train_loss, epoch_time_s, lr, val_pooled_dice``. Empty cells (metrics logged only
            every few epochs) are skipped, not drawn as zero.
        path: PNG to write.
        x: the column for the horizontal axis.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``x`` is missing or there is nothing to plot.
    """
    df = pd.read_csv(history) if not isinstance(history, pd.DataFrame) else history
    if x not in df.columns:
        raise ValueError(f"training log lacks the {x!r} column; it has {list(df.columns)}")
    panels = training_curve_panels(df, x)
    if not panels:
        raise ValueError(f"training log has no numeric columns besides {x!r}")
    fig = _figure(5.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, group) in zip(axes, panels.items()):
        if name == "time / learning rate":
            time_cols = [c for c in group if c in _TIME_COLUMNS]
            rate_cols = [c for c in group if c in _RATE_COLUMNS]
            lines = _draw(ax, df, x, time_cols or rate_cols, "epoch time (s)" if time_cols else "learning rate")
            if time_cols and rate_cols:
                lines += _draw(ax.twinx(), df, x, rate_cols, "learning rate", color_offset=len(time_cols))
            ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
        else:
            _draw(ax, df, x, group, name)
            ax.legend(fontsize=8)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_qualitative(
    images: Any,
    masks: Mapping[str, Any],
    path: str | PathLike,
    *,
    reference: str | None = None,
    row_labels: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> Path:
    """Grid of slices (rows) × CT and each mask overlaid on it (columns), in the radiological convention.

    Args:
        images: CT slices ``(N, C, H, W)`` (the middle channel is shown) or ``(N, H, W)``, RAS-ordered
            (``H`` = x, ``W`` = y, as ``mkd prepare`` stores them); shown with :func:`radiological`.
        masks: column title → masks ``(N, 1, H, W)`` or ``(N, H, W)`` for the same slices, in
            display order, e.g. ``{"ground truth": y, "student": s, "distilled": d, "teacher": t}``.
        path: PNG to write.
        reference: a key of ``masks`` (usually the ground truth) whose outline is drawn in
            green over the other columns' red masks.
        row_labels: one label per slice (e.g. ``"spleen_3 z=41"``).
        threshold: masks are shown where ``>= threshold``.

    Returns:
        ``path``.
    """
    ct = radiological(_gray(images))
    n = ct.shape[0]
    cols = {k: radiological(_gray(v) >= threshold) for k, v in masks.items()}
    for k, v in cols.items():
        if v.shape != ct.shape:
            raise ValueError(f"masks[{k!r}] has shape {v.shape}; the images are {ct.shape}")
    if reference is not None and reference not in cols:
        raise ValueError(f"reference {reference!r} is not one of the masks {list(cols)}")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"got {len(row_labels)} row labels for {n} slices")
    titles = ["CT", *cols]
    fig = _figure(2.2 * len(titles), 2.2 * n + 0.3)
    axes = fig.subplots(n, len(titles), squeeze=False)
    red = np.zeros((*ct.shape[1:], 4), dtype=np.float32)
    for i in range(n):
        for j, name in enumerate(titles):
            ax = axes[i, j]
            ax.imshow(ct[i], cmap="gray", interpolation="nearest")
            if j > 0:
                overlay = red.copy()
                overlay[cols[name][i]] = (1.0, 0.1, 0.1, 0.45)
                ax.imshow(overlay, interpolation="nearest")
                if reference is not None and name != reference and cols[reference][i].any():
                    ax.contour(cols[reference][i].astype(np.float32), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=8)
    return _save(fig, path)


def plot_reconstructions(
    images: Any,
    recons: Any,
    path: str | PathLike,
    *,
    data_range: float = 1.0,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Teacher reconstructions: rows = slices, columns = input, reconstruction, |difference|.

    Slices are RAS-ordered (as ``mkd prepare`` stores them) and shown with :func:`radiological`.

    Each row is titled with its PSNR (dB, over all channels, :func:`mkd.metrics.psnr`).

    Args:
        images: inputs ``(N, C, H, W)`` or ``(N, H, W)`` in ``[0, data_range]``.
        recons: reconstructions, same shape.
        path: PNG to write.
        data_range: intensity range, for the PSNR and the grey scale.
        row_labels: one label per slice.

    Returns:
        ``path``.
    """
    from mkd.metrics.reconstruction import psnr

    x, r = _numpy(images).astype(np.float32), _numpy(recons).astype(np.float32)
    if x.shape != r.shape:
        raise ValueError(f"images and recons must have the same shape, got {x.shape} and {r.shape}")
    if x.ndim == 2:
        x, r = x[None], r[None]
    values = psnr(r, x, data_range=data_range, reduction="none")
    gx, gr = radiological(_gray(x)), radiological(_gray(r))
    n = gx.shape[0]
    fig = _figure(6.6, 2.2 * n + 0.3)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        panels = (("input", gx[i], "gray", 0.0, data_range), ("reconstruction", gr[i], "gray", 0.0, data_range))
        panels += (("|difference|", np.abs(gx[i] - gr[i]), "magma", 0.0, None),)
        for j, (name, img, cmap, lo, hi) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        label = f"PSNR {values[i]:.1f} dB"
        if row_labels is not None:
            label = f"{row_labels[i]}\n{label}"
        axes[i, 0].set_ylabel(label, fontsize=8)
    return _save(fig, path)


def plot_ablation(
    table: pd.DataFrame,
    path: str | PathLike,
    *,
    metric: str = "dice",
    method: str = "method",
    baseline: str | None = None,
    title: str | None = None,
) -> Path:
    """Bar chart of ``metric`` per method, mean ± std over seeds as error bars.

    Args:
        table: either a tidy runs table (``method`` and ``metric`` columns, one row per run)
            or a :func:`mkd.reports.tables.summary_table` (``<metric>_mean`` / ``_std``).
        path: PNG to write.
        metric: the metric to plot.
        method: the method column.
        baseline: a method name drawn as a dashed horizontal reference line.
        title: axes title (default: the metric).

    Returns:
        ``path``.
    """
    if f"{metric}_mean" in table.columns:
        names = table[method].astype(str).tolist()
        means = table[f"{metric}_mean"].to_numpy(dtype=float)
        stds = table[f"{metric}_std"].to_numpy(dtype=float) if f"{metric}_std" in table else np.full(len(names), np.nan)
    elif metric in table.columns:
        g = table.groupby(method, sort=False)[metric]
        names = [str(m) for m in g.mean().index]
        means = g.mean().to_numpy(dtype=float)
        stds = g.std(ddof=1).to_numpy(dtype=float)
    else:
        raise ValueError(f"table has neither {metric!r} nor {metric + '_mean'!r}; columns: {list(table.columns)}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {names}")
    fig = _figure(max(4.0, 0.7 * len(names) + 1.5), 3.8)
    ax = fig.subplots()
    pos = np.arange(len(names))
    colors = ["#888888" if m == baseline else "#3b75af" for m in names]
    ax.bar(pos, means, yerr=np.nan_to_num(stds), capsize=4, color=colors)
    for p, m in zip(pos, means):
        if np.isfinite(m):
            ax.annotate(f"{m:.3f}", (p, m), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    if baseline is not None:
        ax.axhline(means[names.index(baseline)], color="#555555", linestyle="--", linewidth=1, label=baseline)
        ax.legend(fontsize=8)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_gap_recovered(
    table: pd.DataFrame,
    path: str | PathLike,
    *,
    metrics: Sequence[str] = ("dice", "volume_dice"),
    target: float = 0.5,
    title: str | None = None,
) -> Path:
    """Share of the teacher-student gap recovered by each distilled method, ``(KD - S) / (T - S)``.

    Args:
        table: output of :func:`mkd.reports.tables.gap_table`.
        path: PNG to write.
        metrics: the metrics whose ``<m>_recovered`` column is drawn (one bar each per method).
        target: drawn as a dashed reference line (the issue's stretch goal is 0.5).
        title: axes title.

    Returns:
        ``path``.

    Raises:
        ValueError: an empty table or a missing column.
    """
    cols = [f"{m}_recovered" for m in metrics]
    missing = [c for c in cols if c not in table.columns]
    if table.empty or missing:
        raise ValueError(f"no gap to plot (rows {len(table)}, missing columns {missing})")
    names = table["method"].astype(str).tolist()
    fig = _figure(6.5, max(2.5, 0.45 * len(names) * len(cols) + 1.2))
    ax = fig.subplots()
    height = 0.8 / len(cols)
    pos = np.arange(len(names))
    for i, (metric, col) in enumerate(zip(metrics, cols)):
        values = table[col].to_numpy(dtype=float)
        y = pos + (i - (len(cols) - 1) / 2) * height
        ax.barh(y, np.nan_to_num(values), height=height, label=metric)
        for yy, v in zip(y, values):
            ax.annotate("n/a" if not np.isfinite(v) else f"{v:+.2f}", (np.nan_to_num(v), yy), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)  # fmt: skip
    ax.axvline(0.0, color="#333333", linewidth=1)
    ax.axvline(target, color="#aa3333", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_yticks(pos)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("(KD - S) / (T - S): 0 = baseline student, 1 = teacher")
    ax.set_title(title or "teacher-student gap recovered", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
