"""mkd.teachers: distil a teacher from outside mkd -- a MONAI bundle folder or a TorchScript file, 2D or 3D.

See docs/teachers.md. :func:`load_teacher` takes any teacher (an mkd checkpoint too);
a bundle or TorchScript network becomes a :class:`VolumeTeacher`, run once per volume with its
own preprocessing and inferer, whose per-slice logits go into the teacher cache.
"""

from __future__ import annotations

from mkd.teachers.load import SAFE_MODULES, fit_to_teacher, load_teacher, read_bundle_config, teacher_kind
from mkd.teachers.volume import ACTIVATIONS, VolumeTeacher, binary_logits, source_volume

__all__ = [
    "ACTIVATIONS",
    "SAFE_MODULES",
    "VolumeTeacher",
    "binary_logits",
    "fit_to_teacher",
    "load_teacher",
    "read_bundle_config",
    "source_volume",
    "teacher_kind",
]
