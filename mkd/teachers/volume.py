"""A teacher that runs on whole volumes: any 2D or 3D network with its own preprocessing and inferer.

:class:`VolumeTeacher` runs a network from outside mkd (a MONAI bundle's ``network_def`` or a
TorchScript file, see :func:`mkd.teachers.load_teacher`) the way its bundle would: once per
volume, on the source file ``mkd prepare`` read, with the bundle's ``preprocessing`` and
``inferer`` (a 2D network runs slice by slice along the last axis). Its output is brought back
to the volume's own grid with MONAI's ``Invertd``, reduced to one binary logit for the organ
(:func:`binary_logits`), put on the prepared slices' grid (RAS, the dataset's spacing, in-plane
resize to the student's ``image_size``) and cut at the ``z`` of each slice item. Those per-slice
logits are what the teacher cache stores, so a distillation step costs what it costs with an
mkd teacher.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mkd.errors import InputError, MkdError, first_line

__all__ = ["VolumeTeacher", "binary_logits", "source_volume", "ACTIVATIONS"]

logger = logging.getLogger(__name__)

#: how a teacher's output channels become probabilities
ACTIVATIONS = ("softmax", "sigmoid")


def binary_logits(out: torch.Tensor, label: int, activation: str) -> torch.Tensor:
    """One logit per voxel for channel ``label`` of a multi-channel output ``(B, K, ...)`` -> ``(B, 1, ...)``.

    ``sigmoid``: the channel's own logit. ``softmax``: ``log p / (1 - p)`` of the channel's softmax
    probability, i.e. ``z_label - logsumexp(z_others)``, so that ``sigmoid`` of the result is the
    teacher's probability for the organ (for two classes, ``z_1 - z_0``).

    Example:
        >>> z = torch.tensor([[[0.0], [2.0]]])  # (B=1, K=2, 1 voxel)
        >>> binary_logits(z, 1, "softmax").flatten().tolist()
        [2.0]
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    k = out.shape[1]
    if not 0 <= label < k:
        raise ValueError(f"label {label} is not an output channel (the teacher has {k})")
    z = out.float()
    if activation == "sigmoid":
        return z[:, label : label + 1]
    if k == 1:
        raise ValueError("a softmax over one channel is constant; a one-channel teacher is a sigmoid teacher")
    others = torch.cat([z[:, :label], z[:, label + 1 :]], dim=1)
    return z[:, label : label + 1] - torch.logsumexp(others, dim=1, keepdim=True)


def source_volume(info: Mapping[str, Any], patient: str) -> Path:
    """The source file ``mkd prepare`` read for ``patient`` (labelled or unlabelled), found on this machine.

    ``prepare.json`` records each path as it was given; a relative one is tried from the current
    folder, then inside the task folder (``task.dir``).

    Raises:
        InputError: the patient is not in ``prepare.json`` or its file is gone.
    """
    entry = info.get("volumes", {}).get(patient) or info.get("unlabelled", {}).get(patient)
    if entry is None or "image" not in entry:
        raise InputError(None, f"patient {patient!r} is not in the dataset's prepare.json")
    path = Path(entry["image"])
    tried = [path]
    if not path.is_absolute():
        task_dir = Path(info.get("task", {}).get("dir", "."))
        tried.append(task_dir / path.parent.name / path.name)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise InputError(
        entry["image"],
        f"source volume of {patient} not found; a volume teacher runs on the files `mkd prepare` read: keep them "
        "where they were (or run from the folder prepare ran in)",
    )


