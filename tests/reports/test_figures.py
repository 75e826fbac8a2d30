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


def test_training_curves_put_losses_metrics_and_time_with_learning_rate_on_separate_axes(tmp_path):
    """Epoch time (seconds), learning rate (1e-2) and Dice shared one y-axis: the metrics were a flat line."""
    log = pd.DataFrame(  # the columns EpochCSVLogger writes for a distilled student
        {
            "epoch": [1, 2, 3],
            "train_loss": [1.2, 0.9, 0.7],
            "train_infonce": [3.1, 2.5, 2.2],
            "epoch_time_s": [41.0, 39.5, 40.2],
            "lr": [0.01, 0.0075, 0.0025],
            "val_pooled_dice": [0.4, 0.55, 0.6],
            "note": ["a", "b", "c"],  # not numeric: not drawn
        }
    )
    img = _check_png(plot_training_curves(log, tmp_path / "curves.png"))
    assert img.shape[1] == 3 * 500  # three panels of 5 inches at 100 dpi
    from mkd.reports.figures import training_curve_panels

    assert training_curve_panels(log) == {
        "loss": ["train_loss", "train_infonce"],
        "metric": ["val_pooled_dice"],
        "time / learning rate": ["epoch_time_s", "lr"],
    }
    assert training_curve_panels(log[["epoch", "val_pooled_dice"]]) == {"metric": ["val_pooled_dice"]}


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


def _marker_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 40x30x12 RAS volume (1 mm) with a bright blob in the patient's anterior right (high x, high y)."""
    vol = np.full((40, 30, 12), -1000.0, np.float32)
    vol[5:35, 4:26, :] = 40.0  # the "body"
    vol[29:34, 20:25, 2:10] = 1000.0  # anterior right, z 2..9
    return vol, np.diag([1.0, 1.0, 1.0, 1.0])


def _quadrant(img: np.ndarray) -> str:
    rows, cols = np.nonzero(img)
    r, c = rows.mean() / img.shape[0], cols.mean() / img.shape[1]
    return ("upper" if r < 0.5 else "lower") + "-" + ("left" if c < 0.5 else "right")


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIL", "SLA"])
def test_axial_panels_show_anterior_up_and_the_patients_right_on_the_left(tmp_path, codes, monkeypatch):
    import nibabel as nib
    from matplotlib.axes import Axes

    from mkd.reports import plot_mask_preview, preview_panels

    vol, affine = _marker_volume()
    img = nib.Nifti1Image(vol, affine)
    now = nib.orientations.io_orientation(img.affine)
    img = img.as_reoriented(nib.orientations.ornt_transform(now, nib.orientations.axcodes2ornt(tuple(codes))))
    data, aff = np.asarray(img.dataobj), img.affine
    assert nib.aff2axcodes(aff) == tuple(codes)
    mask = (data > 500).astype(np.uint8)
    panels = preview_panels(data, mask, aff)
    assert [z for *_, z in panels] == [4, 6, 7]  # 25, 50, 75 % of the blob's z 2..9: 3.75, 5.5, 7.25
    for ct2d, m2d, _ in panels:
        assert ct2d.shape == (30, 40) and _quadrant(m2d) == "upper-left" and _quadrant(ct2d > 500) == "upper-left"
    shown = []
    monkeypatch.setattr(Axes, "imshow", lambda self, x, *a, **k: shown.append(np.asarray(x)))
    plot_mask_preview(data, mask, aff, tmp_path / "preview.png")
    assert len(shown) == 6 and all(_quadrant(s > 500) == "upper-left" for s in shown[0::2])
    assert all(_quadrant(s[..., 3] > 0) == "upper-left" for s in shown[1::2])  # the red overlay's alpha


def test_qualitative_and_reconstruction_panels_are_radiological(tmp_path, monkeypatch):
    """Prepared slices are RAS (rows = x, columns = y): a blob at high x, high y must be drawn upper left."""
    from matplotlib.axes import Axes

    from mkd.reports import radiological

    ct = np.zeros((1, 3, 40, 30), np.float32)
    ct[..., 29:34, 20:25] = 1.0
    assert _quadrant(radiological(ct[0, 1])) == "upper-left"
    shown = []
    monkeypatch.setattr(Axes, "imshow", lambda self, x, *a, **k: shown.append(np.asarray(x)))
    monkeypatch.setattr(Axes, "contour", lambda self, *a, **k: None)
    plot_qualitative(ct, {"ground truth": ct[:, 1:2]}, tmp_path / "q.png")
    assert shown[0].shape == (30, 40) and _quadrant(shown[0] > 0.5) == "upper-left"
    assert _quadrant(shown[2][..., 3] > 0) == "upper-left"
    shown.clear()
    plot_reconstructions(ct, ct, tmp_path / "r.png")
    assert _quadrant(shown[0] > 0.5) == "upper-left" and _quadrant(shown[1] > 0.5) == "upper-left"
