"""Trainable projector heads that bring student and teacher features of one scale to a common shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv

__all__ = ["ProjectorHeads", "match_spatial", "pool_spatial"]

#: the projector head kinds (``kind``)
KINDS = ("linear", "mlp")
_KINDS = KINDS
_PROJECT = ("both", "student")
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def match_spatial(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(B, C, *spatial)`` feature map to the spatial ``size`` (teacher → student grid).

    Dimensions larger than the target are reduced by adaptive average pooling,
    smaller ones are enlarged by (bi/tri)linear interpolation
    (``align_corners=False``); when some dims shrink and others grow, pooling comes
    first. A feature that already has the target size is returned unchanged (the same
    object), so applying this twice is the same as once: a teacher-output cache can
    store ``match_spatial(teacher_feature, student_size)`` and
    :meth:`ProjectorHeads.forward` will give exactly the same embeddings from it as
    from the full-size live feature.

    Args:
        feature: ``(B, C, *spatial)`` tensor with 1 to 3 spatial dims.
        size: the target spatial size, one int per spatial dim.

    Returns:
        ``(B, C, *size)`` tensor.

    Raises:
        ValueError: when ``size`` does not have one entry per spatial dim of ``feature``.

    Example:
        >>> match_spatial(torch.ones(2, 8, 32, 32), (16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """
    size = tuple(int(v) for v in size)
    spatial = tuple(feature.shape[2:])
    if len(size) != len(spatial) or len(spatial) not in _POOL:
        raise ValueError(
            f"cannot resize a feature of shape {tuple(feature.shape)} to spatial size {size}; expected "
            f"(B, C, *spatial) with 1-3 spatial dims and one target size per spatial dim."
        )
    if spatial == size:
        return feature
    pooled = tuple(min(a, b) for a, b in zip(spatial, size))
    if pooled != spatial:
        feature = _POOL[len(size)](feature, pooled)
    if pooled != size:
        feature = F.interpolate(feature, size=size, mode=_INTERP[len(size)], align_corners=False)
    return feature


def _head(in_channels: int, out_channels: int, kind: str, spatial_dims: int) -> nn.Module:
    conv = Conv[Conv.CONV, spatial_dims]
    if kind == "linear":
        return conv(in_channels, out_channels, kernel_size=1)
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=1),
        nn.ReLU(inplace=True),
        conv(out_channels, out_channels, kernel_size=1),
    )


