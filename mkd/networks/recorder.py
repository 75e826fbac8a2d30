"""Forward-hook feature recorder keyed by scale name, plus feature shape / channel / stride helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from mkd.networks.base import reconstruction

__all__ = [
    "FeatureRecorder",
    "unwrap_model",
    "resolve_scales",
    "feature_shapes",
    "feature_info",
    "feature_channels",
    "ScaleInfo",
]

_MAX_LISTED_PATHS = 30


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the network inside DistributedDataParallel / DataParallel wrappers (any nesting)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_scales(model: nn.Module, scales: str | Sequence[str]) -> dict[str, str]:
    """Map each requested scale name or raw module path to a module path of ``model`` (unwrapped).

    Args:
        model: a network (possibly DDP / DataParallel-wrapped). Scale names come from its
            ``feature_scales`` mapping when it has one.
        scales: scale names (``"enc"``, ``"bn"``, ``"dec"``, ``"recon"``) and/or module paths
            (``"encoder.3"``); a single string is one scale.

    Returns:
        ``{requested name: module path}`` in the requested order.

    Raises:
        ValueError: a name is neither a declared scale nor a module path; the message lists the
            valid scale names and module paths.
    """
    net = unwrap_model(model)
    if isinstance(scales, str):
        scales = [scales]
    declared: Mapping[str, str] = getattr(net, "feature_scales", {}) or {}
    modules = dict(net.named_modules())
    out: dict[str, str] = {}
    for name in scales:
        if name in declared:
            out[name] = declared[name]
        elif name and name in modules:
            out[name] = name
        else:
            paths = [p for p in modules if p]
            shown = ", ".join(paths[:_MAX_LISTED_PATHS])
            more = f", ... ({len(paths) - _MAX_LISTED_PATHS} more)" if len(paths) > _MAX_LISTED_PATHS else ""
            kind = type(net).__name__
            raise ValueError(
                f"unknown feature scale {name!r} for {kind}: valid scale names are "
                f"{', '.join(repr(s) for s in declared) or '(none declared)'}; "
                f"or give a module path: {shown}{more}"
            )
    return out


class FeatureRecorder:
    """Record intermediate outputs of a network by scale name, with forward hooks.

    The hooks store outputs only while recording is switched on, so the same model can
    run un-recorded (validation, inference) without keeping tensors alive. Works on
    DistributedDataParallel / DataParallel-wrapped models (hooks go on the inner
    module; call the wrapper as usual).

    Args:
        model: the network (or its DDP / DataParallel wrapper).
        scales: scale names declared by the network (``enc``, ``bn``, ``dec``, ``recon``)
            and/or raw module paths; they are the keys of :attr:`features`.
        detach: store ``output.detach()`` instead of the output (for a frozen teacher).

    Raises:
        ValueError: unknown scale name or module path (the message lists valid ones).

    Example:
        >>> from mkd.networks import build
        >>> net = build("s1")
        >>> with FeatureRecorder(net, ["enc", "bn"]) as rec:
        ...     with rec.recording():
        ...         logits = net(torch.zeros(2, 3, 32, 32))
        ...     {k: tuple(v.shape) for k, v in rec.features.items()}
        {'enc': (2, 32, 16, 16), 'bn': (2, 64, 8, 8)}

    A module that runs more than once in one forward keeps its last output. A scale whose
    module did not run (``recon`` with ``reconstruct=False``) is absent from
    :attr:`features` and listed in :attr:`missing`.
    """

    def __init__(self, model: nn.Module, scales: str | Sequence[str], detach: bool = False) -> None:
        self.paths = resolve_scales(model, scales)
        self.detach = detach
        self._active = False
        self._closed = False
        self._features: dict[str, Any] = {}
        net = unwrap_model(model)
        modules = dict(net.named_modules())
        self._handles = [modules[path].register_forward_hook(self._hook(name)) for name, path in self.paths.items()]

    @property
    def scales(self) -> list[str]:
        """The recorded scale names, in order."""
        return list(self.paths)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            if self.detach and isinstance(output, torch.Tensor):
                output = output.detach()
            self._features[name] = output

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """Switch recording on for the body; clears previous features on entry. Yields :attr:`features`."""
        if self._closed:  # not ``not self._handles``: a recorder of no scale has no hooks but is open
            raise RuntimeError("FeatureRecorder is closed; create a new one")
        self._features = {}
        self._active = True
        try:
            yield self._features
        finally:
            self._active = False

    @property
    def features(self) -> dict[str, Any]:
        """``{scale: tensor}`` from the last recording, in the requested order."""
        return {k: self._features[k] for k in self.paths if k in self._features}

    @property
    def missing(self) -> list[str]:
        """Scales whose module did not run during the last recording."""
        return [k for k in self.paths if k not in self._features]

    def clear(self) -> None:
        """Drop recorded tensors (free memory)."""
        self._features = {}

    def close(self) -> None:
        """Remove every hook (safe to call twice). The last :attr:`features` stay readable; :meth:`clear` frees them."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._closed = True

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: hooks never outlive the recorder
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("recording" if self._active else "idle")
        return f"FeatureRecorder({self.paths}, detach={self.detach}, {state})"


