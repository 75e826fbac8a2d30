"""The large-grid steps of ``mkd infer`` on a DICOM series, the former route against the current one, in one run.

Usage: python benchmarks/bench_dicom.py [--slices 150] [--size 512] [--reps 3] [--threads 2]

Writes the real CT sample (``tests/data/totalseg_example/ct_full.nii.gz``) resampled to
``size x size x slices`` as a DICOM series (ITK/GDCM, int16, LPS positions) into a temporary
folder, then times, median of ``--reps``:

- reading: the former reader (GDCM scan, header pass of the slice check, MONAI
  ``LoadImage(reader="ITKReader")``, ``check_finite``) against :func:`mkd.inference.load_volume`;
- the HU window: MONAI's ``ScaleIntensityRanged`` against :class:`mkd.data.transforms.Windowd`;
- the in-plane ``area`` resize to 256² (``--size`` / 2: an integer shrink): MONAI's ``Resized`` against
  the pipeline's, whose resizer is :class:`mkd.data.transforms.BlockMeanResize`;
- the way back: :func:`mkd.inference.invert` then the threshold against
  :func:`mkd.inference.invert_mask`, for probabilities at 96² on a 256² prepared grid, once with
  foreground on every slice (the windowed image itself: the body, the worst case) and once on a
  third of the slices (about what a spleen spans in an abdominal CT);
- the largest component: MONAI's ``KeepLargestConnectedComponent`` over the whole grid against
  :func:`mkd.metrics.keep_largest_component` on the mask ``HU > 53.5`` (the body, a worst case
  for a bounding box).

Prints a Markdown table and whether each pair gives identical results.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "totalseg_example" / "ct_full.nii.gz"


def write_series(folder: Path, slices: int, size: int) -> np.ndarray:
    """The sample resampled (trilinear) to (size, size, slices), written as a DICOM series; returns its RAS affine."""
    import itk
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    src = nib.load(str(SAMPLE))
    vol = torch.as_tensor(np.asarray(src.dataobj, dtype=np.float32))[None, None]
    arr = F.interpolate(vol, size=(size, size, slices), mode="trilinear", align_corners=False)[0, 0]
    arr = arr.round().numpy().astype(np.int16)
    zooms = np.asarray(src.header.get_zooms()[:3]) * np.asarray(src.shape[:3]) / np.asarray(arr.shape)
    affine = src.affine.copy()
    affine[:3, :3] = np.diag(zooms)
    folder.mkdir(parents=True)
    for k in range(slices):
        sl = itk.image_from_array(np.ascontiguousarray(arr[:, :, k].T))
        sl.SetSpacing([float(zooms[0]), float(zooms[1])])
        meta = sl.GetMetaDataDictionary()
        x, y, z = (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        meta["0020|0032"] = f"{-x:.4f}\\{-y:.4f}\\{z:.4f}"  # ImagePositionPatient, LPS
        meta["0020|0037"] = "-1\\0\\0\\0\\-1\\0"
        meta["0018|0050"] = f"{zooms[2]:g}"
        meta["0020|0013"] = str(k + 1)
        meta["0008|0060"] = "CT"
        meta["0020|000e"] = "1.2.826.0.1.3680043.2.1125.1.4245"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(folder / f"IM{k:04d}.dcm"), ImageIO=io).Update()
    return affine


def old_reader(path: Path):
    """The former ``load_volume`` for a DICOM folder: scan, header pass, MONAI LoadImage, checks."""
    import itk
    from monai.transforms import LoadImage

    from mkd.data.checks import warn_if_not_ct
    from mkd.inference.io import _check_slice_positions, _dicom_series_files

    files = _dicom_series_files(path)
    slices = []
    for name in files:  # the former header pass
        io = itk.GDCMImageIO.New()
        io.SetFileName(name)
        io.ReadImageInformation()
        slices.append(tuple(_io_numbers(io, tag) for tag in ("0020|0032", "0020|0037")))
    _check_slice_positions(path, slices)
    data = LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(path))
    _old_check_finite(data)
    warn_if_not_ct(data, path)
    return data, np.asarray(data.affine, dtype=np.float64)


def _io_numbers(io, tag: str):
    found, text = io.GetValueFromTag(tag, "")
    return [float(v) for v in str(text).strip().split("\\")] if found else None


def _old_check_finite(data) -> None:
    import torch

    assert not bool((~torch.isfinite(torch.as_tensor(data))).any())


def old_lcc(mask: np.ndarray) -> np.ndarray:
    """The former ``keep_largest_component``: MONAI over the whole grid."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    arr = np.asarray(mask).astype(np.uint8)
    if not arr.any():
        return arr
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=None)
    return np.asarray(torch.as_tensor(keep(torch.as_tensor(arr)[None]))[0]).astype(np.uint8)


