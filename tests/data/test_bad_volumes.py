"""Bad volumes are refused at the door (issue 18): never a silent NaN slice or a mask on a wrong grid."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mkd.cli import cli
from mkd.data.prepare import prepare_dataset
from mkd.errors import InputError, MkdError


def _cases(n: int = 5, dtype=np.int16) -> dict:
    cases = {}
    for i in range(n):
        image = np.full((16, 16, 6), -1000, dtype)
        image[4:12, 4:12] = 100
        label = np.zeros((16, 16, 6), np.uint8)
        label[6:10, 6:10, 2:4] = 1
        cases[f"case_{i}"] = (image, label)
    return cases


def _prepare(args, out):
    before = set(os.listdir(out.parent))
    r = CliRunner().invoke(cli, ["prepare", *args, "--out", str(out), "--size", "16"])
    return r, set(os.listdir(out.parent)) - before


def _one_error_line(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# --- non-finite voxels ----------------------------------------------------------------------------


def test_prepare_refuses_an_infinite_voxel_with_window_max(make_task, tmp_path):
    """One +Inf voxel with --window max wrote NaN slices (x / inf), exit 0."""
    cases = _cases(dtype=np.float32)
    cases["case_1"][0][3, 3, 3] = np.inf
    task = make_task(cases=cases)
    r, new = _prepare(["--source", str(task), "--window", "max"], tmp_path / "data")
    line = _one_error_line(r)
    assert line == (
        f"Error: {task / 'imagesTr' / 'case_1.nii.gz'}: 1 infinite voxel(s) of 1536; mkd refuses non-finite values "
        "(they would become NaN slices and empty masks): fix or re-export the volume"
    )
    assert not new  # nothing left behind


def test_prepare_refuses_nan_and_inf_together(make_task, tmp_path):
    cases = _cases(dtype=np.float32)
    cases["case_0"][0][0, 0, :2] = np.nan
    cases["case_0"][0][1, 1, 0] = -np.inf
    with pytest.raises(InputError, match=r"case_0.nii.gz: 2 NaN and 1 infinite voxel\(s\) of 1536"):
        prepare_dataset(make_task(cases=cases), tmp_path / "data", size=16)
    assert not (tmp_path / "data").exists()


# --- spacing ----------------------------------------------------------------------------------------


def test_prepare_refuses_a_spacing_that_makes_an_absurd_grid(make_task, tmp_path):
    """--spacing 1e-3,1e-3,0 printed a 77-line traceback (MONAI's Spacingd tried to allocate it)."""
    task = make_task()
    r, new = _prepare(["--source", str(task), "--spacing", "1e-3,1e-3,0"], tmp_path / "data")
    line = _one_error_line(r)
    assert line == (
        f"Error: {task / 'imagesTr' / 'case_0.nii.gz'}: --spacing 0.001,0.001,0 would resample this 16x16x6 "
        "volume to 16000x16000x6 = 1.54e+09 voxels (limit 1e+09); give a voxel size in mm, e.g. 1,1,2, or 0 to "
        "keep an axis"
    )
    assert not new


@pytest.mark.parametrize("spacing", ["1,-1,1", "1,nan,1", "1,inf,1"])
def test_prepare_refuses_negative_or_non_finite_spacing(make_task, tmp_path, spacing):
    r, new = _prepare(["--source", str(make_task()), "--spacing", spacing], tmp_path / "data")
    line = _one_error_line(r)
    assert line == (
        f"Error: --spacing {spacing}: expected three voxel sizes in mm (X,Y,Z), each positive or 0 to keep that axis"
    )
    assert not new


def test_spacing_checks_by_hand():
    from mkd.data.checks import check_resampled_size, check_spacing

    assert check_spacing([1, 0, 2.5]) == (1.0, 0.0, 2.5)  # 0 keeps an axis
    with pytest.raises(MkdError, match="each positive or 0"):
        check_spacing([1, 1])
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    check_resampled_size((512, 512, 100), affine, (0.5, 0.5, 1.0), "ct")  # 819x819x500 = 3.4e8: fine
    with pytest.raises(InputError, match=r"ct: `spacing=0.1,0.1,0` would resample this 512x512x100 volume to "
                                         r"4096x4096x100 = 1.68e\+09 voxels"):  # fmt: skip
        check_resampled_size((512, 512, 100), affine, (0.1, 0.1, 0), "ct", "spacing")


# --- warnings -------------------------------------------------------------------------------------------


def test_non_ct_intensities_and_empty_labels_warn_once_each(make_task, tmp_path, caplog):
    cases = _cases()
    cases["case_2"] = (np.full((16, 16, 6), 300, np.int16), cases["case_2"][1])  # e.g. an MR volume: no air
    cases["case_3"][1][:] = 0  # an empty mask
    task = make_task(cases=cases)
    with caplog.at_level(logging.WARNING, logger="mkd"):
        prepare_dataset(task, tmp_path / "data", size=16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == [
        f"{task / 'imagesTr' / 'case_2.nii.gz'}: intensities 300..300 do not look like CT in HU (no air below "
        "-500 HU); check the modality and the window (--window)",
        f"{task / 'labelsTr' / 'case_3.nii.gz'}: the label is empty (no foreground voxel); its volume teaches only "
        "background",
    ]


def test_ct_in_hu_does_not_warn(caplog):
    from mkd.data.checks import warn_if_not_ct

    volume = np.full((4, 4, 4), -1000.0, np.float32)
    volume[1:3, 1:3] = 40.0
    with caplog.at_level(logging.WARNING, logger="mkd"):
        assert warn_if_not_ct(volume, "ct.nii.gz") is False
        assert warn_if_not_ct((volume + 1000) / 1040, "normalised.nii.gz") is True
        assert warn_if_not_ct(volume * -200, "scaled.nii.gz") is True
    assert [r.getMessage() for r in caplog.records] == [
        "normalised.nii.gz: intensities 0..1 do not look like CT in HU (no air below -500 HU); check the modality "
        "and the window (--window)",
        "scaled.nii.gz: intensities -8000..200000 do not look like CT in HU (values above 1e5); check the modality "
        "and the window (--window)",
    ]


# --- DICOM series with missing slices ------------------------------------------------------------------


def write_series(folder: Path, positions, shape=(8, 8)) -> Path:
    """A CT DICOM series written slice by slice with ITK/GDCM, one file per position (mm along z)."""
    itk = pytest.importorskip("itk")
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(positions):
        arr = np.full(shape, -1000, np.int16)
        arr[2:6, 2:6] = 50
        sl = itk.image_from_array(arr)
        sl.SetSpacing([1.0, 1.0])
        meta = sl.GetMetaDataDictionary()
        meta["0020|0032"] = f"0\\0\\{z:.4f}"  # ImagePositionPatient
        meta["0020|0037"] = "1\\0\\0\\0\\1\\0"  # ImageOrientationPatient
        meta["0018|0050"] = "1.5"
        meta["0020|0013"] = str(k + 1)
        meta["0008|0060"] = "CT"
        meta["0020|000e"] = "1.2.826.0.1.3680043.2.1125.1.4243"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(folder / f"IM{k:04d}.dcm"), ImageIO=io).Update()
    return folder


def test_dicom_series_with_missing_slices_is_refused(tmp_path):
    """3 of 10 slices missing: ITK averaged the spacing to 2.25 mm and a mask was written, exit 0."""
    from mkd.inference import load_volume

    series = write_series(tmp_path / "series", [1.5 * i for i in range(10) if i not in (3, 4, 7)])
    with pytest.raises(InputError) as err:
        load_volume(series)
    assert str(err.value) == (
        f"{series}: uneven DICOM slice positions: expected a step of 1.5 mm, found steps 1.5, 3, 4.5 mm; 3 slice "
        "position(s) missing (4.5, 6, 10.5 mm); 7 slices span 13.5 mm (read as is, ITK would average the spacing to "
        "2.25 mm). Export the complete series"
    )


def test_complete_dicom_series_loads_with_its_spacing(tmp_path):
    import locale

    from mkd.inference import load_volume
    from mkd.utils import keep_locale

    with keep_locale():  # the test's own ITK writer leaves the "C" locale behind
        series = write_series(tmp_path / "series", [1.5 * i for i in range(5)])
    before = locale.setlocale(locale.LC_ALL)
    vol = load_volume(series)
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's reader does not change the process's encoding
    assert vol.shape == (8, 8, 5)
    assert abs(float(vol.affine[2, 2]) - 1.5) < 1e-6


def test_cli_infer_refuses_the_gapped_series_in_one_line(tmp_path):
    import torch

    from mkd.networks import build, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "s1.pt", build("s1"), run={"image_size": [16, 16]})
    series = write_series(tmp_path / "series", [0.0, 1.5, 3.0, 6.0])
    out = tmp_path / "mask.nii.gz"
    r = CliRunner().invoke(cli, ["infer", str(ckpt), "--input", str(series), "--output", str(out), "--backend",
                                 "torch", "--device", "cpu"])  # fmt: skip
    line = _one_error_line(r)
    assert line.startswith(f"Error: {series}: uneven DICOM slice positions: expected a step of 1.5 mm, found steps "
                           "1.5, 3 mm; 1 slice position(s) missing (4.5 mm)")  # fmt: skip
    assert not out.exists()


def test_dicom_series_with_slices_of_another_size_is_refused(tmp_path):
    """A slice of another size is another series to GDCM's scan (rows / columns): refused in one line."""
    from mkd.inference import load_volume

    series = write_series(tmp_path / "series", [1.5 * i for i in range(4)])
    write_series(tmp_path / "other", [6.0], shape=(10, 10))
    (tmp_path / "other" / "IM0000.dcm").rename(series / "IM0004.dcm")
    with pytest.raises(InputError) as err:
        load_volume(series)
    assert str(err.value) == f"{series}: holds 2 DICOM series; pass a folder with one series"


def test_dicom_series_with_two_slices_at_one_position_is_refused(tmp_path):
    from mkd.inference import load_volume

    series = write_series(tmp_path / "series", [0.0, 1.5, 1.5, 3.0])
    with pytest.raises(InputError) as err:
        load_volume(series)
    assert str(err.value).startswith(f"{series}: two DICOM slices lie at the same position (1.5 mm along the slice ")
