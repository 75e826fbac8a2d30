"""Find, verify, extract, download and read Medical Segmentation Decathlon task folders.

A task folder holds ``dataset.json`` (with a ``training`` list of
``{"image": ..., "label": ...}``), ``imagesTr/``, ``labelsTr/`` and usually
``imagesTs/``. Any folder in that layout works, not only the MSD tasks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mkd.errors import InputError, MkdError

__all__ = [
    "DECATHLON_MD5",
    "DECATHLON_URLS",
    "Case",
    "Task",
    "case_id",
    "check_reachable",
    "download_task",
    "extract_task",
    "locate_task",
    "read_task",
    "verify_md5",
]

logger = logging.getLogger(__name__)

#: Published archive URLs (the ones MONAI's ``DecathlonDataset`` uses).
DECATHLON_URLS = {
    "Task09_Spleen": "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar",
}
#: Published MD5 sums of the archives.
DECATHLON_MD5 = {"Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e"}

#: Seconds allowed for the connectivity check before a download.
CONNECT_TIMEOUT = 4.0


def _known(task: str) -> tuple[str | None, str | None]:
    """URL and MD5 of a published MSD task: ours, else MONAI's table."""
    url, md5 = DECATHLON_URLS.get(task), DECATHLON_MD5.get(task)
    if url is None or md5 is None:
        try:
            from monai.apps import DecathlonDataset

            url = url or DecathlonDataset.resource.get(task)
            md5 = md5 or DecathlonDataset.md5.get(task)
        except ImportError:  # pragma: no cover
            pass
    return url, md5


@dataclass(frozen=True)
class Case:
    """One labelled volume: ``patient`` is the file stem (``spleen_3``)."""

    patient: str
    image: Path
    label: Path


@dataclass
class Task:
    """A Decathlon task folder as read from its ``dataset.json``."""

    root: Path
    name: str
    cases: list[Case]
    unlabelled: list[Path] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def case_id(path: str | os.PathLike) -> str:
    """Patient id of a case file: its name without ``.nii.gz`` / ``.nii``.

    Example:
        >>> case_id("./imagesTr/spleen_3.nii.gz")
        'spleen_3'
    """
    name = Path(str(path)).name
    return re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", "", name)


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def verify_md5(archive: str | os.PathLike, md5: str) -> None:
    """Check ``archive`` against its published MD5 with MONAI's ``check_hash``.

    Raises:
        InputError: the checksum differs (incomplete or corrupt file).
    """
    from monai.apps.utils import check_hash

    logger.info("verifying MD5 of %s", archive)
    if not check_hash(archive, md5, hash_type="md5"):
        raise InputError(
            archive, f"MD5 does not match the published {md5}; the file is incomplete or corrupt, download it again"
        )


