"""Real CT (TotalSegmentator sample, RAS, 3 mm) packed into a Decathlon-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mkd.cli import cli

SAMPLE = Path(__file__).resolve().parent / "totalseg_example"  # shipped in the repository (Apache-2.0)


def _reoriented(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same scan stored with another voxel order (nibabel's orientation tools)."""
    now = nib.orientations.io_orientation(img.affine)
    xform = nib.orientations.ornt_transform(now, nib.orientations.axcodes2ornt(tuple(codes)))
    return img.as_reoriented(xform)


def test_spleen_lands_on_the_patients_left_whatever_the_voxel_order(tmp_path):
    ct = nib.load(SAMPLE / "ct_30slices.nii.gz")
    sp = nib.load(SAMPLE / "spleen_30slices.nii.gz")
    task = tmp_path / "Task90_Real"
    training = []
    for codes in ("RAS", "LPS", "LAS"):
        pid = f"real_{codes.lower()}"
        for sub, img in (("imagesTr", ct), ("labelsTr", sp)):
            (task / sub).mkdir(parents=True, exist_ok=True)
            nib.save(_reoriented(img, codes), task / sub / f"{pid}.nii.gz")
        training.append({"image": f"./imagesTr/{pid}.nii.gz", "label": f"./labelsTr/{pid}.nii.gz"})
    assert nib.aff2axcodes(nib.load(task / "imagesTr" / "real_lps.nii.gz").affine) == ("L", "P", "S")
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Real",
                "description": "TotalSegmentator sample",
                "tensorImageSize": "3D",
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "spleen"},
                "numTraining": 3,
                "numTest": 0,
                "training": training,
                "test": [],
            }
        )
    )
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["real_ras"], "validation": ["real_lps"], "test": ["real_las"]}))
    out = tmp_path / "data"
    r = CliRunner().invoke(cli, ["prepare", "--source", str(task), "--out", str(out), "--size", "64",
                                 "--split-file", str(split)])  # fmt: skip
    assert r.exit_code == 0, r.output

    info = json.loads((out / "prepare.json").read_text())
    labels = {pid: np.load(out / "labels" / f"{pid}.npy")[:, 0] for pid in info["volumes"]}
    images = {pid: np.load(out / "images" / f"{pid}.npy")[:, 0].astype(np.float32) for pid in info["volumes"]}
    # the three voxel orders give the same slices once reoriented to RAS
    for pid in ("real_lps", "real_las"):
        np.testing.assert_array_equal(labels[pid], labels["real_ras"])
        np.testing.assert_allclose(images[pid], images["real_ras"], atol=1e-3)
        np.testing.assert_allclose(info["volumes"][pid]["affine"], info["volumes"]["real_ras"]["affine"], atol=1e-4)

    for pid, geo in info["volumes"].items():
        # centroids in world millimetres. nibabel's RAS+ world: +x points to the patient's Right,
        # so the patient's left side is the smaller x.
        affine = np.asarray(geo["affine"])
        sx = geo["shape"][0] / 64  # stored rows were resized from shape[0] voxels to 64

        spleen_rows = np.nonzero(labels[pid])[1]
        body_rows = np.nonzero(images[pid] > 0.3)[1]  # soft tissue above ~10 HU
        assert affine[0, 0] > 0  # RAS: row index grows toward the patient's right
        assert _world_x(spleen_rows, affine, sx) < _world_x(body_rows, affine, sx) - 40, (
            pid
        )  # well to the patient's left
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert geo["spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert nib.aff2axcodes(np.asarray(info["volumes"]["real_lps"]["source_affine"])) == ("L", "P", "S")
    # a mask made by TotalSegmentator label 1 has 9,452 spleen voxels before resizing
    assert info["volumes"]["real_ras"]["source_shape"] == [122, 101, 30]


def _world_x(rows, affine, sx):
    """World x (mm) of the mean row, undoing the in-plane resize (voxel centres, align_corners=False)."""
    return affine[0, 0] * ((rows.mean() + 0.5) * sx - 0.5) + affine[0, 3]


def test_full_scan_keeps_its_axial_order():
    from mkd.data import volume_transforms

    t = volume_transforms(keys=("image",), size=None)
    full = t({"image": str(SAMPLE / "ct_full.nii.gz")})["image"]
    part = t({"image": str(SAMPLE / "ct_30slices.nii.gz")})["image"]
    assert full.shape == (1, 122, 101, 112) and part.shape == (1, 122, 101, 30)
    # ct_30slices holds the top 30 axial slices (82..111) of ct_full, in the same order; note that its
    # header keeps ct_full's origin, so the two files disagree about where those slices are in space.
    np.testing.assert_allclose(full[..., 82:].numpy(), part.numpy(), atol=1e-6)
