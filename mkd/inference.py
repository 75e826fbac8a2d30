"""Segment a whole CT volume with a trained network: the ``mkd infer`` library.

A volume (NIfTI file, or a DICOM series folder read with ITK) goes through exactly
the pipeline ``mkd prepare`` used for the training slices
(:func:`mkd.data.volume_transforms`: RAS orientation, optional spacing, HU window,
in-plane ``area`` resize; then :func:`mkd.data.volume_to_slices` for the 3 channels),
plus the training bundles' second ``area`` resize to the network's input size when it
differs from the prepared size. The network runs on batches of slices; the
foreground probability ``sigmoid(logits)`` is mapped back to the input's voxel grid
(trilinear resize back, then MONAI's inverse of ``Spacingd`` and ``Orientationd``)
and thresholded at 0.5, so the mask has exactly the input's shape, affine and voxel
order. Optionally only the largest 3D connected component is kept (MONAI
``KeepLargestConnectedComponent``). The mask is written atomically as uint8 NIfTI.
:meth:`Segmenter.segment_folder` does the same for every NIfTI file of a folder
(nnU-Net's folder-in, folder-out convention, masks under the input file names).

Example:
    >>> from mkd.inference import Segmenter  # doctest: +SKIP
    >>> seg = Segmenter("runs/distill-s1-bn/models/model.pt", data_dir="mkd_data", lcc=True)  # doctest: +SKIP
    >>> result = seg.segment_to_file("ct.nii.gz", "ct_mask.nii.gz")  # doctest: +SKIP
    >>> result.shape, result.seconds  # doctest: +SKIP
    ((512, 512, 94), 3.1)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mkd.data.checks import check_finite, check_resampled_size, warn_if_not_ct
from mkd.errors import InputError, MkdError, first_line
from mkd.metrics.segmentation import keep_largest_component
from mkd.networks.checkpoint import CheckpointRecord
from mkd.utils import atomic_path

__all__ = [
    "InferenceSettings",
    "InferenceResult",
    "Volume",
    "Preprocessed",
    "Segmenter",
    "FolderResult",
    "find_volumes",
    "check_folder_job",
    "is_volume_folder",
    "resolve_settings",
    "load_volume",
    "preprocess",
    "invert",
    "predict_slices",
    "check_logits",
    "keep_largest_component",
    "save_mask",
    "infer",
    "NIFTI_SUFFIXES",
    "BACKENDS",
    "calibration_slices",
    "default_threads",
    "onnxruntime_available",
    "resolve_backend",
    "TorchBackend",
    "OnnxRuntimeBackend",
]

logger = logging.getLogger(__name__)

#: Output file name endings accepted for masks.
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: ``--backend`` choices: ``auto`` = ONNX Runtime on a CPU when it is installed, else PyTorch.
BACKENDS = ("auto", "torch", "onnxruntime")

_DEFAULTS: dict[str, Any] = {"window": (-57.0, 164.0), "channels": "replicate", "spacing": None, "size": 256}


# --- settings -----------------------------------------------------------------------------------


@dataclass
class InferenceSettings:
    """How a volume is turned into network input (the ``mkd prepare`` settings + the network's input size).

    Attributes:
        window: ``(low, high)`` HU mapped to [0, 1], or ``"max"``.
        channels: ``"replicate"`` or ``"2.5d"``.
        spacing: target voxel size (x, y, z) in mm, or ``None`` for the native grid.
        prepare_size: in-plane size ``mkd prepare`` resized the slices to.
        image_size: ``(H, W)`` the network was trained on (the bundle's ``image_size``); when it differs
            from ``prepare_size`` the slices get a second ``area`` resize, as in training.
        sources: where each setting came from (``"option"``, ``"checkpoint"``, ``"DATA/prepare.json"``,
            ``"default"``).
    """

    window: tuple[float, float] | str = _DEFAULTS["window"]
    channels: str = "replicate"
    spacing: tuple[float, float, float] | None = None
    prepare_size: int = 256
    image_size: tuple[int, int] = (256, 256)
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the CLI, e.g. ``window -57,164 HU, channels replicate, spacing native, size 96 (...)``."""
        win = "max" if self.window == "max" else f"{self.window[0]:g},{self.window[1]:g} HU"
        spacing = "native" if self.spacing is None else ",".join(f"{s:g}" for s in self.spacing) + " mm"
        size = f"{self.image_size[0]}x{self.image_size[1]}"
        if self.prepare_size != self.image_size[0] or self.image_size[0] != self.image_size[1]:
            size = f"{self.prepare_size} then {size}"
        src = ", ".join(f"{k} from {v}" for k, v in self.sources.items())
        return f"window {win}, channels {self.channels}, spacing {spacing}, size {size}" + (f" ({src})" if src else "")

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the schema of ``prepare.json``'s ``settings`` plus ``image_size``)."""
        return {
            "window": self.window if self.window == "max" else list(self.window),
            "channels": self.channels,
            "spacing": None if self.spacing is None else list(self.spacing),
            "size": self.prepare_size,
            "image_size": list(self.image_size),
        }


def resolve_settings(
    checkpoint: Mapping[str, Any] | CheckpointRecord | None = None,
    data_dir: str | os.PathLike | None = None,
    window: tuple[float, float] | str | None = None,
    channels: str | None = None,
    spacing: Sequence[float] | str | None = None,
    size: int | None = None,
) -> InferenceSettings:
    """Combine the preprocessing settings; per setting the first source that has it wins.

    Order: explicit arguments, then the checkpoint (:attr:`CheckpointRecord.preprocessing`, prepare.json
    schema), then ``DATA/prepare.json`` of ``data_dir``, then the ``mkd prepare`` defaults
    ([-57, 164] HU, replicate, native spacing, 256).

    The network's input size is the checkpoint's :attr:`CheckpointRecord.image_size` (the training
    bundles record ``run.image_size``), else ``size``, else the prepared size.
    ``size`` (the ``--size`` option) is a fall-back for checkpoints without ``run.image_size``.
    ``spacing="none"`` asks for the native grid explicitly (``None`` means "not given").
    Without a recorded prepared size (checkpoint or ``data_dir``) the slices are resized once,
    straight to the network's input size.

    Args:
        checkpoint: the checkpoint dict (as :func:`mkd.networks.load_network` returns it) or its
            :class:`~mkd.networks.CheckpointRecord`; ``None`` for a network without metadata.
        data_dir: a prepared dataset.
        window, channels, spacing: explicit settings (the ``mkd infer`` options).
        size: the network's input size for a checkpoint that records none.

    Raises:
        InputError: ``data_dir`` has no readable ``prepare.json``.
        ValueError: a setting out of range (bad window, channels, size).
    """
    from mkd.data.transforms import parse_window

    record = CheckpointRecord.from_checkpoint(checkpoint)
    layers: list[tuple[str, dict[str, Any]]] = []
    explicit = {k: v for k, v in {"window": window, "channels": channels, "spacing": spacing}.items() if v is not None}
    layers.append(("option", explicit))
    layers.append(("checkpoint", dict(record.preprocessing)))
    if data_dir is not None:
        from mkd.data.prepare import load_prepare_info

        try:
            info = load_prepare_info(data_dir)
        except InputError:
            raise
        except ValueError as err:  # JSONDecodeError
            raise InputError(Path(data_dir) / "prepare.json", f"not valid JSON ({err})") from err
        layers.append((str(Path(data_dir) / "prepare.json"), dict(info.get("settings", {}))))
    layers.append(("default", dict(_DEFAULTS)))

    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("window", "channels", "spacing", "size"):
        for name, layer in layers:
            if key in layer:
                chosen[key], sources[key] = layer[key], name
                break
    image_size: Any = record.image_size
    if image_size is not None:
        sources["image_size"] = "checkpoint"
    elif size is not None:
        image_size, sources["image_size"] = size, "option"
    else:
        image_size, sources["image_size"] = chosen["size"], sources["size"]
    if isinstance(image_size, (int, float)):
        image_size = (image_size, image_size)
    try:
        image_size = tuple(int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be two integers (H, W), got {image_size!r}") from None
    if len(image_size) != 2 or min(image_size) < 1 or max(image_size) > 4096:
        where = f" (from the {sources['image_size']})" if sources["image_size"] != "default" else ""
        raise ValueError(f"image_size must be two integers (H, W) from 1 to 4096, got {list(image_size)}{where}")
    if chosen["channels"] not in ("replicate", "2.5d"):
        raise ValueError(f"channels must be 'replicate' or '2.5d', got {chosen['channels']!r}")
    sp = chosen["spacing"]
    if isinstance(sp, str) and sp.strip().lower() in ("none", "native", ""):
        sp = None
    if sp is not None:
        sp = tuple(float(s) for s in sp)
        if len(sp) != 3:
            raise ValueError(f"spacing must be three numbers (x, y, z) in mm, got {sp}")
    # without a recorded prepared size, the slices are resized once, straight to the network's size
    prepare_size = image_size[0] if sources["size"] == "default" else int(chosen["size"])
    if prepare_size < 1:
        raise ValueError(f"size must be positive, got {prepare_size}")
    return InferenceSettings(
        window=parse_window(chosen["window"]),
        channels=chosen["channels"],
        spacing=sp,
        prepare_size=prepare_size,
        image_size=image_size,  # type: ignore[arg-type]
        sources={k: v for k, v in sources.items() if v != "default"},
    )


# --- reading ------------------------------------------------------------------------------------


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


def _check_dicom_folder(path: Path) -> None:
    """Exactly one DICOM series in ``path`` (ITK's GDCM series scan) with evenly spaced slices, else InputError."""
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
    _check_slice_positions(path, list(scan.GetFileNames(uids[0])))


def _dicom_numbers(io: Any, tag: str) -> list[float] | None:
    found, text = io.GetValueFromTag(tag, "")
    try:
        return [float(v) for v in str(text).strip().split("\\")] if found else None
    except ValueError:
        return None


def _check_slice_positions(path: Path, files: Sequence[str], tolerance: float = 0.01) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along the slice normal.

    ITK reads such a series with one averaged slice spacing (a series with 3 of 10 slices
    missing becomes a shorter volume with a wrong voxel size), so the mask would not fit the
    patient. Slices without ``ImagePositionPatient`` / ``ImageOrientationPatient`` are not checked.

    Raises:
        InputError: naming the folder, the expected step and the positions found / missing.
    """
    import itk

    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(name))
        io.ReadImageInformation()
        pos, ori = _dicom_numbers(io, "0020|0032"), _dicom_numbers(io, "0020|0037")
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
        f"{len(files)} slices span {z[-1] - z[0]:g} mm (read as is, ITK would average the spacing to "
        f"{(z[-1] - z[0]) / (len(files) - 1):g} mm). Export the complete series",
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
                _check_dicom_folder(path)
                data = LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(path))
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


# --- preprocessing and its inverse -------------------------------------------------------------


def _pipeline(settings: InferenceSettings):
    """``volume_transforms`` without its loader (the same transform objects ``mkd prepare`` builds)."""
    from monai.transforms import Compose, LoadImaged, Resized

    from mkd.data.transforms import volume_transforms

    full = volume_transforms(
        keys=("image",), window=settings.window, spacing=settings.spacing, size=settings.prepare_size
    )
    xforms = list(full.transforms)
    if not (isinstance(xforms[0], LoadImaged) and isinstance(xforms[-1], Resized)):
        raise RuntimeError("mkd.data.volume_transforms changed: expected LoadImaged first and Resized last")
    return Compose(xforms[1:])


@dataclass
class Preprocessed:
    """A volume after the ``mkd prepare`` pipeline, with what :func:`invert` needs.

    Attributes:
        image: MetaTensor (1, prepare_size, prepare_size, Z') in [0, 1]; its ``applied_operations``
            record the geometry.
        transform: the MONAI ``Compose`` that ran (its transforms invert the geometry).
        settings: the settings used.
    """

    image: Any
    transform: Any
    settings: InferenceSettings


def preprocess(volume: Volume | Any, settings: InferenceSettings) -> Preprocessed:
    """The ``mkd prepare`` volume pipeline after loading: channel-first, RAS, spacing, window, resize.

    Args:
        volume: a :class:`Volume`, or a MetaTensor (X, Y, Z) with its affine.
        settings: the preprocessing settings.

    Returns:
        the preprocessed volume; slice it with :func:`mkd.data.volume_to_slices`.
    """
    data = volume.data if isinstance(volume, Volume) else volume
    transform = _pipeline(settings)
    return Preprocessed(image=transform({"image": data})["image"], transform=transform, settings=settings)


def invert(values: torch.Tensor, preprocessed: Preprocessed) -> torch.Tensor:
    """Map a (1, h, w, Z') map on the preprocessed grid back to the input's voxel grid.

    ``values`` may be at the network's input size (h, w) rather than the prepared size; it is
    first resized in-plane to the prepared size. Then MONAI inverts the recorded geometry in
    reverse order: ``Resized`` (with ``trilinear`` interpolation instead of the forward ``area``,
    Z unchanged), ``Spacingd`` (bilinear resampling) and ``Orientationd`` (exact flips /
    transposes). Use it on probabilities and threshold afterwards.

    Args:
        values: float tensor (1, h, w, Z').
        preprocessed: what :func:`preprocess` returned for this volume.

    Returns:
        float tensor (X, Y, Z): the input's shape and voxel order.

    Raises:
        ValueError: ``values`` does not have the preprocessed volume's slice count.
    """
    from monai.data import MetaTensor
    from monai.transforms.utils import convert_applied_interp_mode
    from monai.utils import TraceKeys

    ref = preprocessed.image
    ops = list(ref.applied_operations)
    if not ops or ops[-1][TraceKeys.CLASS_NAME] != "Resize":
        raise RuntimeError("the preprocessed volume has no Resize as its last operation")
    n_slices = int(ref.shape[-1])
    v = torch.as_tensor(values).detach().to("cpu", torch.float32).as_subclass(torch.Tensor)
    if v.ndim != 4 or v.shape[0] != 1 or v.shape[-1] != n_slices:
        raise ValueError(f"expected values of shape (1, h, w, {n_slices}), got {tuple(v.shape)}")
    if tuple(v.shape) != tuple(ref.shape):
        v = F.interpolate(v[None], size=tuple(ref.shape[1:]), mode="trilinear", align_corners=False)[0]
    # probabilities are resized back linearly, not with the forward "area" (blocky when upsampling)
    ops[-1] = convert_applied_interp_mode(ops[-1], mode="trilinear", align_corners=False)
    m = MetaTensor(v, meta=dict(ref.meta), applied_operations=ops)
    # Compose.inverse needs the transform objects that ran forward (MONAI checks their ids)
    out = preprocessed.transform.inverse({"image": m})["image"]
    return torch.as_tensor(out).as_subclass(torch.Tensor)[0]


def predict_slices(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    slices: np.ndarray | torch.Tensor,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    name: Any = "the network",
) -> torch.Tensor:
    """Foreground probabilities of (S, C, H, W) slices, in batches.

    Args:
        model: logits-out network in eval mode, or any callable ``f(x) -> logits`` (a backend of
            :class:`Segmenter`: :class:`TorchBackend`, :class:`OnnxRuntimeBackend`).
        slices: network input at the prepared size.
        image_size: resize each batch (``area``, as the training bundles) to this size first.
        batch_size: slices per forward.
        device: where the network is.
        name: what the error messages name (the checkpoint).

    Returns:
        float32 CPU tensor (S, 1, h, w) of ``sigmoid(logits)``.

    Raises:
        MkdError: the input or the network's output holds NaN or infinite values (a broken
            network would otherwise give an empty mask without a word); ``name`` starts the message.
    """
    x_all = torch.as_tensor(slices, dtype=torch.float32)
    check_finite(x_all, name, "network input value")  # never hand NaN to the network
    outs = []
    with torch.inference_mode():
        for start in range(0, x_all.shape[0], max(int(batch_size), 1)):
            x = x_all[start : start + batch_size].to(device)
            if image_size is not None and tuple(x.shape[-2:]) != tuple(image_size):
                x = F.interpolate(x, size=tuple(image_size), mode="area")
            logits = model(x).float()
            check_logits(logits, name, f"slices {start}-{start + x.shape[0] - 1}")
            outs.append(torch.sigmoid(logits).cpu())
    return torch.cat(outs).contiguous()


def check_logits(logits: torch.Tensor, name: Any = "the network", where: str = "") -> None:
    """Refuse non-finite network output (NaN weights, overflow) instead of thresholding it into an empty mask.

    Raises:
        MkdError: ``"<name>: the network's output holds N NaN / infinite values (...)"``.
    """
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        raise MkdError(
            f"{name}: the network's output holds {int(bad.sum())} NaN or infinite value(s) of {logits.numel()}"
            f"{f' ({where})' if where else ''}; its weights are broken (a diverged run?): retrain it or use an "
            "earlier checkpoint"
        )


# --- backends -----------------------------------------------------------------------------------


def default_threads() -> int:
    """The CPU cores this process may use (``os.sched_getaffinity``, else ``os.cpu_count``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not on Linux
        return max(os.cpu_count() or 1, 1)


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (the ``mkd[onnx]`` extra) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve_backend(backend: str, device: torch.device) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (one of :data:`BACKENDS`) on ``device``.

    ``auto``: PyTorch on a GPU; ONNX Runtime on a CPU when installed, else PyTorch.

    Raises:
        ValueError: an unknown backend, or ``onnxruntime`` with a non-CPU device.
        MkdError: ``onnxruntime`` asked for but not installed.
    """
    backend = str(backend).lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backend onnxruntime runs on the CPU; got device {device} (use --backend torch)")
        if not onnxruntime_available():
            raise MkdError("backend onnxruntime needs the optional extra: pip install 'mkd[onnx]'")
    return backend


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the body, then back to what it was."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchBackend:
    """Eager PyTorch: ``model(x)`` in ``torch.inference_mode``, channels-last memory on the CPU by default.

    Args:
        model: the network, in eval mode on ``device``.
        device: where it runs.
        channels_last: NHWC weights and input (faster convolutions with oneDNN on CPUs).
    """

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool = True) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(x)

    def describe(self) -> str:
        return f"torch ({self.device}{', channels_last' if self.channels_last else ''}, inference_mode)"


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (``CPUExecutionProvider``, all graph optimisations, ``threads`` intra-op threads).

    Args:
        path: the ONNX graph (input ``image``, output ``logits``).
        threads: ``intra_op_num_threads``.
        quantized: shown by :meth:`describe` (``int8``).
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int, quantized: str | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.path = Path(path)
        self.threads = int(threads)
        self.quantized = quantized
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])

    def describe(self) -> str:
        q = f", {self.quantized}" if self.quantized else ""
        return f"onnxruntime (CPU{q}, {self.threads} threads, graph {self.path})"


def calibration_slices(
    source: str | os.PathLike, settings: InferenceSettings, split: str = "train", n: int = 64
) -> np.ndarray:
    """Network-input slices ``(n, 3, H, W)`` for int8 calibration, evenly spread over ``source``.

    Args:
        source: a prepared dataset (``mkd prepare`` output: the slices of its ``split``, preprocessed
            as in training), a folder of NIfTI CT volumes, or one volume (preprocessed as by
            :class:`Segmenter`).
        settings: the preprocessing settings; ``image_size`` is the network's input size.
        split: datalist split of a prepared dataset.
        n: number of slices.

    Raises:
        InputError: ``source`` is missing, or holds no slice.
    """
    from mkd.data.transforms import volume_to_slices

    source = Path(source)
    size = tuple(settings.image_size)
    if (source / "prepare.json").is_file():
        from mkd.bundle import check_datalist
        from mkd.data import load_split
        from mkd.evaluation import slice_transform

        check_datalist(source, [split])
        items = load_split(source, split)
        picks = np.unique(np.linspace(0, len(items) - 1, num=min(n, len(items))).round().astype(int))
        transform = slice_transform(size)
        xs = [torch.as_tensor(transform(dict(items[i]))["image"]) for i in picks]
        return torch.stack(xs).float().numpy()
    paths = find_volumes(source) if source.is_dir() and is_volume_folder(source) else [source]
    chunks = []
    for path in paths:
        pre = preprocess(load_volume(path), settings)
        x = torch.as_tensor(volume_to_slices(pre.image, channels=settings.channels), dtype=torch.float32)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="area")
        chunks.append(x)
    slices = torch.cat(chunks)
    picks = np.unique(np.linspace(0, slices.shape[0] - 1, num=min(n, slices.shape[0])).round().astype(int))
    return slices[picks].numpy()


# --- writing ------------------------------------------------------------------------------------


def _check_output(path: Path) -> None:
    if not _is_nifti(path):
        raise InputError(path, f"output must be a NIfTI file ending in {' or '.join(NIFTI_SUFFIXES)}")
    if path.is_dir():
        raise InputError(path, "is a folder; expected an output file name")


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
    _check_output(path)
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


# --- the segmenter ------------------------------------------------------------------------------


@dataclass
class InferenceResult:
    """One segmented volume.

    Attributes:
        mask: uint8 (X, Y, Z) on the input's grid.
        affine: the input's affine.
        shape: the input's shape.
        foreground: number of foreground voxels.
        slices: number of slices the network saw.
        seconds: wall time of the whole volume (read, preprocess, network, invert, post-process, write).
        timings: the parts: ``load``, ``preprocess``, ``network``, ``invert``, ``postprocess``, ``write``.
        output: the file written, if any.
    """

    mask: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]
    foreground: int
    slices: int
    seconds: float
    timings: dict[str, float]
    output: Path | None = None


class Segmenter:
    """A network plus its preprocessing, ready to segment volumes.

    Args:
        checkpoint: an mkd checkpoint (``RUN/models/model.pt``) or an already built network.
        data_dir: a prepared dataset whose ``prepare.json`` gives the preprocessing settings (and, with
            ``quantize="int8"``, the default calibration slices: its training split).
        window: HU window ``(low, high)`` or ``"max"``; overrides checkpoint / ``data_dir``.
        channels: ``"replicate"`` or ``"2.5d"``; overrides checkpoint / ``data_dir``.
        spacing: voxel size (x, y, z) mm; overrides checkpoint / ``data_dir``.
        size: network input size for checkpoints without ``run.image_size``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        batch_size: slices per forward; ``None``: 8 on a CPU (fastest for S1 at 256² with ONNX Runtime on
            2 cores, see docs/export.md), 32 on a GPU.
        lcc: keep only the largest 3D connected component; ``None`` (default): on for single-organ
            networks (one output channel).
        threshold: probability threshold (0.5: ``sigmoid(logits) > 0.5``).
        backend: ``"auto"`` (ONNX Runtime on a CPU when installed, else PyTorch), ``"torch"`` or
            ``"onnxruntime"``. The ONNX graph of a checkpoint is exported once and cached beside it
            (:func:`mkd.export.cached_onnx`).
        threads: CPU threads for the network (PyTorch's intra-op threads while segmenting, ONNX Runtime's
            ``intra_op_num_threads``); ``None``: the cores this process may use.
        quantize: ``"int8"``: ONNX Runtime static int8 quantisation (students only), calibrated on
            ``calibration``.
        calibration: calibration slices for ``quantize``: a prepared dataset folder (its training split),
            a folder of NIfTI CT volumes or one volume; default ``data_dir``.
        channels_last: the PyTorch backend's memory format on the CPU.

    Raises:
        InputError: unreadable checkpoint or ``data_dir``.
        ValueError / MkdError: a backend that cannot run here, ``quantize`` on a teacher or without data.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | torch.nn.Module,
        data_dir: str | os.PathLike | None = None,
        window: tuple[float, float] | str | None = None,
        channels: str | None = None,
        spacing: Sequence[float] | None = None,
        size: int | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        lcc: bool | None = None,
        threshold: float = 0.5,
        backend: str = "auto",
        threads: int | None = None,
        quantize: str | None = None,
        calibration: str | os.PathLike | None = None,
        channels_last: bool = True,
    ) -> None:
        from mkd.networks import load_network
        from mkd.utils import resolve_device

        self.device = resolve_device(None if device is None else str(device))
        if isinstance(checkpoint, torch.nn.Module):
            self.model, ckpt, self.checkpoint_path = checkpoint, {}, None
        else:
            self.checkpoint_path = Path(checkpoint)
            self.model, ckpt = load_network(checkpoint, map_location="cpu")
        self.record = CheckpointRecord.from_checkpoint(ckpt)
        if hasattr(self.model, "reconstruct"):
            self.model.reconstruct = False
        self.model.to(self.device).eval()
        in_channels = getattr(self.model, "in_channels", 3)
        if in_channels != 3:
            raise InputError(self.checkpoint_path, f"network takes {in_channels} input channels; mkd slices have 3")
        self.settings = resolve_settings(self.record, data_dir, window, channels, spacing, size)
        self.batch_size = int(batch_size) if batch_size is not None else (8 if self.device.type == "cpu" else 32)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out_channels = int(getattr(self.model, "out_channels", 1))
        self.lcc = out_channels == 1 if lcc is None else bool(lcc)
        self.threshold = float(threshold)
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        cores = os.cpu_count() or 1
        if self.threads > cores:
            logger.warning("--threads %d is more than the %d CPU cores of this machine; the network runs no faster "
                           "(often slower) with more threads than cores", self.threads, cores)  # fmt: skip
        self.backend_name = resolve_backend(backend, self.device)
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
        if quantize is not None:
            from mkd.networks.registry import STUDENTS

            name = self.record.arch
            if name not in STUDENTS:
                raise MkdError(
                    f"{self.checkpoint_path or 'network'}: --quantize int8 is for students ({', '.join(STUDENTS)}); "
                    f"this is {name or type(self.model).__name__!r}"
                )
            if self.backend_name != "onnxruntime":
                raise ValueError(f"quantize int8 runs on ONNX Runtime; got backend {backend!r} on {self.device}")
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.backend_name == "torch":
            self.backend: Any = TorchBackend(self.model, self.device, channels_last and self.device.type == "cpu")
        else:
            path = self._onnx_graph(quantize, calibration if calibration is not None else data_dir)
            self.backend = OnnxRuntimeBackend(path, self.threads, quantized=quantize)

    def _onnx_graph(self, quantize: str | None, calibration: Any) -> Path:
        """The (cached) ONNX graph for this network at the input size, int8 when ``quantize``."""
        from mkd.export import cached_onnx, export_model, quantize_int8

        size = tuple(self.settings.image_size)
        build_variant, extra = None, None
        if quantize is not None:
            if calibration is None:
                raise MkdError(
                    "--quantize int8 needs calibration slices: pass --data (the prepared training data) "
                    "or --calibration DIR"
                )
            split = self.record.train_split or "train"
            extra = {"calibration": str(Path(calibration).resolve()), "calibration_split": split}

            def build_variant(fp32: Path, out: Path) -> None:
                slices = calibration_slices(calibration, self.settings, split=split)
                quantize_int8(fp32, out, slices, batch_size=min(self.batch_size, 16))

        if self.checkpoint_path is None:  # a built network: export into a private temporary folder
            self._tmp = tempfile.TemporaryDirectory(prefix="mkd-onnx-")
            fp32 = Path(self._tmp.name) / "model.onnx"
            export_model(self.model, "onnx", fp32, size, {"source": type(self.model).__name__}, check=True)
            self.model.to(self.device)
            if build_variant is None:
                return fp32
            out = Path(self._tmp.name) / "model.int8.onnx"
            build_variant(fp32, out)
            return out
        return cached_onnx(
            self.checkpoint_path,
            size,
            model=self.model,
            ckpt=self.record,
            variant=quantize or "fp32",
            build_variant=build_variant,
            extra_key=extra,
        )

    def describe(self) -> str:
        """One line: the backend, its device / threads and the graph used."""
        text = self.backend.describe()
        if self.backend_name == "torch" and self.device.type == "cpu":
            text = text[:-1] + f", {self.threads} threads)"
        return text

    def segment(self, volume: str | os.PathLike | Volume) -> InferenceResult:
        """Segment one volume (path or :class:`Volume`); nothing is written."""
        from mkd.data.transforms import volume_to_slices

        t: dict[str, float] = {}
        t0 = tick = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            t[name] = now - tick
            tick = now

        vol = volume if isinstance(volume, Volume) else load_volume(volume)
        lap("load")
        check_resampled_size(vol.shape, vol.affine, self.settings.spacing, vol.path, "spacing")
        pre = preprocess(vol, self.settings)
        slices = volume_to_slices(pre.image, channels=self.settings.channels)
        lap("preprocess")
        name = self.checkpoint_path or type(self.model).__name__
        with _torch_threads(self.threads if self.device.type == "cpu" else None):
            probs = predict_slices(self.backend, slices, self.settings.image_size, self.batch_size, self.device, name)
        lap("network")
        stacked = probs[:, 0].permute(1, 2, 0)[None]  # (1, h, w, Z')
        back = invert(stacked, pre)
        if tuple(back.shape) != vol.shape:
            raise RuntimeError(f"inverted shape {tuple(back.shape)} differs from the input's {vol.shape}")
        lap("invert")
        mask = (back > self.threshold).numpy().astype(np.uint8)
        if self.lcc:
            mask = keep_largest_component(mask)
        lap("postprocess")
        return InferenceResult(
            mask=mask,
            affine=vol.affine,
            shape=vol.shape,
            foreground=int(mask.sum()),
            slices=int(slices.shape[0]),
            seconds=time.perf_counter() - t0,
            timings=t,
        )

    def segment_to_file(
        self, input: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
    ) -> InferenceResult:
        """Segment ``input`` and write the mask to ``output`` (NIfTI, atomically).

        Raises:
            InputError: bad input, output not ``.nii``/``.nii.gz``, or output exists without ``overwrite``.
        """
        from mkd.utils import check_free_space, check_writable

        output = Path(output)
        _check_output(output)
        if output.exists() and not overwrite:
            raise MkdError(f"{output}: output already exists; pass --overwrite to replace it")
        if Path(input).resolve() == output.resolve():
            raise InputError(output, "output would overwrite the input")
        check_writable(output.parent, "mask")  # before the work, not after segmenting the whole volume
        t0 = time.perf_counter()
        vol = load_volume(input)
        check_free_space(output.parent, mask_bytes(vol.shape, output), "mask")
        load_s = time.perf_counter() - t0
        result = self.segment(vol)
        result.timings = {"load": load_s, **{k: v for k, v in result.timings.items() if k != "load"}}
        t1 = time.perf_counter()
        save_mask(result.mask, vol, output)
        result.timings["write"] = time.perf_counter() - t1
        result.seconds = time.perf_counter() - t0
        result.output = output
        logger.info("%s -> %s: %d slices, %.2f s", input, output, result.slices, result.seconds)
        return result

    def segment_folder(
        self,
        input_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        skip_existing: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> FolderResult:
        """Segment every NIfTI volume in ``input_dir`` into ``output_dir`` under the same file name.

        The folder convention of nnU-Net's predictor: ``CASE.nii.gz`` in, ``CASE.nii.gz``
        (the mask) out. Outputs that already exist are an error before anything runs,
        unless ``overwrite`` (replace them) or ``skip_existing`` (leave them; for
        continuing an interrupted batch). A volume that is not a readable 3D CT (an
        :class:`InputError` from :func:`load_volume`) does not stop the others: its
        one-line error is collected in :attr:`FolderResult.failed` and no file is written
        for it (each mask is written atomically). Other errors (out of memory, a broken
        network) stop the batch.

        Raises:
            InputError: ``input_dir`` holds no NIfTI file, or ``output_dir`` is the input
                folder or a file.
            MkdError: outputs exist without ``overwrite`` / ``skip_existing``.
        """
        say = progress or logger.info
        input_dir, output_dir = Path(input_dir), Path(output_dir)
        volumes = check_folder_job(input_dir, output_dir, overwrite, skip_existing)
        output_dir.mkdir(parents=True, exist_ok=True)
        result = FolderResult()
        for i, volume in enumerate(volumes, 1):
            out = output_dir / volume.name
            if out.exists() and skip_existing and not overwrite:
                result.skipped.append(out)
                say(f"[{i}/{len(volumes)}] {volume.name}: exists, skipped")
                continue
            try:
                one = self.segment_to_file(volume, out, overwrite=True)
            except InputError as err:
                result.failed[volume] = str(err)
                say(f"[{i}/{len(volumes)}] {volume.name}: FAILED: {err}")
                continue
            result.written.append(one)
            say(f"[{i}/{len(volumes)}] {volume.name}: {one.foreground} foreground voxels, {one.seconds:.2f} s")
        return result


def check_folder_job(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False, skip_existing: bool = False
) -> list[Path]:
    """The volumes of a folder job, after checking it can run (see :meth:`Segmenter.segment_folder`).

    Raises:
        InputError / MkdError: as :meth:`Segmenter.segment_folder`.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    volumes = find_volumes(input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "is a file; with a folder --input, --output must be a folder")
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(output_dir, "output folder is the input folder; masks would overwrite the CTs")
    from mkd.utils import check_writable

    check_writable(output_dir, "masks")
    existing = [output_dir / v.name for v in volumes if (output_dir / v.name).exists()]
    if existing and not (overwrite or skip_existing):
        raise MkdError(
            f"{existing[0]}: output already exists ({len(existing)} of {len(volumes)} in {output_dir}); "
            "pass --overwrite to replace them or --skip-existing to keep them"
        )
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


@dataclass
class FolderResult:
    """What :meth:`Segmenter.segment_folder` did: masks written, outputs kept, inputs that failed."""

    written: list[InferenceResult] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def infer(
    checkpoint: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> InferenceResult:
    """Segment one volume and write the mask: ``Segmenter(checkpoint, **kwargs).segment_to_file(input, output)``."""
    return Segmenter(checkpoint, **kwargs).segment_to_file(input, output, overwrite=overwrite)
