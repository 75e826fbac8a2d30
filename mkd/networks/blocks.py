"""Building blocks shared by the mkd networks, built from MONAI layers.

Every block takes ``spatial_dims`` first and builds its layers through MONAI's
layer factories (``Conv[Conv.CONV, spatial_dims]``, ``Pool[Pool.MAX, spatial_dims]``)
or :class:`monai.networks.blocks.Convolution`, so the same code gives 2D and 3D
networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Conv, Pool
from torch import nn

__all__ = [
    "ConvBlock",
    "DownBlock",
    "UpBlock",
    "ConvDecoder",
    "ViTBottleneck",
    "transformer_block",
    "check_input",
    "ensure_tuple_dims",
]


def ensure_tuple_dims(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ``spatial_dims`` ints (an int is repeated).

    Raises:
        ValueError: a sequence of the wrong length was given.
    """
    if isinstance(value, int):
        return (value,) * spatial_dims
    out = tuple(int(v) for v in value)
    if len(out) != spatial_dims:
        raise ValueError(f"{name}={tuple(value)} has {len(out)} entries; expected {spatial_dims} (spatial_dims)")
    return out


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, min_size: int) -> None:
    """Validate a network input: ``(N, in_channels, *spatial)`` with every spatial size >= ``min_size``.

    Skipped while tracing or scripting so export stays clean.

    Raises:
        ValueError: wrong number of dimensions, wrong channel count, or a spatial size too small.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"input has shape {tuple(x.shape)}; expected (N, C, {', '.join('HWD'[:spatial_dims])}) "
            f"for spatial_dims={spatial_dims}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"input has {x.shape[1]} channels; the network was built with in_channels={in_channels}")
    small = [int(s) for s in x.shape[2:] if s < min_size]
    if small:
        raise ValueError(
            f"input spatial size {tuple(int(s) for s in x.shape[2:])} is too small: every side must be at least "
            f"{min_size} (the network downsamples by {min_size}); sizes need not be multiples of {min_size}"
        )


class ConvBlock(nn.Sequential):
    """``n_convs`` times (conv kxk -> BatchNorm -> ReLU); the first conv maps ``in_channels`` to ``out_channels``.

    With ``n_convs=2`` this is the classic U-Net "double conv"; the students use ``n_convs=1``.
    Convolutions have no bias (BatchNorm follows each).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels of every conv.
        n_convs: number of conv-BN-ReLU units.
        kernel_size: conv kernel size.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, n_convs: int = 2, kernel_size: int = 3
    ) -> None:
        if n_convs < 1:
            raise ValueError(f"n_convs={n_convs}; expected >= 1")
        layers = []
        for i in range(n_convs):
            layers.append(
                Convolution(
                    spatial_dims,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size=kernel_size,
                    act="relu",
                    norm="batch",
                    bias=False,
                )
            )
        super().__init__(*layers)


class DownBlock(nn.Sequential):
    """2x max pooling followed by a :class:`ConvBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, n_convs: int = 2) -> None:
        super().__init__(
            Pool[Pool.MAX, spatial_dims](kernel_size=2),
            ConvBlock(spatial_dims, in_channels, out_channels, n_convs),
        )


def _match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Pad (replicate, at the far end) or crop ``x`` so its spatial size equals ``ref``'s.

    Max pooling floors odd sizes, so after 2x upsampling a map can be one voxel
    short of its skip connection; this restores the skip's size.
    """
    if x.shape[2:] == ref.shape[2:]:
        return x
    pad: list[int] = []
    for dim in range(x.ndim - 1, 1, -1):  # F.pad lists the last dimension first
        pad.extend([0, max(int(ref.shape[dim]) - int(x.shape[dim]), 0)])
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    slices = (slice(None), slice(None)) + tuple(slice(0, int(s)) for s in ref.shape[2:])
    return x[slices]


