"""``mkd infer`` / mkd.inference: geometry on real CT, the inverse of the preprocessing, DICOM series, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from mkd.cli import cli
from mkd.data.transforms import volume_to_slices
from mkd.errors import MkdError
from mkd.export import cached_onnx, read_metadata
from mkd.inference import (
    OnnxRuntimeBackend,
    Segmenter,
    SlicePrediction,
    TorchBackend,
    Volume,
    bf16_supported,
    default_threads,
    invert,
    invert_mask,
    keep_largest_component,
    load_volume,
    onnxruntime_available,
    predict_slices,
    preprocess,
    resolve_backend,
    resolve_settings,
)
from mkd.networks import build, load_network, save_checkpoint

SAMPLE = Path(__file__).resolve().parent / "data" / "totalseg_example"  # shipped in the repository (Apache-2.0)
needs_sample = pytest.mark.skipif(not (SAMPLE / "ct_full.nii.gz").is_file(), reason="real CT sample missing")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


class HUThreshold(nn.Module):
    """A hand-checkable "network": foreground where the centre channel's windowed intensity > 0.5.

    With the default window [-57, 164] HU -> [0, 1] that is HU > 53.5, which can be computed on the
    original grid directly.
    """

    in_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x[:, 1:2] - 0.5)


def reoriented(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    now = nib.orientations.io_orientation(img.affine)
    return img.as_reoriented(nib.orientations.ornt_transform(now, nib.orientations.axcodes2ornt(tuple(codes))))


@pytest.fixture(scope="module")
def s1_ckpt(tmp_path_factory) -> Path:
    """Random-weight s1 checkpoint at 64x64 (geometry tests need no accuracy)."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "s1.pt", build("s1"), run={"image_size": [64, 64]})


def test_the_inference_package_keeps_its_public_names():
    """mkd.inference became a package (settings, io, geometry, backends, predictor); the names stay importable.

    ``infer`` (a one-line wrapper of ``Segmenter(...).segment_to_file``) and ``InferenceSettings.as_dict``
    had no caller anywhere and are gone.
    """
    import mkd.inference

    assert sorted(mkd.inference.__all__) == sorted(
        ["BACKENDS", "FolderResult", "InferenceResult", "InferenceSettings", "NIFTI_SUFFIXES", "OnnxRuntimeBackend",
         "Preprocessed", "Segmenter", "SlicePrediction", "TorchBackend", "Volume", "bf16_supported",
         "calibration_slices",
         "check_folder_job", "check_logits", "check_mask_output", "check_mask_replaceable", "check_preview_path",
         "default_threads", "find_volumes", "invert", "invert_mask", "is_volume_folder", "keep_largest_component",
         "load_volume",
         "mask_bytes", "onnxruntime_available", "predict_slices", "preprocess", "resolve_backend", "resolve_settings",
         "save_mask"]
    )  # fmt: skip
    assert all(hasattr(mkd.inference, name) for name in mkd.inference.__all__)
    assert mkd.inference.Segmenter.__module__ == "mkd.inference.predictor"
    assert not hasattr(mkd.inference, "infer") and not hasattr(mkd.inference.InferenceSettings, "as_dict")


# --- geometry on the real CT ----------------------------------------------------------------------


@needs_sample
def test_cli_mask_has_the_inputs_shape_affine_and_dtype(s1_ckpt, tmp_path):
    out = tmp_path / "mask.nii.gz"
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(s1_ckpt),
            "--input",
            str(SAMPLE / "ct_full.nii.gz"),
            "--output",
            str(out),
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "time per volume" in r.output and "112 slices" in r.output
    ct, mask = nib.load(SAMPLE / "ct_full.nii.gz"), nib.load(out)
    assert mask.shape == ct.shape == (122, 101, 112)
    np.testing.assert_allclose(mask.affine, ct.affine)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(ct.affine)
    assert mask.get_data_dtype() == np.uint8
    data = np.asanyarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]  # no temporary file left


@needs_sample
@pytest.mark.parametrize("size, spacing", [(128, None), (64, (4.0, 4.0, 4.0))])
def test_preprocess_then_invert_gives_back_the_mask(size, spacing):
    """The spleen mask pushed through the image pipeline and mapped back is nearly itself."""
    reference = np.asarray(nib.load(SAMPLE / "spleen_30slices.nii.gz").dataobj).astype(bool)
    volume = load_volume(SAMPLE / "spleen_30slices.nii.gz")
    settings = resolve_settings(window=(0.0, 1.0), spacing=spacing, size=size)
    pre = preprocess(volume, settings)
    assert tuple(pre.image.shape[:3]) == (1, size, size)
    back = invert(pre.image, pre)
    assert tuple(back.shape) == reference.shape
    assert dice(back.numpy() > 0.5, reference) > 0.9


@needs_sample
@pytest.mark.parametrize(
    "codes, spacing, size", [("RAS", None, 64), ("LPS", None, 64), ("SPL", None, 64), ("RAS", None, 160),
                             ("LPS", (4.0, 4.0, 6.0), 64)])  # fmt: skip
