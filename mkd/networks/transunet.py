"""The multi-task TransUNet teacher (``t2``): CNN stem + ViT encoder, two cascaded-upsampler decoders."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mkd.networks.base import MkdNetwork, MultiTaskForward
from mkd.networks.blocks import ConvBlock, ConvDecoder, DownBlock, ViTBottleneck, ensure_tuple_dims

__all__ = ["TransUNet"]


class TransUNet(MultiTaskForward, MkdNetwork):
    """Multi-task TransUNet: a hybrid CNN + ViT encoder shared by a segmentation and a reconstruction decoder.

    Encoder: a CNN stem of double-conv blocks (``features``, max pooling between
    them; the last stem block is at stride 2^(len(features)-1), 1/8 by default),
    then a ViT bottleneck: 2x2 patch embedding (stride 16 overall, a 16x16 token grid
    at 256x256 like TransUNet's R50-ViT-B/16), learnable position embedding,
    ``num_layers`` ViT blocks (MONAI's ``TransformerBlock``) and a LayerNorm, reshaped back to a
    ``hidden_size``-channel map. Decoders (TransUNet's cascaded upsampler): a
    conv3x3-BN-ReLU to ``head_channels`` ("conv_more"), then per stem block a
    bilinear 2x upsampling, concatenation of the stem's skip and a double conv to
    ``decoder_channels[i]``, then a 3x3 output conv.

    The defaults (stem 64-512, hidden 1024, 12 layers, 16 heads, MLP 4096) give
    about 175 M parameters, the size of the thesis's T2 (172.6 M); the thesis does not
    describe its T2 further, so the split between stem, ViT and decoders is ours.

    ``forward(x)`` returns the segmentation logits only; the reconstruction is the
    output of ``recon_decoder`` (scale ``recon``), skipped when ``reconstruct`` is
    false, exactly as in :class:`~mkd.networks.MultiTaskUNet`.

    Module layout: ``encoder.0 .. encoder.{K-1}`` (stem, ``K = len(features)``),
    ``bottleneck`` (:class:`~mkd.networks.blocks.ViTBottleneck`),
    ``decoder.entry``, ``decoder.blocks.0 .. decoder.blocks.{K-1}``, ``decoder.head``
    and the same under ``recon_decoder``. Feature scales: ``enc`` = ``encoder.{K-1}``,
    ``bn`` = ``bottleneck``, ``dec`` = ``decoder.blocks.{K-1}``, ``recon`` = ``recon_decoder``.

    Any input whose sides are at least ``size_divisor = 2 ** len(features)`` (16 by
    default) works; sizes need not be multiples of it. The position embedding is
    interpolated when the token grid differs from ``img_size // size_divisor``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: segmentation output channels (logits).
        features: widths of the CNN stem blocks.
        hidden_size: ViT token width.
        num_layers: transformer blocks.
        num_heads: attention heads (divide ``hidden_size``).
        mlp_dim: MLP width in each transformer block.
        decoder_channels: output width of each decoder block, deepest first (``len(features)`` entries).
        head_channels: width of the decoders' entry conv.
        img_size: input size the position embedding is stored for (int or one per spatial dim).
        dropout_rate: dropout in the ViT.
        recon_channels: channels of the reconstruction; defaults to ``in_channels``.
        reconstruct: run the reconstruction decoder in ``forward``.
    """

    default_name = "t2"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (64, 128, 256, 512),
        hidden_size: int = 1024,
        num_layers: int = 12,
        num_heads: int = 16,
        mlp_dim: int = 4096,
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        head_channels: int = 512,
        img_size: int | Sequence[int] = 256,
        dropout_rate: float = 0.0,
        recon_channels: int | None = None,
        reconstruct: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims}; expected 2 or 3")
        features = tuple(int(f) for f in features)
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(features) < 1:
            raise ValueError("features must name at least one stem block width")
        if len(decoder_channels) != len(features):
            raise ValueError(
                f"decoder_channels={decoder_channels} has {len(decoder_channels)} entries; "
                f"expected {len(features)} (one per stem block in features={features})"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.size_divisor = 2 ** len(features)  # stem pools len-1 times, patch embedding strides 2
        img = ensure_tuple_dims(img_size, spatial_dims, "img_size")
        grid = tuple(max(s // self.size_divisor, 1) for s in img)
        self.recon_channels = in_channels if recon_channels is None else int(recon_channels)
        self.reconstruct = bool(reconstruct)

        stem: list[nn.Module] = [ConvBlock(spatial_dims, in_channels, features[0])]
        stem += [DownBlock(spatial_dims, features[i - 1], features[i]) for i in range(1, len(features))]
        self.encoder = nn.ModuleList(stem)
        self.bottleneck = ViTBottleneck(
            spatial_dims, features[-1], hidden_size, mlp_dim, num_layers, num_heads, grid, 2, dropout_rate
        )
        self.decoder = self._make_decoder(out_channels, hidden_size, decoder_channels, head_channels)
        self.recon_decoder = self._make_decoder(self.recon_channels, hidden_size, decoder_channels, head_channels)
        self._set_config(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            decoder_channels=decoder_channels,
            head_channels=head_channels,
            img_size=list(img),
            dropout_rate=dropout_rate,
            recon_channels=self.recon_channels,
        )

    def _make_decoder(self, out_channels: int, hidden: int, channels: tuple[int, ...], head: int) -> ConvDecoder:
        return ConvDecoder(
            self.spatial_dims,
            hidden,
            skip_channels=self.features,
            channels=channels,
            out_channels=out_channels,
            n_convs=2,
            upsample="nontrainable",
            entry_channels=head,
            head_kernel_size=3,
        )

    @property
    def feature_scales(self) -> dict[str, str]:
        last = len(self.features) - 1
        return {"enc": f"encoder.{last}", "bn": "bottleneck", "dec": f"decoder.blocks.{last}", "recon": "recon_decoder"}
