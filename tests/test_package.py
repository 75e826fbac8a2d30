"""Package-level behaviour: what importing mkd sets up."""

from __future__ import annotations

import logging
import sys
import types
import warnings


def test_monai_nvimagecodec_note_is_shown_at_most_once_per_process(monkeypatch, caplog):
    """With pydicom installed (faked here) MONAI logged the note once per volume read (issue 12, case 11)."""
    import nibabel  # noqa: F401 - imported before the fake pydicom, which nibabel would try to use
    from monai.transforms import LoadImaged

    import mkd  # noqa: F401 - installs the filters

    monkeypatch.setitem(sys.modules, "pydicom", types.ModuleType("pydicom"))
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(3):  # mkd's prepare builds one loader per volume
            LoadImaged(keys="image", reader="NibabelReader")
    notes = [r for r in caplog.records if "nvImageCodec" in r.getMessage()]
    assert len(notes) <= 1
    assert [str(w.message) for w in caught if "nvImageCodec" in str(w.message)] == []
