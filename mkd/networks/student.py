"""The student U-Nets ``s1`` ("U-Net-S") and ``s2`` (``s1`` at twice the width)."""

from __future__ import annotations

from collections.abc import Sequence

from mkd.networks.unet import UNet

__all__ = ["StudentUNet", "S1_FEATURES", "S2_FEATURES"]

S1_FEATURES: tuple[int, ...] = (16, 32, 64)
S2_FEATURES: tuple[int, ...] = (32, 64, 128)


class StudentUNet(UNet):
    """Student U-Net: 2 encoder blocks, a bottleneck, 2 decoder blocks, a 1x1 classifier.

    One conv3x3-BN-ReLU per block (thesis section 3.3): ``E1`` (16 ch, full
    resolution), ``E2`` (32 ch, 1/2), bottleneck (64 ch, 1/4), ``D1`` (transposed conv
    up, concat ``E2``, conv to 32 ch), ``D2`` (up, concat ``E1``, conv to 16 ch), 1x1
    classifier. 0.057 M parameters for 3 -> 1 channels in 2D (``s1``); with
    ``features=(32, 64, 128)`` it is ``s2`` (0.227 M).

    Feature scales: ``enc`` = ``encoder.1`` (E2, stride 2), ``bn`` = ``bottleneck``
    (stride 4), ``dec`` = ``decoder.blocks.1`` (D2, stride 1).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: segmentation output channels (logits).
        features: encoder widths followed by the bottleneck width.
        convs_per_block: conv-BN-ReLU units per block (1 in the thesis).
    """

    default_name = "s1"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = S1_FEATURES,
        convs_per_block: int = 1,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, convs_per_block)
