"""Small shared helpers: atomic outputs, seeding, device choice, names read from a registry on first use."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mkd.errors import MkdError, output_exists

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "write_json",
    "umask_mode",
    "seed_everything",
    "resolve_device",
    "DEVICE_CHOICES",
    "check_writable",
    "check_free_space",
    "PlainState",
    "LazyNames",
]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def umask_mode(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would have: 0o666 / 0o777 less the umask.

    ``tempfile`` creates private files (0o600) and folders (0o700); an output renamed into
    place from one would otherwise stay unreadable to the rest of a lab group.
    """
    if directory is None:
        directory = os.path.isdir(path)
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only on success.

    Nothing is left at ``target`` if the body raises, and an existing ``target``
    is replaced only when the body completes and ``overwrite`` is true.

    Args:
        target: final directory path.
        overwrite: replace an existing ``target``; otherwise an existing one is an error.

    Raises:
        MkdError: ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise output_exists(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask_mode(tmp, directory=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed over it when the body succeeds (removed when it raises).

    For writers that take a file name (nibabel, ONNX export, ``np.save``). The file gets the
    mode a plain ``open`` would give it (:func:`umask_mode`), not ``tempfile``'s private 0o600.

    Args:
        target: the final path.
        suffix: the temporary file's suffix (some writers pick the format by it); default
            ``target``'s last suffix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask_mode(tmp, directory=False)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[Any]:
    """Open a temporary file beside ``target``; rename it over ``target`` when the body succeeds.

    Text is written as UTF-8; ``newline`` as for :func:`open` (``""`` for the ``csv`` module).
    """
    with atomic_path(target, suffix="") as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8", newline=newline) as fh:
            yield fh


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process's C locale after the block: ITK's GDCM (DICOM) reader and writer set it to "C".

    Python reads the locale's encoding as the default of ``open()`` / ``Path.read_text()``; after
    GDCM had run it was ASCII, and reading any UTF-8 text with a '±' failed later in the process.
    """
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        with contextlib.suppress(locale.Error):
            locale.setlocale(locale.LC_ALL, saved)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``) for repeatable CPU runs."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)


#: what ``--device`` accepts
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | None = None) -> torch.device:  # noqa: F821
    """Return the ``torch.device`` for ``--device``; ``None`` or ``"auto"`` picks CUDA when present, else CPU.

    Raises:
        MkdError: an unknown device (``--device banana``), or CUDA asked for on a machine without it
            (or a GPU index it does not have); the message names ``--device`` and its valid values.
    """
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise MkdError(f"`device={device}`: unknown device; valid values: {DEVICE_CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MkdError(f"`device={device}`: CUDA is not available on this machine; use `device=cpu` (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise MkdError(
                f"`device={device}`: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                f"valid values: {DEVICE_CHOICES}"
            )
    return dev


def check_writable(folder: str | os.PathLike, what: str = "output") -> Path:
    """Make sure files can be written in ``folder`` (or created under its nearest existing parent) before any work.

    A probe file is created and removed (``os.access`` is not enough on read-only mounts);
    nothing else is created.

    Returns:
        the folder.

    Raises:
        MkdError: the folder, or its nearest existing parent, is a file or is not writable.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        fd, name = tempfile.mkstemp(prefix=".mkd-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        why = err.strerror or type(err).__name__
        where = folder if probe == folder else f"{folder} (in {probe})"
        raise MkdError(f"{where}: cannot write the {what} here ({why}); choose another folder") from None
    return folder


def check_free_space(folder: str | os.PathLike, needed: int, what: str = "output") -> None:
    """Refuse to start when ``folder``'s file system has less than ``needed`` bytes free (``shutil.disk_usage``).

    Raises:
        MkdError: too little free space; the message gives both sizes.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise MkdError(
            f"{folder}: {_size(free)} free, about {_size(needed)} needed for the {what}; free some space or "
            "choose another folder"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


class PlainState:
    """Plain metadata with ``state_dict`` / ``load_state_dict``, so MONAI's CheckpointSaver can store it.

    Example:
        >>> info = PlainState(image_size=[96, 96], bundle="teacher")
        >>> info.state_dict()
        {'image_size': [96, 96], 'bundle': 'teacher'}
    """

    def __init__(self, **data: Any) -> None:
        self.data = json.loads(json.dumps(data, default=str))

    def state_dict(self) -> dict[str, Any]:
        return dict(self.data)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = dict(state)


class LazyNames(Sequence):
    """The names of a registry of the package, read when first needed (``import mkd.cli`` stays light).

    Click choices and the declared distillation settings (:mod:`mkd.handlers.settings`) list registries
    whose modules import torch; this reads them only when a name is asked for.

    Args:
        module: the module holding the registry.
        name: the registry (a mapping or a sequence of names).

    Example:
        >>> list(LazyNames("mkd.bundle", "ROLES"))
        ['teacher', 'student', 'distill']
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @functools.cached_property
    def _names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __getitem__(self, index):
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)
