"""Reading CT volumes (NIfTI, DICOM series, other ITK formats), writing masks, folder jobs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mkd.data.checks import check_finite, warn_if_not_ct
from mkd.errors import InputError, MkdError, first_line, output_exists
from mkd.utils import atomic_path

__all__ = [
    "NIFTI_SUFFIXES",
    "Volume",
    "load_volume",
    "save_mask",
    "mask_bytes",
    "check_mask_path",
    "check_mask_output",
    "check_mask_replaceable",
    "check_preview_path",
    "find_volumes",
    "is_volume_folder",
    "check_folder_job",
]

#: Output file name endings accepted for masks.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A loaded input volume.

    Attributes:
        data: MONAI ``MetaTensor`` (X, Y, Z) as loaded (float32 HU, the file's voxel order).
        path: the file or folder read.
        affine: voxel -> world (RAS mm) of the input, the affine the mask is written with.
        header: the NIfTI header of a NIfTI input (copied into the mask), else ``None``.
    """

    data: Any
    path: Path
    affine: np.ndarray
    header: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _dicom_series_files(path: Path) -> list[str]:
    """The files of the one DICOM series in ``path`` (ITK's GDCM series scan, sorted along the slice normal).

    Raises:
        InputError: no DICOM series, or more than one.
    """
    import itk

    itk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's "No Series were found" goes to stderr otherwise
    scan = itk.GDCMSeriesFileNames.New()
    scan.SetUseSeriesDetails(True)
    scan.SetDirectory(str(path))
    uids = list(scan.GetSeriesUIDs())
    if not uids:
        expected = "expected a NIfTI file, a folder of NIfTI files or one DICOM series folder"
        raise InputError(path, f"no DICOM series in this folder; {expected}")
    if len(uids) > 1:
        raise InputError(path, f"holds {len(uids)} DICOM series; pass a folder with one series")
    return [str(f) for f in scan.GetFileNames(uids[0])]


def _tag_numbers(tags: Any, tag: str) -> list[float] | None:
    """The backslash-separated numbers of a DICOM tag in an ITK metadata dictionary, or ``None``."""
    if not tags.HasKey(tag):
        return None
    try:
        return [float(v) for v in str(tags[tag]).strip().split("\\")]
    except (ValueError, TypeError):
        return None


def _transposed_float32(zyx: np.ndarray, block: int = 32) -> np.ndarray:
    """``zyx.T`` as a C-contiguous float32 array, copied in blocks (a plain strided copy is 2x slower)."""
    nz, ny, nx = zyx.shape
    out = np.empty((nx, ny, nz), np.float32)
    for i in range(0, nx, block):
        for j in range(0, ny, 2 * block):
            out[i : i + block, j : j + 2 * block] = zyx[:, j : j + 2 * block, i : i + block].T
    return out


def _read_dicom_series(path: Path) -> Any:
    """Read the one DICOM series in ``path`` as a float32 MetaTensor (X, Y, Z) with its RAS affine.

    One GDCM scan and one ``itk.ImageSeriesReader`` pass: the volume, affine and metadata are the
    ones MONAI's ``LoadImage(reader="ITKReader", dtype=np.float32)`` gives for the folder (ITK's
    geometry: origin of the first slice, direction of the slices, the mean slice step), without its
    second scan, the separate header pass of the slice check and its two full-volume copies. The
    slice positions are checked from the headers the reader kept (:func:`_check_slice_positions`).

    Raises:
        InputError: no series, several series, uneven slice positions.
    """
    import itk
    import torch
    from monai.data import ITKReader, MetaTensor

    files = _dicom_series_files(path)
    reader = itk.ImageSeriesReader.New(FileNames=files, ImageIO=itk.GDCMImageIO.New())
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.Update()
    tags = reader.GetMetaDataDictionaryArray()
    _check_slice_positions(path, [(_tag_numbers(t, "0020|0032"), _tag_numbers(t, "0020|0037")) for t in tags])
    image = reader.GetOutput()
    view, meta = ITKReader().get_data(image)  # (X, Y, Z) view of ITK's (Z, Y, X) buffer, MONAI's affine and meta
    zyx = np.asarray(view).T
    if zyx.ndim == 3:
        data = _transposed_float32(zyx)
    else:  # a single slice (2D) or vector pixels: load_volume refuses it by its shape
        data = np.ascontiguousarray(view, dtype=np.float32)
    meta["filename_or_obj"] = str(path)
    return MetaTensor(torch.from_numpy(data), meta=meta)


