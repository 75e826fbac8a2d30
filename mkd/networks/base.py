"""The common base of mkd networks: named feature scales, a size divisor, rebuildable config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["MkdNetwork", "MultiTaskForward", "SCALES", "plain_config", "reconstruction"]

#: Scale names every network declares (multi-task teachers add ``"recon"``).
SCALES: tuple[str, ...] = ("enc", "bn", "dec")


@contextlib.contextmanager
def reconstruction(network: nn.Module, on: bool) -> Iterator[nn.Module]:
    """Switch a multi-task network's reconstruction decoder on or off for a block, then restore it.

    Networks without a ``reconstruct`` attribute (students, single-task U-Net) are left alone.

    Example:
        >>> from mkd.networks import build
        >>> net = build("t1", preset="tiny")
        >>> with reconstruction(net, False):
        ...     net.reconstruct
        False
        >>> net.reconstruct
        True
    """
    had = getattr(network, "reconstruct", None)
    if had is not None:
        network.reconstruct = on
    try:
        yield network
    finally:
        if had is not None:
            network.reconstruct = had


def plain_config(value: Any) -> Any:
    """Turn tuples into lists recursively so a config is plain JSON-like data (safe for ``weights_only``)."""
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


class MkdNetwork(nn.Module):
    """Base class: a plain logits-out network that also names its feature scales.

    Subclasses set :attr:`default_name`, store their constructor arguments in
    :attr:`config` (plain data, so a checkpoint can rebuild the network with
    ``mkd.networks.build(name, **config)``), set :attr:`size_divisor` and implement
    :attr:`feature_scales`.

    Attributes:
        network_name: registry name (``"unet"``, ``"t1"``, ...); set by ``build``.
        config: constructor keyword arguments as plain data.
        size_divisor: total downsampling factor; every input side must be at least this.
    """

    default_name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.network_name: str = self.default_name
        self.config: dict[str, Any] = {}
        self.size_divisor: int = 1

    @property
    def feature_scales(self) -> dict[str, str]:
        """``{scale: module path}`` for ``enc``, ``bn``, ``dec`` (and ``recon`` for multi-task teachers)."""
        raise NotImplementedError

    def _set_config(self, **kwargs: Any) -> None:
        self.config = plain_config(kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"name={self.network_name!r}"

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run ``self.encoder`` (a sequence of blocks) then ``self.bottleneck``.

        Returns (the encoder maps, shallowest first, used as skips; the bottleneck map).
        Shared by the U-Nets and the TransUNet, whose encoders differ only in their blocks.
        """
        from mkd.networks.blocks import check_input

        check_input(x, self.spatial_dims, self.in_channels, self.size_divisor)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips, self.bottleneck(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MultiTaskForward:
    """``forward`` / ``forward_tasks`` of the multi-task teachers (t1, t2): a shared encoder, two decoders.

    The network provides ``encode(x) -> (skips, bottom)``, ``decoder`` and ``recon_decoder``
    (each called as ``decoder(bottom, skips)``) and the ``reconstruct`` switch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits; also runs ``recon_decoder`` (read it with a recorder) when :attr:`reconstruct`."""
        skips, bottom = self.encode(x)
        seg = self.decoder(bottom, skips)
        if self.reconstruct:
            self.recon_decoder(bottom, skips)
        return seg

    def forward_tasks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"seg": logits, "recon": reconstruction}`` in one pass (ignores :attr:`reconstruct`).

        A convenience for single-process use; under DistributedDataParallel call the
        wrapped model and read ``recon`` with a :class:`~mkd.networks.FeatureRecorder`,
        so that DDP's gradient hooks see the call.
        """
        skips, bottom = self.encode(x)
        return {"seg": self.decoder(bottom, skips), "recon": self.recon_decoder(bottom, skips)}
