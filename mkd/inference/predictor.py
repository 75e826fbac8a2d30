"""The predictor: a network plus its preprocessing, from a CT volume to a mask on the volume's own grid.

:func:`predict_slices` is the network part (slices in, foreground probabilities and optionally a
teacher's reconstruction out, in batches; ``mkd evaluate`` and the report's panels predict with it
too); :class:`Segmenter` is the whole path of ``mkd infer`` and the bundle's ``inference.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mkd.data.checks import check_finite, check_resampled_size
from mkd.errors import InputError, MkdError
from mkd.inference.backends import (
    CALIBRATION_SPLIT,
    OnnxRuntimeBackend,
    TorchBackend,
    bf16_supported,
    calibration_slices,
    default_threads,
    resolve_backend,
    torch_threads,
)
from mkd.inference.geometry import invert_mask, preprocess
from mkd.inference.io import (
    Volume,
    check_folder_job,
    check_mask_output,
    load_volume,
    mask_bytes,
    save_mask,
)
from mkd.inference.settings import resolve_settings
from mkd.metrics.segmentation import keep_largest_component
from mkd.networks.checkpoint import CheckpointRecord

__all__ = ["predict_slices", "SlicePrediction", "check_logits", "InferenceResult", "FolderResult", "Segmenter"]

logger = logging.getLogger(__name__)

#: pixels per forward of the PyTorch backend on a CPU when no batch size is given (4 slices at 256²)
CPU_TORCH_BATCH_PIXELS = 2**18


@dataclass
class SlicePrediction:
    """What :func:`predict_slices` gives.

    Attributes:
        probs: float32 CPU tensor (S, C, h, w) of ``sigmoid(logits)``, in the order of the slices.
        recon: the reconstruction of a multi-task teacher (its ``recon`` feature scale), float32
            (S, C_in, h, w) clamped to [0, 1], on the network's device (evaluation reduces its PSNR
            there, as it always did); ``None`` unless asked for.
    """

    probs: torch.Tensor
    recon: torch.Tensor | None = None


def predict_slices(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    slices: np.ndarray | torch.Tensor,
    image_size: Sequence[int] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    name: Any = "the network",
    *,
    where: str | None = None,
    recon: bool = False,
) -> SlicePrediction:
    """Foreground probabilities of (S, C, H, W) slices, in batches.

    The slice prediction of ``mkd infer`` (:class:`Segmenter`), ``mkd evaluate``
    (:func:`mkd.evaluation.evaluate_checkpoint`, once per loader batch) and the report's qualitative
    panels: all three give the same probabilities and refuse a broken network the same way.

    Args:
        model: logits-out network in eval mode, or any callable ``f(x) -> logits`` (a backend of
            :class:`Segmenter`: :class:`TorchBackend`, :class:`OnnxRuntimeBackend`).
        slices: network input at the prepared size.
        image_size: resize each batch (``area``, as the training bundles) to this size first.
        batch_size: slices per forward.
        device: where the network is; each batch is moved there.
        name: what the error messages name (the checkpoint).
        where: what the error messages call the slices (``"test slices of p1, p2"``); default
            their indices in ``slices`` (``"slices 0-31"``).
        recon: also capture the reconstruction (``recon`` scale, through
            :class:`mkd.networks.FeatureRecorder`; the network's reconstruction decoder is switched on
            for the call and off otherwise). Needs a multi-task network, not a backend.

    Returns:
        :class:`SlicePrediction`: ``probs``, and ``recon`` when asked for.

    Raises:
        MkdError: the input or the network's output holds NaN or infinite values (a broken
            network would otherwise give an empty mask without a word); ``name`` starts the message.
        ValueError: ``recon`` for a network without a ``recon`` scale, or for a backend.
    """
    from mkd.networks import FeatureRecorder
    from mkd.networks.base import reconstruction

    if recon and not isinstance(model, torch.nn.Module):
        raise ValueError(f"{name}: a reconstruction needs the PyTorch network, not {type(model).__name__}")
    x_all = torch.as_tensor(slices, dtype=torch.float32)
    check_finite(x_all, name, "network input value")  # never hand NaN to the network
    step = max(int(batch_size), 1)
    recorder = FeatureRecorder(model, ["recon"], detach=True) if recon else None
    switch = reconstruction(model, recon) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    probs, recons = [], []
    try:
        with torch.inference_mode(), switch:
            for start in range(0, x_all.shape[0], step):
                x = x_all[start : start + step].to(device)
                if image_size is not None and tuple(x.shape[-2:]) != tuple(image_size):
                    x = F.interpolate(x, size=tuple(image_size), mode="area")
                if recorder is None:
                    logits = model(x).float()
                else:
                    with recorder.recording():
                        logits = model(x).float()
                    recons.append(recorder.features["recon"].float().clamp(0, 1))
                check_logits(logits, name, where or f"slices {start}-{start + x.shape[0] - 1}")
                probs.append(torch.sigmoid(logits).cpu())
    finally:
        if recorder is not None:
            recorder.close()
    return SlicePrediction(torch.cat(probs).contiguous(), torch.cat(recons) if recorder is not None else None)


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
            ``quantize="int8"``, the default calibration slices: the list the checkpoint trained on).
        window: HU window ``(low, high)`` or ``"max"``; overrides checkpoint / ``data_dir``.
        channels: ``"replicate"`` or ``"2.5d"``; overrides checkpoint / ``data_dir``.
        spacing: voxel size (x, y, z) mm; overrides checkpoint / ``data_dir``.
        size: network input size for checkpoints without ``run.image_size``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        batch_size: slices per forward; ``None``: 32 on a GPU; on a CPU 8 with ONNX Runtime (fastest for S1
            at 256² on 2 cores, see docs/export.md) and 2^18 pixels with PyTorch (4 slices at 256²).
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
        calibration: calibration slices for ``quantize``: a prepared dataset folder (the datalist list of
            the checkpoint's ``run.train_split``, else ``training``), a folder of NIfTI CT volumes or one
            volume; default ``data_dir``.
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
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out_channels = int(getattr(self.model, "out_channels", 1))
        self.lcc = out_channels == 1 if lcc is None else bool(lcc)
        self.threshold = float(threshold)
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        cores = os.cpu_count() or 1
        if self.threads > cores:
            logger.warning("`threads=%d` is more than the %d CPU cores of this machine; the network runs no faster "
                           "(often slower) with more threads than cores", self.threads, cores)  # fmt: skip
        if quantize not in (None, "int8", "bf16"):
            raise ValueError(f"quantize must be 'int8', 'bf16' or None, got {quantize!r}")
        if quantize == "bf16":
            if str(backend).lower() == "onnxruntime":
                raise MkdError("`quantize=bf16` runs on PyTorch (autocast); pass `backend=torch` or `backend=auto`")
            if not bf16_supported(self.device):
                raise MkdError(f"`quantize=bf16`: {self.device} has no native bf16 (on CPUs: AVX-512 BF16 or AMX), "
                               "so it would run slower than fp32; leave `quantize` out")  # fmt: skip
            backend = "torch"
        self.backend_name = resolve_backend(backend, self.device)
        self.batch_size = int(batch_size) if batch_size is not None else self._default_batch_size()
        if quantize == "int8":
            from mkd.networks.registry import STUDENTS

            name = self.record.arch
            if name not in STUDENTS:
                raise MkdError(
                    f"{self.checkpoint_path or 'network'}: `quantize=int8` is for students ({', '.join(STUDENTS)}); "
                    f"this is {name or type(self.model).__name__!r}"
                )
            if self.backend_name != "onnxruntime":
                raise ValueError(f"quantize int8 runs on ONNX Runtime; got backend {backend!r} on {self.device}")
        self._tmp: tempfile.TemporaryDirectory | None = None
        if self.backend_name == "torch":
            self.backend: Any = TorchBackend(self.model, self.device, channels_last and self.device.type == "cpu",
                                             bf16=quantize == "bf16")  # fmt: skip
        else:
            path = self._onnx_graph(quantize, calibration if calibration is not None else data_dir)
            self.backend = OnnxRuntimeBackend(path, self.threads, quantized=quantize)

    def _default_batch_size(self) -> int:
        """Slices per forward when none is given: 32 on a GPU; on a CPU 8 for ONNX Runtime and, for PyTorch,
        as many as make 2^18 pixels (4 at 256², 28 at 96²): the largest batch whose maps stay in cache
        (measured in docs/export.md)."""
        if self.device.type != "cpu":
            return 32
        if self.backend_name == "onnxruntime":
            return 8
        h, w = self.settings.image_size
        return max(1, CPU_TORCH_BATCH_PIXELS // (int(h) * int(w)))

    def _onnx_graph(self, quantize: str | None, calibration: Any) -> Path:
        """The (cached) ONNX graph for this network at the input size, int8 when ``quantize``."""
        from mkd.export import INT8_RECIPE, cached_onnx, export_model, quantize_int8

        size = tuple(self.settings.image_size)
        build_variant, extra = None, None
        if quantize is not None:
            if calibration is None:
                raise MkdError(
                    "`quantize=int8` needs calibration slices: pass `data_dir` (the prepared training data) "
                    "or `calibration` (a folder of them)"
                )
            split = self.record.train_split or CALIBRATION_SPLIT
            extra = {"calibration": str(Path(calibration).resolve()), "calibration_split": split,
                     "int8_recipe": INT8_RECIPE}  # fmt: skip

            def build_variant(fp32: Path, out: Path) -> None:
                slices = calibration_slices(calibration, self.settings, split=split, n=INT8_RECIPE["slices"])
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
        layout = isinstance(self.backend, TorchBackend) and self.backend.channels_last  # the backend's memory layout
        slices = volume_to_slices(pre.image, channels=self.settings.channels, channels_last=layout)
        lap("preprocess")
        name = self.checkpoint_path or type(self.model).__name__
        with torch_threads(self.threads if self.device.type == "cpu" else None):
            probs = predict_slices(
                self.backend, slices, self.settings.image_size, self.batch_size, self.device, name
            ).probs
        lap("network")
        stacked = probs[:, 0].permute(1, 2, 0)[None]  # (1, h, w, Z')
        mask = invert_mask(stacked, pre, self.threshold)  # the threshold of invert(), on the slices that need it
        if tuple(mask.shape) != vol.shape:
            raise RuntimeError(f"inverted shape {tuple(mask.shape)} differs from the input's {vol.shape}")
        lap("invert")
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

        ``overwrite`` replaces a mask (a uint8 NIfTI), never the input or another file
        (:func:`mkd.inference.io.check_mask_output`).

        Raises:
            InputError: bad input; ``output`` is the input, not ``.nii``/``.nii.gz``, or an existing file that is
                not a mask; ``output`` exists without ``overwrite``.
        """
        from mkd.utils import check_free_space

        # before the work, not after segmenting the whole volume: never the input, never a file that is not a mask
        output = check_mask_output(input, output, overwrite)
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


@dataclass
class FolderResult:
    """What :meth:`Segmenter.segment_folder` did: masks written, outputs kept, inputs that failed."""

    written: list[InferenceResult] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