class ScaleInfo(NamedTuple):
    """Channels and stride (input size / feature size, per spatial dim) of one feature scale."""

    channels: int
    stride: tuple[int, ...]


def feature_shapes(
    model: nn.Module,
    input_size: int | Sequence[int],
    scales: Sequence[str] | None = None,
    in_channels: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes ``(C, *spatial)`` of the features at ``scales`` for one input of ``input_size``.

    Runs the network on the meta device (``torch.func.functional_call`` with meta
    copies of the parameters), so it costs no compute or memory, even for T2.
    Multi-task teachers run with ``reconstruct`` switched on for the probe.

    Args:
        model: a network (possibly wrapped).
        input_size: spatial input size (an int is used for every spatial dim).
        scales: scale names / module paths; default: all of ``model.feature_scales``.
        in_channels: input channels; default ``model.in_channels``.

    Returns:
        ``{scale: (channels, *spatial)}``.
    """
    net = unwrap_model(model)
    if scales is None:
        scales = list(getattr(net, "feature_scales", {}))
    spatial_dims = int(getattr(net, "spatial_dims", 2))
    size = (int(input_size),) * spatial_dims if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    channels = int(in_channels if in_channels is not None else net.in_channels)
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in net.state_dict(keep_vars=True).items()}
    x = torch.empty((1, channels, *size), device="meta")
    was_training = net.training
    try:
        net.eval()
        with reconstruction(net, True), FeatureRecorder(net, scales, detach=True) as rec, torch.no_grad():
            with rec.recording():
                torch.func.functional_call(net, meta_state, (x,))
            feats = rec.features
    finally:
        net.train(was_training)
    return {k: tuple(int(s) for s in v.shape[1:]) for k, v in feats.items()}


def feature_info(model: nn.Module, scales: Sequence[str] | None = None) -> dict[str, ScaleInfo]:
    """Channels and stride of each scale, probed at ``4 * size_divisor`` per side on the meta device."""
    net = unwrap_model(model)
    spatial_dims = int(getattr(net, "spatial_dims", 2))
    probe = 4 * int(getattr(net, "size_divisor", 16))
    shapes = feature_shapes(net, probe, scales)
    return {
        k: ScaleInfo(channels=s[0], stride=tuple(probe // int(d) for d in s[1 : spatial_dims + 1]))
        for k, s in shapes.items()
    }


def feature_channels(model: nn.Module, scales: Sequence[str] | None = None) -> dict[str, int]:
    """``{scale: channels}`` of the features at ``scales`` (default: every declared scale)."""
    return {k: v.channels for k, v in feature_info(model, scales).items()}