def test_invert_mask_is_the_thresholded_inverse_voxel_for_voxel(tmp_path, monkeypatch, codes, spacing, size):
    """invert_mask skips slices with nothing above the threshold; its mask equals ``invert(...) > t`` exactly.

    Probabilities at the network's 48² on a 64² prepared grid (the way back enlarges) or a 160² one (it
    shrinks to the sample's 122 x 101), foreground on a few slices only, an input stored RAS, LPS and with
    its axes permuted (SPL), and a ``spacing`` run (which falls back to invert).
    """
    path = tmp_path / "ct.nii.gz"
    nib.save(reoriented(nib.load(SAMPLE / "spleen_30slices.nii.gz"), codes), path)
    volume = load_volume(path)
    pre = preprocess(volume, resolve_settings(window=(0.0, 1.0), spacing=spacing, size=size))
    n = int(pre.image.shape[-1])
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 48, 48, n, generator=g) * 0.5  # nothing above 0.5 ...
    probs[:, 10:30, 15:40, n // 3 : n // 3 + 4] = torch.rand(1, 20, 25, 4, generator=g)  # ... but here
    probs[:, 5:9, 5:9, n - 2] = 0.9
    import mkd.inference.geometry as geometry

    calls = []
    monkeypatch.setattr(geometry, "invert", lambda *a: calls.append(1) or invert(*a))
    mask = invert_mask(probs, pre, 0.5)
    assert len(calls) == (spacing is not None)  # the slice-wise route unless a Spacing step mixes slices
    expected = (invert(probs, pre) > 0.5).numpy()
    assert mask.dtype == np.uint8 and mask.shape == volume.shape and mask.flags.c_contiguous
    assert 1000 < expected.sum() < 0.2 * expected.size
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert not invert_mask(probs * 0.0, pre, 0.5).any()


@needs_sample
def test_threshold_model_segments_what_a_direct_threshold_finds():
    """Through windowing, resizing, slicing, the network batches and the inverse: HU > 53.5 survives."""
    ct = np.asarray(nib.load(SAMPLE / "ct_full.nii.gz").dataobj).astype(np.float32)
    expected = ct > 53.5
    # lcc=False: a direct threshold has many components (bone, vessels), the default filter would keep one
    seg = Segmenter(HUThreshold(), size=256, batch_size=16, device="cpu", lcc=False)
    result = seg.segment(SAMPLE / "ct_full.nii.gz")
    assert result.shape == ct.shape and result.slices == 112
    assert 0.02 < expected.mean() < 0.5
    assert dice(result.mask, expected) > 0.95  # (0.97; at 128 area-resizing blurs thin vessels and bone: 0.79)


@needs_sample
def test_lps_copy_gives_the_flipped_mask(tmp_path):
    """The same scan stored LPS: its mask is the RAS mask in LPS voxel order, with the LPS file's affine."""
    ras = nib.load(SAMPLE / "ct_full.nii.gz")
    lps = reoriented(ras, "LPS")
    nib.save(lps, tmp_path / "ct_lps.nii.gz")
    seg = Segmenter(HUThreshold(), size=64, device="cpu")
    m_ras = seg.segment_to_file(SAMPLE / "ct_full.nii.gz", tmp_path / "ras_mask.nii.gz").mask
    m_lps = seg.segment_to_file(tmp_path / "ct_lps.nii.gz", tmp_path / "lps_mask.nii.gz").mask
    assert m_ras.sum() > 1000
    out = nib.load(tmp_path / "lps_mask.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    np.testing.assert_allclose(out.affine, lps.affine)
    np.testing.assert_array_equal(m_lps, m_ras[::-1, ::-1, :])
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), m_lps)


def write_dicom_series(arr: np.ndarray, affine: np.ndarray, series: Path) -> Path:
    """A CT series written slice by slice with ITK/GDCM (LPS positions) from a RAS volume (X, Y, Z) and its affine."""
    import itk

    series.mkdir(parents=True)
    for k in range(arr.shape[2]):
        sl = itk.image_from_array(np.ascontiguousarray(arr[:, :, k].T))
        sl.SetSpacing([float(affine[0, 0]), float(affine[1, 1])])
        meta = sl.GetMetaDataDictionary()
        x, y, z = (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        meta["0020|0032"] = f"{-x:.4f}\\{-y:.4f}\\{z:.4f}"  # ImagePositionPatient, LPS
        meta["0020|0037"] = "-1\\0\\0\\0\\-1\\0"  # rows along -x, columns along -y in LPS: the RAS axes
        meta["0018|0050"] = f"{affine[2, 2]:g}"
        meta["0020|0013"] = str(k + 1)
        meta["0008|0060"] = "CT"
        meta["0020|000e"] = "1.2.826.0.1.3680043.2.1125.1.4242"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(series / f"IM{k:04d}.dcm"), ImageIO=io).Update()
    return series


@needs_sample
def test_dicom_series_folder_gives_the_same_mask_as_the_nifti(tmp_path):
    """A DICOM series (written slice by slice with ITK/GDCM, LPS positions) read with mkd's ITK series reader."""
    pytest.importorskip("itk")
    img = nib.load(SAMPLE / "ct_30slices.nii.gz")
    arr = np.asarray(img.dataobj)[:, :, :6].astype(np.int16)
    affine = img.affine.copy()
    nib.save(nib.Nifti1Image(arr, affine), tmp_path / "ct6.nii.gz")
    series = write_dicom_series(arr, affine, tmp_path / "series")

    seg = Segmenter(HUThreshold(), size=64, device="cpu")
    from_dicom = seg.segment_to_file(series, tmp_path / "dicom_mask.nii.gz")
    from_nifti = seg.segment_to_file(tmp_path / "ct6.nii.gz", tmp_path / "nifti_mask.nii.gz")
    out = nib.load(tmp_path / "dicom_mask.nii.gz")
    assert out.shape == (122, 101, 6)
    np.testing.assert_allclose(out.affine, affine, atol=1e-3)
    assert from_nifti.mask.sum() > 100
    np.testing.assert_array_equal(from_dicom.mask, from_nifti.mask)


