"""Shared fixtures: a tiny phantom task folder and a prepared DATA folder made from it (session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mkd.utils import keep_locale


@pytest.fixture(autouse=True)
def _restore_locale():
    """Tests that write DICOM with ITK directly: GDCM leaves the "C" locale behind (mkd's reader restores it)."""
    with keep_locale():
        yield


#: Settings of the shared tiny dataset (kept small: the fixtures take a few seconds).
TINY_CASES = 8
TINY_SHAPE = (64, 64, 16)
TINY_SIZE = 64
TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A phantom Task09-shaped folder: 8 labelled 64x64x16 volumes (+2 unlabelled), seed 0."""
    from mkd.data.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("sources"), cases=TINY_CASES, shape=TINY_SHAPE, seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_prepared(tiny_phantom, tmp_path_factory) -> Path:
    """``mkd prepare`` output of ``tiny_phantom`` at 64x64 (4 training / 2 validation / 2 test / 2 student patients).

    Treat it as read-only: other tests share it.
    """
    from mkd.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset(tiny_phantom, out, size=TINY_SIZE, seed=TINY_SEED)
    return out


def write_nifti(path: Path, array, affine=None) -> Path:
    """Save ``array`` as NIfTI (identity affine by default)."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def make_task(tmp_path):
    """Factory for small Decathlon-layout folders: ``make_task(cases={"p1": (image, label), ...}, affine=...)``.

    Without ``cases``, writes ``n`` cases of a 16x16x6 int16 volume with a 4x4x2 cube of label 1.
    Returns the task folder.
    """
    import json

    import numpy as np

    def factory(cases: dict | None = None, n: int = 5, name: str = "Task99_Test", affine=None) -> Path:
        task = tmp_path / name
        if cases is None:
            cases = {}
            for i in range(n):
                image = np.full((16, 16, 6), -100, np.int16)
                image[4:12, 4:12] = 100
                label = np.zeros((16, 16, 6), np.uint8)
                label[6:10, 6:10, 2:4] = 1
                cases[f"case_{i}"] = (image, label)
        training = []
        for pid, (image, label) in cases.items():
            write_nifti(task / "imagesTr" / f"{pid}.nii.gz", image, affine)
            write_nifti(task / "labelsTr" / f"{pid}.nii.gz", label, affine)
            training.append({"image": f"./imagesTr/{pid}.nii.gz", "label": f"./labelsTr/{pid}.nii.gz"})
        meta = {"name": name, "description": "test", "tensorImageSize": "3D", "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "organ"}, "numTraining": len(training), "numTest": 0,
                "training": training, "test": []}  # fmt: skip
        (task / "dataset.json").write_text(json.dumps(meta))
        return task

    return factory


#: fixtures that train a bundle: a test that uses one is a slow test (`tox -e fast` must not train)
TRAINING_FIXTURES = frozenset({"teacher_run", "student_run"})


def pytest_collection_modifyitems(config, items):
    """Refuse a test that trains a bundle through a fixture without ``@pytest.mark.slow``."""
    for item in items:
        used = TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} trains a bundle ({', '.join(sorted(used))}) but is not "
                                    "marked @pytest.mark.slow")  # fmt: skip
