"""Figures write readable, non-empty PNG files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from mkd.reports import plot_ablation, plot_qualitative, plot_reconstructions, plot_training_curves, summary_table


def _check_png(path, min_bytes: int = 2000) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0  # not a blank canvas
    return img


def test_training_curves(tmp_path):
    log = pd.DataFrame(
        {
            "epoch": range(1, 7),
            "train_loss": [1.0, 0.8, 0.6, 0.5, 0.45, 0.4],
            "val_dice": [np.nan, 0.5, np.nan, 0.7, np.nan, 0.75],  # validated every other epoch
        }
    )
    csv = tmp_path / "log.csv"
    log.to_csv(csv, index=False)
    _check_png(plot_training_curves(csv, tmp_path / "curves.png", title="student"))
    with pytest.raises(ValueError, match="'epoch'"):
        plot_training_curves(log.drop(columns="epoch"), tmp_path / "x.png")


def test_qualitative_and_reconstruction_panels(tmp_path):
    rng = np.random.default_rng(0)
    ct = torch.as_tensor(rng.random((2, 3, 32, 32)), dtype=torch.float32)
    gt = np.zeros((2, 1, 32, 32))
    gt[:, :, 8:20, 10:22] = 1
    student = np.roll(gt, 3, axis=-1)
    masks = {"ground truth": gt, "student": student, "distilled": gt, "teacher": gt}
    out = plot_qualitative(ct, masks, tmp_path / "panels.png", reference="ground truth", row_labels=["a z=1", "a z=2"])
    img = _check_png(out)
    assert img.shape[1] > img.shape[0]  # 5 columns, 2 rows
    with pytest.raises(ValueError, match="reference"):
        plot_qualitative(ct, masks, tmp_path / "bad.png", reference="label")
    recon = (ct + 0.05 * torch.randn_like(ct)).clamp(0, 1)
    _check_png(plot_reconstructions(ct, recon, tmp_path / "recon.png"))


def test_ablation_bars(tmp_path):
    runs = pd.DataFrame(
        {
            "method": ["s1", "s1", "B", "B", "B+PMD", "B+PMD"],
            "baseline": [None, None, "s1", "s1", "s1", "s1"],
            "seed": [0, 1, 0, 1, 0, 1],
            "dice": [0.70, 0.72, 0.75, 0.77, 0.77, 0.78],
        }
    )
    _check_png(plot_ablation(runs, tmp_path / "runs.png", metric="dice", baseline="s1"))
    summary = summary_table(runs, metrics=("dice",))
    _check_png(plot_ablation(summary, tmp_path / "summary.png", metric="dice"))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
