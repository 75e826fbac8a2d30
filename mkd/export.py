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

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mkd.errors import InputError, MkdError, first_line, output_exists
from mkd.networks.checkpoint import CheckpointRecord
from mkd.utils import atomic_path

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
    "file_sha256",
    "checkpoint_metadata",
    "cached_onnx",
    "quantize_int8",
    "INT8_RECIPE",
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
    with atomic_path(path) as tmp:
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
        import onnx  # noqa: F401 - checked here; _set_onnx_metadata uses it
    except ImportError as err:
        raise MkdError("ONNX export needs the optional 'onnx' package: pip install 'mkd[onnx]'") from err
    path = Path(path)
    model = _prepare(model)
    example = _example(tuple(input_size), int(getattr(model, "in_channels", 3)))
    with atomic_path(path) as tmp:
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
        _set_onnx_metadata(tmp, metadata or {})
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


def _is_export(path: Path) -> bool:
    """``path`` is a file that :func:`export_checkpoint` could have written: a TorchScript archive or ONNX model.

    TorchScript is a zip archive with a ``code/`` folder (a ``torch.save`` checkpoint has none);
    ONNX is a protobuf ``ModelProto`` that the ``onnx`` package reads.
    """
    import zipfile

    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in f"/{name}" for name in zf.namelist())
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX (or no onnx package to tell): keep it
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


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
    from mkd.networks import load_network

    fmt = _check_format(fmt)
    checkpoint = Path(checkpoint)
    model, ckpt = load_network(checkpoint, map_location="cpu")
    record = CheckpointRecord.from_checkpoint(ckpt)
    if size is not None:
        input_size = (int(size), int(size))
    else:
        input_size = record.image_size or (256, 256)  # type: ignore[assignment]
    if output is None:
        output = checkpoint.with_name(checkpoint.stem + (".ts.pt" if fmt == "torchscript" else ".onnx"))
    output = Path(output)
    if output.resolve() == checkpoint.resolve():
        raise InputError(output, "output would overwrite the checkpoint")
    if output.exists() and not overwrite:
        raise output_exists(output)
    if output.exists() and not _is_export(output):
        raise InputError(output, "not a TorchScript or ONNX export (a checkpoint or another file?); "
                         "`overwrite=True` replaces only an export: give `output` another name")  # fmt: skip
    metadata = checkpoint_metadata(checkpoint, record, model, fmt, input_size)
    try:
        result = export_model(model, fmt, output, input_size, metadata, check=check, atol=atol)
    except (RuntimeError, ValueError) as err:
        if isinstance(err, MkdError):
            raise
        raise MkdError(f"{checkpoint}: cannot export to {fmt}: {first_line(err, 300)}") from err
    logger.info("exported %s to %s (%s)", checkpoint, output, fmt)
    return result


def checkpoint_metadata(
    checkpoint: str | os.PathLike,
    ckpt: Mapping[str, Any] | CheckpointRecord,
    model: nn.Module,
    fmt: str,
    input_size: tuple[int, int],
) -> dict[str, Any]:
    """The JSON metadata an export of ``checkpoint`` carries (see docs/export.md).

    Args:
        checkpoint: the checkpoint file (recorded as ``source_checkpoint``).
        ckpt: its dict or :class:`~mkd.networks.CheckpointRecord` (network name and kwargs, preprocessing).
        model: the loaded network.
        fmt: ``"torchscript"`` or ``"onnx"``.
        input_size: ``(H, W)`` of the export.
    """
    from mkd import __version__

    record = CheckpointRecord.from_checkpoint(ckpt)
    return {
        "mkd_version": __version__,
        "format": fmt,
        "network": {"name": record.arch, "kwargs": record.network_kwargs},
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
        "preprocessing": record.preprocessing or None,
        "source_checkpoint": str(checkpoint),
    }


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_problem(path: Path, key: Mapping[str, Any]) -> str | None:
    """Why the cached graph at ``path`` cannot be used for ``key`` (``None``: it can)."""
    try:
        import onnx

        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        props = {p.key: p.value for p in proto.metadata_props}
        meta = json.loads(props[METADATA_KEY])
    except Exception as err:  # noqa: BLE001 - any failure to read it means "do not use it"
        return f"unreadable ({first_line(err)})"
    cached = meta.get("cache") if isinstance(meta, Mapping) else None
    if not isinstance(cached, Mapping):
        return "no cache record in its metadata"
    for k, v in key.items():
        if cached.get(k) != v:
            return f"stale ({k} {cached.get(k)!r}, expected {v!r})"
    return None


