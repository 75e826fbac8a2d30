"""Package-level behaviour: what importing mkd sets up."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_monai_nvimagecodec_log_note_is_shown_at_most_once_per_process(monkeypatch, caplog):
    """With pydicom installed (faked here) MONAI logged the note once per volume read (issue 12, case 11)."""
    import nibabel  # noqa: F401 - imported before the fake pydicom, which nibabel would try to use
    from monai.transforms import LoadImaged

    import mkd  # noqa: F401 - installs the filters

    monkeypatch.setitem(sys.modules, "pydicom", types.ModuleType("pydicom"))
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # mkd's prepare builds one loader per volume
        LoadImaged(keys="image", reader="NibabelReader")
    assert len([r for r in caplog.records if "nvImageCodec" in r.getMessage()]) <= 1


@pytest.mark.slow
def test_a_fresh_process_shows_the_nvimagecodec_note_once(tmp_path):
    """The whole output of a process building 14 loaders, warnings shown every time (-W always)."""
    code = (
        "import logging, sys, types, nibabel\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['pydicom'] = types.ModuleType('pydicom')\n"
        "import mkd\n"
        "from monai.transforms import LoadImaged\n"
        "for _ in range(14):\n"
        "    LoadImaged(keys='image')\n"
    )
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "nvImageCodec" in line]
    assert notes == [
        "WARNING:monai.data.nvimgcodec_pydicom_plugin:nvImageCodec is not available; skipping pydicom decoder "
        "plugin registration."
    ]


def _mkd_imports() -> dict[str, set[str]]:
    """``{module: mkd modules it imports}`` over every file of mkd, imports inside functions included."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in sorted((ROOT / "mkd").rglob("*.py"))}
    files = {name.removesuffix(".__init__"): p for name, p in files.items()}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # "from mkd.x import submodule"
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_no_module_of_mkd_imports_one_that_imports_it_back():
    """mkd.inference <-> mkd.export and mkd.inference <-> mkd.evaluation were cycles (issue 19)."""
    graph = _mkd_imports()
    assert {"mkd.export", "mkd.evaluation", "mkd.networks.checkpoint"} <= set(graph)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []
    assert not any(m.startswith("mkd.inference") for m in graph["mkd.export"])  # export: networks, never back


def test_only_the_checkpoint_record_reads_a_checkpoints_run_entry():
    """``ckpt.get("run")`` was read by hand in 9 places across 5 modules (issue 19)."""
    by_hand = re.compile(r"""ckpt\[.run.\]|get\("run"\)""")
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mkd").rglob("*.py") if by_hand.search(p.read_text()))
    assert readers == ["mkd/networks/checkpoint.py"]
