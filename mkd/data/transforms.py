"""MONAI transforms that turn a CT volume into 2D slices, and that load prepared slices back.

:func:`volume_transforms` is the one volume pipeline, used by ``mkd prepare`` and
reusable at inference (with ``keys=("image",)``, then MONAI's ``Invertd`` to map a
restacked prediction back to the original grid). Stored slices are axial planes
of the RAS-oriented volume: the array's first axis (rows) runs from the patient's
left to right, the second (columns) from posterior to anterior.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LabelToMaskd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resize,
    Resized,
    Spacingd,
)

__all__ = [
    "DEFAULT_WINDOW",
    "UNLABELLED",
    "BlockMeanResize",
    "FillMissingLabeld",
    "LoadSliced",
    "ScaleByMaxd",
    "Windowd",
    "parse_window",
    "slice_transform",
    "slice_grid_transforms",
    "volume_to_slices",
    "volume_transforms",
]

#: Default HU window: [-57, 164] -> [0, 1] (the abdominal soft-tissue window of MONAI's spleen tutorial).
DEFAULT_WINDOW = (-57.0, 164.0)
#: Label value of a slice without a label (a transfer-set item); :class:`mkd.losses.LabelledOnly` skips
#: every sample whose label holds a negative value.
UNLABELLED = -1.0


def parse_window(text: str | Sequence[float]) -> tuple[float, float] | str:
    """``"-57,164"`` -> ``(-57.0, 164.0)``; ``"max"`` -> ``"max"``.

    Raises:
        ValueError: not two increasing numbers and not ``"max"``.
    """
    if isinstance(text, str):
        if text.strip().lower() == "max":
            return "max"
        try:
            parts = [float(p) for p in text.split(",")]
        except ValueError:
            parts = []
    else:
        parts = [float(p) for p in text]
    if len(parts) != 2 or not parts[0] < parts[1]:
        raise ValueError(f"window must be 'LOW,HIGH' with LOW < HIGH (HU) or 'max', got {text!r}")
    return parts[0], parts[1]


class Windowd(MapTransform):
    """An HU window mapped to [0, 1] with clipping, in one buffer.

    The values of MONAI's ``ScaleIntensityRanged(a_min=low, a_max=high, b_min=0, b_max=1, clip=True)``
    bit for bit (the same operations in the same order; ``tests/data/test_transforms.py``), at a
    fraction of the cost on a large volume: MONAI's version makes a new MetaTensor for each of its
    five operations, this one allocates once and works in place (on a 512 x 512 x 150 series,
    ``benchmarks/bench_dicom.py`` "HU window"). The input is never changed; the output keeps its
    metadata. A non-float input is converted to float32 first.
    """

    def __init__(self, keys: KeysCollection, low: float, high: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not float(low) < float(high):
            raise ValueError(f"window needs low < high, got ({float(low)}, {float(high)})")
        self.low, self.high = float(low), float(high)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            plain = x.as_subclass(torch.Tensor) if isinstance(x, MetaTensor) else x
            if not plain.is_floating_point():
                plain = plain.float()
            out = torch.sub(plain, self.low)  # the one new buffer; the rest is in place, as MONAI computes it
            out.div_(self.high - self.low).mul_(1.0).add_(0.0).clamp_(0.0, 1.0)
            d[key] = MetaTensor(out, meta=x.meta, applied_operations=x.applied_operations) if isinstance(
                x, MetaTensor) else out  # fmt: skip
        return d


class BlockMeanResize(Resize):
    """MONAI's ``Resize``, with its in-plane ``area`` shrink by an integer factor computed from strided views.

    An ``area`` resize of a (C, H, W, Z) volume to (H / k, W / k, Z) with one integer factor k >= 2 (a
    512² series to 256² or 128²) averages k x k blocks. PyTorch's ``adaptive_avg_pool3d`` does that with
    a general kernel; here the k² strided views are summed in that kernel's order and divided by k twice,
    as it does, which gives its values bit for bit (``tests/data/test_transforms.py``) about five times
    faster on a 512 x 512 x 150 series (``benchmarks/bench_dicom.py``). The metadata (affine, the
    recorded operation that ``invert`` and ``Compose.inverse`` read) is recorded as MONAI's resize records
    it, under the name ``Resize``. Any other call is MONAI's own.
    """

    def get_transform_info(self) -> dict:
        from monai.utils import TraceKeys

        return {**super().get_transform_info(), TraceKeys.CLASS_NAME: "Resize"}

    def __call__(  # type: ignore[override]
        self,
        img: torch.Tensor,
        mode: str | None = None,
        align_corners: bool | None = None,
        anti_aliasing: bool | None = None,
        anti_aliasing_sigma=None,
        dtype=None,
        lazy: bool | None = None,
    ) -> torch.Tensor:
        factor = self._block_factor(img, mode, anti_aliasing, dtype, lazy)
        if factor is None:
            return super().__call__(img, mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype, lazy)
        from monai.data.meta_obj import get_track_meta
        from monai.transforms.inverse import TraceableTransform
        from monai.transforms.utils import scale_affine
        from monai.utils import TraceKeys, convert_to_tensor

        _align = self.align_corners if align_corners is None else align_corners
        img = convert_to_tensor(img, track_meta=get_track_meta())
        orig_size = tuple(int(s) for s in img.shape[1:])
        out_size = (orig_size[0] // factor, orig_size[1] // factor, orig_size[2])
        meta_info = TraceableTransform.track_transform_meta(
            img,
            sp_size=out_size,
            affine=scale_affine(orig_size, out_size, align_corners=_align if _align is not None else False),
            extra_info={
                "mode": "area",
                "align_corners": _align if _align is not None else TraceKeys.NONE,
                "dtype": "float32",
                "new_dim": 0,
            },  # fmt: skip
            orig_size=orig_size,
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        acc = torch.zeros((x.shape[0], *out_size), dtype=torch.float32)
        for i in range(factor):  # adaptive_avg_pool3d's order: rows, then columns, from 0
            for j in range(factor):
                acc.add_(x[:, i::factor, j::factor, :])
        acc.div_(factor).div_(factor)  # sum / kH / kW, as the kernel divides
        out = convert_to_tensor(acc, track_meta=get_track_meta())
        return out.copy_meta_from(meta_info) if isinstance(out, MetaTensor) else out

    def _block_factor(self, img, mode, anti_aliasing, dtype, lazy) -> int | None:
        """k when this call is an in-plane ``area`` shrink by k of a float32 (C, H, W, Z) tensor, else None."""
        from monai.utils import fall_back_tuple

        mode = self.mode if mode is None else mode
        anti_aliasing = self.anti_aliasing if anti_aliasing is None else anti_aliasing
        lazy = self.lazy if lazy is None else lazy
        want = dtype or self.dtype
        if str(mode) != "area" or anti_aliasing or lazy or self.size_mode != "all" or img.ndim != 4:
            return None
        if want not in (None, np.float32, torch.float32, "float32") or img.dtype != torch.float32:
            return None
        if isinstance(img, MetaTensor) and img.pending_operations:
            return None
        size = tuple(int(s) for s in img.shape[1:])
        try:
            out = tuple(int(s) for s in fall_back_tuple(self.spatial_size, size))
        except (TypeError, ValueError):
            return None
        if len(out) != 3 or out[2] != size[2] or min(out[:2]) < 1:
            return None
        k = size[0] // out[0]
        if k < 2 or size[0] != k * out[0] or size[1] != k * out[1]:
            return None
        return k


def _resized(keys: Sequence[str], spatial_size: Sequence[int], mode) -> Resized:
    """MONAI's ``Resized`` whose resizer is a :class:`BlockMeanResize` (the same values, faster integer shrinks)."""
    out = Resized(keys=keys, spatial_size=spatial_size, mode=mode)
    out.resizer = BlockMeanResize(spatial_size=spatial_size, size_mode=out.resizer.size_mode)
    return out