def _check_channels(name: str, channels: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for scale, ch in channels.items():
        if not isinstance(scale, str) or not scale or "." in scale:
            raise ValueError(f"{name}: scale names must be non-empty strings without '.'; got {scale!r}.")
        if int(ch) < 1:
            raise ValueError(f"{name}[{scale!r}]={ch} must be a positive channel count.")
        out[scale] = int(ch)
    return out


class ProjectorHeads(nn.Module):
    """One trainable projector per scale and side, mapping features to a shared embedding.

    Replaces the thesis code's 1x1 convs that were created inside the training step
    (fresh random weights every iteration, never trained, never saved; SPEC §4.1):
    here the heads are persistent submodules, ``student_heads`` and
    ``teacher_heads`` (two ``nn.ModuleDict`` keyed by scale), so they are in
    ``parameters()`` for the optimiser and in ``state_dict()`` for checkpoints
    (keys ``student_heads.<scale>...`` / ``teacher_heads.<scale>...``).

    A head is a 1x1 convolution (``kind="linear"``) or 1x1 conv - ReLU - 1x1 conv
    (``kind="mlp"``, hidden width = output width). With ``project="both"`` both
    sides are mapped to ``embed_dim`` channels; with ``project="student"`` only the
    student is mapped, to the teacher's channel count, and the teacher feature is
    used as is (``teacher_heads`` is then empty).

    In :meth:`forward` the teacher feature is first resized to the student
    feature's spatial size with :func:`match_spatial` and only then projected
    (the order matters for the mlp heads, which are not linear).

    Args:
        student_channels: ``{scale: channels}`` of the student features.
        teacher_channels: ``{scale: channels}`` of the teacher features, same scales.
        embed_dim: width of the shared embedding when ``project="both"``.
        kind: ``"linear"`` or ``"mlp"``.
        project: ``"both"`` or ``"student"``.
        spatial_dims: 2 for slices, 3 for volumes (1 also works).

    Raises:
        ValueError: when the two mappings have different scales or are empty, a channel
            count is not positive, or ``kind``/``project``/``spatial_dims``/``embed_dim``
            is not allowed.

    Example:
        >>> heads = ProjectorHeads({"bn": 64}, {"bn": 1024}, embed_dim=128)
        >>> s, t = heads("bn", torch.randn(2, 64, 16, 16), torch.randn(2, 1024, 16, 16))
        >>> tuple(s.shape), tuple(t.shape)
        ((2, 128, 16, 16), (2, 128, 16, 16))
    """

    def __init__(
        self,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        embed_dim: int = 128,
        kind: str = "linear",
        project: str = "both",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        s_ch = _check_channels("student_channels", student_channels)
        t_ch = _check_channels("teacher_channels", teacher_channels)
        if not s_ch or set(s_ch) != set(t_ch):
            raise ValueError(
                f"student_channels and teacher_channels must name the same, non-empty set of scales; "
                f"got {sorted(s_ch)} and {sorted(t_ch)}."
            )
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r} is not supported; expected one of {_KINDS}.")
        if project not in _PROJECT:
            raise ValueError(f"project={project!r} is not supported; expected one of {_PROJECT}.")
        if spatial_dims not in _INTERP:
            raise ValueError(f"spatial_dims={spatial_dims} is not supported; expected 1, 2 or 3.")
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim={embed_dim} must be a positive integer.")
        self.student_channels = s_ch
        self.teacher_channels = t_ch
        self.embed_dim = int(embed_dim)
        self.kind = kind
        self.project = project
        self.spatial_dims = int(spatial_dims)
        self.student_heads = nn.ModuleDict(
            {k: _head(s_ch[k], self.embed_dim if project == "both" else t_ch[k], kind, self.spatial_dims) for k in s_ch}
        )
        self.teacher_heads = nn.ModuleDict(
            {k: _head(t_ch[k], self.embed_dim, kind, self.spatial_dims) for k in t_ch} if project == "both" else {}
        )

    @classmethod
    def from_features(
        cls,
        student_features: Mapping[str, torch.Tensor],
        teacher_features: Mapping[str, torch.Tensor],
        **kwargs: Any,
    ) -> ProjectorHeads:
        """Build heads whose channel counts are read from example features ``{scale: (B, C, ...)}``.

        ``spatial_dims`` is inferred from the features unless given in ``kwargs``;
        the other keyword arguments are those of the constructor.
        """
        if "spatial_dims" not in kwargs and student_features:
            kwargs["spatial_dims"] = next(iter(student_features.values())).ndim - 2
        return cls(
            {k: v.shape[1] for k, v in student_features.items()},
            {k: v.shape[1] for k, v in teacher_features.items()},
            **kwargs,
        )

    @property
    def scales(self) -> tuple[str, ...]:
        """The scale names, in construction order."""
        return tuple(self.student_channels)

    @property
    def out_channels(self) -> dict[str, int]:
        """Width of the embeddings returned for each scale."""
        if self.project == "both":
            return {k: self.embed_dim for k in self.scales}
        return dict(self.teacher_channels)

    @property
    def config(self) -> dict[str, Any]:
        """Plain-data constructor arguments, for checkpoints: ``ProjectorHeads(**heads.config)``."""
        return {
            "student_channels": dict(self.student_channels),
            "teacher_channels": dict(self.teacher_channels),
            "embed_dim": self.embed_dim,
            "kind": self.kind,
            "project": self.project,
            "spatial_dims": self.spatial_dims,
        }

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, project={self.project!r}, embed_dim={self.embed_dim}, scales={list(self.scales)}"

    def _check(self, scale: str, side: str, feature: torch.Tensor, channels: int) -> None:
        if feature.ndim != self.spatial_dims + 2 or feature.shape[1] != channels:
            raise ValueError(
                f"{side} feature at scale {scale!r} has shape {tuple(feature.shape)}; expected "
                f"(B, {channels}, *spatial) with {self.spatial_dims} spatial dims."
            )

    def forward(
        self, scale: str, student_feat: torch.Tensor, teacher_feat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project one scale's features to embeddings of identical shape.

        Args:
            scale: one of :attr:`scales`.
            student_feat: ``(B, C_s, *spatial_s)``.
            teacher_feat: ``(B, C_t, *spatial_t)``, any spatial size (e.g. a live
                teacher's full-size feature, or a cached one already resized with
                :func:`match_spatial`); cast to the student feature's dtype.

        Returns:
            ``(s_emb, t_emb)``, both ``(B, out_channels[scale], *spatial_s)``.

        Raises:
            ValueError: for an unknown scale (the message lists the known ones), or
                features whose channels, dims or batch sizes do not match.
        """
        if scale not in self.student_heads:
            raise ValueError(f"unknown scale {scale!r}; known scales: {list(self.scales)}.")
        self._check(scale, "student", student_feat, self.student_channels[scale])
        self._check(scale, "teacher", teacher_feat, self.teacher_channels[scale])
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                f"student and teacher features at scale {scale!r} have batch sizes "
                f"{student_feat.shape[0]} and {teacher_feat.shape[0]}; they must be equal."
            )
        t = match_spatial(teacher_feat, student_feat.shape[2:])
        if t.dtype != student_feat.dtype:
            t = t.to(student_feat.dtype)
        s_emb = self.student_heads[scale](student_feat)
        t_emb = self.teacher_heads[scale](t) if self.project == "both" else t
        return s_emb, t_emb


def pool_spatial(feature: torch.Tensor) -> torch.Tensor:
    """Spatial mean of ``(B, C, *spatial)`` keeping the dims: ``(B, C, 1, ...)`` (image-level InfoNCE, the cache)."""
    return feature.mean(dim=tuple(range(2, feature.ndim)), keepdim=True)
