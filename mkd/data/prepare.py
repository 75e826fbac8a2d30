"""``mkd prepare``: Decathlon volumes -> patient-split 2D slice stacks, datalist, manifest and geometry.

See ``docs/prepare.md`` for the output layout and ``docs/architecture.md`` for the contract.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mkd.data.checks import check_finite, check_resampled_size, check_spacing, warn_if_not_ct
from mkd.data.decathlon import Case, case_id, read_task
from mkd.data.split import SPLITS, read_split_file, split_patients, student_subset
from mkd.errors import InputError, MkdError, first_line, output_exists

__all__ = [
    "DATALIST_KEYS",
    "LOAD_SPLITS",
    "UNLABELLED_KEY",
    "PrepareSummary",
    "check_output_dir",
    "find_task",
    "load_manifest",
    "load_prepare_info",
    "load_split",
    "prepare_dataset",
]

logger = logging.getLogger(__name__)

#: the labelled datalist lists; each must be non-empty
DATALIST_KEYS = (*SPLITS, "student")
#: the datalist list of unlabelled slices (``imagesTs``); may be empty, absent in older datalists
UNLABELLED_KEY = "unlabelled"
#: what :func:`load_split` reads: the datalist lists, plus the derived ``"transfer"`` set
LOAD_SPLITS = (*DATALIST_KEYS, UNLABELLED_KEY, "transfer")


@dataclass
class PrepareSummary:
    """What :func:`prepare_dataset` wrote.

    ``volumes`` counts the labelled volumes; ``patients`` and ``slices`` are keyed by
    :data:`DATALIST_KEYS` and ``"unlabelled"`` (``imagesTs`` volumes and their slices).
    """

    out_dir: Path
    volumes: int
    patients: dict[str, int]
    slices: dict[str, int]
    fg_slice_fraction: float
    fg_pixel_fraction: float
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def slices_per_second(self) -> float:
        """Stored slices (training + validation + test) per second of wall time."""
        return sum(self.slices[k] for k in SPLITS) / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        per_split = ", ".join(f"{k} {self.slices[k]} ({self.patients[k]} patients)" for k in DATALIST_KEYS)
        return [
            f"wrote {self.out_dir}",
            f"volumes: {self.volumes}",
            f"slices: {per_split}",
            f"unlabelled: {self.slices.get(UNLABELLED_KEY, 0)} slices ({self.patients.get(UNLABELLED_KEY, 0)} volumes)",
            f"foreground: {100 * self.fg_slice_fraction:.1f}% of slices, {100 * self.fg_pixel_fraction:.2f}% of pixels",
            f"time: {self.seconds:.1f} s ({self.slices_per_second:.0f} slices/s)",
        ]


def _fmt_values(values: np.ndarray) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:8]]
    return "{" + ", ".join(shown) + (", ..." if len(values) > 8 else "") + "}"


def _load_nifti(d: dict, keys: Sequence[str]) -> dict:
    """Load ``d[key]`` for each key with MONAI's LoadImaged (nibabel only); a broken file raises an InputError."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImaged

    for key in keys:
        try:  # a runtime reader: no silent fallback to another library that tolerates a broken file
            d = LoadImaged(keys=key, image_only=True, dtype=np.float32)(d, reader=NibabelReader())
        except Exception as err:  # nibabel / gzip / zlib raise many types for broken files
            raise InputError(d[key], f"cannot read NIfTI (corrupt or truncated file): {first_line(err)}") from None
    return d


def _check_image(image, path: Path, spacing: Sequence[float] | None = None) -> None:
    """A 3D volume of finite voxels whose resampled grid is sane, else an InputError naming ``path``.

    Intensities that do not look like CT in HU are logged as a warning.
    """
    if image.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
    check_finite(image, path)
    check_resampled_size(image.shape, np.asarray(image.affine, float), spacing, path)
    warn_if_not_ct(image, path)