class ScaleByMaxd(MapTransform):
    """The thesis's per-volume scaling: ``clip(x / max(x), 0, 1)`` (negative HU become 0)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            peak = float(x.max()) if x.numel() else 0.0
            d[key] = (x / peak).clamp(0, 1) if peak > 0 else x.clamp(0, 0)
        return d


def volume_transforms(
    keys: Sequence[str] = ("image", "label"),
    window: tuple[float, float] | str = DEFAULT_WINDOW,
    spacing: Sequence[float] | None = None,
    size: int | None = 256,
    label_value: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """The volume pipeline: load, channel-first, RAS, optional spacing, windowing, in-plane resize.

    Output: ``image`` (1, size, size, Z) in [0, 1] and ``label`` (1, size, size, Z) with values {0, 1},
    as MetaTensors whose ``applied_operations`` let ``Invertd`` undo the geometry.

    Args:
        keys: the keys to load; pass ``("image",)`` at inference.
        window: ``(low, high)`` HU mapped linearly to [0, 1] with clipping, or ``"max"`` for
            per-volume ``x / max(x)`` (the thesis).
        spacing: target voxel size in mm (x, y, z) for ``Spacingd``; a non-positive entry keeps
            that axis's spacing; ``None`` keeps the native grid.
        size: in-plane size of the resized slices (``Resized`` to (size, size) with the slice count kept;
            ``area`` interpolation for the image, i.e. averaging when shrinking, ``nearest-exact`` for
            the label); ``None`` keeps the in-plane grid.
        label_value: make the label binary as ``label == label_value`` (multi-label masks).
        image_key: the image key.
        label_key: the label key.

    Example:
        >>> t = volume_transforms(keys=("image",), size=96)  # doctest: +SKIP
        >>> t({"image": "ct.nii.gz"})["image"].shape  # doctest: +SKIP
        torch.Size([1, 96, 96, 40])
    """
    keys = tuple(keys)
    has_label = label_key in keys
    interp = tuple("bilinear" if k == image_key else "nearest" for k in keys)
    xforms: list = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys),
    ]
    if has_label and label_value is not None:
        xforms.append(LabelToMaskd(keys=label_key, select_labels=[int(label_value)]))
    xforms += _orientation_spacing(keys, spacing, interp)
    if window == "max":
        xforms.append(ScaleByMaxd(keys=image_key))
    else:
        low, high = parse_window(window)  # type: ignore[arg-type]
        xforms.append(Windowd(keys=image_key, low=low, high=high))
    if size is not None:
        modes = tuple("area" if k == image_key else "nearest-exact" for k in keys)
        xforms.append(_resized(keys, (int(size), int(size), -1), modes))
    return Compose(xforms)


def _orientation_spacing(keys: Sequence[str], spacing: Sequence[float] | None, modes: Sequence[str]) -> list:
    """RAS, then ``Spacingd`` to ``spacing`` when given: the geometry of :func:`volume_transforms` before the resize."""
    out: list = [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if spacing is not None:
        out.append(Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=tuple(modes)))
    return out


def slice_grid_transforms(
    keys: str | Sequence[str], spacing: Sequence[float] | None, size: Sequence[int], mode: str = "area"
) -> Compose:
    """Put a loaded volume ``(C, ...)`` on the prepared slices' grid, at in-plane ``size``.

    The geometry of :func:`volume_transforms` (RAS, the dataset's ``spacing`` with bilinear
    interpolation), then an in-plane resize to ``size`` with ``mode``, the slice count kept: what
    :class:`mkd.teachers.VolumeTeacher` does to a teacher's logits so that slice ``z`` of the result
    lies on slice ``z`` of the prepared volume.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    xforms = _orientation_spacing(keys, spacing, ["bilinear"] * len(keys))
    xforms.append(_resized(keys, (*(int(s) for s in size), -1), mode))
    return Compose(xforms)


