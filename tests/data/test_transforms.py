"""The volume pipeline's numbers, checked by hand: window, max scaling, 2.5D channels, label selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mkd.data.transforms import LoadSliced, Windowd, parse_window, volume_to_slices, volume_transforms


def test_window_maps_hu_linearly_and_clips(tmp_path):
    from conftest import write_nifti

    hu = np.array([-1000, -57, 53.5, 164, 1000], np.float32)
    vol = np.broadcast_to(hu[:, None, None], (5, 2, 3)).copy()
    write_nifti(tmp_path / "ct.nii.gz", vol)
    out = volume_transforms(keys=("image",), size=None)({"image": str(tmp_path / "ct.nii.gz")})["image"]
    assert out.shape == (1, 5, 2, 3)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0, 0, 0.5, 1, 1], atol=1e-6)
    custom = volume_transforms(keys=("image",), size=None, window=(0, 100))({"image": str(tmp_path / "ct.nii.gz")})
    np.testing.assert_allclose(custom["image"][0, :, 0, 0].numpy(), [0, 0, 0.535, 1, 1], atol=1e-6)
    maxed = volume_transforms(keys=("image",), size=None, window="max")({"image": str(tmp_path / "ct.nii.gz")})
    np.testing.assert_allclose(maxed["image"][0, :, 0, 0].numpy(), [0, 0, 0.0535, 0.164, 1], atol=1e-6)


def test_windowd_equals_monai_scale_intensity_range_bit_for_bit_and_leaves_its_input():
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRanged

    g = torch.Generator().manual_seed(0)
    hu = torch.randn(1, 37, 29, 11, generator=g) * 400 + 50  # most values outside [-57, 164]
    hu[0, 0, 0, :4] = torch.tensor([-57.0, 164.0, 53.5, float("nan")])
    x = MetaTensor(hu.clone(), affine=torch.diag(torch.tensor([2.0, 3.0, 5.0, 1.0])))
    x.meta["filename_or_obj"] = "ct.nii.gz"
    ref = ScaleIntensityRanged("image", a_min=-57, a_max=164, b_min=0.0, b_max=1.0, clip=True)({"image": x})["image"]
    out = Windowd("image", -57, 164)({"image": x})["image"]
    plain = out.as_subclass(torch.Tensor)
    assert torch.equal(torch.nan_to_num(plain, nan=-9.0), torch.nan_to_num(ref.as_subclass(torch.Tensor), nan=-9.0))
    assert plain[0, 0, 0, :3].tolist() == [0.0, 1.0, 0.5] and torch.isnan(plain[0, 0, 0, 3])
    assert torch.equal(torch.nan_to_num(x.as_subclass(torch.Tensor)), torch.nan_to_num(hu))  # input unchanged
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "ct.nii.gz"
    assert torch.equal(out.affine, x.affine) and out.dtype == torch.float32
    ints = Windowd("image", 0, 100)({"image": torch.tensor([-5, 50, 200], dtype=torch.int16)})["image"]
    assert ints.dtype == torch.float32 and ints.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"window needs low < high, got \(164.0, -57.0\)"):
        Windowd("image", 164, -57)


def test_parse_window():
    assert parse_window("-57,164") == (-57.0, 164.0)
    assert parse_window(" MAX ") == "max"
    for bad in ("164,-57", "1", "a,b"):
        with pytest.raises(ValueError, match="LOW < HIGH"):
            parse_window(bad)


def test_25d_channels_are_neighbouring_slices():
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32), (1, 2, 2, 5))  # slice z has value z
    s = volume_to_slices(ramp, "2.5d")
    assert s.shape == (5, 3, 2, 2)
    assert s[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    r = volume_to_slices(ramp, "replicate", rows=[3, 1])
    assert r[:, :, 0, 0].tolist() == [[3, 3, 3], [1, 1, 1]]
    with pytest.raises(ValueError, match="channels must be"):
        volume_to_slices(ramp, "rgb")


@pytest.mark.parametrize("channels", ["replicate", "2.5d"])
@pytest.mark.parametrize("rows", [None, [4, 0, 2]])
def test_channels_last_slices_hold_the_same_values_in_nhwc_memory(channels, rows):
    import torch

    vol = np.random.default_rng(0).random((1, 6, 7, 5), dtype=np.float32)
    plain = volume_to_slices(vol, channels, rows=rows)
    nhwc = volume_to_slices(vol, channels, rows=rows, channels_last=True)
    assert nhwc.shape == plain.shape and nhwc.dtype == np.float32
    assert np.array_equal(nhwc, plain)
    assert nhwc.strides[1] == 4 and nhwc.base is not None  # channels adjacent in memory: (S, H, W, 3) underneath
    t = torch.as_tensor(nhwc)
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    with pytest.raises(ValueError, match="channels must be"):
        volume_to_slices(vol, "rgb", channels_last=True)


@pytest.mark.parametrize(
    "shape, size, factor",
    [((1, 512, 512, 6), 256, 2), ((1, 384, 384, 4), 128, 3), ((1, 300, 300, 3), 100, 3), ((1, 97, 131, 4), 96, None),
     ((1, 64, 64, 3), 96, None)],
)  # fmt: skip
def test_block_mean_resize_is_monais_area_resize_bit_for_bit(shape, size, factor, monkeypatch):
    """An integer in-plane shrink is computed from strided views; values, affine, recorded operation and the
    inverse equal MONAI's ``Resized``; anything else is MONAI's own call."""
    import torch
    import torch.nn.functional as F
    from monai.data import MetaTensor
    from monai.transforms import Resized

    from mkd.data.transforms import BlockMeanResize, _resized

    g = torch.Generator().manual_seed(0)
    affine = torch.tensor([[-0.7, 0, 0, 10], [0, 0.6, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=torch.float64)
    x = torch.randn(shape, generator=g) * 300
    x[0, 0, 0, 0], x[0, 1, 1, 0] = float("nan"), float("inf")
    ref_t = Resized(keys="image", spatial_size=(size, size, -1), mode="area")
    ref = ref_t({"image": MetaTensor(x.clone(), affine=affine.clone())})["image"]
    ours_t = _resized(["image"], (size, size, -1), "area")
    assert isinstance(ours_t.resizer, BlockMeanResize)
    seen = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: seen.append(1) or real(*a, **k))
    src = MetaTensor(x.clone(), affine=affine.clone())
    ours = ours_t({"image": src})["image"]
    assert (len(seen) == 0) == (factor is not None)  # the strided route only for an integer shrink
    assert torch.equal(src.as_tensor().nan_to_num(), x.nan_to_num())  # input unchanged
    torch.testing.assert_close(ours.as_tensor(), ref.as_tensor(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.affine, ref.affine)
    op, ref_op = dict(ours.applied_operations[-1]), dict(ref.applied_operations[-1])
    assert op.pop("id") == id(ours_t.resizer) and ref_op.pop("id") == id(ref_t.resizer)
    assert op == ref_op and op["class"] == "Resize"
    back, ref_back = ours_t.inverse({"image": ours})["image"], ref_t.inverse({"image": ref})["image"]
    assert back.shape == x.shape
    torch.testing.assert_close(back.as_tensor(), ref_back.as_tensor(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(back.affine, ref_back.affine)


def test_the_volume_pipeline_resizes_with_block_mean_resize_and_labels_stay_monais():
    import torch
    from monai.data import MetaTensor

    from mkd.data.transforms import BlockMeanResize

    resize = volume_transforms(keys=("image", "label"), size=4).transforms[-1]
    assert isinstance(resize.resizer, BlockMeanResize) and resize.mode == ("area", "nearest-exact")
    label = torch.zeros(1, 8, 8, 2)
    label[0, 2:4, 2:4] = 1
    out = resize({"image": MetaTensor(torch.rand(1, 8, 8, 2)), "label": MetaTensor(label)})
    assert out["label"].shape == (1, 4, 4, 2) and set(out["label"].unique().tolist()) == {0.0, 1.0}


def test_label_value_selects_one_organ_and_resize_keeps_labels_binary(tmp_path):
    from conftest import write_nifti

    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:4, :4] = 1
    mask[4:, 4:] = 2
    mask[4:, :2] = 5
    write_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 8, 3), np.int16))
    write_nifti(tmp_path / "lbl.nii.gz", mask)
    d = {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lbl.nii.gz")}
    out = volume_transforms(size=None, label_value=2)(dict(d))["label"][0].numpy()
    assert out.sum() == 16 * 3 and out[4:, 4:].all()
    big = volume_transforms(size=16, label_value=2)(dict(d))["label"]
    assert big.shape == (1, 16, 16, 3) and set(np.unique(big.numpy())) == {0.0, 1.0}


def test_loadsliced_caches_and_pickles(tmp_path):
    import pickle

    np.save(tmp_path / "a.npy", np.arange(2 * 3 * 2 * 2, dtype=np.float16).reshape(2, 3, 2, 2))
    t = LoadSliced(keys="image")
    out = t({"image": str(tmp_path / "a.npy"), "slice": 1})
    assert out["image"].dtype == torch.float32 and out["image"][0, 0, 0] == 12
    assert len(t._cache) == 1
    assert pickle.loads(pickle.dumps(t))._cache == {}
