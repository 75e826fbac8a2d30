"""Checkpoints that rebuild their own network: state dicts plus plain metadata, loaded with ``weights_only``."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mkd.errors import InputError
from mkd.networks.base import MkdNetwork, plain_config
from mkd.networks.recorder import unwrap_model
from mkd.networks.registry import NETWORKS, build
from mkd.utils import atomic_file

__all__ = [
    "NetworkInfo",
    "CheckpointRecord",
    "save_checkpoint",
    "load_checkpoint",
    "load_network",
    "task_heads",
    "checkpoint_role",
]


class NetworkInfo:
    """Name and constructor kwargs of a network, with ``state_dict`` / ``load_state_dict``.

    Lets MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` store the metadata next to the
    weights: ``CheckpointSaver(save_dir, save_dict={"model": net, "network": NetworkInfo.of(net)})``
    writes ``{"model": ..., "network": {"name": ..., "kwargs": {...}}}``, which
    :func:`load_network` reads.

    Args:
        name: registry name (``"t1"``, ``"s1"``, ...).
        kwargs: constructor arguments (plain data).
    """

    def __init__(self, name: str = "", kwargs: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.kwargs: dict[str, Any] = plain_config(dict(kwargs or {}))

    @classmethod
    def of(cls, model: nn.Module) -> NetworkInfo:
        """The info of an mkd network (unwrapping DDP / DataParallel)."""
        net = unwrap_model(model)
        if not isinstance(net, MkdNetwork):
            raise TypeError(f"{type(net).__name__} is not an mkd network; build it with mkd.networks.build")
        return cls(net.network_name, net.config)

    def build(self, **overrides: Any) -> MkdNetwork:
        """Build the network described (``overrides`` replace stored kwargs)."""
        return build(self.name, **{**self.kwargs, **overrides})

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.name = str(state["name"])
        self.kwargs = dict(state.get("kwargs", {}))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetworkInfo) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"NetworkInfo({self.name!r}, {self.kwargs!r})"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **metadata: Any) -> Path:
    """Write ``{"model": state_dict, "network": {"name", "kwargs"}, **metadata}`` atomically.

    Args:
        path: output file (parent folders are created).
        model: an mkd network, possibly DDP / DataParallel-wrapped (the inner state dict is saved).
        metadata: extra entries; keep them plain data (numbers, strings, lists, dicts, tensors,
            other state dicts) so that ``weights_only`` loading accepts them.

    Returns:
        the path written.
    """
    for key in ("model", "network"):
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is reserved")
    net = unwrap_model(model)
    ckpt = {"model": net.state_dict(), "network": NetworkInfo.of(net).state_dict(), **metadata}
    path = Path(path)
    with atomic_file(path, "wb") as fh:
        torch.save(ckpt, fh)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``torch.load(..., weights_only=True)``.

    Raises:
        InputError: the file is missing, unreadable, not weights-only safe, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        with warnings.catch_warnings():  # a plain pickle file: refused below, the protocol note is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file
        raise InputError(path, f"cannot read: {_load_problem(path, err)}") from None
    if not isinstance(ckpt, dict):
        raise InputError(path, f"holds a {type(ckpt).__name__}; expected a dict checkpoint")
    return ckpt


def _load_problem(path: Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in mkd's words.

    PyTorch's own message advises re-running with ``weights_only=False``, which executes
    whatever code the file holds; mkd never repeats that advice.
    """
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) and found:
        return (
            f"holds Python objects ({found.group(1)}) besides tensors and plain data; mkd loads checkpoints "
            "weights-only and never runs code from a file. Re-save it as a state dict "
            "(mkd.networks.save_checkpoint) where it was made"
        )
    if zipfile.is_zipfile(path):
        return f"a zip archive, but not a readable PyTorch checkpoint ({type(err).__name__})"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        return "truncated PyTorch checkpoint (the zip archive has no end; was it killed while being written?)"
    if head[:1] == b"\x80":
        return (
            "a plain pickle file, not a weights-only PyTorch checkpoint; mkd does not unpickle arbitrary "
            "objects. Re-save it with torch.save(state_dict) or mkd.networks.save_checkpoint"
        )
    return "not a PyTorch checkpoint (no zip archive; expected a file written by torch.save)"


def _strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _check_weights(path: Path, info: NetworkInfo, state: Mapping[str, Any]) -> None:
    """Refuse NaN / infinite weights, and metadata describing a network far larger than the weights, before building.

    The network is first built on PyTorch's meta device (nothing allocated): a checkpoint whose
    ``network.kwargs`` ask for, say, 60 GB of parameters while the file holds a few MB is refused
    instead of exhausting the memory.

    Raises:
        InputError: naming the file, with the count of bad weights or the two sizes.
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        first = next(iter(bad))
        raise InputError(
            path,
            f"{sum(bad.values())} weight(s) are NaN or infinite, in {len(bad)} tensor(s) (first: {first}); the run "
            "diverged or the file is damaged: retrain, or use an earlier checkpoint",
        )
    if info.name not in NETWORKS:
        return
    try:
        with torch.device("meta"):
            wanted = sum(v.numel() for v in info.build().state_dict().values())
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(path, f"cannot rebuild {info.name!r} from its kwargs {info.kwargs}: {err}") from None
    held = sum(v.numel() for v in tensors.values())
    if wanted > 2 * held + 1_000_000:
        raise InputError(
            path,
            f"its network metadata ({info.name!r}, kwargs {info.kwargs}) describes {wanted / 1e6:.1f} M values "
            f"({wanted * 4 / 2**30:.1f} GB as float32) but the file holds {held / 1e6:.1f} M; refused before "
            "allocating: the metadata does not match the weights",
        )


def load_network(
    path: str | os.PathLike,
    expected: str | Sequence[str] | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
) -> tuple[MkdNetwork, dict[str, Any]]:
    """Rebuild a network from a checkpoint's own metadata and load its weights.

    Accepts files written by :func:`save_checkpoint` and MONAI ``CheckpointSaver`` files
    (a dict with a ``"model"`` key; with ``"network"`` saved through :class:`NetworkInfo`).
    A bare state dict, or a dict without ``"network"``, can be loaded only when
    ``expected`` names one architecture; it is then built with that architecture's
    default (thesis) widths.

    Args:
        path: checkpoint file.
        expected: architecture name(s) the caller accepts; ``None`` accepts any.
        map_location: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.

    Returns:
        ``(model, checkpoint dict)``; the model is in eval mode on ``map_location``'s device
        when that is a device (CPU by default).

    Raises:
        InputError: missing or unreadable file, another architecture than ``expected``
            ("... holds a 't1' network; expected 's1'"), no metadata, or weights that do not fit.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location)
    wanted = [expected] if isinstance(expected, str) else (list(expected) if expected is not None else None)
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = ckpt["model"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt  # a bare state dict (e.g. CheckpointSaver with a single object)
    else:
        raise InputError(path, f"no 'model' state dict in the checkpoint (keys: {', '.join(map(str, ckpt)) or 'none'})")
    meta = ckpt.get("network") if isinstance(ckpt.get("network"), Mapping) else None
    if meta is not None and "name" in meta:
        info = NetworkInfo()
        info.load_state_dict(meta)
    elif wanted is not None and len(wanted) == 1:
        info = NetworkInfo(wanted[0], {})
    else:
        raise InputError(
            path,
            "holds no 'network' metadata (name and kwargs), so the network cannot be rebuilt; save it with "
            "mkd.networks.save_checkpoint or CheckpointSaver(save_dict={'model': net, 'network': NetworkInfo.of(net)})",
        )
    if info.name not in NETWORKS:
        raise InputError(path, f"holds an unknown network {info.name!r}; known: {', '.join(NETWORKS)}")
    if wanted is not None and info.name not in wanted:
        raise InputError(path, f"holds a {info.name!r} network; expected {' or '.join(repr(w) for w in wanted)}")
    state = _strip_prefix(state)
    _check_weights(path, info, state)
    try:
        model = info.build()
    except (TypeError, ValueError) as err:
        raise InputError(path, f"cannot rebuild {info.name!r} from its kwargs {info.kwargs}: {err}") from err
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:3])
        raise InputError(
            path, f"weights do not fit a {info.name!r} network with kwargs {info.kwargs}: {detail}"
        ) from err
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, ckpt


#: checkpoint roles, and the role of each training bundle's checkpoints (for files written before roles were recorded)
ROLES = ("teacher", "student", "distilled")
_ROLE_OF_BUNDLE = {"teacher": "teacher", "student": "student", "distill": "distilled"}


def task_heads(model: nn.Module) -> list[str]:
    """The output heads of an mkd network: ``["segmentation"]``, plus ``"reconstruction"`` for multi-task teachers."""
    scales = getattr(unwrap_model(model), "feature_scales", {})
    return ["segmentation"] + (["reconstruction"] if "recon" in scales else [])


def checkpoint_role(ckpt: Mapping[str, Any]) -> str | None:
    """The role recorded in a checkpoint: ``"teacher"``, ``"student"``, ``"distilled"`` or ``None``.

    Shorthand for ``CheckpointRecord.from_checkpoint(ckpt).role``.
    """
    return CheckpointRecord.from_checkpoint(ckpt).role


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ()


def _image_size(value: Any) -> tuple[int, ...] | None:
    """``run.image_size`` as integers: ``[H, W]`` (or a number ``n`` for ``n x n``); ``None`` when not recorded."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value), int(value))
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return tuple(int(s) for s in value)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be two integers (H, W), got {value!r} (from the checkpoint)") from None


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint says about its network and its training run, read once from the checkpoint dict.

    The training bundles save ``{"model", "network": {"name", "kwargs"}, "run": {...}, ...}`` (the
    ``run`` entry is ``train.json#run_info``, plus the distillation settings of ``distill.json``);
    :func:`save_checkpoint` files carry whatever metadata their writer passed. Every field is optional:
    a checkpoint written before a field was recorded (or by hand) reads as ``None`` / empty there.

    Attributes:
        arch: registry name of the network (``network.name``: ``"t1"``, ``"s1"``, ...).
        network_kwargs: its constructor arguments (``network.kwargs``).
        role: ``"teacher"``, ``"student"`` or ``"distilled"`` (``run.role``; for bundle runs written
            before roles were recorded, the role of ``run.bundle``).
        bundle: the role config the run was trained with (``"teacher"``, ``"student"``, ``"distill"``).
        tasks: the output heads trained (``run.tasks``: ``("segmentation", "reconstruction")``, ...).
        image_size: ``(H, W)`` the network was trained on (``run.image_size``).
        preprocessing: the ``mkd prepare`` settings of the training data (``window``, ``channels``,
            ``spacing``, ``size``: the schema of ``prepare.json``'s ``settings``), from the top-level
            ``preprocessing`` entry or ``run.preprocessing``; empty when not recorded.
        train_split: the datalist list trained on (``run.train_split``: ``"training"``, ``"student"``).
        seed: the run's seed.
        recipe: the distillation recipe (``run.recipe``) of a distilled student.
        teacher: the teacher checkpoint of a distilled student (``run.teacher``).
        augment: the named augmentation (``run.augment``).
        mix: the batch mix (``run.mix``).
        run: the whole ``run`` entry as recorded (plain data), for summaries that copy it.

    Example:
        >>> record = CheckpointRecord.from_checkpoint({"network": {"name": "s1"}, "run": {"image_size": [96, 96]}})
        >>> record.arch, record.image_size, record.role
        ('s1', (96, 96), None)
    """

    arch: str | None = None
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    role: str | None = None
    bundle: str | None = None
    tasks: tuple[str, ...] = ()
    image_size: tuple[int, ...] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    train_split: str | None = None
    seed: int | None = None
    recipe: str | None = None
    teacher: str | None = None
    augment: str | None = None
    mix: str | None = None
    run: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any] | CheckpointRecord | None) -> CheckpointRecord:
        """Read the record of a checkpoint dict (what :func:`load_checkpoint` / :func:`load_network` return).

        Args:
            ckpt: the checkpoint dict; ``None`` or ``{}`` (a built network, no metadata) gives an empty
                record, and a record is returned as it is.

        Raises:
            ValueError: ``run.image_size`` is not a list of integers.
        """
        if isinstance(ckpt, CheckpointRecord):
            return ckpt
        ckpt = ckpt if isinstance(ckpt, Mapping) else {}
        network, run = _mapping(ckpt.get("network")), _mapping(ckpt.get("run"))
        role = run.get("role") or _ROLE_OF_BUNDLE.get(str(run.get("bundle")))
        preprocessing = next(
            (dict(p) for p in (ckpt.get("preprocessing"), run.get("preprocessing")) if isinstance(p, Mapping)), {}
        )
        seed = run.get("seed")
        return cls(
            arch=_optional_str(network.get("name")),
            network_kwargs=_mapping(network.get("kwargs")),
            role=role if role in ROLES else None,
            bundle=_optional_str(run.get("bundle")),
            tasks=_names(run.get("tasks")),
            image_size=_image_size(run.get("image_size")),
            preprocessing=preprocessing,
            train_split=_optional_str(run.get("train_split")),
            seed=int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
            recipe=_optional_str(run.get("recipe")),
            teacher=_optional_str(run.get("teacher")),
            augment=_optional_str(run.get("augment")),
            mix=_optional_str(run.get("mix")),
            run=run,
        )