@needs_sample
def test_dicom_reader_gives_monai_itkreaders_volume_affine_and_metadata(tmp_path):
    """The one-pass series reader against the former reader, MONAI's LoadImage(ITKReader): voxel for voxel."""
    pytest.importorskip("itk")
    from monai.transforms import LoadImage

    img = nib.load(SAMPLE / "ct_30slices.nii.gz")
    arr = np.asarray(img.dataobj)[:, :, :12].astype(np.int16)
    series = write_dicom_series(arr, img.affine, tmp_path / "series")
    vol = load_volume(series)
    ref = LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(series))
    assert vol.data.dtype == ref.dtype == torch.float32
    assert vol.data.is_contiguous()
    assert torch.equal(vol.data.as_tensor(), ref.as_tensor())
    np.testing.assert_allclose(vol.affine, np.asarray(ref.affine), rtol=0, atol=1e-6)
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-3)  # RAS, as written
    assert set(vol.data.meta) == set(ref.meta)
    for key in ("spacing", "original_affine", "affine", "spatial_shape", "space", "filename_or_obj"):
        np.testing.assert_array_equal(np.asarray(vol.data.meta[key]), np.asarray(ref.meta[key]))
    np.testing.assert_array_equal(vol.data.numpy(), arr.astype(np.float32))


# --- settings, post-processing, a trained model -------------------------------------------------------


def test_settings_come_from_options_then_checkpoint_then_prepare_json(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prepare.json").write_text(
        json.dumps({"settings": {"size": 128, "channels": "2.5d", "window": [-100, 200], "spacing": [2, 2, 0]}})
    )
    s = resolve_settings({"run": {"image_size": [64, 64]}}, data)
    assert (s.window, s.channels, s.spacing, s.prepare_size, s.image_size) == (
        (-100.0, 200.0),
        "2.5d",
        (2.0, 2.0, 0.0),
        128,
        (64, 64),
    )
    assert s.sources["window"].endswith("prepare.json") and s.sources["image_size"] == "checkpoint"
    s = resolve_settings(
        {"run": {"image_size": [64, 64]}, "preprocessing": {"window": "max"}},
        data,
        channels="replicate",
        spacing="none",
    )
    assert (s.window, s.channels, s.spacing) == ("max", "replicate", None)
    s = resolve_settings({}, size=96)  # no metadata at all: mkd prepare's defaults, one resize to --size
    assert (s.window, s.channels, s.spacing, s.prepare_size, s.image_size) == (
        (-57.0, 164.0),
        "replicate",
        None,
        96,
        (96, 96),
    )
    assert resolve_settings({}).image_size == (256, 256)


def test_largest_connected_component():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[5:9, 5:9, 5:9] = 1  # 64 voxels
    mask[10, 10, 10] = 1
    out = keep_largest_component(mask)
    assert out.dtype == np.uint8 and out.sum() == 64 and out[5:9, 5:9, 5:9].all()
    assert keep_largest_component(np.zeros((4, 4, 4), np.uint8)).sum() == 0


# --- predict_slices: the one slice prediction of infer, evaluate and report -------------------------------


class Channel0(nn.Module):
    """Logits = channel 0 + log(channel 1): channel 0 where channel 1 is 1, NaN where it is negative.

    Records the batch sizes it is called with.
    """

    in_channels, out_channels = 3, 1

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x[:, :1] + torch.log(x[:, 1:2])


def test_predict_slices_gives_the_sigmoid_of_known_logits_in_slice_order_across_batches():
    slices = torch.ones(5, 3, 4, 4)
    slices[:, 0] = torch.arange(-2.0, 3.0).view(5, 1, 1)  # slice i: logits i - 2 everywhere
    net = Channel0()
    out = predict_slices(net, slices, batch_size=2)
    assert isinstance(out, SlicePrediction) and net.batches == [2, 2, 1] and out.recon is None
    assert out.probs.dtype == torch.float32 and out.probs.device.type == "cpu" and out.probs.shape == (5, 1, 4, 4)
    assert bool((out.probs == out.probs[:, :, :1, :1]).all()) and float(out.probs[2, 0, 0, 0]) == 0.5
    e = math.e
    expected = [1 / (1 + e**2), 1 / (1 + e), 0.5, e / (1 + e), e**2 / (1 + e**2)]
    assert out.probs[:, 0, 0, 0].tolist() == pytest.approx(expected, abs=1e-7)
    # the input resized to the network size by area: a 2x2 block of 4 on a 4x4 slice of 1 is a 2x2 [[4, 1], [1, 1]]
    block = torch.ones(1, 3, 4, 4)
    block[:, 0, :2, :2] = 4.0
    probs = predict_slices(Channel0(), block, image_size=(2, 2)).probs
    assert probs[0, 0].flatten().tolist() == pytest.approx([e**4 / (1 + e**4)] + [e / (1 + e)] * 3, abs=1e-7)


