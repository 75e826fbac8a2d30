"""The unlabelled transfer set: ``imagesTs`` slices, ``load_split(..., "transfer")`` and the label sentinel.

The key property: a student trained on ``student`` + ``transfer`` never reads the label file of
a training patient outside its own half.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

#: the small phantom of this module: 6 labelled (4 training / 1 validation / 1 test, 2 student) + 2 unlabelled
CASES, TEST_CASES, SHAPE, SIZE = 6, 2, (32, 32, 8), 16


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    """``mkd prepare`` output of a 6 + 2 case 32x32x8 phantom at 16x16 (read-only: shared by this module)."""
    from mkd.data import prepare_dataset, write_phantom

    root = tmp_path_factory.mktemp("transfer")
    task = write_phantom(root / "src", cases=CASES, shape=SHAPE, test_cases=TEST_CASES, seed=0)
    prepare_dataset(task, root / "data", size=SIZE, seed=0)
    return root / "data"


def _datalist(data_dir: Path) -> dict:
    return json.loads((data_dir / "datalist.json").read_text())


def test_prepare_slices_every_unlabelled_volume(small_prepared):
    dl = _datalist(small_prepared)
    info = json.loads((small_prepared / "prepare.json").read_text())
    unlabelled = dl["unlabelled"]
    assert len(unlabelled) == TEST_CASES * SHAPE[2]  # image only, every slice
    pids = sorted({it["patient"] for it in unlabelled})
    assert pids == ["spleen_7", "spleen_8"]  # the imagesTs file stems
    labelled = {p for k in ("training", "validation", "test") for p in dl["patients"][k]}
    assert not set(pids) & labelled
    for it in unlabelled:
        assert set(it) == {"image", "patient", "slice", "z"} and it["image"] == f"images/{it['patient']}.npy"
    for pid in pids:
        img = np.load(small_prepared / "images" / f"{pid}.npy")
        assert img.dtype == np.float16 and img.shape == (SHAPE[2], 3, SIZE, SIZE)
        assert 0 <= img.min() and img.max() <= 1
        assert not (small_prepared / "labels" / f"{pid}.npy").exists()
        rows = [(it["slice"], it["z"]) for it in unlabelled if it["patient"] == pid]
        assert rows == [(z, z) for z in range(SHAPE[2])]
        geo = info["unlabelled"][pid]
        assert geo["split"] == "unlabelled" and geo["rows"] == SHAPE[2] and geo["z"] == list(range(SHAPE[2]))
        assert geo["shape"] == list(SHAPE) and geo["stored_shape"] == [SIZE, SIZE]
        assert np.asarray(geo["affine"]).shape == (4, 4) and geo["image"].endswith(f"imagesTs/{pid}.nii.gz")
    # the labelled geometry and the manifest hold the labelled volumes only
    assert not set(info["volumes"]) & set(pids)
    assert not set(pids) & set(pd.read_csv(small_prepared / "manifest.csv").patient)


def test_transfer_is_the_other_training_patients_then_unlabelled_without_labels(small_prepared):
    from mkd.data import load_split

    dl = _datalist(small_prepared)
    pats = dl["patients"]
    others = set(pats["training"]) - set(pats["student"])
    transfer = load_split(small_prepared, "transfer")
    assert transfer
    assert all("label" not in it for it in transfer)
    assert not any("labels" in str(v) for it in transfer for v in it.values())  # no label path anywhere
    assert {it["patient"] for it in transfer} == others | {"spleen_7", "spleen_8"}
    assert not {it["patient"] for it in transfer} & set(pats["student"])
    n_others = sum(it["patient"] in others for it in dl["training"])
    assert len(transfer) == n_others + len(dl["unlabelled"])
    assert [it["patient"] in others for it in transfer] == [True] * n_others + [False] * len(dl["unlabelled"])
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in transfer)
    assert load_split(small_prepared, "unlabelled") == transfer[n_others:]
    # student + transfer covers every training slice exactly once, labels only for the student
    train = load_split(small_prepared, "training")
    both = load_split(small_prepared, "student") + transfer[:n_others]
    assert sorted((it["patient"], it["slice"]) for it in both) == sorted((it["patient"], it["slice"]) for it in train)


def test_an_older_datalist_without_unlabelled_gives_the_training_part_only(small_prepared, tmp_path):
    from mkd.data import load_split

    data = tmp_path / "old"
    shutil.copytree(small_prepared, data)
    dl = _datalist(data)
    del dl["unlabelled"]
    (data / "datalist.json").write_text(json.dumps(dl))
    transfer = load_split(data, "transfer")
    assert transfer and {it["patient"] for it in transfer} == set(dl["patients"]["training"]) - set(
        dl["patients"]["student"]
    )
    assert all("label" not in it for it in transfer)
    assert load_split(data, "unlabelled") == []
    with pytest.raises(ValueError, match="transfer"):
        load_split(data, "transfer_set")


def test_empty_imagesTs_gives_an_empty_list_and_colliding_names_get_a_suffix(make_task, tmp_path, caplog):
    from conftest import write_nifti

    from mkd.data import load_split, prepare_dataset

    task = make_task(n=5)
    s = prepare_dataset(task, tmp_path / "empty", size=8)
    assert _datalist(tmp_path / "empty")["unlabelled"] == [] and s.slices["unlabelled"] == 0
    assert load_split(tmp_path / "empty", "unlabelled") == []
    assert "unlabelled: 0 slices (0 volumes)" in s.lines()

    # an imagesTs file named like a labelled case, a new one, a listed-but-missing one
    image = np.full((16, 16, 6), 50, np.int16)
    write_nifti(task / "imagesTs" / "case_0.nii.gz", image)
    write_nifti(task / "imagesTs" / "new_1.nii.gz", image)
    meta = json.loads((task / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/case_0.nii.gz", "./imagesTs/new_1.nii.gz", "./imagesTs/gone.nii.gz"]
    (task / "dataset.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        s = prepare_dataset(task, tmp_path / "named", size=8)
    assert "gone.nii.gz" in caplog.text and "case_0_unlabelled" in caplog.text
    dl = _datalist(tmp_path / "named")
    assert sorted({it["patient"] for it in dl["unlabelled"]}) == ["case_0_unlabelled", "new_1"]
    assert s.slices["unlabelled"] == 12 and s.patients["unlabelled"] == 2
    stored = np.load(tmp_path / "named" / "images" / "case_0_unlabelled.npy")
    assert stored.shape == (6, 3, 8, 8) and np.allclose(stored, (50 + 57) / (164 + 57), atol=2e-3)
    # the labelled case_0 keeps its own slices
    assert float(np.load(tmp_path / "named" / "images" / "case_0.npy").max()) == pytest.approx(157 / 221, abs=2e-3)


def test_fill_missing_label_gives_a_sentinel_of_the_image_shape():
    from monai.data import MetaTensor

    from mkd.data import UNLABELLED, FillMissingLabeld

    fill = FillMissingLabeld(keys="label")
    out = fill({"image": torch.rand(3, 5, 7), "patient": "p"})
    assert out["label"].shape == (1, 5, 7) and out["label"].dtype == torch.float32
    assert torch.all(out["label"] == UNLABELLED) and UNLABELLED < 0
    label = torch.ones(1, 5, 7)
    kept = fill({"image": torch.rand(3, 5, 7), "label": label})
    assert kept["label"] is label
    meta = fill({"image": MetaTensor(torch.rand(3, 4, 4), affine=torch.eye(4) * 2)})["label"]
    assert isinstance(meta, MetaTensor) and torch.equal(meta.affine, torch.eye(4) * 2)
    assert not meta.applied_operations
    assert fill({"image": np.zeros((3, 2, 2))})["label"].shape == (1, 2, 2)
    with pytest.raises(ValueError, match="must be negative"):
        FillMissingLabeld(keys="label", value=0)
    with pytest.raises(ValueError, match="place it after loading"):
        fill({"image": "images/p.npy"})
    with pytest.raises(KeyError, match="image"):
        fill({"patient": "p"})


@pytest.mark.parametrize("fill_at", ["after_load", "after_resize"])
def test_non_student_label_files_are_never_read(small_prepared, tmp_path, monkeypatch, fill_at):
    """Delete the labels of the training patients outside the student's half, record every np.load.

    Student + transfer items go through the distill bundle's loading chain (LoadSliced, Resized,
    EnsureTyped) with the sentinel transform, and a shuffled DataLoader mixes them in batches.
    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, EnsureTyped, Resized

    from mkd.data import UNLABELLED, FillMissingLabeld, LoadSliced, load_split
    from mkd.losses import LabelledOnly

    data = tmp_path / "data"
    shutil.copytree(small_prepared, data)
    pats = _datalist(data)["patients"]
    others = sorted(set(pats["training"]) - set(pats["student"]))
    assert others
    forbidden = {str((data / "labels" / f"{pid}.npy").resolve()) for pid in others}
    for path in forbidden:
        Path(path).unlink()

    opened: list[str] = []
    real_load = np.load

    def recording_load(file, *args, **kwargs):
        opened.append(str(Path(file).resolve()))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)

    keys = ("image", "label")
    load = LoadSliced(keys=keys, allow_missing_keys=True)
    resize = Resized(keys=keys, spatial_size=(24, 24), mode=("area", "nearest"), allow_missing_keys=True)
    fill = FillMissingLabeld(keys="label")
    chain = [load, fill, resize] if fill_at == "after_load" else [load, resize, fill]
    transform = Compose([*chain, EnsureTyped(keys=keys, track_meta=False)])

    student = load_split(data, "student")
    transfer = load_split(data, "transfer")
    loader = DataLoader(
        Dataset(student + transfer, transform=transform),
        batch_size=6,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=0,
    )
    loss = LabelledOnly(DiceCELoss(sigmoid=True, batch=True))
    seen, mixed = 0, 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 24, 24) and batch["label"].shape[1:] == (1, 24, 24)
        assert batch["label"].shape[0] == batch["image"].shape[0]
        for label, pid in zip(batch["label"], batch["patient"]):
            if pid in pats["student"]:
                assert set(label.unique().tolist()) <= {0.0, 1.0}
            else:
                assert torch.all(label == UNLABELLED)
        pred = torch.zeros_like(batch["label"], requires_grad=True)
        value = loss(pred, batch["label"])
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(pred.grad).all()
        mixed += len({pid in pats["student"] for pid in batch["patient"]}) == 2
        seen += len(batch["patient"])
    assert seen == len(student) + len(transfer) and mixed > 0

    assert opened, "np.load was not called: the recording is not in the loading path"
    assert not forbidden & set(opened)
    assert {str((data / "labels" / f"{pid}.npy").resolve()) for pid in pats["student"]} <= set(opened)
    assert {str((data / "images" / f"{pid}.npy").resolve()) for pid in others} <= set(opened)