def _load_checked(case: Case, label_value: int | None, spacing: Sequence[float] | None = None) -> dict:
    """Load one case with MONAI's LoadImaged and check it; every problem names the file."""
    d = _load_nifti({"image": str(case.image), "label": str(case.label)}, ("image", "label"))
    image, label = d["image"], d["label"]
    _check_image(image, case.image, spacing)
    check_finite(label, case.label, "label value")
    if tuple(label.shape) != tuple(image.shape):
        raise InputError(
            case.label, f"shape {tuple(label.shape)} does not match its image {tuple(image.shape)} ({case.image.name})"
        )
    a_img, a_lbl = np.asarray(image.affine, float), np.asarray(label.affine, float)
    if not np.allclose(a_img, a_lbl, rtol=1e-5, atol=1e-3):
        diff = float(np.abs(a_img - a_lbl).max())
        raise InputError(case.label, f"affine differs from its image's ({case.image.name}) by up to {diff:.3g} mm")
    values = np.unique(label.numpy())
    if label_value is None:
        if not set(values.tolist()) <= {0.0, 1.0}:
            raise InputError(
                case.label,
                f"label values {_fmt_values(values)}; expected {{0, 1}} (pass `label_value=N` to segment label N)",
            )
        if 1.0 not in set(values.tolist()):
            logger.warning("%s: the label is empty (no foreground voxel); its volume teaches only background",
                           case.label)  # fmt: skip
    elif label_value not in set(values.tolist()):
        logger.warning("%s: no voxel has label value %d; the mask is empty", case.label, label_value)
    return d


def _unlabelled_ids(paths: Sequence[Path], taken: set[str]) -> list[tuple[str, Path]]:
    """``(pid, path)`` of each unlabelled volume; the pid is the file stem (as for labelled cases).

    A stem that is already a labelled patient id (or an earlier unlabelled one) gets the
    suffix ``_unlabelled`` (then ``_unlabelled2`` ...), so no slice file or teacher-cache key
    is shared with a labelled case. A file that is missing or listed twice is skipped (logged).
    """
    out: list[tuple[str, Path]] = []
    used, seen = set(taken), set()
    for path in paths:
        path = Path(path)
        if path in seen:
            logger.warning("%s: listed twice in dataset.json's test list; used once", path)
            continue
        seen.add(path)
        if not path.is_file():
            logger.warning("%s: unlabelled volume listed in dataset.json but missing; skipped", path)
            continue
        base = pid = case_id(path)
        n = 1
        while pid in used:
            pid = f"{base}_unlabelled" + (str(n) if n > 1 else "")
            n += 1
        if pid != base:
            logger.warning("%s: patient id %r is taken by another case; stored as %r", path, base, pid)
        used.add(pid)
        out.append((pid, path))
    return out


def _run_volume(d: dict, compose, resize_at: int) -> tuple[dict, dict]:
    """Run the volume pipeline after loading; also return the geometry recorded in ``prepare.json``.

    The geometry is read from the loaded image (source) and just before the in-plane resize.
    """
    source_shape = [int(s) for s in d["image"].shape]
    source_affine = np.asarray(d["image"].affine, float)
    d = compose(d, start=1, end=resize_at)
    geo_shape = [int(s) for s in d["image"].shape[1:]]
    geo_affine = np.asarray(d["image"].affine, float)
    d = compose(d, start=resize_at)
    geometry = {
        "source_shape": source_shape,
        "source_affine": source_affine.tolist(),
        "shape": geo_shape,
        "affine": geo_affine.tolist(),
        "spacing": [float(s) for s in np.sqrt((geo_affine[:3, :3] ** 2).sum(0))],
        "slice_shape": geo_shape[:2],  # in-plane grid before the resize
    }
    return d, geometry


