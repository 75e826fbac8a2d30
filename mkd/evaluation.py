"""Evaluate a checkpoint on the test patients: pooled, per-slice and per-volume metrics, PSNR.

This is what ``mkd evaluate`` runs. The model sees the slices exactly as in
training (the bundles' preprocessing: stored slice -> resize to the
checkpoint's ``image_size``); predictions are ``sigmoid > 0.5`` of
:func:`mkd.inference.predict_slices` (the prediction of ``mkd infer`` and of
the report's panels too), one call per loader batch. Per-volume metrics
restack each patient's slices by their axial index ``z`` (the MSD convention)
and HD95 is in millimetres, using the voxel size of the prepared volume after
the in-plane resize.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mkd.data.transforms import slice_transform

__all__ = ["EvaluationResult", "evaluate_checkpoint", "slice_transform"]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Metrics of one checkpoint on one split; :meth:`write` saves them.

    Attributes:
        segmentation: the :class:`mkd.metrics.SegmentationResult` (pooled, per slice, per volume).
        summary: ``segmentation.summary`` plus the checkpoint, network, split, image size,
            PSNR of the reconstruction (multi-task teachers) and wall time.
    """

    segmentation: Any
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``summary.json``, ``per_volume.csv`` and ``per_slice.csv`` into ``directory``."""
        from mkd.utils import write_json

        paths = self.segmentation.write(directory)
        write_json(paths["summary"], self.summary)
        return paths


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    image_size: Sequence[int] | None = None,
    progress: bool = False,
    runner: Any = None,
    teacher_label: int | None = None,
) -> EvaluationResult:
    """Run a checkpoint over every slice of ``split`` and compute the metrics.

    Args:
        checkpoint: a ``models/model.pt`` of a teacher, student or distilled student.
        data_dir: the prepared dataset.
        split: datalist key; ``test`` (default) or ``validation``.
        batch_size: slices per forward pass.
        device: ``None`` for CUDA when present, else CPU.
        image_size: model input size; default the checkpoint's training ``image_size``.
        progress: show a tqdm bar.
        runner: run the slices through this callable (``f(images) -> logits``, e.g. the ONNX Runtime
            backend of a :class:`mkd.inference.Segmenter`) instead of the PyTorch network; no PSNR then.
        teacher_label: ``checkpoint`` may also be a teacher from outside mkd (a MONAI bundle folder or
            a TorchScript file, :func:`mkd.teachers.load_teacher`): it runs per volume and its logits
            of each slice are scored like a checkpoint's; this picks its organ channel.

    Raises:
        InputError: unreadable checkpoint (or NaN weights), missing dataset or empty split.
        MkdError: the network's output is NaN or infinite (no metrics of a broken network).
    """
    from monai.data import DataLoader, Dataset

    from mkd.bundle import check_datalist
    from mkd.data import load_prepare_info, load_split
    from mkd.inference.predictor import predict_slices
    from mkd.metrics import PSNRAccumulator, SegmentationAccumulator, spacing_after_resize
    from mkd.networks import CheckpointRecord, load_network
    from mkd.teachers import load_teacher, teacher_kind
    from mkd.utils import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(device)
    check_datalist(data_dir, [split])
    info = load_prepare_info(data_dir)
    stored = int(info["settings"]["size"])
    volume_teacher = None
    if teacher_kind(checkpoint) != "mkd":  # a bundle or TorchScript teacher, run per volume
        size = [int(s) for s in (image_size or (stored, stored))]
        volume_teacher = load_teacher(checkpoint, device, size, data_dir=data_dir, label=teacher_label)
        model, ckpt, record = volume_teacher, {"network": {"name": volume_teacher.network_name}}, None
    else:
        model, ckpt = load_network(checkpoint, map_location="cpu")
        model.to(device).eval()
        record = CheckpointRecord.from_checkpoint(ckpt)
        size = [int(s) for s in (image_size or record.image_size or (stored, stored))]
    items = load_split(data_dir, split)

    # voxel size of a restacked (z, rows, cols) prediction: rows = RAS x, cols = RAS y
    spacing = {}
    for pid, vol in info["volumes"].items():
        sx, sy, sz = vol["spacing"]
        nx, ny = vol["shape"][:2]
        spacing[pid] = (float(sz), *spacing_after_resize((sx, sy), (nx, ny), size))

    reconstruct = runner is None and "recon" in getattr(model, "feature_scales", {})
    # single-organ networks: per-volume metrics also after the largest-connected-component filter (mkd infer's default)
    seg = SegmentationAccumulator(spacing=spacing, lcc=int(getattr(model, "out_channels", 1)) == 1)
    psnr = PSNRAccumulator(data_range=1.0) if reconstruct else None
    loader = DataLoader(Dataset(items, transform=slice_transform(size)), batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=f"evaluate {split}", leave=False)
    net, on = (model, device) if runner is None else (runner, "cpu")  # a runner takes CPU tensors
    for batch in loader:
        where = f"{split} slices of {', '.join(sorted(set(batch['patient'])))}"
        if volume_teacher is not None:  # its logits of these slices, from their volumes

            def net(images, batch=batch):
                return volume_teacher.slice_logits(batch)

            on = "cpu"
        out = predict_slices(
            net, batch["image"], None, len(batch["image"]), on, checkpoint, where=where, recon=reconstruct
        )
        if psnr is not None:
            psnr.update(out.recon, batch["image"])
        seg.update(out.probs, batch["label"], list(batch["patient"]), [int(z) for z in batch["z"]])
    result = seg.compute()
    summary = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "network": ckpt.get("network"),
        "run": record.run if record is not None else {"teacher": str(checkpoint), "teacher_label": teacher_label},
        "data": str(Path(data_dir).resolve()),
        "split": split,
        "image_size": size,
        "slices": len(items),
        **result.summary,
    }
    if psnr is not None:
        summary["psnr"] = psnr.compute()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return EvaluationResult(result, summary)
