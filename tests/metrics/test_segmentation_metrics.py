"""Segmentation metrics against masks whose answers are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mkd.errors import InputError
from mkd.metrics import (
    SegmentationAccumulator,
    flatten_summary,
    hausdorff_distance,
    keep_largest_component,
    metrics_from_counts,
    per_slice_metrics,
    per_volume_metrics,
    pooled_metrics,
)


def _slice_3_of_4_plus_fp(n_fp: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """4x4 label with 4 pixels; prediction covers 3 of them plus ``n_fp`` false positives."""
    label = np.zeros((4, 4), dtype=np.uint8)
    label[0:2, 0:2] = 1
    pred = np.zeros((4, 4), dtype=np.float32)
    pred[0, 0] = pred[0, 1] = pred[1, 0] = 1  # (1, 1) missed: FN = 1
    for i in range(n_fp):
        pred[3, 3 - i] = 1
    return pred, label


def test_pooled_metrics_hand_counts():
    pred, label = _slice_3_of_4_plus_fp(1)  # TP 3, FP 1, FN 1
    m = pooled_metrics(pred, label)
    assert m["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert m["iou"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 4)

    pred, label = _slice_3_of_4_plus_fp(2)  # TP 3, FP 2, FN 1
    m = pooled_metrics(torch.as_tensor(pred)[None, None], torch.as_tensor(label)[None, None])
    assert m == pytest.approx({"dice": 6 / 9, "iou": 3 / 6, "recall": 3 / 4, "precision": 3 / 5})


def test_threshold_binarises_probabilities():
    pred, label = _slice_3_of_4_plus_fp(1)
    prob = np.where(pred > 0, 0.9, 0.2)
    assert pooled_metrics(prob, label) == pytest.approx(pooled_metrics(pred, label))
    assert pooled_metrics(prob, label, threshold=0.95)["dice"] == 0.0


def test_empty_mask_conventions():
    empty, full = np.zeros((4, 4)), np.ones((4, 4))
    assert pooled_metrics(empty, empty) == {"iou": 1.0, "dice": 1.0, "recall": 1.0, "precision": 1.0}
    missed = pooled_metrics(empty, full)  # organ present, nothing predicted
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and missed["recall"] == 0.0
    assert math.isnan(missed["precision"])
    spurious = pooled_metrics(full, empty)  # nothing to find, something predicted
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0 and math.isnan(spurious["recall"])
    assert math.isnan(hausdorff_distance(empty, full)) and math.isnan(hausdorff_distance(empty, empty))


def test_metrics_from_counts_elementwise():
    m = metrics_from_counts(np.array([3, 0, 0]), np.array([1, 0, 2]), np.array([1, 0, 0]))
    np.testing.assert_allclose(m["dice"], [0.75, 1.0, 0.0])
    assert math.isnan(m["recall"][2]) and m["precision"][2] == 0.0


def test_per_slice_rows():
    pred, label = _slice_3_of_4_plus_fp(1)
    preds = np.stack([pred, np.zeros_like(pred)])[:, None]
    labels = np.stack([label, np.zeros_like(label)])[:, None]
    df = per_slice_metrics(preds, labels, patients=["a", "a"], zs=torch.tensor([7, 8]))
    assert list(df["z"]) == [7, 8] and list(df["patient"]) == ["a", "a"]
    assert df.loc[0, ["tp", "fp", "fn", "label_voxels", "pred_voxels"]].tolist() == [3, 1, 1, 4, 4]
    assert df.loc[0, "dice"] == pytest.approx(0.75)
    assert df.loc[1, "dice"] == 1.0  # both empty


def _two_volumes():
    """Patient 'big': 2 slices x 50 label voxels, all found. Patient 'small': 2 x 5 voxels, 1 found each."""
    preds, labels, pats, zs = [], [], [], []
    for z in (0, 1):
        y = np.zeros((10, 10), np.uint8)
        y[:5] = 1
        preds.append(y.copy())
        labels.append(y)
        pats.append("big")
        zs.append(z)
    for z in (3, 4):
        y = np.zeros((10, 10), np.uint8)
        y[0, :5] = 1
        p = np.zeros_like(y)
        p[0, 0] = 1
        preds.append(p)
        labels.append(y)
        pats.append("small")
        zs.append(z)
    return np.stack(preds)[:, None], np.stack(labels)[:, None], pats, zs


def test_pooled_and_per_volume_differ():
    pred, label, pats, zs = _two_volumes()
    # pooled: TP = 100 + 2, FP = 0, FN = 8
    pooled = pooled_metrics(pred, label)
    assert pooled["dice"] == pytest.approx(204 / 212)  # 0.962: looks excellent
    assert pooled["recall"] == pytest.approx(102 / 110)
    vol = per_volume_metrics(pred, label, pats, zs)
    assert list(vol["patient"]) == ["big", "small"]
    assert vol["dice"].tolist() == pytest.approx([1.0, 4 / 12])  # small: 2*2 / (2*2 + 0 + 8)
    assert vol["dice"].mean() == pytest.approx(2 / 3)  # 0.667: the small volume is badly segmented
    assert vol["recall"].mean() == pytest.approx((1.0 + 0.2) / 2)
    assert vol["n_slices"].tolist() == [2, 2] and vol["z_min"].tolist() == [0, 3]


def test_accumulator_streams_batches_in_any_order():
    pred, label, pats, zs = _two_volumes()
    acc = SegmentationAccumulator()
    order = [3, 0, 2, 1]
    for lo, hi in ((0, 1), (1, 4)):  # two batches, patients interleaved
        idx = order[lo:hi]
        acc.update(
            torch.as_tensor(pred[idx]), torch.as_tensor(label[idx]), [pats[i] for i in idx], [zs[i] for i in idx]
        )
    assert len(acc) == 4
    res = acc.compute()
    assert res.pooled["dice"] == pytest.approx(204 / 212)
    assert res.per_volume["dice"].tolist() == pytest.approx([1.0, 1 / 3])
    assert res.per_slice[["patient", "z"]].values.tolist() == [["big", 0], ["big", 1], ["small", 3], ["small", 4]]
    s = res.summary
    assert s["per_volume"]["dice"]["mean"] == pytest.approx(2 / 3) and s["per_volume"]["dice"]["n"] == 2
    assert s["n_volumes"] == 2 and s["n_slices"] == 4 and s["hd95_unit"] == "voxel"
    flat = flatten_summary(s)
    assert flat["dice"] == pytest.approx(204 / 212) and flat["volume_dice"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="already added"):
        acc.update(pred[:1], label[:1], ["big"], [0])


def test_accumulator_write(tmp_path):
    pred, label, pats, zs = _two_volumes()
    acc = SegmentationAccumulator(spacing=1.5)
    acc.update(pred, label, pats, zs)
    paths = acc.compute().write(tmp_path / "eval")
    summary = json.loads(paths["summary"].read_text())
    assert summary["hd95_unit"] == "mm" and summary["per_volume"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert len(pd.read_csv(paths["per_volume"])) == 2 and len(pd.read_csv(paths["per_slice"])) == 4


def test_accumulator_gaps_in_z():
    pred, label, pats, zs = _two_volumes()
    zs = [0, 2, 3, 4]  # patient 'big' lacks z = 1
    acc = SegmentationAccumulator()
    acc.update(pred, label, pats, zs)
    with pytest.raises(InputError, match="'big'.*missing.*z = 1"):
        acc.compute()
    acc = SegmentationAccumulator(fill_missing=True)
    acc.update(pred, label, pats, zs)
    vol = acc.compute().per_volume
    assert vol["filled_slices"].tolist() == [1, 0] and vol["dice"].tolist() == pytest.approx([1.0, 1 / 3])


def test_per_volume_matches_monai_dice_and_iou():
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    label = rng.random((2, 6, 12, 12)) < 0.3
    pred = label ^ (rng.random(label.shape) < 0.15)
    slices_p, slices_y = pred.reshape(-1, 12, 12), label.reshape(-1, 12, 12)
    pats = ["p0"] * 6 + ["p1"] * 6
    zs = list(range(6)) * 2
    ours = per_volume_metrics(slices_p, slices_y, pats, zs)
    tp, ty = torch.as_tensor(pred[:, None]).float(), torch.as_tensor(label[:, None]).float()
    np.testing.assert_allclose(ours["dice"], compute_dice(tp, ty, include_background=True).reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(ours["iou"], compute_iou(tp, ty, include_background=True).reshape(-1), rtol=1e-6)


def _cube(shift_z: int = 0) -> np.ndarray:
    v = np.zeros((10, 10, 10), dtype=bool)
    v[2 + shift_z : 6 + shift_z, 2:6, 2:6] = True
    return v


def test_hd95_shifted_cube_with_spacing():
    # 4^3 cube shifted by one slice. Pred surface: its top face (16 of 56 surface voxels, > 5%)
    # is one slice from the label's top face, the rest is 0 or one in-plane voxel away.
    # So HD95 = one slice thickness when slices are the coarse axis.
    label, pred = _cube(), _cube(shift_z=1)
    assert hausdorff_distance(pred, label) == pytest.approx(1.0)
    assert hausdorff_distance(pred, label, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    # in-plane voxels of 2 mm, slices of 1 mm: the shift is 1 mm, nothing is further
    assert hausdorff_distance(pred, label, spacing=(1.0, 2.0, 2.0)) == pytest.approx(1.0)


def test_hd95_ignores_a_lone_outlier_but_max_does_not():
    label = _cube()
    pred = label.copy()
    pred[9, 4, 4] = True  # 1 of 57 surface voxels, 4 slices above the top face (z = 5)
    assert hausdorff_distance(pred, label, spacing=(2.0, 1.0, 1.0)) == pytest.approx(0.0)
    assert hausdorff_distance(pred, label, spacing=(2.0, 1.0, 1.0), percentile=None) == pytest.approx(8.0)


def test_accumulator_hd95_uses_z_y_x_spacing_per_patient():
    label, pred = _cube(), _cube(shift_z=1)
    acc = SegmentationAccumulator(spacing={"a": (2.0, 1.0, 1.0), "b": (1.0, 2.0, 2.0)})
    zs = list(range(10))
    acc.update(pred[:, None], label[:, None], ["a"] * 10, zs)
    acc.update(pred[:, None], label[:, None], ["b"] * 10, zs)
    res = acc.compute()
    assert res.per_volume.set_index("patient")["hd95"].to_dict() == pytest.approx({"a": 2.0, "b": 1.0})
    acc = SegmentationAccumulator(spacing={"a": (2.0, 1.0, 1.0)})
    acc.update(pred[:, None], label[:, None], ["c"] * 10, zs)
    with pytest.raises(InputError, match="no voxel spacing"):
        acc.compute()


def test_accumulator_reports_undefined_hd95():
    y = np.zeros((3, 1, 8, 8))
    y[:, :, 2:5, 2:5] = 1
    acc = SegmentationAccumulator()
    acc.update(np.zeros_like(y), y, ["a"] * 3, [0, 1, 2])  # nothing predicted
    s = acc.compute().summary
    assert s["hd95_undefined"] == 1 and s["per_volume"]["hd95"] == {"mean": None, "std": None, "n": 0}
    assert s["per_volume"]["precision"]["n"] == 0 and s["per_volume"]["dice"]["mean"] == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="one channel"):
        per_slice_metrics(np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        pooled_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="3 entries for 2 slices"):
        per_volume_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), ["a", "a", "a"], [0, 1])


def test_largest_component_filter_removes_a_far_island_and_its_hd95():
    """Label: a 3x3x3 cube at z 2..4. Prediction: the cube plus a 2x2x2 island at z 20..21, in the cube's rows.

    Directed distances pred -> label surface (z spacing 2 mm): 26 cube-surface voxels at 0, the island's
    4 voxels at z=20 at 16 slices = 32 mm and 4 at z=21 at 34 mm; the 95th percentile of those 34 values
    (index 0.95 * 33 = 31.35, between two 34s) is 34 mm; label -> pred is 0. With the filter the island goes:
    HD95 0, Dice 1. Without it Dice = 2 * 27 / (35 + 27).
    """
    label = np.zeros((24, 6, 6), bool)
    label[2:5, 1:4, 1:4] = True
    pred = label.copy()
    pred[20:22, 1:3, 1:3] = True
    patients, zs = ["p"] * 24, list(range(24))
    acc = SegmentationAccumulator(spacing=(2.0, 1.0, 1.0), lcc=True)
    acc.update(pred, label, patients, zs)
    result = acc.compute()
    row = result.per_volume.iloc[0]
    assert row["hd95"] == pytest.approx(34.0)
    assert row["dice"] == pytest.approx(54 / 62)
    assert row["hd95_lcc"] == 0.0 and row["dice_lcc"] == 1.0 and row["pred_voxels_lcc"] == 27
    assert result.summary["per_volume_lcc"]["hd95"]["mean"] == 0.0
    flat = flatten_summary(result.summary)
    assert flat["volume_hd95"] == pytest.approx(34.0) and flat["volume_hd95_lcc"] == 0.0
    assert np.array_equal(keep_largest_component(pred), label.astype(np.uint8))
    # without lcc=True the columns are absent (other users of the accumulator are unchanged)
    plain = SegmentationAccumulator(spacing=(2.0, 1.0, 1.0))
    plain.update(pred, label, patients, zs)
    assert "hd95_lcc" not in plain.compute().per_volume.columns


def _monai_largest_component(mask: np.ndarray) -> np.ndarray:
    """The former implementation of keep_largest_component: MONAI over the whole grid."""
    from monai.transforms import KeepLargestConnectedComponent

    arr = np.asarray(mask).astype(np.uint8)
    if not arr.any():
        return arr
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=None)
    return np.asarray(torch.as_tensor(keep(torch.as_tensor(arr)[None]))[0]).astype(np.uint8)


def _lcc_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Masks with a known largest component: (mask, expected)."""
    cases = {}
    m = np.zeros((20, 18, 16), np.uint8)
    m[2:8, 2:8, 2:8] = 1  # 216 voxels
    m[12:15, 12:15, 10:13] = 1  # 27 voxels
    cases["two blobs"] = (m, np.where(np.arange(20)[:, None, None] < 10, m, 0).astype(np.uint8))
    m = np.zeros((12, 12, 12), np.uint8)
    m[1:4, 1:4, 1:4] = 1  # 27 voxels
    m[4:6, 4:6, 4:6] = 1  # 8 voxels touching the cube at one corner only: joined by 26-connectivity
    m[9:11, 9:11, 1:9] = 1  # 32 voxels: the largest under 6-connectivity, not under 26 (27 + 8 = 35)
    expected = m.copy()
    expected[9:11, 9:11, 1:9] = 0
    cases["corner contact"] = (m, expected)
    cases["empty"] = (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8))
    m = np.zeros((10, 10, 10), np.uint8)
    m[1:3, 1:3, 1:3] = 1
    m[6:8, 6:8, 6:8] = 1  # the same size: the one labelled last (first voxel last in C order) is kept
    expected = m.copy()
    expected[1:3, 1:3, 1:3] = 0
    cases["tie"] = (m, expected)
    m = np.zeros((10, 10, 10), np.uint8)
    m[0:4, 0:4, 0:4] = 1
    m[7:9, 7:9, 7:9] = 1
    m[5, 5, 5] = 2  # not foreground: kept as is, as MONAI does
    expected = m.copy()
    expected[7:9, 7:9, 7:9] = 0
    cases["other values"] = (m, expected)
    return cases


@pytest.mark.parametrize("name", list(_lcc_cases()))
def test_largest_component_matches_monai_on_known_masks(name):
    mask, expected = _lcc_cases()[name]
    out = keep_largest_component(mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, _monai_largest_component(mask))
    # 6-connectivity would have kept the long bar: the filter is 26-connected
    if name == "corner contact":
        from scipy import ndimage

        labels, n = ndimage.label(mask)
        assert n == 3


def test_largest_component_matches_monai_on_random_masks():
    rng = np.random.default_rng(0)
    for k in range(6):
        from scipy import ndimage

        noise = ndimage.gaussian_filter(rng.normal(size=(40, 36, 24)), 2.0)
        mask = (noise > 0.05 + 0.02 * k).astype(np.uint8)
        mask[:3] = 0  # the bounding box is smaller than the grid
        np.testing.assert_array_equal(keep_largest_component(mask), _monai_largest_component(mask))
        np.testing.assert_array_equal(
            keep_largest_component(torch.as_tensor(mask.astype(bool))), _monai_largest_component(mask)
        )