def _keep_rows(fg_per_z: np.ndarray, keep: str, margin: int) -> np.ndarray:
    z = np.arange(len(fg_per_z))
    if keep == "all":
        return z
    hit = np.flatnonzero(fg_per_z > 0)
    if len(hit) == 0:
        return hit
    near = np.zeros(len(fg_per_z), bool)
    for h in hit:
        near[max(0, h - margin) : h + margin + 1] = True
    return z[near]


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite`` is set and ``mkd prepare`` wrote it (or it is empty).

    ``overwrite`` replaces a prepared dataset; it never deletes a folder that holds
    something else (a typo in ``out_dir`` must not cost a user their files).

    Raises:
        MkdError: ``out_dir`` exists and ``overwrite`` is false, or it is a file, or a folder
            that is neither empty nor holds ``prepare.json``, or one that
            :func:`mkd.ownership.check_replaceable` keeps (the current folder, a folder above it).
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise output_exists(out_dir)
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise MkdError(f"{out_dir}: not a folder; `overwrite=True` replaces only a dataset written by `mkd prepare`")
    if not (out_dir / "prepare.json").is_file() and any(out_dir.iterdir()):
        raise MkdError(
            f"{out_dir}: not written by `mkd prepare` (no prepare.json) and not empty; `overwrite=True` replaces "
            "only a prepared dataset: choose another `out_dir`"
        )
    from mkd.ownership import check_replaceable

    # a prepared dataset (prepare.json) or an empty folder; never the current folder or one above it
    check_replaceable(out_dir, ("prepare",), option="`out_dir`", legacy=lambda p: (p / "prepare.json").is_file())