def _check_slice_positions(
    path: Path, slices: Sequence[tuple[Sequence[float] | None, Sequence[float] | None]], tolerance: float = 0.01
) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along the slice normal.

    ITK reads such a series with one averaged slice spacing (a series with 3 of 10 slices
    missing becomes a shorter volume with a wrong voxel size), so the mask would not fit the
    patient. Slices without ``ImagePositionPatient`` / ``ImageOrientationPatient`` are not checked.

    Args:
        path: the series folder, for the message.
        slices: per slice, its ``ImagePositionPatient`` (3 numbers) and ``ImageOrientationPatient``
            (6 numbers), ``None`` where the tag is missing or unreadable.

    Raises:
        InputError: naming the folder, the expected step and the positions found / missing.
    """
    if len(slices) < 3:
        return
    positions, normal = [], None
    for pos, ori in slices:
        if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
            return
        if normal is None:
            normal = np.cross(np.asarray(ori[:3]), np.asarray(ori[3:]))
        positions.append(float(np.dot(normal, pos)))
    z = np.sort(np.asarray(positions))
    steps = np.diff(z)
    step = float(steps.min())
    if step <= tolerance:
        raise InputError(path, f"two DICOM slices lie at the same position ({z[int(steps.argmin())]:g} mm along the "
                               "slice normal); pass a folder with one complete series")  # fmt: skip
    if float(steps.max() - step) <= max(tolerance, 0.01 * step):
        return
    missing = []
    for a, gap in zip(z[:-1], steps):
        n = int(round(gap / step)) - 1
        missing += [a + step * (k + 1) for k in range(max(n, 0))]
    found = ", ".join(f"{v:g}" for v in sorted({round(float(g), 3) for g in steps}))
    shown = ", ".join(f"{m:g}" for m in missing[:6]) + (", ..." if len(missing) > 6 else "")
    gaps = f"{len(missing)} slice position(s) missing ({shown} mm)" if missing else "slice steps are not multiples"
    raise InputError(
        path,
        f"uneven DICOM slice positions: expected a step of {step:g} mm, found steps {found} mm; {gaps}; "
        f"{len(slices)} slices span {z[-1] - z[0]:g} mm (read as is, ITK would average the spacing to "
        f"{(z[-1] - z[0]) / (len(slices) - 1):g} mm). Export the complete series",
    )


def load_volume(path: str | os.PathLike) -> Volume:
    """Read one 3D CT volume: a NIfTI file (nibabel), a DICOM series folder or another ITK format (ITK).

    Raises:
        InputError: missing path, unreadable file, not a 3D volume, NaN or infinite voxels, a DICOM
            series with uneven slice positions (missing slices).
    """
    import nibabel as nib
    from monai.transforms import LoadImage

    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    header = None
    try:
        if path.is_dir():
            from mkd.utils import keep_locale

            with keep_locale():  # GDCM leaves the process in the "C" locale
                data = _read_dicom_series(path)
        elif _is_nifti(path):
            img = nib.load(str(path))
            header = img.header.copy()
            data = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            from mkd.utils import keep_locale

            with keep_locale():
                data = LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(path))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad input
        what = "a DICOM series" if path.is_dir() else "an image"
        raise InputError(path, f"cannot read as {what} ({first_line(err, 300)})") from err
    if data.ndim != 3:
        kind = "2D image" if data.ndim == 2 else f"{data.ndim}D image"
        raise InputError(path, f"is a {kind} of shape {tuple(data.shape)}; expected one 3D volume")
    if header is None:
        affine = np.asarray(data.affine, dtype=np.float64)
    check_finite(data, path)
    warn_if_not_ct(data, path)
    return Volume(data=data, path=path, affine=affine, header=header)


def check_mask_path(path: str | os.PathLike) -> None:
    """A mask is written to a file name ending in ``.nii`` / ``.nii.gz`` that is not a folder, else InputError."""
    path = Path(path)
    if not _is_nifti(path):
        raise InputError(path, f"output must be a NIfTI file ending in {' or '.join(NIFTI_SUFFIXES)}")
    if path.is_dir():
        raise InputError(path, "is a folder; expected an output file name")


def check_mask_replaceable(path: str | os.PathLike, name: str = "output") -> None:
    """``overwrite`` replaces a mask (a uint8 NIfTI, what mkd infer writes), never a CT or another file.

    Args:
        path: the existing file ``overwrite`` would replace.
        name: the parameter that named it, for the message.

    Raises:
        InputError: ``path`` is not a uint8 NIfTI.
    """
    import nibabel as nib

    try:
        dtype = nib.load(str(path)).get_data_dtype()
    except Exception:  # noqa: BLE001 - unreadable: not a mask infer wrote
        dtype = None
    if dtype is None or dtype.kind != "u" or dtype.itemsize != 1:
        what = f"a {dtype} NIfTI (a CT?)" if dtype is not None else "not a NIfTI mask"
        raise InputError(path, f"is {what}, not a uint8 mask written by mkd infer; `overwrite=True` replaces only "
                         f"masks: give `{name}` another name")  # fmt: skip


def check_mask_output(input: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that the mask of ``input`` can be written to ``output``.

    What ``overwrite`` could never fix is said first: ``output`` is the input itself, or not a
    ``.nii`` / ``.nii.gz`` file name (:func:`check_mask_path`). Then an existing ``output`` needs
    ``overwrite`` and must be a mask (:func:`check_mask_replaceable`), and its folder must be writable.

    Returns:
        ``output`` as a path.

    Raises:
        InputError / MkdError: one line naming the file and the problem.
    """
    from mkd.utils import check_writable

    output = Path(output)
    if Path(input).exists() and output.exists() and output.resolve() == Path(input).resolve():
        raise InputError(output, "is the `input` volume; the mask would replace the CT: give `output` another file "
                         "name")  # fmt: skip
    check_mask_path(output)
    if output.exists() and not overwrite:
        raise output_exists(output)
    if output.exists():
        check_mask_replaceable(output)
    check_writable(output.parent, "mask")
    return output