class VolumeTeacher(torch.nn.Module):
    """A frozen network run per volume; gives one binary logit map per prepared slice.

    Args:
        network: the network (a ``torch.nn.Module`` or a TorchScript module), logits out.
        preprocessing: the bundle's ``preprocessing``: a MONAI ``Compose`` from ``{"image": path}``
            to ``{"image": (C, ...)}`` whose geometric transforms ``Invertd`` can undo.
        inferer: ``inferer(inputs, network)``, e.g. MONAI's ``SlidingWindowInferer``.
        spatial_dims: 3 (the network takes ``(B, C, H, W, D)``) or 2 (slices ``(B, C, H, W)``, run along
            the last axis of the volume).
        in_channels: the network's input channels; a one-channel volume is repeated to 3 for a
            3-channel network, anything else must match.
        label: the output channel of the organ.
        activation: ``softmax`` or ``sigmoid`` (see :func:`binary_logits`).
        prepare_info: the dataset's ``prepare.json`` (source files, spacing).
        image_size: the student's slice size ``(H, W)``.
        device: where the network runs.
        source: the teacher's file or folder (messages and the cache's identity).
        slice_batch: slices per forward for a 2D network.
    """

    #: a bundle / TorchScript network has no named feature scales: logits only
    feature_scales: dict[str, Any] = {}

    def __init__(
        self,
        network: torch.nn.Module,
        preprocessing: Callable[[dict], dict],
        inferer: Callable[..., torch.Tensor],
        spatial_dims: int,
        in_channels: int,
        label: int,
        activation: str,
        prepare_info: Mapping[str, Any],
        image_size: Sequence[int],
        device: torch.device | str = "cpu",
        source: str | os.PathLike = "",
        slice_batch: int = 16,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.network = network
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.label = int(label)
        self.activation = activation
        self.prepare_info = dict(prepare_info)
        self.image_size = tuple(int(s) for s in image_size)
        self.device = torch.device(device)
        self.source = str(source)
        self.slice_batch = int(slice_batch)
        self.network_name = f"volume teacher ({Path(self.source).name or 'network'})"
        self._volume: tuple[str, torch.Tensor] | None = None
        self.volumes_run = 0
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.network.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise MkdError(
            f"{self.source}: a bundle or TorchScript teacher runs on whole volumes, so its outputs come from the "
            "teacher cache; a live teacher (--no-cache, or augmentation) needs an mkd teacher"
        )

    @property
    def cache_meta(self) -> dict[str, Any]:
        """What identifies this teacher's per-slice logits (the teacher cache is rebuilt when it changes)."""
        source = Path(self.source)
        files = (
            sorted(p for d in ("configs", "models") for p in (source / d).glob("*")) if source.is_dir() else [source]
        )
        return {
            "files": {str(p): os.path.getmtime(p) for p in files if p.is_file()},
            "kind": "volume",
            "source": self.source,
            "label": self.label,
            "activation": self.activation,
            "spatial_dims": self.spatial_dims,
            "image_size": list(self.image_size),
        }

    # --- running the network -------------------------------------------------------------------

    def _inputs(self, image: torch.Tensor) -> torch.Tensor:
        c = int(image.shape[0])
        if c == self.in_channels:
            return image
        if c == 1 and self.in_channels == 3:
            return image.repeat(3, *([1] * (image.ndim - 1)))
        raise InputError(
            self.source, f"the network takes {self.in_channels} input channel(s), its preprocessing gives {c}"
        )

    @torch.no_grad()
    def _infer(self, image: torch.Tensor) -> torch.Tensor:
        """``(C, H, W, D)`` preprocessed volume -> ``(K, H, W, D)`` raw network output (float32, on CPU)."""
        x = self._inputs(torch.as_tensor(image)).float()
        plain = x.as_tensor() if hasattr(x, "as_tensor") else x
        if self.spatial_dims == 3:
            if plain.ndim != 4:
                raise InputError(
                    self.source, f"a 3D network needs a 3D volume, its preprocessing gives {tuple(x.shape)}"
                )
            out = self.inferer(plain[None].to(self.device), self.network)
            return torch.as_tensor(out)[0].float().cpu()
        if plain.ndim != 4:
            raise InputError(self.source, f"expected a (C, H, W, D) volume, its preprocessing gives {tuple(x.shape)}")
        slices = plain.permute(3, 0, 1, 2)  # (D, C, H, W)
        outs = []
        for start in range(0, slices.shape[0], self.slice_batch):
            batch = slices[start : start + self.slice_batch].to(self.device)
            outs.append(torch.as_tensor(self.inferer(batch, self.network)).float().cpu())
        return torch.cat(outs).permute(1, 2, 3, 0)  # (K, H, W, D)

    def _to_slice_grid(self, logits, image) -> torch.Tensor:
        """Binary logits on the preprocessed grid -> ``(1, H, W, Z)`` on the prepared slices' grid."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        from mkd.data.transforms import slice_grid_transforms

        pred = MetaTensor(logits, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        inverted = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=False)(
            {"image": image, "pred": pred}
        )["pred"]
        settings = self.prepare_info.get("settings", {})
        grid = slice_grid_transforms("pred", spacing=settings.get("spacing"), size=self.image_size, mode="area")
        return torch.as_tensor(grid({"pred": inverted})["pred"]).float()

    def volume_logits(self, patient: str) -> torch.Tensor:
        """``(1, H, W, Z)`` binary logits of ``patient`` on the prepared grid at the student's size (last one kept)."""
        if self._volume is not None and self._volume[0] == patient:
            return self._volume[1]
        path = source_volume(self.prepare_info, patient)
        try:
            data = self.preprocessing({"image": str(path)})
        except Exception as err:  # a bundle's transforms raise many types
            raise InputError(path, f"the teacher's preprocessing failed: {first_line(err)}") from None
        image = data["image"]
        out = self._infer(image)
        if not torch.isfinite(out).all():
            raise MkdError(f"{self.source}: the teacher's output on {path} holds NaN or infinite values")
        try:
            logits = binary_logits(out[None], self.label, self.activation)[0]
        except ValueError as err:
            raise InputError(self.source, str(err)) from None
        volume = self._to_slice_grid(logits, image)
        self._volume = (patient, volume)
        self.volumes_run += 1
        logger.info("volume teacher: %s -> %d slices of %s", patient, volume.shape[-1],
                    "x".join(map(str, volume.shape[1:3])))  # fmt: skip
        return volume

    def slice_logits(self, items: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> torch.Tensor:
        """``(N, 1, H, W)`` logits for slice items (``patient`` and ``z``, as in the datalist) or a collated batch."""
        if isinstance(items, Mapping):
            items = _items_of(items)
        out = []
        for item in items:
            volume = self.volume_logits(str(item["patient"]))
            z = int(item["z"])
            if not 0 <= z < volume.shape[-1]:
                raise InputError(
                    self.source, f"slice z={z} of {item['patient']} is outside the teacher's {volume.shape[-1]} slices"
                )
            out.append(volume[..., z])
        return torch.stack(out)


def _items_of(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``patient``/``z`` of each slice of a collated batch (what :meth:`VolumeTeacher.slice_logits` reads)."""
    patients = batch["patient"]
    zs = batch["z"]
    zs = zs.tolist() if isinstance(zs, (torch.Tensor, np.ndarray)) else list(zs)
    return [{"patient": p, "z": int(z)} for p, z in zip(patients, zs, strict=True)]
