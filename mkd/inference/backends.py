"""Where the network runs: eager PyTorch or ONNX Runtime on the CPU, thread counts, int8 calibration slices."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mkd.errors import MkdError
from mkd.inference.geometry import preprocess
from mkd.inference.io import find_volumes, is_volume_folder, load_volume
from mkd.inference.settings import InferenceSettings

__all__ = [
    "BACKENDS",
    "default_threads",
    "onnxruntime_available",
    "resolve_backend",
    "torch_threads",
    "TorchBackend",
    "OnnxRuntimeBackend",
    "CALIBRATION_SPLIT",
    "calibration_slices",
    "bf16_supported",
]

#: ``--backend`` choices: ``auto`` = ONNX Runtime on a CPU when it is installed, else PyTorch.
BACKENDS = ("auto", "torch", "onnxruntime")
#: the datalist list int8 calibration reads when the checkpoint records no ``run.train_split``: the slices of
#: every training patient (the lists are ``training``, ``validation``, ``test``, ``student``, ``unlabelled``)
CALIBRATION_SPLIT = "training"


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
            raise ValueError(f"backend onnxruntime runs on the CPU; got device {device} (use `backend=torch`)")
        if not onnxruntime_available():
            raise MkdError("backend onnxruntime needs the optional extra: pip install 'mkd[onnx]'")
    return backend


@contextlib.contextmanager
def torch_threads(n: int | None):
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

    The network runs as its inference copy (:func:`mkd.networks.fuse_for_inference`: BatchNorm folded into
    the convolutions, no concatenated map in the decoder, the same logits up to float rounding), which at
    256² takes about half the time of the network as trained (docs/export.md).

    Args:
        model: the network, in eval mode on ``device``; it is not changed.
        device: where it runs.
        channels_last: NHWC weights and input (faster convolutions with oneDNN on CPUs).
        bf16: run under ``torch.autocast(dtype=torch.bfloat16)`` (CPUs with native bf16, e.g. AVX-512 BF16 or
            AMX; :func:`bf16_supported`); the logits come back as float32.
        fuse: run the inference copy (default) rather than ``model`` itself.
    """

    name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        channels_last: bool = True,
        bf16: bool = False,
        fuse: bool = True,
    ) -> None:
        from mkd.networks import fuse_for_inference

        self.device = device
        self.fused = bool(fuse)
        self.model = (fuse_for_inference(model) if self.fused else model).to(device).eval()
        self.channels_last = bool(channels_last)
        self.bf16 = bool(bf16)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return out.float() if self.bf16 else out

    def describe(self) -> str:
        extra = (", channels_last" if self.channels_last else "") + (", bf16" if self.bf16 else "")
        return f"torch ({self.device}{extra}{', fused' if self.fused else ''}, inference_mode)"


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA device that supports it, or a CPU whose oneDNN does
    (AVX-512 BF16 / AMX); elsewhere bf16 would be emulated, slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
    source: str | os.PathLike, settings: InferenceSettings, split: str = CALIBRATION_SPLIT, n: int = 256
) -> np.ndarray:
    """Network-input slices ``(n, 3, H, W)`` for int8 calibration, evenly spread over ``source``.

    Args:
        source: a prepared dataset (``mkd prepare`` output: the slices of its ``split``, preprocessed
            as in training), a folder of NIfTI CT volumes, or one volume (preprocessed as by
            :class:`Segmenter`).
        settings: the preprocessing settings; ``image_size`` is the network's input size.
        split: datalist list of a prepared dataset: the checkpoint's ``run.train_split``, else
            :data:`CALIBRATION_SPLIT` (``training``).
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
        from mkd.data.transforms import slice_transform

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
