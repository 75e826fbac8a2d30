"""The prepared dataset: patient split, student subset, datalist / manifest / geometry, LoadSliced."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mkd.cli import cli


def _datalist(data_dir):
    return json.loads((data_dir / "datalist.json").read_text())


def test_splits_are_disjoint_and_student_is_half_of_training(tiny_prepared):
    dl = _datalist(tiny_prepared)
    pats = dl["patients"]
    train, val, test, student = (set(pats[k]) for k in ("training", "validation", "test", "student"))
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 8
    assert student <= train and len(student) == len(train) // 2
    # every list holds the items of exactly its patients
    for key in ("training", "validation", "test", "student"):
        assert {it["patient"] for it in dl[key]} == set(pats[key])
    assert dl["student"] == [it for it in dl["training"] if it["patient"] in student]


def test_manifest_and_arrays_match_the_datalist(tiny_prepared):
    dl = _datalist(tiny_prepared)
    man = pd.read_csv(tiny_prepared / "manifest.csv")
    assert list(man.columns) == ["patient", "row", "z", "split", "student", "fg_pixels", "image", "label"]
    assert len(man) == sum(len(dl[k]) for k in ("training", "validation", "test"))
    assert set(man.loc[man.student, "patient"]) == set(dl["patients"]["student"])
    info = json.loads((tiny_prepared / "prepare.json").read_text())
    for pid, rows in man.groupby("patient"):
        img = np.load(tiny_prepared / "images" / f"{pid}.npy")
        lbl = np.load(tiny_prepared / "labels" / f"{pid}.npy")
        assert img.dtype == np.float16 and img.shape == (len(rows), 3, 64, 64)
        assert lbl.dtype == np.uint8 and lbl.shape == (len(rows), 1, 64, 64)
        assert 0 <= img.min() and img.max() <= 1 and set(np.unique(lbl)) <= {0, 1}
        assert rows.fg_pixels.tolist() == lbl.reshape(len(rows), -1).sum(1).tolist()
        geo = info["volumes"][pid]
        assert geo["shape"][2] == geo["rows"] == len(rows)  # keep all: every slice, z == row
        assert rows.z.tolist() == rows.row.tolist() == geo["z"]
        assert np.asarray(geo["affine"]).shape == (4, 4)
    assert info["settings"]["window"] == [-57.0, 164.0] and info["settings"]["orientation"] == "RAS"


def test_monai_datalist_loader_and_loadsliced(tiny_prepared):
    import torch
    from monai.data import load_decathlon_datalist

    from mkd.data import LoadSliced, load_split

    items = load_decathlon_datalist(tiny_prepared / "datalist.json", data_list_key="student", base_dir=tiny_prepared)
    assert items == load_split(tiny_prepared, "student")
    item = max(items, key=lambda it: it["slice"])
    out = LoadSliced(keys=("image", "label"))(item)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["label"].shape == (1, 64, 64) and out["label"].dtype == torch.float32
    stored = np.load(item["image"])[item["slice"]].astype(np.float32)
    assert torch.equal(out["image"], torch.from_numpy(stored))
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(tiny_prepared, "train")


def test_phantom_spleen_is_on_the_patients_left_in_every_case(tiny_prepared):
    """Phantom cases are stored LPS, RAS or LAS; after RAS reorientation rows run left -> right."""
    info = json.loads((tiny_prepared / "prepare.json").read_text())
    codes = set()
    import nibabel as nib

    for pid, geo in info["volumes"].items():
        codes.add(nib.aff2axcodes(np.asarray(geo["source_affine"])))
        lbl = np.load(tiny_prepared / "labels" / f"{pid}.npy")[:, 0]
        rows = np.nonzero(lbl)[1]
        assert rows.mean() < lbl.shape[1] / 2, pid
    assert len(codes) > 1  # orientation handling is exercised


def test_seed_makes_the_split(tiny_phantom, tiny_prepared, tmp_path):
    runner = CliRunner()
    base = ["prepare", "--source", str(tiny_phantom), "--size", "16"]
    r0 = runner.invoke(cli, [*base, "--out", str(tmp_path / "s0"), "--seed", "0"])
    r0b = runner.invoke(cli, [*base, "--out", str(tmp_path / "s0b"), "--seed", "0"])
    r1 = runner.invoke(cli, [*base, "--out", str(tmp_path / "s1"), "--seed", "1"])
    assert r0.exit_code == r0b.exit_code == r1.exit_code == 0, r0.output + r1.output
    assert "slices: training" in r0.output and "foreground:" in r0.output
    assert _datalist(tmp_path / "s0") == _datalist(tmp_path / "s0b")
    assert _datalist(tmp_path / "s0")["patients"] == _datalist(tiny_prepared)["patients"]
    assert _datalist(tmp_path / "s0")["patients"] != _datalist(tmp_path / "s1")["patients"]


def test_keep_organ_filters_training_patients_only(tiny_phantom, tmp_path):
    from mkd.data import prepare_dataset

    s = prepare_dataset(tiny_phantom, tmp_path / "d", size=16, keep="organ", margin=1)
    man = pd.read_csv(tmp_path / "d" / "manifest.csv")
    for _, rows in man.groupby("patient"):
        if rows.split.iloc[0] == "training":
            fg_z = rows.z[rows.fg_pixels > 0]
            assert rows.z.min() >= fg_z.min() - 1 and rows.z.max() <= fg_z.max() + 1
            assert len(rows) < 16
        else:
            assert rows.z.tolist() == list(range(16))
    assert s.slices["student"] <= s.slices["training"]


def test_split_file_is_reproduced_exactly(tiny_phantom, tmp_path):
    spec = {"training": ["spleen_8", "spleen_2", "spleen_5"], "validation": ["spleen_1"],
            "test": ["./imagesTr/spleen_3.nii.gz", "spleen_7"], "student": ["spleen_5"]}  # fmt: skip
    f = tmp_path / "split.json"
    f.write_text(json.dumps(spec))
    r = CliRunner().invoke(cli, ["prepare", "--source", str(tiny_phantom), "--size", "16", "--split-file", str(f),
                                 "--out", str(tmp_path / "d")])  # fmt: skip
    assert r.exit_code == 0, r.output
    pats = _datalist(tmp_path / "d")["patients"]
    assert pats == {"training": ["spleen_8", "spleen_2", "spleen_5"], "validation": ["spleen_1"],
                    "test": ["spleen_3", "spleen_7"], "student": ["spleen_5"]}  # fmt: skip
    info = json.loads((tmp_path / "d" / "prepare.json").read_text())
    assert sorted(info["left_out"]) == ["spleen_4", "spleen_6"]
