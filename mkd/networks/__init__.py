"""mkd.networks: teachers (``unet``, ``t1``, ``t2``), students (``s1``, ``s2``), named feature scales.

Every network is a plain logits-out MONAI-style module taking ``spatial_dims``,
``in_channels``, ``out_channels`` and a width setting, and declares
``feature_scales`` (``enc``, ``bn``, ``dec``, and ``recon`` for the multi-task
teachers). See ``docs/networks.md``.
"""

from __future__ import annotations

from mkd.networks.base import SCALES, MkdNetwork
from mkd.networks.checkpoint import (
    CheckpointRecord,
    NetworkInfo,
    checkpoint_role,
    load_checkpoint,
    load_network,
    save_checkpoint,
    task_heads,
)
from mkd.networks.fusion import fuse_for_inference
from mkd.networks.recorder import (
    FeatureRecorder,
    ScaleInfo,
    feature_channels,
    feature_info,
    feature_shapes,
    resolve_scales,
    unwrap_model,
)
from mkd.networks.registry import (
    NETWORKS,
    PRESETS,
    STUDENTS,
    TEACHERS,
    NetworkSummary,
    build,
    describe,
    network_table,
)
from mkd.networks.student import StudentUNet
from mkd.networks.transunet import TransUNet
from mkd.networks.unet import MultiTaskUNet, UNet

__all__ = [
    "SCALES",
    "MkdNetwork",
    "UNet",
    "MultiTaskUNet",
    "TransUNet",
    "StudentUNet",
    "NETWORKS",
    "PRESETS",
    "TEACHERS",
    "STUDENTS",
    "build",
    "describe",
    "network_table",
    "NetworkSummary",
    "FeatureRecorder",
    "ScaleInfo",
    "feature_shapes",
    "feature_info",
    "feature_channels",
    "resolve_scales",
    "unwrap_model",
    "NetworkInfo",
    "CheckpointRecord",
    "save_checkpoint",
    "load_checkpoint",
    "load_network",
    "checkpoint_role",
    "task_heads",
    "fuse_for_inference",
]
