"""mkd.data: Decathlon reader, phantom generator, patient split, slicing transforms and ``prepare``.

Importing this package imports MONAI (the transforms are MONAI ``MapTransform``s).
"""

from __future__ import annotations

from mkd.data.augment import AUGMENTS, MIXES, RandMixSlicesd, augmentation_transforms, batch_mix
from mkd.data.decathlon import Case, Task, download_task, extract_task, locate_task, read_task, verify_md5
from mkd.data.phantom import PHANTOM_CASES, PHANTOM_SHAPE, PHANTOM_TASK, phantom_case, write_phantom
from mkd.data.prepare import (
    LOAD_SPLITS,
    UNLABELLED_KEY,
    PrepareSummary,
    find_task,
    load_manifest,
    load_prepare_info,
    load_split,
    prepare_dataset,
)
from mkd.data.split import read_split_file, split_patients, student_subset
from mkd.data.teacher_cache import CACHE_PREFIX, LoadTeacherCached, TeacherCache
from mkd.data.transforms import (
    DEFAULT_WINDOW,
    UNLABELLED,
    FillMissingLabeld,
    LoadSliced,
    ScaleByMaxd,
    parse_window,
    slice_transform,
    volume_to_slices,
    volume_transforms,
)

__all__ = [
    "AUGMENTS",
    "MIXES",
    "RandMixSlicesd",
    "augmentation_transforms",
    "batch_mix",
    "CACHE_PREFIX",
    "LoadTeacherCached",
    "TeacherCache",
    "Case",
    "DEFAULT_WINDOW",
    "FillMissingLabeld",
    "LOAD_SPLITS",
    "LoadSliced",
    "PHANTOM_CASES",
    "PHANTOM_SHAPE",
    "PHANTOM_TASK",
    "PrepareSummary",
    "ScaleByMaxd",
    "Task",
    "UNLABELLED",
    "UNLABELLED_KEY",
    "download_task",
    "extract_task",
    "find_task",
    "load_manifest",
    "load_prepare_info",
    "load_split",
    "locate_task",
    "parse_window",
    "phantom_case",
    "prepare_dataset",
    "read_split_file",
    "read_task",
    "slice_transform",
    "split_patients",
    "student_subset",
    "verify_md5",
    "volume_to_slices",
    "volume_transforms",
    "write_phantom",
]