def timed(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per route (median; default 5)")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads (default 2)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from monai.transforms import Resized, ScaleIntensityRanged

    from mkd.data.transforms import Windowd, _resized
    from mkd.inference import invert, invert_mask, load_volume, preprocess, resolve_settings
    from mkd.metrics import keep_largest_component
    from mkd.utils import keep_locale

    with tempfile.TemporaryDirectory() as tmp, keep_locale():
        series = Path(tmp) / "series"
        t0 = time.perf_counter()
        write_series(series, args.slices, args.size)
        print(f"wrote {args.slices} slices of {args.size}x{args.size} to a temporary folder in "
              f"{time.perf_counter() - t0:.1f} s; median of {args.reps}\n")  # fmt: skip
        load_volume(series)  # warm-up (imports, ITK factories, page cache)
        t_old, (old_data, old_affine) = timed(lambda: old_reader(series), args.reps)
        t_new, vol = timed(lambda: load_volume(series), args.reps)
    same_data = bool(np.array_equal(np.asarray(old_data), vol.data.numpy()))
    same_affine = bool(np.allclose(old_affine, vol.affine, rtol=0, atol=1e-6))
    image = {"image": vol.data[None]}
    monai_window = ScaleIntensityRanged("image", a_min=-57.0, a_max=164.0, b_min=0.0, b_max=1.0, clip=True)
    t_old_win, old_win = timed(lambda: monai_window(image)["image"], args.reps)
    t_new_win, new_win = timed(lambda: Windowd("image", -57.0, 164.0)(image)["image"], args.reps)
    same_win = bool(torch.equal(old_win.as_subclass(torch.Tensor), new_win.as_subclass(torch.Tensor)))
    half = (args.size // 2, args.size // 2, -1)
    monai_resize = Resized("image", spatial_size=half, mode="area")
    ours_resize = _resized(["image"], half, "area")
    t_old_rs, old_rs = timed(lambda: monai_resize({"image": new_win})["image"], args.reps)
    t_new_rs, new_rs = timed(lambda: ours_resize({"image": new_win})["image"], args.reps)
    same_rs = bool(torch.equal(old_rs.as_subclass(torch.Tensor), new_rs.as_subclass(torch.Tensor)))
    same_rs = same_rs and bool(torch.equal(old_rs.affine, new_rs.affine))
    pre = preprocess(vol, resolve_settings(window=(-57.0, 164.0), size=256))
    prepared = pre.image[None].as_subclass(torch.Tensor)
    body = torch.nn.functional.interpolate(prepared, size=(96, 96, prepared.shape[-1]), mode="area")[0]
    organ = body.clone()
    third = organ.shape[-1] // 3
    organ[..., :third], organ[..., 2 * third :] = 0.0, 0.0
    mask = (vol.data.numpy() > 53.5).astype(np.uint8)
    t_old_lcc, old_mask = timed(lambda: old_lcc(mask), args.reps)
    t_new_lcc, new_mask = timed(lambda: keep_largest_component(mask), args.reps)
    rows = [
        ("read DICOM series", t_old, t_new, f"array {same_data}, affine (1e-6) {same_affine}"),
        ("HU window", t_old_win, t_new_win, f"values {same_win}"),
        (f"area resize to {half[0]}²", t_old_rs, t_new_rs, f"values and affine {same_rs}"),
    ]
    for name, probs in (("every slice", body), (f"{third} of {body.shape[-1]} slices", organ)):
        t_old_inv, old_back = timed(lambda p=probs: (invert(p, pre) > 0.5).numpy().astype(np.uint8), args.reps)
        t_new_inv, new_back = timed(lambda p=probs: invert_mask(p, pre, 0.5), args.reps)
        rows.append((f"inverse + threshold, foreground on {name}", t_old_inv, t_new_inv,
                     f"mask {bool(np.array_equal(old_back, new_back))}"))  # fmt: skip
    rows.append((f"largest component ({int(mask.sum())} foreground voxels)", t_old_lcc, t_new_lcc,
                 f"mask {bool(np.array_equal(old_mask, new_mask))}"))  # fmt: skip
    print("| step | former (s) | current (s) | speed-up | identical |")
    print("|---|---:|---:|---:|---|")
    for name, old, new, same in rows:
        print(f"| {name} | {old:.3f} | {new:.3f} | {old / new:.1f}x | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
