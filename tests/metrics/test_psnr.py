"""PSNR of teacher reconstructions, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mkd.metrics import PSNRAccumulator, psnr


def test_psnr_by_hand():
    image = torch.zeros(2, 3, 8, 8)
    recon = torch.full((2, 3, 8, 8), 0.1)  # MSE 0.01 at range 1 -> 10 * log10(1 / 0.01) = 20 dB
    assert psnr(recon, image) == pytest.approx(20.0, abs=1e-4)
    assert psnr(recon.numpy(), image.numpy(), data_range=2.0) == pytest.approx(20 + 20 * math.log10(2), abs=1e-4)
    recon[1] = 0.01  # second image: MSE 1e-4 -> 40 dB; per-image values, then their mean
    assert psnr(recon, image, reduction="none") == pytest.approx([20.0, 40.0], abs=1e-3)
    assert psnr(recon, image) == pytest.approx(30.0, abs=1e-3)


def test_psnr_accumulator_and_errors():
    acc = PSNRAccumulator()
    acc.update(np.full((1, 3, 4, 4), 0.1), np.zeros((1, 3, 4, 4)))
    acc.update(np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 4, 4)))  # exact: inf dB, counted apart
    out = acc.compute()
    assert out["mean"] == pytest.approx(20.0, abs=1e-4) and out["n"] == 1 and out["n_exact"] == 1
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((1, 3, 4, 4)), np.zeros((1, 1, 4, 4)))
