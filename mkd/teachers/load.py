"""Load any teacher: an mkd checkpoint, a MONAI bundle folder or a TorchScript file (docs/teachers.md).

A bundle's config is read as data: its ``network_def``, ``preprocessing`` and ``inferer`` may name
MONAI classes (``_target_`` in ``monai.networks.nets``, ``monai.transforms``, ``monai.inferers``)
with plain values, nothing else. An expression (``"$..."``), a reference (``"@..."``), a macro
(``"%..."``), another module or a transform that runs a given function or writes files is refused
unless the user passes ``--allow-expressions`` (bundle key ``allow_teacher_expressions``): then
MONAI's ``ConfigParser`` runs the config as its bundle would (docs/security.md).
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mkd.errors import InputError, MkdError, first_line

__all__ = ["load_teacher", "teacher_kind", "fit_to_teacher", "read_bundle_config", "SAFE_MODULES"]

logger = logging.getLogger(__name__)

#: modules a bundle's ``_target_`` may name without ``--allow-expressions``
SAFE_MODULES = ("monai.networks.nets", "monai.transforms", "monai.inferers")
#: MONAI classes refused even there: they run a function given to them, or write or log data
_REFUSED = ("Lambda", "Lambdad", "RandLambda", "RandLambdad", "SaveImage", "SaveImaged", "DataStats", "DataStatsd",
            "ImageFilter", "ImageFilterd", "RandImageFilter", "RandImageFilterd")  # fmt: skip
#: the sections of a bundle config a teacher needs
_SECTIONS = ("network_def", "preprocessing", "inferer")
#: config files looked for in ``BUNDLE/configs/``, in order
_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


def teacher_kind(path: str | os.PathLike) -> str:
    """``"bundle"`` (a folder), ``"torchscript"`` (a TorchScript archive) or ``"mkd"`` (anything else).

    Example:
        >>> teacher_kind("runs/teacher-t1/models/model.pt")  # doctest: +SKIP
        'mkd'
    """
    path = Path(path)
    if path.is_dir():
        return "bundle"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist()):
                return "torchscript"
    return "mkd"


# --- bundle configs, read as data -------------------------------------------------------------


def _target_module(name: str) -> str | None:
    """The module a ``_target_`` resolves to (MONAI's component lookup for a bare class name)."""
    from monai.bundle import ComponentLocator

    if "." in name:
        return name.rsplit(".", 1)[0]
    found = ComponentLocator().get_component_module_name(name)
    if isinstance(found, list):  # a name in several modules: every one must be safe
        return next((m for m in found if not m.startswith(SAFE_MODULES)), found[0]) if found else None
    return found


def _special(key: str, value: Any) -> str | None:
    """A teacher bundle's special keys: ``_target_`` a safe MONAI class, ``_disabled_`` a boolean, ``_desc_`` text."""
    if key == "_desc_" or (key == "_disabled_" and isinstance(value, bool)):
        return None
    if key != "_target_":
        return "is not plain data"
    if not isinstance(value, str) or value[:1] in ("$", "@", "%"):
        return f"{value!r} is not a class name"
    module = _target_module(value)
    if module is None:
        return f"{value!r} names no MONAI class"
    if not module.startswith(SAFE_MODULES) or value.rsplit(".", 1)[-1] in _REFUSED:
        return f"{value!r} is not a MONAI network, transform or inferer mkd runs as data"
    return None


def _unsafe(value: Any, where: str) -> str | None:
    """Where ``value`` would run code or name something outside :data:`SAFE_MODULES`; ``None`` when it is data."""
    from mkd.bundle import _expression_in

    found = _expression_in(value, where, _special)
    return None if found is None else f"{found[0]}: {found[1]}"


def read_bundle_config(folder: str | os.PathLike, allow_expressions: bool = False):
    """The bundle's config file and a MONAI ``ConfigParser`` holding what a teacher needs from it.

    Without ``allow_expressions`` the parser holds only ``network_def``, ``preprocessing``,
    ``inferer`` and ``postprocessing`` (which is read, never run), each checked to be data.

    Returns:
        ``(config_file, parser)``; ``config_file`` is ``None`` when ``configs/`` holds no inference config.

    Raises:
        InputError: an unreadable config, or (without ``allow_expressions``) one that would run code.
    """
    from monai.bundle import ConfigParser

    folder = Path(folder)
    config_file = next((folder / "configs" / n for n in _CONFIGS if (folder / "configs" / n).is_file()), None)
    if config_file is None:
        return None, None
    try:
        config = ConfigParser.load_config_file(config_file)
    except Exception as err:
        raise InputError(config_file, f"cannot read the bundle config: {first_line(err)}") from None
    parser = ConfigParser()
    if allow_expressions:
        parser.read_config(str(config_file))
        parser["bundle_root"] = str(folder)
        return config_file, parser
    plain: dict[str, Any] = {}
    for key in (*_SECTIONS, "postprocessing"):
        if key not in config:
            continue
        if key != "postprocessing":  # postprocessing is only read for its activation
            problem = _unsafe(config[key], key)
            if problem:
                raise InputError(
                    config_file,
                    f"{problem}; a bundle's config runs as code only with --allow-expressions (docs/security.md)",
                )
        plain[key] = config[key]
    parser.update(plain)
    return config_file, parser


def _activation(config: Mapping[str, Any] | None, channels: int) -> str:
    """``sigmoid`` or ``softmax``: what the bundle's ``postprocessing`` declares, else from the channel count."""
    for t in (config or {}).get("transforms", []) if isinstance(config, Mapping) else []:
        if isinstance(t, Mapping) and str(t.get("_target_", "")).endswith("Activationsd"):
            if t.get("sigmoid") is True:
                return "sigmoid"
            if t.get("softmax") is True:
                return "softmax"
    return "sigmoid" if channels == 1 else "softmax"


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(path, f"cannot read the weights (weights only): {first_line(err)}") from None
    if isinstance(ckpt, Mapping):
        for key in ("model", "state_dict", "network"):
            if isinstance(ckpt.get(key), Mapping):
                return dict(ckpt[key])
        return dict(ckpt)
    raise InputError(path, "not a state dict")


def _torchscript(path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise InputError(path, f"cannot load the TorchScript file: {first_line(err)}") from None


def _probe(network: torch.nn.Module, path: Path) -> tuple[int, int, int]:
    """``(spatial_dims, in_channels, out_channels)`` of a network without a config, found by trying inputs."""
    for dims in (3, 2):
        for channels in (1, 3):
            try:
                with torch.no_grad():
                    out = network(torch.zeros(1, channels, *([32] * dims)))
            except Exception:  # the wrong shape: try the next
                continue
            if isinstance(out, torch.Tensor) and out.ndim == dims + 2:
                return dims, channels, int(out.shape[1])
    raise InputError(path, "cannot tell the network's input (tried 2D and 3D, 1 and 3 channels); give it a bundle "
                     "config with a network_def (docs/teachers.md)")  # fmt: skip


def _network_sizes(parser, config_file) -> dict[str, int]:
    """The sizes in ``network_def`` (``spatial_dims``, ``in_channels``/``in_chans``, ``out_channels``), resolved.

    With ``--allow-expressions`` a size may be an expression (``"$1 + 1"``): its value is what counts.
    """
    net_def = parser.config.get("network_def")
    if not isinstance(net_def, Mapping):
        return {}
    sizes: dict[str, int] = {}
    for key in ("spatial_dims", "in_channels", "in_chans", "out_channels"):
        if key in net_def:
            try:
                sizes[key] = int(parser.get_parsed_content(f"network_def#{key}"))
            except Exception as err:
                raise InputError(config_file, f"network_def.{key} is not a whole number: {first_line(err)}") from None
    return sizes


def _default_preprocessing(info: Mapping[str, Any]):
    """The volume as ``mkd prepare`` reads it, without the in-plane resize: RAS, its spacing and window."""
    from mkd.data.transforms import volume_transforms

    settings = info.get("settings", {})
    return volume_transforms(("image",), window=settings.get("window", "max"), spacing=settings.get("spacing"),
                             size=None)  # fmt: skip


def _load_external(
    path: Path,
    kind: str,
    device: torch.device,
    image_size: Sequence[int],
    data_dir: str | os.PathLike,
    label: int | None,
    allow_expressions: bool,
    roi_size: Sequence[int],
):
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from mkd.data.prepare import load_prepare_info
    from mkd.teachers.volume import VolumeTeacher

    info = load_prepare_info(data_dir)
    parser = config_file = None
    if kind == "bundle":
        config_file, parser = read_bundle_config(path, allow_expressions)
        pt, ts = path / "models" / "model.pt", path / "models" / "model.ts"
        network = None
        if parser is not None and "network_def" in parser.config:
            try:
                network = parser.get_parsed_content("network_def", instantiate=True)
            except Exception as err:
                raise InputError(config_file, f"cannot build network_def: {first_line(err)}") from None
            if pt.is_file():
                try:
                    network.load_state_dict(_state_dict(pt))
                except RuntimeError as err:
                    raise InputError(pt, f"does not fit network_def: {first_line(err)}") from None
            elif ts.is_file():
                network = _torchscript(ts)
            else:
                raise InputError(path, "no models/model.pt or models/model.ts")
        elif ts.is_file():
            network = _torchscript(ts)
        else:
            raise InputError(
                path, "not a MONAI bundle: no configs/inference.json with a network_def, no models/model.ts"
            )
        source = path
    else:
        network = _torchscript(path)
        source = path
    network = network.cpu().eval()
    config = parser.config if parser is not None else {}
    sizes = _network_sizes(parser, config_file) if parser is not None else {}
    if "spatial_dims" in sizes and ("in_channels" in sizes or "in_chans" in sizes):
        dims, in_ch = sizes["spatial_dims"], sizes.get("in_channels", sizes.get("in_chans", 1))
        out_ch = sizes.get("out_channels") or _probe(network, path)[2]
    else:  # a TorchScript network without a config: try inputs
        dims, in_ch, out_ch = _probe(network, path)
    network.to(device)
    if dims not in (2, 3):
        raise InputError(path, f"a {dims}D network: mkd runs 2D and 3D teachers")
    activation = _activation(config.get("postprocessing"), out_ch)
    if label is None:
        if out_ch > 2:
            raise InputError(path, f"the teacher has {out_ch} output channels; pick the organ's with --teacher-label N")
        label = 0 if out_ch == 1 else 1
    if not 0 <= int(label) < out_ch:
        raise InputError(path, f"--teacher-label {label} is not an output channel (the teacher has {out_ch})")
    if parser is not None and "preprocessing" in config:
        try:
            with warnings.catch_warnings():  # MONAI's notes on changed defaults (Orientationd labels) are not ours
                warnings.simplefilter("ignore", FutureWarning)
                preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        except Exception as err:
            raise InputError(config_file, f"cannot build the bundle's preprocessing: {first_line(err)}") from None
    else:
        preprocessing = _default_preprocessing(info)
    if parser is not None and "inferer" in config:
        try:
            inferer = parser.get_parsed_content("inferer", instantiate=True)
        except Exception as err:
            raise InputError(config_file, f"cannot build the bundle's inferer: {first_line(err)}") from None
    else:
        inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=1, overlap=0.25) if dims == 3 else (
            SimpleInferer())  # fmt: skip
    teacher = VolumeTeacher(
        network, preprocessing, inferer, spatial_dims=dims, in_channels=in_ch, label=int(label),
        activation=activation, prepare_info=info, image_size=image_size, device=device, source=source,
    )  # fmt: skip
    logger.info("teacher %s: a %dD %s network, %d output channel(s), organ channel %d (%s); run per volume, its "
                "logits cached per slice", path, dims, kind, out_ch, label, activation)  # fmt: skip
    return teacher


def load_teacher(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    image_size: Sequence[int] | None = None,
    allow_student: bool = False,
    label: int | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_expressions: bool = False,
    live: bool = False,
    roi_size: Sequence[int] = (96, 96, 96),
) -> torch.nn.Module:
    """The frozen teacher of a distillation run, whatever ``path`` holds.

    - an mkd checkpoint (``mkd teacher``): :func:`mkd.handlers.load_teacher`;
    - a MONAI bundle folder (model-zoo layout: ``configs/inference.json`` with a ``network_def``,
      ``models/model.pt`` or ``models/model.ts``): run with the bundle's ``preprocessing`` and
      ``inferer``;
    - a TorchScript file: run on the volume as ``mkd prepare`` reads it (RAS, the dataset's
      spacing and window), a 3D network with a sliding window of ``roi_size``.

    The last two give a :class:`~mkd.teachers.VolumeTeacher` (logits only, from the teacher cache).

    Args:
        path: the teacher.
        device: where it runs.
        image_size: the student's slice size.
        allow_student: (mkd checkpoints) accept a student checkpoint on purpose.
        label: the output channel of the organ in a multi-class teacher (``--teacher-label``); by
            default 0 for one channel, 1 for two, required for more.
        data_dir: the prepared dataset (a volume teacher reads its ``prepare.json``).
        allow_expressions: let a bundle's config run code (MONAI expressions, any ``_target_``).
        live: the run needs the teacher's forward pass on each batch (no cache, augmentation):
            refused for a volume teacher.
        roi_size: the sliding window of a 3D TorchScript teacher without a config.

    Raises:
        InputError: a teacher that cannot be run as asked; the message names the file.
    """
    from mkd.handlers.distillation import load_teacher as load_mkd_teacher

    path = Path(path)
    if not path.exists():
        raise InputError(path, "teacher checkpoint not found; train one with `mkd teacher` (or pass a MONAI bundle "
                         "folder or a TorchScript file)")  # fmt: skip
    kind = teacher_kind(path)
    if kind == "mkd":
        if label not in (None, 0):
            raise InputError(path, f"--teacher-label {label}: an mkd teacher has one output channel")
        return load_mkd_teacher(path, device, image_size, allow_student=allow_student)
    if live:
        raise InputError(path, f"a {kind} teacher runs on whole volumes and is read from the teacher cache; "
                         "--no-cache and augmentation need an mkd teacher")  # fmt: skip
    if data_dir is None or image_size is None:
        raise MkdError("a volume teacher needs `data_dir` and `image_size`")
    return _load_external(path, kind, torch.device(device), image_size, data_dir, label, allow_expressions, roi_size)


def fit_to_teacher(settings, teacher: str | os.PathLike):
    """The distillation settings this teacher can serve: a teacher without named scales distils logits only.

    A bundle or TorchScript teacher (:func:`teacher_kind`, read from the path: the teacher is not
    loaded) has no ``enc``/``bn``/``dec`` features: the recipe's feature scales are dropped with one
    line; scales the user gave (``--scales``) are an error. ``settings`` is a
    :class:`mkd.handlers.settings.DistillSettings`.
    """
    from mkd.handlers.settings import DistillSettings, SettingsError

    if not settings["scales"] or teacher_kind(teacher) == "mkd":
        return settings
    source = str(teacher)
    if "scales" in settings.given:
        raise SettingsError(
            f"scales {','.join(settings['scales'])}: {source} has no named feature scales (a bundle or TorchScript "
            "teacher); distil its logits only (scales none)"
        )
    values = dict(settings)
    values["scales"] = []
    fitted = DistillSettings(values, settings.given)
    if not fitted["pmd"] and "dice" not in fitted.weights:
        raise SettingsError(f"recipe {settings['recipe']!r} distils features only and {source} gives logits only")
    logger.warning("%s gives logits only: the recipe's feature terms (%s) are left out; the run distils %s",
                source, ",".join(settings["scales"]), ", ".join(k for k in fitted.weights if k != "seg"))  # fmt: skip
    return fitted