class UpBlock(nn.Module):
    """Upsample 2x, concatenate the skip connection, then a :class:`ConvBlock`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the map coming from below.
        skip_channels: channels of the skip connection (0 for none).
        out_channels: output channels.
        n_convs: conv-BN-ReLU units after the concatenation.
        upsample: ``"deconv"`` (transposed conv 2x2, ``in_channels -> up_channels``, as in the
            classic U-Net) or ``"nontrainable"`` (bilinear / trilinear interpolation, as in
            TransUNet's cascaded upsampler; channels unchanged).
        up_channels: channels after a ``"deconv"`` upsampling; defaults to ``in_channels // 2``
            (:class:`ConvDecoder` passes the skip's channel count, as in the classic U-Net).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        n_convs: int = 2,
        upsample: str = "deconv",
        up_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.skip_channels = int(skip_channels)
        if upsample == "deconv":
            up_channels = in_channels // 2 if up_channels is None else up_channels
            self.up = UpSample(spatial_dims, in_channels, up_channels, scale_factor=2, mode="deconv", bias=True)
        elif upsample == "nontrainable":
            up_channels = in_channels
            self.up = UpSample(
                spatial_dims,
                in_channels,
                in_channels,
                scale_factor=2,
                mode="nontrainable",
                pre_conv=None,
                interp_mode="linear",
                align_corners=True,
            )
        else:
            raise ValueError(f"upsample={upsample!r}; expected 'deconv' or 'nontrainable'")
        self.conv = ConvBlock(spatial_dims, up_channels + skip_channels, out_channels, n_convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([_match_size(x, skip), skip], dim=1)
        return self.conv(x)


class ConvDecoder(nn.Module):
    """A U-Net decoder: optional entry conv, one :class:`UpBlock` per skip, then an output conv.

    ``forward(x, skips)`` takes the bottleneck map and the encoder outputs (shallowest
    first) and returns the output map (segmentation logits or a reconstruction; no
    activation). The blocks run deepest first: ``blocks[0]`` consumes ``skips[-1]``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the bottleneck map.
        skip_channels: channels of each skip, shallowest first.
        channels: output channels of each decoder block, deepest first (same length as ``skip_channels``).
        out_channels: channels of the output map.
        n_convs: conv-BN-ReLU units per block.
        upsample: see :class:`UpBlock`.
        entry_channels: when set, a conv3x3-BN-ReLU maps the bottleneck to this many channels
            first (TransUNet's "conv_more").
        head_kernel_size: kernel of the output conv (1 for U-Nets, 3 for TransUNet).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: Sequence[int],
        channels: Sequence[int],
        out_channels: int,
        n_convs: int = 2,
        upsample: str = "deconv",
        entry_channels: int | None = None,
        head_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        if len(skip_channels) != len(channels):
            raise ValueError(
                f"{len(skip_channels)} skip connections but {len(channels)} decoder widths {tuple(channels)}"
            )
        self.entry: nn.Module = nn.Identity()
        if entry_channels is not None:
            self.entry = ConvBlock(spatial_dims, in_channels, entry_channels, n_convs=1)
            in_channels = entry_channels
        blocks = []
        for skip_ch, out_ch in zip(reversed(list(skip_channels)), channels):
            up_ch = skip_ch if upsample == "deconv" and skip_ch else None
            blocks.append(
                UpBlock(
                    spatial_dims, in_channels, skip_ch, out_ch, n_convs=n_convs, upsample=upsample, up_channels=up_ch
                )
            )
            in_channels = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size=head_kernel_size, padding=head_kernel_size // 2
        )

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.entry(x)
        for block, skip in zip(self.blocks, reversed(list(skips))):
            x = block(x, skip)
        return self.head(x)


def transformer_block(hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0) -> nn.Module:
    """A pre-norm ViT block: MONAI's :class:`~monai.networks.blocks.TransformerBlock`.

    MONAI's unused cross-attention LayerNorm is removed, so every parameter receives a
    gradient (DDP needs no ``find_unused_parameters``).
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    from monai.networks.blocks import TransformerBlock

    block = TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=True, use_flash_attention=True)
    block.norm_cross_attn = nn.Identity()
    return block


class ViTBottleneck(nn.Module):
    """Patch embedding + a stack of ViT blocks (:func:`transformer_block`), returned as a feature map.

    The input map is cut into ``patch_size`` patches by a strided conv, a learnable
    position embedding is added (stored for the grid of ``grid_size`` and
    interpolated when the input grid differs, so any input size works), the tokens
    go through ``num_layers`` transformer blocks and a final LayerNorm, and are
    reshaped back to ``(N, hidden_size, *grid)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the CNN feature map.
        hidden_size: token width.
        mlp_dim: width of each transformer block's MLP.
        num_layers: number of transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        grid_size: token grid of the stored position embedding (input size / total stride).
        patch_size: patch size (= stride) of the embedding conv.
        dropout_rate: dropout in the embedding and the transformer blocks.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        grid_size: Sequence[int],
        patch_size: int = 2,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.spatial_dims = spatial_dims
        self.patch_embed = Conv[Conv.CONV, spatial_dims](
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_size, *grid_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            transformer_block(hidden_size, mlp_dim, num_heads, dropout_rate) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = x.shape[2:]
        pos = self.pos_embed
        if pos.shape[2:] != grid:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            pos = F.interpolate(pos, size=tuple(int(g) for g in grid), mode=mode, align_corners=False)
        x = self.dropout(x + pos)
        tokens = x.flatten(2).transpose(1, 2)  # (N, L, hidden)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(x.shape)
