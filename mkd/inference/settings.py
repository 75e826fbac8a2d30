"""How a volume becomes network input: the ``mkd prepare`` settings, the network's input size, their sources."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkd.errors import InputError
from mkd.networks.checkpoint import CheckpointRecord

__all__ = ["InferenceSettings", "resolve_settings"]

_DEFAULTS: dict[str, Any] = {"window": (-57.0, 164.0), "channels": "replicate", "spacing": None, "size": 256}


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
