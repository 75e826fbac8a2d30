"""Export a trained network for deployment: TorchScript or ONNX, with metadata, checked against PyTorch.

The networks are traced (``torch.jit.trace``; they use Python control flow on shapes that
``torch.jit.script`` does not compile) at the checkpoint's input size, so the exported
model takes ``(N, 3, H, W)`` with a **dynamic batch** ``N`` and the fixed ``H x W`` it was
exported for, and returns segmentation logits ``(N, 1, H, W)`` (foreground =
``sigmoid(logits) > 0.5``). Multi-task teachers are exported without their reconstruction
decoder (``reconstruct=False``).

The export carries a JSON metadata record (network name and kwargs, input size, channels,
preprocessing settings when the checkpoint records them, mkd version): TorchScript in the
``_extra_files`` entry ``mkd.json``, ONNX in ``metadata_props`` (key ``mkd``). Both files are
written atomically.

Example:
    >>> from mkd.export import export_checkpoint, verify  # doctest: +SKIP
    >>> result = export_checkpoint("runs/student-s1/models/model.pt", "onnx")  # doctest: +SKIP
    >>> result.path, result.max_abs_diff  # doctest: +SKIP
    (PosixPath('runs/student-s1/models/model.onnx'), 2.4e-07)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mkd.errors import InputError, MkdError

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "ExportResult",
    "export_checkpoint",
    "export_model",
    "export_torchscript",
    "export_onnx",
    "load_exported",
    "read_metadata",
    "verify",
]

logger = logging.getLogger(__name__)

#: Supported formats and their file suffix.
FORMATS: dict[str, str] = {"torchscript": ".pt", "onnx": ".onnx"}
#: TorchScript extra-file name / ONNX metadata key of the JSON metadata.
METADATA_KEY = "mkd"
_TS_EXTRA = "mkd.json"
ONNX_OPSET = 17


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        path: the exported file.
        format: ``"torchscript"`` or ``"onnx"``.
        metadata: the metadata stored in it.
        max_abs_diff: largest |exported - PyTorch| logit difference found by :func:`verify`
            (``None`` when not verified).
    """

    path: Path
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float | None = None


@contextlib.contextmanager
def _atomic_path(target: Path):
    """A temporary path beside ``target`` (same suffix), renamed over it when the body succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_format(fmt: str) -> str:
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise MkdError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _prepare(model: nn.Module) -> nn.Module:
    if hasattr(model, "reconstruct"):
        model.reconstruct = False
    return model.eval().cpu()


def _example(input_size: tuple[int, int], in_channels: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, in_channels, *input_size, generator=torch.Generator().manual_seed(0))


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Trace ``model`` at ``input_size`` and save it (``torch.jit.save``) with ``mkd.json`` metadata, atomically.

    Load it with ``torch.jit.load(path, _extra_files={"mkd.json": ""})``, or :func:`load_exported`.
    """
    path = Path(path)
    model = _prepare(model)
    example = _example(tuple(input_size), int(getattr(model, "in_channels", 3)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {_TS_EXTRA: json.dumps(dict(metadata or {}), default=str)}
    with _atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
    opset_version: int = ONNX_OPSET,
) -> Path:
    """Export ``model`` to ONNX (input ``image`` (N, C, H, W), output ``logits``, dynamic batch), atomically.

    Uses PyTorch's TorchScript-based exporter (``dynamo=False``: no ``onnxscript`` needed) and stores
    ``metadata`` as JSON in ``metadata_props["mkd"]`` (needs the ``onnx`` package: ``pip install mkd[onnx]``).

    Raises:
        MkdError: ``onnx`` is not installed.
    """
    try:
        import onnx
    except ImportError as err:
        raise MkdError("ONNX export needs the optional 'onnx' package: pip install 'mkd[onnx]'") from err
    path = Path(path)
    model = _prepare(model)
    example = _example(tuple(input_size), int(getattr(model, "in_channels", 3)))
    with _atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset_version,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(dict(metadata or {}), default=str)
        proto.producer_name = "mkd"
        onnx.save(proto, str(tmp))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The mkd metadata of an exported file (TorchScript ``mkd.json`` or ONNX ``metadata_props``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return json.loads(props.get(METADATA_KEY, "{}"))
    extra = {_TS_EXTRA: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[_TS_EXTRA] or "{}")


def load_exported(path: str | os.PathLike):
    """A callable ``f(x: torch.Tensor) -> torch.Tensor`` (logits) running the exported file.

    TorchScript runs with ``torch.jit.load``; ONNX with ONNX Runtime's CPU provider (needs
    ``onnxruntime``: ``pip install 'mkd[onnx]'``).
    """
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise MkdError("running an ONNX export needs onnxruntime: pip install 'mkd[onnx]'") from err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0])

        return run_onnx
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_ts(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.cpu())

    return run_ts