def test_predict_slices_refuses_nan_logits_naming_the_network_and_the_slices():
    slices = torch.ones(4, 3, 2, 2)
    slices[3, 1] = -1.0  # Channel0 gives log(-1) = NaN on slice 3 only
    with pytest.raises(MkdError) as err:
        predict_slices(Channel0(), slices, batch_size=2, name="net.pt")
    assert str(err.value) == (
        "net.pt: the network's output holds 4 NaN or infinite value(s) of 8 (slices 2-3); its weights are broken "
        "(a diverged run?): retrain it or use an earlier checkpoint"
    )
    with pytest.raises(MkdError, match=r"^net.pt: the network's output holds 4 NaN .* \(test slices of p1\); "):
        predict_slices(Channel0(), slices, name="net.pt", where="test slices of p1")


def test_predict_slices_captures_the_teachers_reconstruction_when_asked():
    torch.manual_seed(0)
    teacher = build("t1", preset="tiny").eval()
    head = [m for m in teacher.recon_decoder.modules() if isinstance(m, nn.Conv2d)][-1]  # spread beyond [0, 1]
    with torch.no_grad():
        head.weight.mul_(200.0)
        head.bias.fill_(0.5)
    teacher.reconstruct = False  # as Segmenter leaves it: the call switches the decoder on, then back off
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = teacher.forward_tasks(x)  # the two decoders called directly, no recorder
    out = predict_slices(teacher, x, batch_size=2, recon=True)
    assert teacher.reconstruct is False
    assert out.recon.shape == (3, 3, 32, 32) and out.recon.dtype == torch.float32
    assert torch.allclose(out.recon, ref["recon"].clamp(0, 1), atol=1e-6)
    assert float(ref["recon"].min()) < 0 and float(ref["recon"].max()) > 1  # the clamp did something
    assert float(out.recon.min()) == 0 and float(out.recon.max()) == 1
    assert torch.allclose(out.probs, torch.sigmoid(ref["seg"]), atol=1e-6)
    assert predict_slices(teacher, x).recon is None
    with pytest.raises(ValueError, match="reconstruction needs the PyTorch network"):
        predict_slices(TorchBackend(teacher, torch.device("cpu")), x, recon=True)


def test_evaluate_the_report_and_infer_take_their_probabilities_from_predict_slices(
    tiny_prepared, tmp_path, monkeypatch
):
    """A stand-in predict_slices answers "all foreground" for a network that says "background" everywhere:
    what evaluate, the report's panels and Segmenter give is that answer."""
    import mkd.inference.predictor as predictor
    from mkd.evaluation import evaluate_checkpoint
    from mkd.reports.report import _pick_slices, _predict

    real, where = predictor.predict_slices, []

    def all_foreground(*args, **kwargs) -> SlicePrediction:
        out = real(*args, **kwargs)
        assert float(out.probs.max()) < 1e-6  # the network's own answer: background
        where.append(kwargs.get("where"))
        return SlicePrediction(torch.ones_like(out.probs), out.recon)

    monkeypatch.setattr(predictor, "predict_slices", all_foreground)
    net = build("s1")
    head = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
    ckpt = save_checkpoint(tmp_path / "background.pt", net, run={"image_size": [32, 32]})

    result = evaluate_checkpoint(ckpt, tiny_prepared, batch_size=7, device="cpu")
    assert result.summary["pooled"]["recall"] == 1.0
    assert len(where) == math.ceil(result.summary["slices"] / 7) and all(w.startswith("test slices of ") for w in where)
    prob, _, _ = _predict(ckpt, _pick_slices(tiny_prepared, 2), [32, 32], "cpu")
    assert prob.shape == (2, 1, 32, 32) and bool((prob == 1).all())
    seg = Segmenter(ckpt, size=32, device="cpu", backend="torch")
    mask = seg.segment(_volume(tmp_path, np.zeros((8, 8, 3), np.float32))).mask
    assert mask.shape == (8, 8, 3) and bool(mask.all())


