"""The embedded phantom: a valid Decathlon task, deterministic, varied."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd.cli import cli
from mkd.data.phantom import phantom_case, write_phantom
from mkd.errors import MkdError


def test_dataset_json_has_every_key_monai_reads(tiny_phantom):
    from monai.data import load_decathlon_datalist, load_decathlon_properties

    meta = json.loads((tiny_phantom / "dataset.json").read_text())
    keys = ["name", "description", "reference", "licence", "release", "tensorImageSize", "modality", "labels",
            "numTraining", "numTest"]  # fmt: skip
    props = load_decathlon_properties(tiny_phantom / "dataset.json", keys)
    assert props["numTraining"] == 8 == len(meta["training"]) and props["numTest"] == len(meta["test"]) == 2
    assert props["labels"] == {"0": "background", "1": "spleen"} and props["modality"] == {"0": "CT"}
    items = load_decathlon_datalist(tiny_phantom / "dataset.json", data_list_key="training")
    test = load_decathlon_datalist(tiny_phantom / "dataset.json", data_list_key="test")
    assert all((tiny_phantom / "imagesTs" / f"spleen_{9 + i}.nii.gz").is_file() for i in range(2)) and len(test) == 2
    for it in items:
        img, lbl = nib.load(it["image"]), nib.load(it["label"])
        assert img.get_data_dtype() == np.int16 and lbl.get_data_dtype() == np.uint8
        assert img.shape == (64, 64, 16) and np.allclose(img.affine, lbl.affine)
        assert set(np.unique(np.asarray(lbl.dataobj))) == {0, 1}
        zooms = img.header.get_zooms()
        assert 5 < zooms[0] < 6.5 and 11 < zooms[2] < 14  # fixed field of view: 340-400 mm, 190-215 mm


def test_same_seed_same_volume_different_seed_differs():
    a = phantom_case((32, 32, 12), seed=4)
    b = phantom_case((32, 32, 12), seed=4)
    c = phantom_case((32, 32, 12), seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_realistic_hu_and_spleen_sizes():
    sizes = {}
    for cls in ("small", "normal", "enlarged"):
        image, label, affine = phantom_case((96, 96, 30), seed=11, size_class=cls)
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        sizes[cls] = label.sum() * voxel_ml
        assert image.min() == -1024 or image.min() < -900  # air
        spleen_hu = np.median(image[label > 0])
        assert 60 < spleen_hu < 200
    assert sizes["small"] < sizes["normal"] < sizes["enlarged"]
    assert 10 < sizes["small"] < 120 and 300 < sizes["enlarged"]  # millilitres (normal adult spleen ~ 150-250)


def test_rewrite_rules(tmp_path):
    task = write_phantom(tmp_path, cases=3, shape=(16, 16, 8), seed=1)
    stamp = (task / "dataset.json").stat().st_mtime_ns
    assert write_phantom(tmp_path, cases=3, shape=(16, 16, 8), seed=1) == task
    assert (task / "dataset.json").stat().st_mtime_ns == stamp  # reused
    write_phantom(tmp_path, cases=4, shape=(16, 16, 8), seed=1)
    assert json.loads((task / "dataset.json").read_text())["numTraining"] == 4  # other settings: rewritten
    (tmp_path / "mine" / "Task09_SpleenPhantom").mkdir(parents=True)
    with pytest.raises(MkdError, match="is not an mkd phantom"):
        write_phantom(tmp_path / "mine", cases=3, shape=(16, 16, 8))
    with pytest.raises(ValueError, match="at least 3 cases"):
        write_phantom(tmp_path, cases=2)


def test_cli_phantom_is_the_default(tmp_path):
    r = CliRunner().invoke(cli, ["prepare", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "d"),
                                 "--cases", "5", "--shape", "24,24,8", "--size", "16",
                                 "--channels", "2.5d"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "using the built-in phantom" in r.output and "volumes: 5" in r.output
    info = json.loads((tmp_path / "d" / "prepare.json").read_text())
    assert info["task"]["source"] == "phantom" and info["settings"]["channels"] == "2.5d"
    assert (tmp_path / "src" / "Task09_SpleenPhantom" / "dataset.json").is_file()
    bad = CliRunner().invoke(cli, ["prepare", "--phantom", "--source", "x", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "only one of" in bad.output
    bad = CliRunner().invoke(cli, ["prepare", "--phantom", "--shape", "1,2", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "expected 3 comma-separated numbers" in bad.output


def test_find_task_writes_the_phantom_unless_a_task_is_named(tmp_path):
    """What mkd prepare reads: the phantom by default, recorded as such in prepare.json's task."""
    from mkd.data import find_task

    ticks = []
    task, info = find_task(root=tmp_path, cases=3, shape=(16, 16, 8), seed=2, progress=lambda *a: ticks.append(a))
    assert task == tmp_path / "Task09_SpleenPhantom" and (task / "dataset.json").is_file()
    assert info == {"source": "phantom", "phantom": {"cases": 3, "shape": [16, 16, 8], "seed": 2}}
    assert ticks[-1][-1] == len(ticks)  # progress(done, total) once per volume
    assert find_task(source=task) == (task, {"source": "source"})
    with pytest.raises(MkdError) as err:
        find_task(decathlon="Task09_Spleen", root=tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'Task09_Spleen'}: no such folder; pass `download=True`, or ")