def verify(
    path: str | os.PathLike,
    model: nn.Module,
    input_size: tuple[int, int],
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Compare the exported file's logits with PyTorch's on random inputs (several batch sizes).

    Returns:
        the largest absolute difference.

    Raises:
        MkdError: a difference beyond ``atol + rtol * |reference|``, or a wrong output shape.
    """
    run = load_exported(path)
    model = _prepare(model)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batch_sizes:
        x = torch.rand(n, int(getattr(model, "in_channels", 3)), *input_size, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise MkdError(f"{path}: output shape {tuple(got.shape)} for batch {n}; PyTorch gives {tuple(ref.shape)}")
        diff = (got - ref).abs()
        worst = max(worst, float(diff.max()))
        if not bool((diff <= atol + rtol * ref.abs()).all()):
            raise MkdError(f"{path}: logits differ from PyTorch by up to {float(diff.max()):.3g} (atol {atol:g})")
    return worst


def export_model(
    model: nn.Module,
    fmt: str,
    path: str | os.PathLike,
    input_size: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export a built network (``fmt`` = ``"torchscript"`` or ``"onnx"``) and optionally :func:`verify` it."""
    fmt = _check_format(fmt)
    input_size = tuple(int(s) for s in input_size)  # type: ignore[assignment]
    min_side = int(getattr(model, "size_divisor", 1))
    if len(input_size) != 2 or min(input_size) < min_side:
        raise ValueError(f"input_size must be (H, W) with sides >= {min_side}, got {input_size}")
    path = Path(path)
    if fmt == "torchscript":
        export_torchscript(model, path, input_size, metadata)
    else:
        export_onnx(model, path, input_size, metadata)
    diff = None
    if check:
        try:
            diff = verify(path, model, input_size, atol=atol)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return ExportResult(path=path, format=fmt, metadata=dict(metadata or {}), max_abs_diff=diff)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike | None = None,
    size: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> ExportResult:
    """Export an mkd checkpoint; the input size is ``run.image_size`` unless ``size`` is given.

    Args:
        checkpoint: ``RUN/models/model.pt`` (or any :func:`mkd.networks.save_checkpoint` file).
        fmt: ``"torchscript"`` or ``"onnx"``.
        output: the file to write; default beside the checkpoint, ``model.ts.pt`` / ``model.onnx``.
        size: square input side, overriding the checkpoint's ``run.image_size`` (default 256 when
            the checkpoint has none).
        check: compare the export's logits with PyTorch's (:func:`verify`).
        atol: tolerance of the check.
        overwrite: replace an existing ``output``.

    Raises:
        MkdError: unknown format, existing output, failed check; ``InputError`` for a bad checkpoint.
    """
    from mkd import __version__
    from mkd.networks import load_network

    fmt = _check_format(fmt)
    checkpoint = Path(checkpoint)
    model, ckpt = load_network(checkpoint, map_location="cpu")
    run = ckpt.get("run") if isinstance(ckpt.get("run"), Mapping) else {}
    if size is not None:
        input_size = (int(size), int(size))
    elif run.get("image_size") is not None:
        input_size = tuple(int(s) for s in run["image_size"])  # type: ignore[assignment]
    else:
        input_size = (256, 256)
    if output is None:
        output = checkpoint.with_name(checkpoint.stem + (".ts.pt" if fmt == "torchscript" else ".onnx"))
    output = Path(output)
    if output.resolve() == checkpoint.resolve():
        raise InputError(output, "output would overwrite the checkpoint")
    if output.exists() and not overwrite:
        raise MkdError(f"{output}: output already exists; pass --overwrite to replace it")
    network = ckpt.get("network", {})
    from mkd.inference import _checkpoint_preprocessing

    metadata = {
        "mkd_version": __version__,
        "format": fmt,
        "network": {"name": network.get("name"), "kwargs": network.get("kwargs", {})},
        "input": {
            "name": "image",
            "shape": ["batch", int(getattr(model, "in_channels", 3)), *input_size],
            "dtype": "float32",
            "range": [0.0, 1.0],
        },
        "output": {
            "name": "logits",
            "shape": ["batch", int(getattr(model, "out_channels", 1)), *input_size],
            "foreground": "sigmoid(logits) > 0.5",
        },
        "preprocessing": _checkpoint_preprocessing(ckpt) or None,
        "source_checkpoint": str(checkpoint),
    }
    try:
        result = export_model(model, fmt, output, input_size, metadata, check=check, atol=atol)
    except (RuntimeError, ValueError) as err:
        if isinstance(err, MkdError):
            raise
        raise MkdError(f"{checkpoint}: cannot export to {fmt}: {str(err).strip().splitlines()[0]}") from err
    logger.info("exported %s to %s (%s)", checkpoint, output, fmt)
    return result