def find_task(
    *,
    decathlon: str | None = None,
    source: str | os.PathLike | None = None,
    root: str | os.PathLike = ".",
    download: bool = False,
    cases: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The task folder to prepare, and where it came from (the ``source_info`` of :func:`prepare_dataset`).

    A Decathlon task (``decathlon``, found, extracted or downloaded in ``root``), a task folder or
    ``.tar`` given directly (``source``): :func:`mkd.data.locate_task`. Neither: the built-in phantom
    written to ``root`` (:func:`mkd.data.write_phantom`, ``cases`` volumes of ``shape`` voxels from
    ``seed``; ``progress(done, total)`` after each volume).

    Returns:
        ``(task folder, source_info)``.
    """
    from mkd.data.decathlon import locate_task

    if decathlon or source:
        task = locate_task(decathlon=decathlon, source=source, root=root, download=download)
        return task, {"source": "decathlon" if decathlon else "source"}
    from mkd.data.phantom import PHANTOM_CASES, PHANTOM_SHAPE, write_phantom

    n_cases = PHANTOM_CASES if cases is None else int(cases)
    grid = PHANTOM_SHAPE if shape is None else tuple(int(s) for s in shape)
    task = write_phantom(root, cases=n_cases, shape=grid, seed=seed, progress=progress)
    return task, {"source": "phantom", "phantom": {"cases": n_cases, "shape": list(grid), "seed": seed}}


def prepare_dataset(
    task_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int = 256,
    channels: str = "replicate",
    window: tuple[float, float] | str = (-57.0, 164.0),
    spacing: Sequence[float] | None = None,
    keep: str = "all",
    margin: int = 5,
    label_value: int | None = None,
    student_fraction: float = 0.5,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    source_info: dict | None = None,
    unlabelled: bool = True,
) -> PrepareSummary:
    """Slice a Decathlon-layout task into the prepared dataset described in ``docs/architecture.md``.

    The output is built in a temporary sibling folder and renamed into place at the end,
    so any error leaves nothing behind.

    Args:
        task_dir: folder with ``dataset.json``, ``imagesTr/``, ``labelsTr/``.
        out_dir: the DATA folder to write.
        size: in-plane size of the stored slices.
        channels: ``"replicate"`` (3 copies) or ``"2.5d"`` (slices z-1, z, z+1).
        window: HU window ``(low, high)`` -> [0, 1], or ``"max"`` (per-volume ``x / max``).
        spacing: resample to this voxel size (mm, x, y, z) first; 0 keeps an axis (negative values are refused,
            and so is a spacing that would make a grid of more than :data:`mkd.data.checks.MAX_VOXELS` voxels).
        keep: ``"all"`` slices, or ``"organ"``: for training patients only the slices within ``margin``
            of a foreground slice (validation and test keep every slice).
        margin: slices kept on each side of the organ with ``keep="organ"``.
        label_value: segment ``label == label_value`` of a multi-label mask.
        student_fraction: share of the training patients in the student's list.
        val_fraction: share of the labelled patients for validation.
        test_fraction: share of the labelled patients for test.
        split_file: JSON with the patient lists to use instead of a random split.
        seed: seed of the split and of the student subset.
        overwrite: replace an existing ``out_dir``.
        progress: called as ``progress(patient, done, total)`` after each volume (labelled, then unlabelled).
        source_info: extra facts recorded in ``prepare.json`` (e.g. how the task was obtained).
        unlabelled: also slice the task's unlabelled volumes (``imagesTs``, the ``test`` list of
            ``dataset.json``) into the datalist list ``"unlabelled"`` (image only, every slice, same
            preprocessing); an empty ``imagesTs`` gives an empty list. Their geometry is recorded
            under ``"unlabelled"`` in ``prepare.json``, not in ``"volumes"`` nor in ``manifest.csv``.

    Returns:
        A :class:`PrepareSummary`.

    Raises:
        InputError: a bad input file (the message names it).
        MkdError: bad options, an empty split, or an existing output without ``overwrite``.
    """
    import pandas as pd

    from mkd import __version__
    from mkd.data.transforms import parse_window, volume_to_slices, volume_transforms
    from mkd.utils import atomic_dir

    t0 = time.perf_counter()
    if channels not in ("replicate", "2.5d"):
        raise MkdError(f"`channels` must be 'replicate' or '2.5d', got {channels!r}")
    if keep not in ("all", "organ"):
        raise MkdError(f"`keep` must be 'all' or 'organ', got {keep!r}")
    if margin < 0 or size < 8:
        raise MkdError(f"`margin` must be >= 0 and `size` >= 8, got margin={margin}, size={size}")
    try:
        window = parse_window(window) if window != "max" else "max"
    except ValueError as err:
        raise MkdError(str(err)) from None
    spacing = check_spacing(spacing)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)

    task = read_task(task_dir)
    by_id = {c.patient: c for c in task.cases}
    try:
        if split_file is not None:
            split = read_split_file(split_file, list(by_id))
            student = split.pop("student", None) or student_subset(split["training"], student_fraction, seed)
        else:
            split = split_patients(list(by_id), val_fraction, test_fraction, seed)
            student = student_subset(split["training"], student_fraction, seed)
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise MkdError(str(err)) from None
    split_of = {p: name for name in SPLITS for p in split[name]}
    student_set = set(student)
    order = [p for name in SPLITS for p in split[name]]
    skipped = [p for p in by_id if p not in split_of]
    if skipped:
        logger.info("not in any split (left out): %s", ", ".join(skipped))

    compose = volume_transforms(("image", "label"), window=window, spacing=spacing, size=size, label_value=label_value)
    resize_at = len(compose.transforms) - 1  # Resized is last: geometry is read just before it
    unlabelled_ids = _unlabelled_ids(task.unlabelled, set(by_id)) if unlabelled else []
    compose_image = volume_transforms(("image",), window=window, spacing=spacing, size=size)
    resize_at_image = len(compose_image.transforms) - 1
    total = len(order) + len(unlabelled_ids)
    datalist: dict[str, list] = {k: [] for k in (*DATALIST_KEYS, UNLABELLED_KEY)}
    unlabelled_volumes: dict[str, dict] = {}
    manifest: list[dict] = []
    volumes: dict[str, dict] = {}
    fg_pixels_total = pixels_total = fg_slices = 0
    label_fg_total = 0

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for n, pid in enumerate(order):
            case, name = by_id[pid], split_of[pid]
            d, geometry = _run_volume(_load_checked(case, label_value, spacing), compose, resize_at)
            image, label = d["image"], d["label"]
            lab = (label[0].numpy() > 0.5).astype(np.uint8)  # (H, W, Z)
            fg_per_z = lab.reshape(-1, lab.shape[-1]).sum(0)
            label_fg_total += int(fg_per_z.sum())
            rows = _keep_rows(fg_per_z, keep if name == "training" else "all", margin)
            if len(rows) == 0:
                logger.warning("%s: no foreground slice; nothing kept with `keep=organ`", pid)
            else:
                img = volume_to_slices(image, channels, rows)
                check_finite(img, case.image, "slice value")  # no NaN ever reaches a slice file
                img = img.astype(np.float16)
                lbl = np.ascontiguousarray(np.moveaxis(lab, -1, 0)[rows][:, None])
                np.save(tmp / "images" / f"{pid}.npy", img)
                np.save(tmp / "labels" / f"{pid}.npy", lbl)
            for row, z in enumerate(rows.tolist()):
                fg = int(fg_per_z[z])
                item = {
                    "image": f"images/{pid}.npy",
                    "label": f"labels/{pid}.npy",
                    "patient": pid,
                    "slice": row,
                    "z": z,
                }
                datalist[name].append(item)
                if pid in student_set:
                    datalist["student"].append(dict(item))
                manifest.append({"patient": pid, "row": row, "z": z, "split": name, "student": pid in student_set,
                                 "fg_pixels": fg, "image": item["image"], "label": item["label"]})  # fmt: skip
                fg_pixels_total += fg
                fg_slices += fg > 0
                pixels_total += lab.shape[0] * lab.shape[1]
            volumes[pid] = {
                "split": name,
                "student": pid in student_set,
                "image": str(case.image),
                "label": str(case.label),
                **geometry,
                "stored_shape": [int(s) for s in lab.shape[:2]],
                "rows": len(rows),
                "z": rows.tolist(),
                "fg_voxels": int(fg_per_z.sum()),
            }
            if progress is not None:
                progress(pid, n + 1, total)
        for n, (pid, path) in enumerate(unlabelled_ids, start=len(order)):
            d = _load_nifti({"image": str(path)}, ("image",))
            _check_image(d["image"], path, spacing)
            d, geometry = _run_volume(d, compose_image, resize_at_image)
            image = d["image"]
            rows = np.arange(image.shape[-1])  # every slice: there is no mask to select by
            img = volume_to_slices(image, channels, rows)
            check_finite(img, path, "slice value")
            np.save(tmp / "images" / f"{pid}.npy", img.astype(np.float16))
            for row, z in enumerate(rows.tolist()):
                datalist[UNLABELLED_KEY].append({"image": f"images/{pid}.npy", "patient": pid, "slice": row, "z": z})
            unlabelled_volumes[pid] = {
                "split": UNLABELLED_KEY,
                "student": False,
                "image": str(path),
                **geometry,
                "stored_shape": [int(s) for s in image.shape[1:3]],
                "rows": len(rows),
                "z": rows.tolist(),
            }
            if progress is not None:
                progress(pid, n + 1, total)
        if label_value is not None and label_fg_total == 0:
            raise MkdError(f"`label_value={label_value}`: no voxel has this value in any label file of {task.root}")
        for key in DATALIST_KEYS:
            if not datalist[key]:
                raise MkdError(f"the {key} split has no slices (check `keep=organ` and the masks)")
        datalist["patients"] = {
            **{k: list(split[k]) for k in SPLITS},
            "student": [p for p in split["training"] if p in student_set],
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
        pd.DataFrame(
            manifest, columns=["patient", "row", "z", "split", "student", "fg_pixels", "image", "label"]
        ).to_csv(tmp / "manifest.csv", index=False)
        info = {
            "mkd_version": __version__,
            "task": {
                "name": task.name,
                "dir": str(Path(task.root).resolve()),
                "labels": task.labels,
                "unlabelled": [str(p) for p in task.unlabelled],
                **(source_info or {}),
            },  # fmt: skip
            "settings": {
                "size": size,
                "channels": channels,
                "window": list(window) if window != "max" else "max",
                "spacing": None if spacing is None else [float(s) for s in spacing],
                "orientation": "RAS",
                "keep": keep,
                "margin": margin,
                "label_value": label_value,
                "student_fraction": student_fraction,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_file": None if split_file is None else str(split_file),
                "seed": seed,
                "slice_axes": "rows: RAS x (patient left -> right), columns: RAS y (posterior -> anterior)",
            },  # fmt: skip
            "left_out": skipped,
            "volumes": volumes,
            UNLABELLED_KEY: unlabelled_volumes,
        }
        (tmp / "prepare.json").write_text(json.dumps(info, indent=1) + "\n")

    seconds = time.perf_counter() - t0
    return PrepareSummary(
        out_dir=out_dir,
        volumes=len(order),
        patients={
            **{k: len(split[k]) for k in SPLITS},
            "student": len(datalist["patients"]["student"]),
            UNLABELLED_KEY: len(unlabelled_volumes),
        },
        slices={k: len(datalist[k]) for k in (*DATALIST_KEYS, UNLABELLED_KEY)},
        fg_slice_fraction=fg_slices / max(len(manifest), 1),
        fg_pixel_fraction=fg_pixels_total / max(pixels_total, 1),
        seconds=seconds,
        skipped=skipped,
    )


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Items of one datalist list with absolute paths (MONAI's ``load_decathlon_datalist``).

    ``"unlabelled"`` is the list of ``imagesTs`` slices (items without ``"label"``; empty for a
    datalist written before that list existed). ``"transfer"`` is the distillation transfer set
    of the student: the ``training`` items of the patients *outside* the student's list, with
    their ``"label"`` key removed, followed by the ``unlabelled`` items. It never holds a label
    path, so a student trained on ``student`` + ``transfer`` sees only its own patients' labels;
    on the transfer items it learns from the teacher alone. Load them with
    ``LoadSliced(..., allow_missing_keys=True)`` followed by
    :class:`~mkd.data.transforms.FillMissingLabeld`, which gives them the label sentinel
    that :class:`mkd.losses.LabelledOnly` leaves out of the supervised loss.

    Args:
        data_dir: a folder written by ``mkd prepare``.
        split: ``"training"``, ``"validation"``, ``"test"``, ``"student"``, ``"unlabelled"`` or ``"transfer"``.

    Returns:
        A list of ``{"image", ["label",] "patient", "slice", "z"}`` items.

    Raises:
        InputError: no ``datalist.json`` in ``data_dir``.
        ValueError: unknown ``split``.

    Example:
        >>> train = load_split("mkd_data", "student") + load_split("mkd_data", "transfer")  # doctest: +SKIP
    """
    from monai.data import load_decathlon_datalist

    if split not in LOAD_SPLITS:
        raise ValueError(f"split must be one of {', '.join(LOAD_SPLITS)}, got {split!r}")
    path = Path(data_dir) / "datalist.json"
    if not path.is_file():
        raise InputError(path, "missing; run `mkd prepare` first")

    def read(key: str) -> list[dict]:
        return load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=Path(data_dir))

    if split in DATALIST_KEYS:
        return read(split)
    raw = json.loads(path.read_text())
    unlabelled = [_without_label(it) for it in read(UNLABELLED_KEY)] if UNLABELLED_KEY in raw else []
    if split == UNLABELLED_KEY:
        return unlabelled
    student = {str(it["patient"]) for it in raw.get("student", [])}
    student |= {str(p) for p in (raw.get("patients") or {}).get("student", [])}
    others = [_without_label(it) for it in read("training") if str(it["patient"]) not in student]
    return others + unlabelled


def _without_label(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "label"}


def load_manifest(data_dir: str | os.PathLike):
    """The per-slice manifest as a pandas DataFrame."""
    import pandas as pd

    path = Path(data_dir) / "manifest.csv"
    if not path.is_file():
        raise InputError(path, "missing; run `mkd prepare` first")
    return pd.read_csv(path)


def load_prepare_info(data_dir: str | os.PathLike) -> dict:
    """``prepare.json``: the settings and the per-volume geometry (for restacking and inverting predictions)."""
    path = Path(data_dir) / "prepare.json"
    if not path.is_file():
        raise InputError(path, "missing; run `mkd prepare` first")
    return json.loads(path.read_text())
