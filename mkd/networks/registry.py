"""Network registry: ``build(name, preset=..., **kwargs)``, width presets, and a meta-device summary."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mkd.errors import MkdError
from mkd.networks.base import MkdNetwork
from mkd.networks.recorder import feature_shapes
from mkd.networks.student import S1_FEATURES, S2_FEATURES, StudentUNet
from mkd.networks.transunet import TransUNet
from mkd.networks.unet import MultiTaskUNet, UNet

__all__ = ["NETWORKS", "PRESETS", "PRESET_NAMES", "TEACHERS", "STUDENTS", "build", "describe", "NetworkSummary",
           "network_table"]  # fmt: skip

#: Registry name -> network class.
NETWORKS: dict[str, type[MkdNetwork]] = {
    "unet": UNet,
    "t1": MultiTaskUNet,
    "t2": TransUNet,
    "s1": StudentUNet,
    "s2": StudentUNet,
}
TEACHERS: tuple[str, ...] = ("unet", "t1", "t2")
STUDENTS: tuple[str, ...] = ("s1", "s2")

_UNET_WIDTHS = {
    "thesis": (64, 128, 256, 512, 1024),
    "medium": (32, 64, 128, 256, 512),
    "small": (16, 32, 64, 128, 256),
    "tiny": (8, 16, 32, 64, 128),
}
#: the width presets every network has (``mkd.networks.build(name, preset=...)``)
PRESET_NAMES: tuple[str, ...] = tuple(_UNET_WIDTHS)
_T2_WIDTHS: dict[str, dict[str, Any]] = {
    "thesis": {},
    "medium": dict(
        features=(32, 64, 128, 256),
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        mlp_dim=1536,
        decoder_channels=(128, 64, 32, 16),
        head_channels=256,
    ),
    "small": dict(
        features=(16, 32, 64, 128),
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        mlp_dim=512,
        decoder_channels=(64, 32, 16, 16),
        head_channels=128,
    ),
    "tiny": dict(
        features=(8, 16, 32, 64),
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        mlp_dim=128,
        decoder_channels=(32, 16, 8, 8),
        head_channels=64,
    ),
}

#: ``PRESETS[name][preset]`` -> constructor kwargs. ``thesis`` = the thesis widths (the class
#: defaults); ``medium`` / ``small`` = CPU-sized teachers (SPEC section 8: 2-head U-Net 32..512 is
#: 10.8 M, 16..256 is 2.7 M parameters); ``tiny`` = for tests. Students are CPU-sized already, so
#: their ``medium`` and ``small`` presets are the thesis widths; ``tiny`` halves them.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {k: {"features": v} for k, v in _UNET_WIDTHS.items()},
    "t1": {k: {"features": v} for k, v in _UNET_WIDTHS.items()},
    "t2": _T2_WIDTHS,
    "s1": {
        "thesis": {"features": S1_FEATURES},
        "medium": {"features": S1_FEATURES},
        "small": {"features": S1_FEATURES},
        "tiny": {"features": (8, 16, 32)},
    },
    "s2": {
        "thesis": {"features": S2_FEATURES},
        "medium": {"features": S2_FEATURES},
        "small": {"features": S2_FEATURES},
        "tiny": {"features": S1_FEATURES},
    },
}


def _check_name(name: str) -> None:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETWORKS)}")


def build(name: str, preset: str = "thesis", **kwargs: Any) -> MkdNetwork:
    """Build a registered network.

    Args:
        name: one of ``unet``, ``t1``, ``t2``, ``s1``, ``s2``.
        preset: width preset (``thesis``, ``medium``, ``small``, ``tiny``; see :data:`PRESETS`).
        kwargs: constructor arguments (``spatial_dims``, ``in_channels``, ``out_channels``,
            ``features``, ...); they override the preset.

    Returns:
        the network, with ``network_name = name`` and its full constructor arguments in ``config``.

    Raises:
        ValueError: unknown name or preset (the message lists the valid ones), or bad arguments.

    Example:
        >>> net = build("t1", preset="small")
        >>> round(net.num_parameters() / 1e6, 2)
        2.71
    """
    _check_name(name)
    presets = PRESETS[name]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for network {name!r}; expected one of {', '.join(presets)}")
    args = {**copy.deepcopy(presets[preset]), **kwargs}
    net = NETWORKS[name](**args)
    net.network_name = name
    return net


@dataclass
class NetworkSummary:
    """What ``describe`` reports: parameter count and per-scale feature shapes ``(C, *spatial)``."""

    name: str
    preset: str
    params: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    features: dict[str, tuple[int, ...]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def describe(
    name: str,
    preset: str = "thesis",
    input_size: int | Sequence[int] = 256,
    scales: Sequence[str] | None = None,
    **kwargs: Any,
) -> NetworkSummary:
    """Parameter count and per-scale feature shapes of a network, computed on the meta device.

    Nothing is allocated or computed, so this is instant even for the 175 M-parameter T2.

    Args:
        name: registry name.
        preset: width preset.
        input_size: spatial input size (int: same for every spatial dim).
        scales: scales to report; default all declared.
        kwargs: constructor overrides (``spatial_dims``, ``in_channels``, ``features``, ...).
    """
    with torch.device("meta"):
        net = build(name, preset, **kwargs)
    spatial = (int(input_size),) * net.spatial_dims if isinstance(input_size, int) else tuple(input_size)
    out_shape = (net.out_channels, *spatial)
    feats = feature_shapes(net, spatial, scales)
    return NetworkSummary(
        name=name,
        preset=preset,
        params=net.num_parameters(),
        input_shape=(net.in_channels, *spatial),
        output_shape=out_shape,
        features=feats,
        config=dict(net.config),
    )


def _shape_str(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "-"
    channels, *spatial = shape
    return f"{channels} x {'x'.join(str(s) for s in spatial)}"


def network_table(
    names: Sequence[str] | None = None, preset: str = "thesis", input_size: int = 256, **kwargs: Any
) -> list[str]:
    """The table of ``mkd networks``: parameters, output and feature shapes (C x spatial) per network.

    Args:
        names: networks to list; default all of :data:`NETWORKS`.
        preset: width preset.
        input_size: input side length.
        kwargs: constructor overrides, as :func:`describe`.

    Returns:
        a heading line, the column names, a rule and one row per network.

    Raises:
        MkdError: a network these settings cannot build (``NAME: why``).
    """
    infos = []
    for name in names or NETWORKS:
        try:
            infos.append(describe(name, preset, input_size, **kwargs))
        except ValueError as err:
            raise MkdError(f"{name}: {err}") from None
    rows = [[i.name, f"{i.params / 1e6:.3f} M", _shape_str(i.output_shape),
             *(_shape_str(i.features.get(s)) for s in ("enc", "bn", "dec", "recon"))] for i in infos]  # fmt: skip
    header = ["network", "params", "output", "enc", "bn", "dec", "recon"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"preset {preset}, input {_shape_str(infos[0].input_shape)}; feature shapes are channels x spatial"]
    for r in [header, ["-" * w for w in widths], *rows]:  # names and params left, shapes right
        lines.append("  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))))
    return lines