def cached_onnx(
    checkpoint: str | os.PathLike,
    input_size: tuple[int, int],
    *,
    model: nn.Module | None = None,
    ckpt: Mapping[str, Any] | CheckpointRecord | None = None,
    variant: str = "fp32",
    build_variant: Any = None,
    extra_key: Mapping[str, Any] | None = None,
    rebuild: bool = False,
) -> Path:
    """The ONNX graph of ``checkpoint`` at ``input_size``, exported once and cached beside the checkpoint.

    The cache file is ``<stem>.<H>x<W>.onnx`` (``<stem>.<H>x<W>.<variant>.onnx`` for other variants, e.g.
    ``int8``) next to the checkpoint. Its metadata records the checkpoint's SHA-256, the input size and
    the variant (plus ``extra_key``); a cached file is used only when it parses, passes ONNX's checker
    and all of these match. Otherwise it is rebuilt (export with :func:`export_model`, checked against
    PyTorch's logits, written atomically), never used. A checkpoint folder that is not writable gets
    its cache under ``$XDG_CACHE_HOME/mkd/onnx`` (``~/.cache/mkd/onnx``).

    Args:
        checkpoint: an mkd checkpoint file.
        input_size: ``(H, W)`` of the graph (the batch is dynamic).
        model / ckpt: the loaded network and its checkpoint dict or :class:`~mkd.networks.CheckpointRecord`
            (loaded from ``checkpoint`` when ``None``).
        variant: ``"fp32"`` (the plain export) or a name for a derived graph.
        build_variant: ``f(fp32_path, out_path)`` writing the derived graph (needed when ``variant``
            is not ``"fp32"``); the fp32 graph is made (or reused) first.
        extra_key: more entries that must match (e.g. the calibration data of a quantised graph).
        rebuild: ignore any cached file.

    Returns:
        the path of a valid cached graph.

    Raises:
        MkdError: ``onnx`` is not installed, or the export fails its check.
    """
    checkpoint = Path(checkpoint)
    input_size = (int(input_size[0]), int(input_size[1]))
    if model is None or ckpt is None:
        from mkd.networks import load_network

        model, ckpt = load_network(checkpoint, map_location="cpu")
    key = {"checkpoint_sha256": file_sha256(checkpoint), "input_size": list(input_size), "variant": variant}
    key.update(dict(extra_key or {}))
    suffix = "" if variant == "fp32" else f".{variant}"
    name = f"{checkpoint.stem}.{input_size[0]}x{input_size[1]}{suffix}.onnx"
    path = checkpoint.with_name(name)
    if not os.access(checkpoint.parent, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mkd" / "onnx"
        path = cache / f"{key['checkpoint_sha256'][:16]}-{name}"
        if not path.exists():
            from mkd.utils import check_writable

            try:
                check_writable(cache, "ONNX graph")
            except MkdError:
                raise MkdError(
                    f"{checkpoint.parent} and {cache}: neither folder is writable, so the ONNX graph of "
                    f"{checkpoint.name} cannot be cached; set XDG_CACHE_HOME to a writable folder, or pass "
                    "`backend=torch`"
                ) from None
    if path.exists() and not rebuild:
        problem = _cache_problem(path, key)
        if problem is None:
            return path
        logger.warning("%s: cached ONNX graph is %s; rebuilding it", path, problem)
    metadata = checkpoint_metadata(checkpoint, ckpt, model, "onnx", input_size)
    metadata["cache"] = key
    if variant == "fp32":
        export_model(model, "onnx", path, input_size, metadata, check=True)
    else:
        if build_variant is None:
            raise ValueError(f"variant {variant!r} needs build_variant")
        base = cached_onnx(checkpoint, input_size, model=model, ckpt=ckpt)
        with atomic_path(path) as tmp:
            build_variant(base, tmp)
            _set_onnx_metadata(tmp, metadata)
    logger.info("exported %s to %s (ONNX cache, %s)", checkpoint, path, variant)
    return path


def _set_onnx_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` as JSON under ``metadata_props["mkd"]`` of the ONNX file at ``path`` (in place)."""
    import onnx

    proto = onnx.load(str(path))
    for entry in list(proto.metadata_props):
        if entry.key == METADATA_KEY:
            proto.metadata_props.remove(entry)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(dict(metadata), default=str)
    proto.producer_name = "mkd"
    onnx.save(proto, str(path))


#: how ``--quantize int8`` builds its graph (docs/export.md, "int8"; chosen on validation Dice of six phantom
#: students, then checked on their test patients): min-max calibration on this many slices, and the first and
#: the last convolution (the image's raw intensities in, the logits out) kept in fp32. Part of the ONNX cache key.
INT8_RECIPE = {"calibration": "minmax", "slices": 256, "fp32_layers": "first and last conv", "version": 2}


def quantize_int8(
    fp32: str | os.PathLike,
    output: str | os.PathLike,
    slices: np.ndarray,
    batch_size: int = 8,
    keep_fp32: Sequence[str] | None = None,
) -> Path:
    """ONNX Runtime static int8 quantisation of ``fp32`` into ``output``, calibrated on ``slices``.

    ``onnxruntime.quantization.quantize_static`` with a ``CalibrationDataReader`` that feeds ``slices``
    (network input, ``(N, 3, H, W)`` float32) in batches: QDQ format, per-channel int8 weights,
    uint8 activations, min-max calibration. The graph is pre-processed (shape inference, fusions) first.
    The nodes named in ``keep_fp32`` stay fp32; by default (``None``) the first and the last convolution
    (:data:`INT8_RECIPE`).

    Raises:
        MkdError: ``onnxruntime`` is not installed, or no calibration slices.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise MkdError("int8 quantisation needs onnxruntime: pip install 'mkd[onnx]'") from err
    slices = np.ascontiguousarray(np.asarray(slices, dtype=np.float32))
    if slices.ndim != 4 or slices.shape[0] == 0:
        raise MkdError(f"int8 calibration needs slices (N, C, H, W), got shape {slices.shape}")
    batches = [slices[i : i + batch_size] for i in range(0, slices.shape[0], max(int(batch_size), 1))]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {"image": batch}

    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="mkd-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            if keep_fp32 is None:
                keep_fp32 = _first_and_last_conv(pre)
            quantize_static(
                str(pre),
                str(output),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=list(keep_fp32),
            )
    return output


def _first_and_last_conv(path: Path) -> list[str]:
    """The names of the first and the last ``Conv`` / ``ConvTranspose`` node of the ONNX graph at ``path``."""
    import onnx

    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    return list(dict.fromkeys([names[0], names[-1]])) if names else []
