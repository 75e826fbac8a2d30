"""mkd.errors: the one-line message of a library error."""

from __future__ import annotations

import re
from pathlib import Path

from mkd.errors import first_line


def test_first_line_keeps_the_first_line_and_cuts_it_at_the_limit():
    assert first_line(OSError("  truncated gzip stream\nat offset 120\n")) == "truncated gzip stream"
    assert first_line(RuntimeError("x" * 250)) == "x" * 197 + "..."  # 200 characters in all
    assert first_line(RuntimeError("x" * 200)) == "x" * 200
    assert first_line(ValueError("abcdef"), limit=5) == "ab..."
    assert first_line(KeyError()) == "KeyError" and first_line(RuntimeError(" \n ")) == "RuntimeError"


def test_first_line_is_written_once():
    """``_first_line`` was defined three times, with three limits (200, 300, and 160 keeping the *last* line)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "mkd").rglob("*.py"))
    defined = [str(p.relative_to(root)) for p in files for line in p.read_text().splitlines()
               if re.match(r"def _?first_line\(", line)]  # fmt: skip
    assert defined == ["mkd/errors.py"]
