"""mkd.utils: atomic outputs keep the process umask's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from mkd.errors import MkdError
from mkd.utils import atomic_dir, atomic_file, write_json


@pytest.fixture
def umask():
    """Run a test under a chosen umask; the old one is restored."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """tempfile made them 0o600 / 0o700: unreadable to the rest of a lab group (issue 12, case 7)."""
    umask(mask)
    with atomic_dir(tmp_path / "dataset") as tmp:
        (tmp / "images").mkdir()
        (tmp / "datalist.json").write_text("{}")
    write_json(tmp_path / "run" / "config.json", {"epochs": 3})
    with atomic_file(tmp_path / "mask.bin", "wb") as fh:
        fh.write(b"\x00\x01")
    assert _mode(tmp_path / "dataset") == dir_mode
    assert _mode(tmp_path / "dataset" / "images") == dir_mode
    assert _mode(tmp_path / "dataset" / "datalist.json") == file_mode
    assert _mode(tmp_path / "run") == dir_mode
    assert _mode(tmp_path / "run" / "config.json") == file_mode
    assert _mode(tmp_path / "mask.bin") == file_mode
    assert (tmp_path / "mask.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "mask.bin", "run"]  # no temp left


def test_atomic_writes_still_replace_whole_or_not_at_all(tmp_path, umask):
    write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json") as fh:
        fh.write('{"v": ')
        raise RuntimeError("killed")
    assert (tmp_path / "a.json").read_text() == '{\n  "v": 1\n}\n'
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(MkdError, match="output already exists"), atomic_dir(tmp_path / "d"):
        pass
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    assert (tmp_path / "d" / "x").read_text() == "new" and _mode(tmp_path / "d") == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def test_atomic_path_gives_the_umask_mode_and_leaves_nothing_on_error(tmp_path):
    """Masks and ONNX files were 0600 (tempfile's mode) instead of what the umask gives a plain open."""
    from mkd.utils import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "mask.nii.gz", suffix=".nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"mask")
        assert stat.S_IMODE((tmp_path / "mask.nii.gz").stat().st_mode) == 0o644
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]
