"""The classic U-Net (``unet``) and the multi-task U-Net teacher (``t1``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mkd.networks.base import MkdNetwork, MultiTaskForward
from mkd.networks.blocks import ConvBlock, ConvDecoder, DownBlock

__all__ = ["UNet", "MultiTaskUNet"]


class UNet(MkdNetwork):
    """Classic U-Net: conv blocks of (conv3x3-BN-ReLU) x ``convs_per_block``, max-pool down, transposed-conv up.

    With the default ``features=(64, 128, 256, 512, 1024)`` and ``convs_per_block=2``
    this is the widely used "milesial" U-Net (31.04 M parameters for 3 -> 1 channels
    in 2D). ``features[:-1]`` are the encoder widths, ``features[-1]`` the bottleneck;
    the decoder mirrors the encoder. Inputs of any size whose sides are at least
    ``2 ** (len(features) - 1)`` work: upsampled maps are padded to their skip's size.

    Module layout (the paths the feature scales refer to):
    ``encoder.0 .. encoder.{L-1}`` (``encoder.0`` at full resolution, each later one
    pools 2x first), ``bottleneck``, ``decoder.blocks.0 .. decoder.blocks.{L-1}``
    (deepest first), ``decoder.head`` (1x1 conv to ``out_channels``), where
    ``L = len(features) - 1``.

    Feature scales: ``enc`` = ``encoder.{L-1}`` (last encoder block, stride 2^(L-1)),
    ``bn`` = ``bottleneck`` (stride 2^L), ``dec`` = ``decoder.blocks.{L-1}`` (last
    decoder block, full resolution).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: segmentation output channels (logits).
        features: encoder widths followed by the bottleneck width (at least 2 entries).
        convs_per_block: conv-BN-ReLU units per block (2 = classic "double conv").

    Example:
        >>> net = UNet(features=(8, 16, 32))
        >>> net(torch.zeros(1, 3, 20, 20)).shape
        torch.Size([1, 1, 20, 20])
    """

    default_name = "unet"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        convs_per_block: int = 2,
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims}; expected 2 or 3")
        if len(features) < 2:
            raise ValueError(f"features={features}; expected at least 2 widths (encoder..., bottleneck)")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.depth = len(features) - 1
        self.size_divisor = 2**self.depth
        enc = features[:-1]
        blocks: list[nn.Module] = [ConvBlock(spatial_dims, in_channels, enc[0], convs_per_block)]
        blocks += [DownBlock(spatial_dims, enc[i - 1], enc[i], convs_per_block) for i in range(1, len(enc))]
        self.encoder = nn.ModuleList(blocks)
        self.bottleneck = DownBlock(spatial_dims, enc[-1], features[-1], convs_per_block)
        self.decoder = self._make_decoder(out_channels, convs_per_block)
        self._set_config(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            convs_per_block=convs_per_block,
        )

    def _make_decoder(self, out_channels: int, convs_per_block: int) -> ConvDecoder:
        enc = self.features[:-1]
        return ConvDecoder(
            self.spatial_dims,
            self.features[-1],
            skip_channels=enc,
            channels=tuple(reversed(enc)),
            out_channels=out_channels,
            n_convs=convs_per_block,
            upsample="deconv",
        )

    @property
    def feature_scales(self) -> dict[str, str]:
        last = self.depth - 1
        return {"enc": f"encoder.{last}", "bn": "bottleneck", "dec": f"decoder.blocks.{last}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits, same spatial size as ``x``."""
        skips, bottom = self.encode(x)
        return self.decoder(bottom, skips)


class MultiTaskUNet(MultiTaskForward, UNet):
    """Multi-task U-Net teacher (``t1``): one shared encoder, a segmentation and a reconstruction decoder.

    Both decoders mirror the encoder (same widths, skip connections from the shared
    encoder). ``forward(x)`` returns the segmentation logits only, so the network is
    a drop-in MONAI network; the reconstruction (``recon_channels`` maps, linear
    output, trained against the input with MSE) is the output of the module
    ``recon_decoder`` and is read through the ``recon`` feature scale with
    :class:`mkd.networks.FeatureRecorder`, or with :meth:`forward_tasks`.

    With ``reconstruct = False`` (attribute, settable at any time) the reconstruction
    decoder is not run at all: inference and teacher-output caching pay for the
    segmentation path only. ``reconstruct`` is a run-time switch and is not stored
    in checkpoints (a loaded teacher reconstructs by default).

    At the default widths the network has 43.23 M parameters (3 -> 1 + 3 channels, 2D).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: segmentation output channels (logits).
        features: encoder widths followed by the bottleneck width.
        convs_per_block: conv-BN-ReLU units per block.
        recon_channels: channels of the reconstruction; defaults to ``in_channels``.
        reconstruct: run the reconstruction decoder in ``forward``.
    """

    default_name = "t1"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        convs_per_block: int = 2,
        recon_channels: int | None = None,
        reconstruct: bool = True,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, convs_per_block)
        self.recon_channels = in_channels if recon_channels is None else int(recon_channels)
        self.recon_decoder = self._make_decoder(self.recon_channels, convs_per_block)
        self.reconstruct = bool(reconstruct)
        self.config["recon_channels"] = self.recon_channels

    @property
    def feature_scales(self) -> dict[str, str]:
        return {**super().feature_scales, "recon": "recon_decoder"}