@needs_sample
def test_phantom_trained_student_gives_a_binary_mask_on_real_ct(tiny_prepared, tmp_path):
    """s1 trained a few steps on the 64x64 phantom; --data gives the preprocessing; --lcc keeps one blob."""
    from mkd.data import LoadSliced, load_split

    torch.manual_seed(0)
    model = build("s1")
    items = load_split(tiny_prepared, "training")
    load = LoadSliced(keys=("image", "label"))
    batch = [load(items[i]) for i in range(0, len(items), max(len(items) // 16, 1))][:16]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["label"] for b in batch])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    ckpt = save_checkpoint(tmp_path / "model.pt", model, run={"image_size": [64, 64]})
    out = tmp_path / "mask.nii"
    r = CliRunner().invoke(
        cli,
        [
            "infer",
            str(ckpt),
            "--input",
            str(SAMPLE / "ct_full.nii.gz"),
            "--output",
            str(out),
            "--data",
            str(tiny_prepared),
            "--lcc",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"window from {tiny_prepared / 'prepare.json'}" in r.output  # the settings came from --data
    mask = nib.load(out)
    data = np.asanyarray(mask.dataobj)
    assert mask.shape == (122, 101, 112) and data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    if data.any():  # one 26-connected component after --lcc
        from scipy import ndimage

        assert ndimage.label(data, structure=np.ones((3, 3, 3)))[1] == 1


# --- errors ---------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "garbage.nii.gz").write_bytes(b"not a nifti")
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), tmp / "flat.nii.gz")
    (tmp / "no_dicom").mkdir()
    (tmp / "no_dicom" / "notes.txt").write_text("hello")
    return {
        "missing": tmp / "missing.nii.gz",
        "garbage": tmp / "garbage.nii.gz",
        "2d": tmp / "flat.nii.gz",
        "folder": tmp / "no_dicom",
    }


@pytest.mark.parametrize(
    "case, message",
    [("missing", "no such file"), ("garbage", "cannot read"), ("2d", "2D image"), ("folder", "no DICOM series")],
)
def test_bad_input_is_one_line_error_and_no_output(s1_ckpt, tmp_path, case, message):
    path = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "mask.nii.gz"
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", str(path), "--output", str(out)])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: ") and message in lines[0], r.output
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


@needs_sample
def test_output_rules_and_atomic_write(s1_ckpt, tmp_path, monkeypatch):
    ct = str(SAMPLE / "ct_30slices.nii.gz")
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", ct, "--output", str(tmp_path / "mask.png")])
    assert r.exit_code == 1 and "must be a NIfTI file" in r.output
    existing = tmp_path / "old.nii.gz"
    existing.write_bytes(b"keep me")
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", ct, "--output", str(existing)])
    assert r.exit_code == 1 and "--overwrite" in r.output and existing.read_bytes() == b"keep me"
    r = CliRunner().invoke(
        cli, ["infer", str(tmp_path / "nope.pt"), "--input", ct, "--output", str(tmp_path / "a.nii")]
    )
    assert r.exit_code == 1 and "checkpoint file not found" in r.output

    def broken_save(img, filename):  # a failure half-way through writing
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError):
        Segmenter(s1_ckpt, device="cpu").segment_to_file(ct, tmp_path / "w" / "mask.nii.gz")
    assert list((tmp_path / "w").iterdir()) == []


# --- a folder of volumes --------------------------------------------------------------------------


def _small_ct(path: Path, shape, zooms, seed) -> Path:
    """A small CT-like volume: air, soft tissue (40 HU) and a bright block (200 HU)."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000.0, np.float32)
    data[2:-2, 2:-2, :] = 40.0 + rng.normal(0, 10, (shape[0] - 4, shape[1] - 4, shape[2]))
    data[shape[0] // 3 : shape[0] // 2, shape[1] // 3 : shape[1] // 2, :] = 200.0
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
    return path


def test_folder_in_folder_out_same_names_geometry_and_masks_as_single_calls(s1_ckpt, tmp_path):
    cases = tmp_path / "imagesTs"
    cases.mkdir()
    a = _small_ct(cases / "case_a.nii.gz", (40, 36, 5), (1.5, 1.5, 3.0), 0)
    b = _small_ct(cases / "case_b.nii", (32, 32, 4), (2.0, 2.0, 5.0), 1)
    (cases / "notes.txt").write_text("not a volume: ignored")
    out = tmp_path / "pred"
    args = ["infer", str(s1_ckpt), "--input", str(cases), "--output", str(out), "--device", "cpu"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "wrote 2 masks" in r.output and "0 failed" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_b.nii"]
    seg = Segmenter(s1_ckpt, device="cpu")
    for src in (a, b):
        mask, ct = nib.load(out / src.name), nib.load(src)
        assert mask.shape == ct.shape
        np.testing.assert_allclose(mask.affine, ct.affine)
        single = seg.segment_to_file(src, tmp_path / "single" / src.name)
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(nib.load(single.output).dataobj))

    # a second call refuses to touch the masks unless told what to do with them
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out / 'case_a.nii.gz'}: output already exists (2 of 2")
    assert "--skip-existing" in lines[0]
    r = CliRunner().invoke(cli, [*args, "--skip-existing"])
    assert r.exit_code == 0 and "wrote 0 masks" in r.output and "2 kept" in r.output, r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_folder_with_a_bad_volume_writes_the_others_and_exits_1(s1_ckpt, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    _small_ct(cases / "good.nii.gz", (32, 32, 4), (2.0, 2.0, 5.0), 0)
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "pred"
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", str(cases), "--output", str(out)])
    assert r.exit_code == 1
    assert f"{cases / 'broken.nii.gz'}: cannot read" in r.output
    assert r.output.strip().splitlines()[-1] == f"Error: 1 of 2 volumes in {cases} failed; see above"
    assert [p.name for p in out.iterdir()] == ["good.nii.gz"]  # nothing half-written for the broken one


def test_folder_input_errors(s1_ckpt, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    _small_ct(cases / "a.nii.gz", (32, 32, 4), (2.0, 2.0, 5.0), 0)
    r = CliRunner().invoke(cli, ["infer", str(s1_ckpt), "--input", str(cases), "--output", str(cases)])
    assert r.exit_code == 1 and f"Error: {cases}: output folder is the input folder" in r.output
    (tmp_path / "file.nii.gz").write_bytes(b"x")
    r = CliRunner().invoke(
        cli, ["infer", str(s1_ckpt), "--input", str(cases), "--output", str(tmp_path / "file.nii.gz")]
    )
    assert r.exit_code == 1 and "file.nii.gz: is a file; with a folder --input, --output must be a folder" in r.output


# --- backends ----------------------------------------------------------------------------------------

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime not installed (mkd[onnx])")


@pytest.fixture(scope="module")
def busy_s1(tmp_path_factory) -> Path:
    """A random-weight s1 at 64x64 whose mask on the real CT is ~10% of the voxels (not empty, not full).

    The classifier's bias is shifted by the 90th percentile of its logits on the CT's slices, so the masks
    the backends are compared on have a long, irregular border (many voxels near the threshold).
    """
    torch.manual_seed(0)
    net = build("s1").eval()
    vol = load_volume(SAMPLE / "ct_full.nii.gz")
    pre = preprocess(vol, resolve_settings({"run": {"image_size": [64, 64]}}))
    x = F.interpolate(torch.as_tensor(volume_to_slices(pre.image)), size=(64, 64), mode="area")
    with torch.no_grad():
        head = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
        head.bias -= float(torch.quantile(net(x).flatten(), 0.9))
    return save_checkpoint(tmp_path_factory.mktemp("busy") / "s1.pt", net, run={"image_size": [64, 64]})


def test_backend_resolution_and_threads(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr("mkd.inference.backends.onnxruntime_available", lambda: False)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(MkdError, match=r"mkd\[onnx\]"):
        resolve_backend("onnxruntime", cpu)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, onnxruntime; got 'tvm'"):
        resolve_backend("tvm", cpu)
    monkeypatch.setattr("mkd.inference.backends.onnxruntime_available", lambda: True)
    assert resolve_backend("auto", cpu) == "onnxruntime"
    with pytest.raises(ValueError, match="runs on the CPU; got device cuda"):
        resolve_backend("onnxruntime", torch.device("cuda"))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_threads() == 3


@needs_ort
@needs_sample
def test_every_backend_gives_eager_pytorchs_logits_and_the_same_mask_on_real_ct(busy_s1):
    vol = load_volume(SAMPLE / "ct_full.nii.gz")
    eager, _ = load_network(busy_s1)
    segs = {b: Segmenter(busy_s1, backend=b, device="cpu", threads=2, batch_size=16) for b in ("torch", "onnxruntime")}
    assert isinstance(segs["torch"].backend, TorchBackend)
    assert isinstance(segs["onnxruntime"].backend, OnnxRuntimeBackend)
    pre = preprocess(vol, segs["torch"].settings)
    x = F.interpolate(torch.as_tensor(volume_to_slices(pre.image)[40:56]), size=(64, 64), mode="area")
    with torch.no_grad():
        ref = eager.eval()(x)
    for name, seg in segs.items():
        got = seg.backend(x).float()
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= 1e-4, name
    masks = {name: seg.segment(vol).mask for name, seg in segs.items()}
    fg = int(masks["torch"].sum())
    assert 0.02 * masks["torch"].size < fg < 0.5 * masks["torch"].size
    assert np.array_equal(masks["torch"], masks["onnxruntime"]), int((masks["torch"] != masks["onnxruntime"]).sum())


@needs_ort
@needs_sample
def test_cli_auto_uses_onnxruntime_on_cpu_prints_it_and_writes_the_torch_mask(busy_s1, tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(busy_s1.read_bytes())
    outs = {}
    for backend in ("auto", "torch"):
        outs[backend] = tmp_path / f"{backend}.nii.gz"
        args = ["infer", str(ckpt), "--input", str(SAMPLE / "ct_full.nii.gz"), "--output", str(outs[backend])]
        r = CliRunner().invoke(cli, [*args, "--device", "cpu", *(["--backend", "torch"] if backend == "torch" else [])])
        assert r.exit_code == 0, r.output
        first = r.output.splitlines()[0]
        if backend == "auto":
            graph = tmp_path / "model.64x64.onnx"
            assert first == f"backend: onnxruntime (CPU, {default_threads()} threads, graph {graph})"
        else:
            assert first.startswith("backend: torch (cpu, channels_last, fused, inference_mode")
        assert "largest connected component: on" in r.output
    assert np.array_equal(nib.load(outs["auto"]).get_fdata(), nib.load(outs["torch"]).get_fdata())
    assert (tmp_path / "model.64x64.onnx").is_file()


@needs_ort
def test_cached_onnx_is_reused_and_a_corrupt_or_stale_one_is_rebuilt(tmp_path, caplog):
    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "model.pt", build("s1", "tiny"), run={"image_size": [32, 32]})
    first = cached_onnx(ckpt, (32, 32))
    assert first == tmp_path / "model.32x32.onnx" and read_metadata(first)["cache"]["input_size"] == [32, 32]
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(ckpt, (32, 32)) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    x = torch.rand(3, 3, 32, 32)

    def agrees(model_path: Path) -> bool:
        model, _ = load_network(model_path)
        with torch.no_grad():
            ref = model.eval()(x)
        return float((OnnxRuntimeBackend(first, threads=1)(x) - ref).abs().max()) <= 1e-4

    # corrupt: garbage bytes -> detected as unreadable, rebuilt, and the session runs
    first.write_bytes(b"\x08\x07not an onnx graph at all")
    with caplog.at_level("WARNING", logger="mkd.export"):
        assert cached_onnx(ckpt, (32, 32)) == first
    assert "unreadable" in caplog.text and agrees(ckpt)
    # truncated half-written file
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    caplog.clear()
    with caplog.at_level("WARNING", logger="mkd.export"):
        cached_onnx(ckpt, (32, 32))
    assert "unreadable" in caplog.text and agrees(ckpt)
    # stale: the checkpoint was retrained (new weights, same name) -> its hash no longer matches
    torch.manual_seed(2)
    save_checkpoint(ckpt, build("s1", "tiny"), run={"image_size": [32, 32]})
    caplog.clear()
    with caplog.at_level("WARNING", logger="mkd.export"):
        cached_onnx(ckpt, (32, 32))
    assert "stale (checkpoint_sha256" in caplog.text and agrees(ckpt)
    # a Segmenter on the retrained checkpoint runs the rebuilt graph
    seg = Segmenter(ckpt, backend="onnxruntime", device="cpu", threads=1)
    assert seg.backend.path == first and agrees(ckpt)


def test_torch_backend_uses_channels_last_and_the_thread_count(tmp_path):
    seen = {}

    class Probe(nn.Module):
        in_channels = 3

        def forward(self, x):
            seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
            seen["threads"] = torch.get_num_threads()
            seen["inference_mode"] = torch.is_inference_mode_enabled()
            return x[:, :1]

    before = torch.get_num_threads()
    seg = Segmenter(Probe(), backend="torch", device="cpu", threads=1, size=16, lcc=False)
    seg.segment(_volume(tmp_path, np.zeros((16, 16, 4), np.float32)))
    assert seen == {"channels_last": True, "threads": 1, "inference_mode": True}
    assert torch.get_num_threads() == before


def _volume(tmp_path: Path, array: np.ndarray) -> Volume:
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return load_volume(path)


def test_lcc_is_on_by_default_for_single_organ_networks_and_no_lcc_turns_it_off(tmp_path):
    class Islands(nn.Module):
        """Foreground on two blobs of the slice: a big one and a small one far away."""

        in_channels, out_channels = 3, 1

        def forward(self, x):
            out = torch.full_like(x[:, :1], -10.0)
            out[..., 2:10, 2:10] = 10.0
            out[..., 13:15, 13:15] = 10.0
            return out

    vol = _volume(tmp_path, np.zeros((16, 16, 3), np.float32))
    on = Segmenter(Islands(), backend="torch", device="cpu", size=16)
    off = Segmenter(Islands(), backend="torch", device="cpu", size=16, lcc=False)
    assert on.lcc and not off.lcc
    assert on.segment(vol).foreground == 8 * 8 * 3 and off.segment(vol).foreground == (8 * 8 + 2 * 2) * 3


def test_quantize_refuses_teachers_with_one_line(tmp_path):
    ckpt = save_checkpoint(tmp_path / "t.pt", build("t1", "tiny"), run={"image_size": [32, 32]})
    r = CliRunner().invoke(cli, ["infer", str(ckpt), "--input", str(tmp_path / "ct.nii.gz"), "--output",
                                 str(tmp_path / "m.nii.gz"), "--quantize", "int8", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 1 and len(r.output.splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: {ckpt}: --quantize int8 is for students (s1, s2); this is 't1'")


# --- int8 ---------------------------------------------------------------------------------------------------------


@needs_ort
def test_int8_calibrates_on_the_training_list_when_the_checkpoint_names_none(tiny_prepared, tmp_path):
    """Calibration read a datalist list named "train", which no datalist has (they hold training, validation,
    test, student, unlabelled): --quantize int8 failed for every checkpoint without run.train_split."""
    from mkd.data import load_split, slice_transform
    from mkd.inference import calibration_slices

    settings = resolve_settings({"run": {"image_size": [32, 32]}}, tiny_prepared)
    training = load_split(tiny_prepared, "training")
    slices = calibration_slices(tiny_prepared, settings, n=4)  # 4 slices evenly spread over the training list
    picks = np.linspace(0, len(training) - 1, num=4).round().astype(int)
    expected = np.stack([slice_transform([32, 32])(dict(training[i]))["image"].numpy() for i in picks])
    np.testing.assert_array_equal(slices, expected)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "s1.pt", build("s1"), run={"image_size": [32, 32]})  # no train_split
    seg = Segmenter(ckpt, data_dir=tiny_prepared, device="cpu", backend="onnxruntime", quantize="int8", threads=1)
    assert seg.backend.path.name == "s1.32x32.int8.onnx"
    assert read_metadata(seg.backend.path)["cache"]["calibration_split"] == "training"


@needs_ort
def test_int8_quantised_phantom_student_keeps_its_dice(tiny_prepared, tmp_path):
    """An s1 trained on the phantom's student slices, quantised to int8 (static, calibrated on those slices):
    pooled test Dice within 0.05 of the fp32 graph's, and a truly int8 graph."""
    import onnx

    from mkd.evaluation import evaluate_checkpoint
    from mkd.export import INT8_RECIPE

    ckpt = _trained_phantom_s1(tiny_prepared, tmp_path / "s1.pt")  # pooled test Dice 0.585 with torch here
    fp32 = Segmenter(ckpt, device="cpu", backend="onnxruntime", threads=1)
    int8 = Segmenter(ckpt, data_dir=tiny_prepared, device="cpu", backend="onnxruntime", quantize="int8", threads=1)
    assert int8.describe().startswith("onnxruntime (CPU, int8, 1 threads, graph ")
    assert read_metadata(int8.backend.path)["cache"]["calibration_split"] == "student"
    graph = onnx.load(str(int8.backend.path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    # the recipe: the first and the last convolution stay fp32 (their weights are float initialisers, not the
    # output of a DequantizeLinear), the ones between run int8
    assert read_metadata(int8.backend.path)["cache"]["int8_recipe"] == INT8_RECIPE
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    weights_int8 = [c.input[1] in dequantized for c in convs]
    assert weights_int8[0] is False and weights_int8[-1] is False and all(weights_int8[1:-1]), weights_int8
    dice = {
        name: evaluate_checkpoint(ckpt, tiny_prepared, runner=seg.backend).summary["pooled"]["dice"]
        for name, seg in (("fp32", fp32), ("int8", int8))
    }
    assert dice["fp32"] > 0.45, dice  # it learnt the phantom's organ (predicting all foreground scores 0.02)
    assert abs(dice["int8"] - dice["fp32"]) <= 0.05, dice


def _trained_phantom_s1(prepared, path):
    """An s1 trained 40 full-batch Adam steps on the phantom's student slices (32²), saved as a checkpoint."""
    from monai.losses import DiceCELoss

    from mkd.data import load_split, slice_transform

    torch.manual_seed(0)
    model = build("s1")
    batch = [slice_transform([32, 32])(dict(d)) for d in load_split(prepared, "student")]
    x, y = torch.stack([b["image"] for b in batch]), torch.stack([b["label"] for b in batch])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = DiceCELoss(sigmoid=True, batch=True)
    model.train()
    for _ in range(40):  # full batch
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return save_checkpoint(path, model, run={"image_size": [32, 32], "train_split": "student"})


def test_the_torch_backend_runs_the_fused_copy_with_the_trained_networks_dice(tiny_prepared, tmp_path):
    """The PyTorch backend runs :func:`mkd.networks.fuse_for_inference` (BatchNorm folded, no decoder concatenation);
    the Segmenter's network stays as trained, and the Dice of the two is the same."""
    from mkd.evaluation import evaluate_checkpoint

    ckpt = _trained_phantom_s1(tiny_prepared, tmp_path / "s1.pt")
    seg = Segmenter(ckpt, device="cpu", backend="torch", threads=1)
    assert seg.backend.fused and not any(isinstance(m, nn.BatchNorm2d) for m in seg.backend.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in seg.model.modules())
    eager = evaluate_checkpoint(ckpt, tiny_prepared).summary["pooled"]["dice"]
    fused = evaluate_checkpoint(ckpt, tiny_prepared, runner=seg.backend).summary["pooled"]["dice"]
    assert eager > 0.45 and abs(fused - eager) <= 1e-4, (eager, fused)
    plain = TorchBackend(seg.model, torch.device("cpu"), fuse=False)
    assert plain.model is not seg.backend.model and not plain.fused
    assert plain.describe() == "torch (cpu, channels_last, inference_mode)"


def test_default_batch_size_follows_the_backend_and_the_input_size(tmp_path):
    """CPU: ONNX Runtime 8 slices; PyTorch 2^18 pixels (4 slices at 256², 28 at 96², 64 at 64²)."""
    sizes = {}
    for size in (256, 96, 64):
        ckpt = save_checkpoint(tmp_path / f"s1_{size}.pt", build("s1", "tiny"), run={"image_size": [size, size]})
        sizes[size] = Segmenter(ckpt, device="cpu", backend="torch", threads=1).batch_size
    assert sizes == {256: 4, 96: 28, 64: 64}
    assert Segmenter(tmp_path / "s1_64.pt", device="cpu", backend="torch", batch_size=5).batch_size == 5
    if onnxruntime_available():
        assert Segmenter(tmp_path / "s1_64.pt", device="cpu", backend="onnxruntime", threads=1).batch_size == 8


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_phantom_student_keeps_its_dice(tiny_prepared, tmp_path):
    """``quantize="bf16"``: PyTorch autocast on a CPU with native bf16; Dice within 0.005 of fp32, float32 logits."""
    from mkd.evaluation import evaluate_checkpoint

    ckpt = _trained_phantom_s1(tiny_prepared, tmp_path / "s1.pt")
    fp32 = Segmenter(ckpt, device="cpu", backend="torch", threads=1)
    bf16 = Segmenter(ckpt, device="cpu", quantize="bf16", threads=1)  # backend auto: bf16 picks PyTorch
    assert bf16.describe().startswith("torch (cpu, channels_last, bf16, fused, inference_mode")
    x = torch.rand(2, 3, 32, 32)
    assert bf16.backend(x).dtype == torch.float32
    dice = {name: evaluate_checkpoint(ckpt, tiny_prepared, runner=seg.backend).summary["pooled"]["dice"]
            for name, seg in (("fp32", fp32), ("bf16", bf16))}  # fmt: skip
    assert dice["fp32"] > 0.45, dice
    assert abs(dice["bf16"] - dice["fp32"]) <= 0.005, dice


def test_bf16_is_refused_where_it_would_be_emulated_or_on_onnxruntime(s1_ckpt, monkeypatch):
    import mkd.inference.predictor as predictor

    with pytest.raises(MkdError) as err:
        Segmenter(s1_ckpt, device="cpu", backend="onnxruntime", quantize="bf16")
    assert str(err.value) == "`quantize=bf16` runs on PyTorch (autocast); pass `backend=torch` or `backend=auto`"
    monkeypatch.setattr(predictor, "bf16_supported", lambda device: False)
    with pytest.raises(MkdError) as err:
        Segmenter(s1_ckpt, device="cpu", quantize="bf16")
    assert str(err.value) == ("`quantize=bf16`: cpu has no native bf16 (on CPUs: AVX-512 BF16 or AMX), so it would "
                              "run slower than fp32; leave `quantize` out")  # fmt: skip