def check_preview_path(preview: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that the PNG preview of a mask (:func:`mkd.reports.plot_mask_preview`) may be written.

    ``overwrite`` replaces an earlier preview (a PNG image) only, never a volume or another file.

    Returns:
        ``preview`` as a path.

    Raises:
        InputError / MkdError: not a ``.png`` name, an existing file without ``overwrite``, or one that is
            not a PNG image.
    """
    png = Path(preview)
    if png.suffix.lower() != ".png":
        raise InputError(png, "`preview` must be a file name ending in .png")
    if png.exists() and not overwrite:
        raise MkdError(f"{png}: preview already exists; pass `overwrite=True` to replace it")
    if png.exists() and (not png.is_file() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
        raise InputError(png, "is not a PNG image; `overwrite=True` replaces only an earlier preview: give `preview` "
                         "another name")  # fmt: skip
    return png


def mask_bytes(shape: Sequence[int], path: str | os.PathLike) -> int:
    """An upper estimate of the size of a uint8 mask file: the voxels plus the header, 1/4 of that for ``.nii.gz``.

    (A mask compresses far better than 4 to 1; the estimate errs on the safe side.)
    """
    raw = int(np.prod([int(s) for s in shape])) + 352
    return raw if not str(path).lower().endswith(".gz") else raw // 4 + 4096


def save_mask(mask: np.ndarray, volume: Volume, path: str | os.PathLike) -> Path:
    """Write a uint8 NIfTI with the input's affine (and its NIfTI header, when it was NIfTI), atomically.

    The file appears only when complete (:func:`mkd.utils.atomic_path`), with the umask's mode.
    """
    import nibabel as nib

    path = Path(path)
    check_mask_path(path)
    mask = np.asarray(mask).astype(np.uint8)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the input's {volume.shape}")
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(mask, volume.affine, header=header)
        img.header.set_slope_inter(1.0, 0.0)
        img.header["cal_min"], img.header["cal_max"] = 0, 1
    else:
        img = nib.Nifti1Image(mask, volume.affine)
        img.header.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"mkd infer mask"
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path


def check_folder_job(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, skip_existing: bool = False
) -> list[Path]:
    """The volumes of a folder job, after checking it can run (see :meth:`mkd.inference.Segmenter.segment_folder`).

    With ``overwrite``, every existing output must be a mask (:func:`check_mask_replaceable`).

    Raises:
        InputError / MkdError: as :meth:`mkd.inference.Segmenter.segment_folder`, or an existing output
            that is not a mask.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    volumes = find_volumes(input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "is a file; with a folder `input_dir`, `output_dir` must be a folder")
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(output_dir, "output folder is the input folder; masks would overwrite the CTs")
    from mkd.utils import check_writable

    check_writable(output_dir, "masks")
    existing = [output_dir / v.name for v in volumes if (output_dir / v.name).exists()]
    if existing and not (overwrite or skip_existing):
        raise MkdError(
            f"{existing[0]}: output already exists ({len(existing)} of {len(volumes)} in {output_dir}); "
            "pass `overwrite=True` to replace them or `skip_existing=True` to keep them"
        )
    for path in existing if overwrite else ():
        check_mask_replaceable(path, "output_dir")
    return volumes


def find_volumes(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files (``.nii``, ``.nii.gz``) directly in ``folder``, sorted by name.

    Raises:
        InputError: ``folder`` is missing or holds no NIfTI file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p))
    if not found:
        raise InputError(folder, "no NIfTI file (.nii, .nii.gz) in this folder")
    return found


def is_volume_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of NIfTI volumes (batch input), not one DICOM series."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and _is_nifti(p) for p in path.iterdir())