def extract_task(archive: str | os.PathLike, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Verify (when ``md5`` is given) and extract a task archive into ``dest``, atomically.

    The archive must contain one top-level task folder (as the MSD ``.tar`` files do);
    it lands at ``dest/<folder>``. Extraction happens in a temporary folder, so a
    failure leaves nothing behind.

    Returns:
        The extracted task folder.

    Raises:
        InputError: bad checksum, unreadable archive, or no ``dataset.json`` inside.
    """
    import tarfile

    from monai.apps.utils import extractall

    archive, dest = Path(archive), Path(dest)
    if md5:
        verify_md5(archive, md5)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mkd-extract-", dir=dest))
    try:
        try:
            extractall(archive, tmp, has_base=False, file_type="tar")
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise InputError(archive, f"cannot extract ({err})") from None
        found = sorted(p.parent for p in tmp.glob("*/dataset.json"))
        if not found:
            raise InputError(archive, "no task folder with dataset.json inside the archive")
        target = dest / found[0].name
        if target.exists():
            raise MkdError(f"{target}: already exists; remove it or use it directly with `source`")
        os.replace(found[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %s to %s", archive, target)
    return target


def _hand_placement(task: str, root: Path, url: str | None, md5: str | None) -> str:
    where = f"download {url} (MD5 {md5}) on a connected machine and " if url else ""
    return (f"{where}put it at {root / (task + '.tar')} or extract it to {root / task}/ "
            f"(dataset.json, imagesTr/, labelsTr/)")  # fmt: skip


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Return None when ``url``'s host accepts a TCP connection within ``timeout`` seconds, else the reason.

    Name resolution runs in a daemon thread too, so a missing DNS server cannot stall the caller.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as err:
            result.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return f"no answer from {host} within {timeout:g} s"
    return result[0]


def download_task(task: str, root: str | os.PathLike, url: str | None = None, md5: str | None = None) -> Path:
    """Download and extract a published MSD task into ``root`` with MONAI's ``download_url`` and ``extractall``.

    Fails within a few seconds when the host is unreachable.

    Returns:
        The task folder ``root/task``.

    Raises:
        MkdError: unknown task, no network (the message says where to put the archive by hand),
            or a failed / corrupt download.
    """
    from monai.apps.utils import download_url

    root = Path(root)
    known_url, known_md5 = _known(task)
    url, md5 = url or known_url, md5 or known_md5
    if url is None:
        raise MkdError(
            f"`download=True`: no published archive for task {task!r}; put the task folder in {root} by hand"
        )
    reason = check_reachable(url)
    if reason is not None:
        raise MkdError(f"cannot download {url} ({reason}); {_hand_placement(task, root, url, md5)}")
    archive = root / f"{task}.tar"  # download_url creates ``root`` only once the file is complete
    try:
        download_url(url, archive, hash_val=md5, hash_type="md5", progress=True)
    except Exception as err:  # network errors come in many types
        raise MkdError(f"download of {url} failed ({err}); {_hand_placement(task, root, url, md5)}") from None
    return extract_task(archive, root, md5=None)


def locate_task(
    *, decathlon: str | None = None, source: str | os.PathLike | None = None,
    root: str | os.PathLike = ".", download: bool = False,
) -> Path:  # fmt: skip
    """Find (and if needed verify / extract / download) a task folder.

    ``decathlon="Task09_Spleen"`` looks for ``root/Task09_Spleen/``, then
    ``root/Task09_Spleen.tar`` (MD5-verified, extracted into ``root``), then
    downloads when ``download`` is true. ``source`` is a task folder or a
    ``.tar`` archive given directly (extracted into ``root``).

    Raises:
        InputError: missing folder / archive (the message says where to put it).
    """
    root = Path(root)
    if source is not None:
        source = Path(source)
        if source.is_dir():
            return source
        if source.is_file() and source.name.endswith((".tar", ".tar.gz", ".tgz")):
            task = source.name.split(".")[0]
            return extract_task(source, root, md5=_known(task)[1])
        raise InputError(source, "no such task folder or .tar archive")
    if decathlon is None:
        raise MkdError("give a task: `decathlon=NAME` or `source=DIR_OR_TAR`")
    folder, archive = root / decathlon, root / f"{decathlon}.tar"
    if folder.is_dir():
        return folder
    if archive.is_file():
        return extract_task(archive, root, md5=_known(decathlon)[1])
    if download:
        return download_task(decathlon, root)
    url, md5 = _known(decathlon)
    raise InputError(folder, f"no such folder; pass `download=True`, or {_hand_placement(decathlon, root, url, md5)}")


def read_task(task_dir: str | os.PathLike) -> Task:
    """Read a Decathlon-layout folder's ``dataset.json`` with MONAI's ``load_decathlon_datalist``.

    Checks that ``dataset.json`` exists and parses, that it has a non-empty
    ``training`` list, and that every listed file exists. Volumes are not opened here.

    Raises:
        InputError: missing folder, missing or malformed ``dataset.json``, missing case files.
    """
    from monai.data import load_decathlon_datalist

    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise InputError(
            task_dir, "no such folder; expected a Decathlon task folder (dataset.json, imagesTr/, labelsTr/)"
        )
    meta_file = task_dir / "dataset.json"
    if not meta_file.is_file():
        raise InputError(meta_file, "missing; a Decathlon task folder needs dataset.json with a 'training' list")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(meta_file, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list) or not meta["training"]:
        raise InputError(meta_file, "no 'training' list of {'image': ..., 'label': ...} items")
    try:
        items = load_decathlon_datalist(meta_file, is_segmentation=True, data_list_key="training", base_dir=task_dir)
    except (TypeError, ValueError) as err:
        raise InputError(meta_file, f"unreadable training list ({err})") from None
    cases, seen = [], set()
    for item in items:
        if "image" not in item or "label" not in item:
            raise InputError(meta_file, f"training item {item} lacks 'image' or 'label'")
        if isinstance(item["image"], (list, tuple)) or isinstance(item["label"], (list, tuple)):
            raise InputError(meta_file, "multi-file (multi-modal) cases are not supported; one image per case")
        image, label = Path(item["image"]), Path(item["label"])
        for f in (image, label):
            if not f.is_file():
                raise InputError(f, "listed in dataset.json but missing")
        pid = case_id(image)
        if pid in seen:
            raise InputError(meta_file, f"patient id {pid!r} appears twice")
        seen.add(pid)
        cases.append(Case(pid, image, label))
    cases.sort(key=lambda c: _natural_key(c.patient))
    unlabelled = []
    for entry in meta.get("test", []) or []:
        path = entry.get("image") if isinstance(entry, dict) else entry
        if isinstance(path, str):
            unlabelled.append((task_dir / path).resolve() if not os.path.isabs(path) else Path(path))
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    return Task(task_dir, str(meta.get("name", task_dir.name)), cases, unlabelled, labels, meta)