def volume_to_slices(
    volume: np.ndarray | torch.Tensor,
    channels: str = "replicate",
    rows: Sequence[int] | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Cut a (1, H, W, Z) volume into (S, 3, H, W) slices.

    Args:
        volume: one-channel volume, axial axis last.
        channels: ``"replicate"`` copies the slice into 3 channels (the thesis); ``"2.5d"`` stacks the
            slices z-1, z, z+1 (the edge slice is repeated at the ends of the volume).
        rows: the axial indices to keep, in order; default all.
        channels_last: lay the slices out in memory as (S, H, W, 3) (the returned array is its
            (S, 3, H, W) view, which ``torch.as_tensor`` turns into a channels-last tensor): the layout
            the PyTorch backend runs in, written once instead of copied again per batch.

    Returns:
        float32 array of shape (len(rows), 3, H, W).

    Raises:
        ValueError: unknown ``channels`` or a volume that is not (1, H, W, Z).
    """
    v = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if v.ndim != 4 or v.shape[0] != 1:
        raise ValueError(f"expected a (1, H, W, Z) volume, got shape {tuple(v.shape)}")
    if channels not in ("replicate", "2.5d"):
        raise ValueError(f"channels must be 'replicate' or '2.5d', got {channels!r}")
    v = np.moveaxis(v[0], -1, 0)  # (Z, H, W)
    z = np.arange(v.shape[0]) if rows is None else np.asarray(rows, dtype=int)
    if channels == "replicate":
        idx = np.stack([z, z, z], axis=1)
    else:
        last = v.shape[0] - 1
        idx = np.stack([np.clip(z - 1, 0, last), z, np.clip(z + 1, 0, last)], axis=1)
    if not channels_last:
        if channels == "replicate":
            return np.repeat(v[z][:, None], 3, axis=1).astype(np.float32)
        return v[idx].astype(np.float32)
    out = np.empty((len(z), v.shape[1], v.shape[2], 3), dtype=np.float32)
    if channels == "replicate":
        out[...] = v[z][..., None]
    else:
        for c in range(3):
            out[..., c] = v[idx[:, c]]
    return out.transpose(0, 3, 1, 2)


class LoadSliced(MapTransform):
    """Load one prepared slice: ``d[key]`` is a ``.npy`` stack, ``d["slice"]`` the row to take.

    The stacks are memory-mapped and kept open (one handle per file and process; the cache is
    not pickled, so DataLoader workers open their own). Returns float32 tensors: image
    (C, H, W), label (1, H, W). Only the files named in the item are opened.

    Args:
        keys: keys holding ``.npy`` paths, e.g. ``("image", "label")``.
        slice_key: key of the row index.
        allow_missing_keys: skip absent keys. Pass ``True`` to load items without ``"label"``
            (the ``unlabelled`` and ``transfer`` lists of :func:`~mkd.data.load_split`) next to
            labelled ones, then give them a sentinel label with :class:`FillMissingLabeld`.

    Example:
        >>> items = load_split("mkd_data", "student")  # doctest: +SKIP
        >>> LoadSliced(keys=("image", "label"))(items[0])["image"].shape  # doctest: +SKIP
        torch.Size([3, 256, 256])
    """

    def __init__(
        self, keys: KeysCollection = ("image", "label"), slice_key: str = "slice", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key
        self._cache: dict[str, np.ndarray] = {}

    def _open(self, path: str | os.PathLike) -> np.ndarray:
        path = os.fspath(path)
        arr = self._cache.get(path)
        if arr is None:
            arr = np.load(path, mmap_mode="r")
            self._cache[path] = arr
        return arr

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        row = int(d[self.slice_key])  # type: ignore[arg-type]
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                d[key] = torch.from_numpy(np.array(self._open(value)[row], dtype=np.float32))
        return d


def slice_transform(image_size: Sequence[int]) -> Compose:
    """The bundles' deterministic slice preprocessing: load a stored slice, resize, to tensor.

    What ``mkd evaluate``, the report's panels and int8 calibration feed the network: :class:`LoadSliced`,
    an ``area`` resize of the image (``nearest`` of the label) to ``image_size``, plain tensors.
    """
    return Compose(
        [
            LoadSliced(keys=("image", "label")),
            Resized(keys=("image", "label"), spatial_size=list(image_size), mode=("area", "nearest")),
            EnsureTyped(keys=("image", "label"), track_meta=False),
        ]
    )


class FillMissingLabeld(MapTransform):
    """Give an item without a label a sentinel label, so labelled and unlabelled items collate into one batch.

    For each key in ``keys`` that the item lacks (a transfer-set item, see
    :func:`~mkd.data.load_split`), adds a float32 tensor of ``channels`` channels and the
    spatial shape of ``d[ref_key]``, filled with ``value`` (default :data:`UNLABELLED`, -1).
    Items that have the key are returned unchanged. :class:`mkd.losses.LabelledOnly` leaves the
    samples with a negative label out of the supervised loss.

    Place it after :class:`LoadSliced` (``allow_missing_keys=True``), before or after the resize:
    after ``LoadSliced`` it makes a plain tensor at the stored size, which the resize (nearest
    neighbour) keeps at ``value``; after a resize that returns a ``MetaTensor`` it makes a
    ``MetaTensor`` carrying a copy of the image's metadata (no applied operations).

    Args:
        keys: the label key(s) to fill when missing.
        ref_key: the key whose spatial shape (all dimensions but the first) the label takes.
        value: the fill value; must be negative.
        channels: channels of the filled label.

    Raises:
        ValueError: ``value`` >= 0 or ``channels`` < 1; when called, ``d[ref_key]`` still a path
            (the transform placed before loading).
        KeyError: when called on an item that lacks a label and ``ref_key``.

    Example:
        >>> fill = FillMissingLabeld(keys="label")
        >>> fill({"image": torch.zeros(3, 4, 5)})["label"].shape
        torch.Size([1, 4, 5])
    """

    def __init__(
        self, keys: KeysCollection = "label", ref_key: str = "image", value: float = UNLABELLED, channels: int = 1
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if not value < 0:
            raise ValueError(f"value must be negative (the unlabelled sentinel), got {value!r}")
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels!r}")
        self.ref_key = ref_key
        self.value = float(value)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        missing = [key for key in self.keys if key not in d]
        if not missing:
            return d
        if self.ref_key not in d:
            raise KeyError(f"{type(self).__name__}: reference key {self.ref_key!r} is missing; item keys: {list(d)}")
        ref = d[self.ref_key]
        if isinstance(ref, (str, os.PathLike)):
            raise ValueError(f"{type(self).__name__}: {self.ref_key!r} is a path ({ref!r}); place it after loading")
        shape = (self.channels, *tuple(ref.shape)[1:])  # type: ignore[attr-defined]
        for key in missing:
            if isinstance(ref, torch.Tensor):
                label = torch.full(shape, self.value, dtype=torch.float32, device=ref.device)
                if isinstance(ref, MetaTensor):
                    label = MetaTensor(label, meta=copy.deepcopy(ref.meta))
            else:
                label = np.full(shape, self.value, dtype=np.float32)
            d[key] = label
        return d
