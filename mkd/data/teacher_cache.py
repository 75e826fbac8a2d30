"""Teacher-output cache: the frozen teacher's features and logits, computed once per slice.

The teacher is frozen and the training slices are fixed (no random
augmentation), so what the teacher says about a slice never changes. Running
it at every step costs 1.7x (small teacher, 96²) to 13x (T1, 256²) the
student's own step; the cache computes it once, stores it compactly and feeds
it back through the data pipeline.

Teacher features are stored already resized to the student's feature size at
each scale with :func:`mkd.networks.projector.match_spatial` -- the same
resizing :class:`~mkd.networks.projector.ProjectorHeads` applies to a live
teacher feature before projecting it -- so the distillation losses computed
from the cache are those of the live teacher (exactly with ``dtype="float32"``;
to float16 rounding with the default ``dtype="float16"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from mkd.errors import InputError
from mkd.utils import atomic_file

__all__ = ["TeacherCache", "LoadTeacherCached", "CACHE_PREFIX"]

logger = logging.getLogger(__name__)

#: batch keys of cached teacher outputs: ``teacher_<scale>`` and ``teacher_logits``
CACHE_PREFIX = "teacher_"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _item_key(item: Mapping[str, Any]) -> str:
    return f"{item['patient']}:{item['slice']}"


@contextlib.contextmanager
def _rank_zero_first() -> Iterator[bool]:
    """Under ``torch.distributed``: rank 0 runs the block while the other ranks wait, then they run it.

    Yields whether this process should build (``True`` on rank 0 and without distribution).
    Every rank holds the whole training list, so several ranks writing one cache
    directory would race on its temporary files.
    """
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() > 0:
        dist.barrier()  # until rank 0 has finished its block
        yield False
        return
    try:
        yield True
    finally:
        if distributed:
            dist.barrier()


class TeacherCache:
    """Cached teacher outputs for a list of slice items, one array per scale (and one for logits).

    Build with :meth:`build`; read back with :class:`LoadTeacherCached`. Arrays
    are ``.npy`` files in ``directory`` (memory-mapped when read), with an
    ``index.json`` that maps ``"patient:slice"`` to a row.

    Args:
        directory: folder holding ``index.json`` and ``<name>.npy`` arrays.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index_file = self.directory / "index.json"
        if not index_file.is_file():
            raise InputError(self.directory, "not a teacher cache (index.json missing)")
        meta = json.loads(index_file.read_text())
        self.rows: dict[str, int] = meta["rows"]
        self.names: list[str] = meta["names"]
        self.meta: dict[str, Any] = meta.get("meta", {})
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(self.array(n).nbytes for n in self.names)

    def lookup(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"teacher_<name>": float32 tensor}`` for one slice item."""
        key = _item_key(item)
        if key not in self.rows:
            raise KeyError(f"slice {key} is not in the teacher cache {self.directory}")
        row = self.rows[key]
        return {CACHE_PREFIX + n: torch.from_numpy(np.array(self.array(n)[row], dtype=np.float32)) for n in self.names}

    @classmethod
    def build(
        cls,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        data: Sequence[Mapping[str, Any]],
        transform: Callable,
        scales: Sequence[str],
        directory: str | os.PathLike,
        image_size: Sequence[int],
        logits: bool = True,
        pool: bool = False,
        dtype: str = "float16",
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        meta: Mapping[str, Any] | None = None,
    ) -> TeacherCache:
        """Run the frozen teacher once over ``data`` and store its outputs; reuse a matching cache.

        Args:
            teacher: the frozen teacher (put in eval mode here).
            student: the student, to read its feature size at each scale.
            data: slice items (``patient``, ``slice``, ``image``...).
            transform: the deterministic preprocessing that turns an item into ``{"image": (C, H, W)}``.
            scales: teacher scales to store (``enc``, ``bn``, ``dec``).
            directory: where the cache lives; an existing cache with the same ``meta`` is reused.
            image_size: the slice size the student sees (to probe its feature sizes).
            logits: also store the teacher's logits (for PMD).
            pool: store the spatial mean of each (resized) feature, ``(C, 1, 1)`` per slice:
                all that image-level InfoNCE with linear heads needs
                (:func:`mkd.handlers.distillation.pools_features`).
            dtype: ``float16`` (half the memory) or ``float32`` (bit-exact losses).
            batch_size: slices per teacher forward.
            device: where the teacher runs.
            meta: plain data identifying the teacher and settings; a cache built with other
                ``meta`` is rebuilt.

        Under ``torch.distributed`` (the multi-process bundles) only rank 0 runs the teacher;
        the other ranks wait for it and read its files, so ``directory`` must be one that
        every rank sees (one machine, or a shared file system).
        """
        from mkd.networks import FeatureRecorder, feature_shapes
        from mkd.networks.base import reconstruction
        from mkd.networks.projector import match_spatial, pool_spatial

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        directory = Path(directory)
        meta = json.loads(
            json.dumps(
                {
                    **(meta or {}),
                    "scales": list(scales),
                    "logits": logits,
                    "dtype": dtype,
                    "image_size": list(image_size),
                    "n": len(data),
                },
                default=str,
            )
        )
        index_file = directory / "index.json"
        with _rank_zero_first() as builds:
            if not builds:  # another rank built it
                if not (index_file.is_file() and json.loads(index_file.read_text()).get("meta") == meta):
                    raise RuntimeError(f"rank 0 did not write the teacher cache {directory}")
                return cls(directory)
            if index_file.is_file() and json.loads(index_file.read_text()).get("meta") == meta:
                logger.info("reusing teacher cache %s", directory)
                return cls(directory)

            # a PMD-only run (no feature scale) stores logits alone: no shape probe is needed
            shapes = feature_shapes(student, tuple(image_size), list(scales)) if scales else {}
            targets = {s: shape[1:] for s, shape in shapes.items()}
            names = list(scales) + (["logits"] if logits else [])
            directory.mkdir(parents=True, exist_ok=True)
            arrays: dict[str, np.lib.format.open_memmap] = {}
            teacher.eval()
            rows: dict[str, int] = {}
            # the reconstruction decoder is not needed for distillation
            with reconstruction(teacher, False):
                with FeatureRecorder(teacher, list(scales), detach=True) as recorder, torch.no_grad():
                    for start in range(0, len(data), batch_size):
                        items = data[start : start + batch_size]
                        if hasattr(teacher, "slice_logits"):  # a volume teacher (mkd.teachers): logits per slice
                            out = teacher.slice_logits(items)
                        else:
                            images = torch.stack([torch.as_tensor(transform(dict(it))["image"]) for it in items])
                            with recorder.recording():
                                out = teacher(images.to(device))
                        values = {s: match_spatial(recorder.features[s].float(), targets[s]) for s in scales}
                        if pool:
                            values = {s: pool_spatial(v) for s, v in values.items()}
                        if logits:
                            values["logits"] = out.float()
                        for name, v in values.items():
                            if name not in arrays:
                                arrays[name] = np.lib.format.open_memmap(
                                    directory / f"{name}.npy.tmp", mode="w+", dtype=_DTYPES[dtype],
                                    shape=(len(data), *v.shape[1:]),
                                )  # fmt: skip
                            arrays[name][start : start + len(items)] = v.cpu().numpy().astype(_DTYPES[dtype])
                        for offset, it in enumerate(items):
                            rows[_item_key(it)] = start + offset
            for name, arr in arrays.items():
                arr.flush()
                del arr
                os.replace(directory / f"{name}.npy.tmp", directory / f"{name}.npy")
            with atomic_file(index_file) as fh:
                fh.write(json.dumps({"rows": rows, "names": names, "meta": meta}))
            cache = cls(directory)
            logger.info("teacher cache: %d slices, %.1f MB in %s", len(cache), cache.nbytes() / 1e6, directory)
            return cache


class LoadTeacherCached(MapTransform):
    """Add the cached teacher outputs of a slice item as ``teacher_<scale>`` / ``teacher_logits`` keys.

    Args:
        cache: a :class:`TeacherCache`; ``None`` makes this transform a no-op (cache disabled).
        keys: unused (the item's ``patient`` and ``slice`` select the row); kept for MONAI's signature.
    """

    def __init__(self, cache: TeacherCache | None, keys: KeysCollection = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.cache = cache

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.cache is not None:
            d.update(self.cache.lookup(d))
        return d
