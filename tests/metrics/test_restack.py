"""Restacking slices into volumes by their axial index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mkd.metrics import restack, spacing_after_resize


def test_every_slice_lands_at_its_z():
    rng = np.random.default_rng(0)
    zs = rng.permutation(12)
    slices = np.stack([np.full((1, 3, 4), z, dtype=np.int16) for z in zs])  # each slice holds its z
    vol = restack(slices, zs)
    assert vol.shape == (12, 1, 3, 4) and vol.dtype == np.int16
    for z in range(12):
        assert np.all(vol[z] == z)


def test_tensors_and_lists_and_start():
    zs = [13, 11, 12]
    slices = [torch.full((2, 2), float(z)) for z in zs]
    vol = restack(slices, torch.tensor(zs), start=None)  # volume spans z = 11..13
    assert isinstance(vol, torch.Tensor) and vol[:, 0, 0].tolist() == [11.0, 12.0, 13.0]
    vol = restack(slices, zs, start=10, depth=5, fill=-1)
    assert vol[:, 0, 0].tolist() == [-1.0, 11.0, 12.0, 13.0, -1.0]


def test_missing_duplicate_and_out_of_range_z():
    s = np.ones((3, 2, 2))
    with pytest.raises(ValueError, match="1 of 4 slices are missing \\(z = 2\\)"):
        restack(s, [0, 1, 3])
    vol = restack(s, [0, 1, 3], fill=0)
    assert vol[:, 0, 0].tolist() == [1, 1, 0, 1]
    with pytest.raises(ValueError, match="repeat"):
        restack(s, [0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        restack(s, [0, 1, 5], depth=4, fill=0)
    with pytest.raises(ValueError, match="3 slices but 2"):
        restack(s, [0, 1])


def test_spacing_after_resize():
    assert spacing_after_resize((5.0, 0.8, 0.8), (90, 512, 512), (90, 256, 256)) == (5.0, 1.6, 1.6)
