"""The named augmentation (``augment``): per-slice random views and the pair-wise slice mix (MixUp / CutMix)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose

from mkd.data import UNLABELLED, RandMixSlicesd, augmentation_transforms, batch_mix
from mkd.losses import LabelledOnly, labelled_mask


def _stub_random(beta, uniform=0.5, reverse=True):
    """A stand-in for the transform's ``R``: fixed Beta draws, constant uniforms, reversed permutations."""
    return SimpleNamespace(
        beta=lambda a, b, size: np.asarray(beta, dtype=float),
        random_sample=lambda n: np.full(n, uniform),
        permutation=lambda n: np.arange(n)[::-1] if reverse else np.arange(n),
    )


def _two_slices():
    image = torch.tensor([[[[0.0, 4.0], [8.0, 0.0]]], [[[4.0, 4.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    label = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    return image, label


def test_mixup_mixes_the_label_exactly_as_the_image_by_hand():
    mix = RandMixSlicesd(keys="image", label_key="label", mode="mixup", prob=1.0)
    mix.R = _stub_random(beta=[0.25, 0.9])  # lam -> max(lam, 1 - lam) = 0.75, 0.9; partners swapped
    image, label = _two_slices()
    out = mix({"image": image, "label": label, "patient": ["a", "b"]})
    # slice 0: 0.75 * a + 0.25 * b;  slice 1: 0.9 * b + 0.1 * a
    torch.testing.assert_close(out["image"][0, 0], torch.tensor([[1.0, 4.0], [6.0, 0.0]]))
    torch.testing.assert_close(out["label"][0, 0], torch.tensor([[0.25, 1.0], [0.75, 0.0]]))
    torch.testing.assert_close(out["image"][1, 0], torch.tensor([[3.6, 4.0], [0.8, 0.0]]))
    torch.testing.assert_close(out["label"][1, 0], torch.tensor([[0.9, 1.0], [0.1, 0.0]]))
    assert out["patient"] == ["a", "b"]  # the other keys stay each slice's own
    assert mix.partner.tolist() == [1, 0] and mix.weight.tolist() == pytest.approx([0.75, 0.9])


def test_cutmix_pastes_the_same_box_into_image_and_label_by_hand():
    mix = RandMixSlicesd(keys="image", label_key="label", mode="cutmix", prob=1.0)
    mix.R = _stub_random(beta=[0.75, 0.25])  # lam 0.75 for both: side round(4 * sqrt(0.25)) = 2, start int(0.5 * 3) = 1
    image = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    label = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    out = mix({"image": image, "label": label})
    box = torch.zeros(4, 4)
    box[1:3, 1:3] = 1
    torch.testing.assert_close(out["image"][0, 0], box)  # the partner's ones in rows 1-2, columns 1-2
    torch.testing.assert_close(out["image"][1, 0], 1 - box)
    assert torch.equal(out["label"], out["image"])  # the label takes the very same box
    assert float(out["label"][0].mean()) == 1 - 0.75  # a share 1 - lam of the slice


def test_a_slice_that_is_not_drawn_is_left_as_it_is():
    mix = RandMixSlicesd(keys="image", label_key="label", mode="mixup", prob=0.4)
    mix.R = _stub_random(beta=[0.5, 0.5], uniform=0.5)  # 0.5 >= prob: no slice is mixed
    image, label = _two_slices()
    out = mix({"image": image, "label": label})
    assert torch.equal(out["image"], image) and torch.equal(out["label"], label)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_unlabelled_slices_are_mixed_with_unlabelled_ones_only_and_stay_out_of_the_supervised_loss(mode):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 8, 8, generator=g)
    label = (torch.rand(6, 1, 8, 8, generator=g) > 0.5).float()
    unlabelled = [1, 3, 4]
    label[unlabelled] = UNLABELLED
    pred = torch.randn(6, 1, 8, 8, generator=g)
    seg = DiceCELoss(sigmoid=True, batch=True)
    for seed in range(10):
        mix = RandMixSlicesd(keys="image", label_key="label", mode=mode, prob=1.0).set_random_state(seed)
        out = mix({"image": image, "label": label})
        groups = labelled_mask(label)
        assert torch.equal(groups[mix.partner], groups)  # partners come from the slice's own group
        assert torch.equal(labelled_mask(out["label"]), groups)
        assert torch.equal(out["label"][unlabelled], label[unlabelled])  # the sentinel label is kept as it is
        assert bool((out["label"][groups] >= 0).all() and (out["label"][groups] <= 1).all())
        loss = LabelledOnly(seg)(pred, out["label"])
        assert torch.isfinite(loss)
        assert loss == pytest.approx(float(seg(pred[groups], out["label"][groups])))
    assert not torch.equal(out["image"], image)


def test_the_mix_is_seeded():
    batch = {"image": torch.rand(8, 3, 8, 8), "label": (torch.rand(8, 1, 8, 8) > 0.5).float()}
    runs = [RandMixSlicesd(prob=1.0).set_random_state(s)(batch) for s in (0, 0, 1)]
    assert torch.equal(runs[0]["image"], runs[1]["image"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])


def test_cached_teacher_outputs_cannot_be_mixed():
    batch = {"image": torch.rand(2, 3, 4, 4), "label": torch.zeros(2, 1, 4, 4), "teacher_bn": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match=r"cached teacher outputs \(teacher_bn\).*use_cache=false"):
        RandMixSlicesd(prob=1.0)(batch)


def test_the_per_slice_views_are_seeded_and_move_image_and_label_together():
    grid = torch.arange(16.0).reshape(1, 4, 4)
    item = {"image": grid.repeat(3, 1, 1) / 16, "label": (grid >= 8).float()}
    views = []
    for seed in (0, 0, 1):
        t = Compose(augmentation_transforms("consistent"))
        t.set_random_state(seed)
        views.append(t(dict(item)))
    assert torch.equal(views[0]["image"], views[1]["image"]) and torch.equal(views[0]["label"], views[1]["label"])
    assert not torch.equal(views[0]["image"], views[2]["image"])
    for v in views:
        assert type(v["image"]) is torch.Tensor  # plain tensors, as the pipeline before them gives
        assert set(v["label"].unique().tolist()) <= {0.0, 1.0}  # nearest: the label stays binary


def test_an_unlabelled_slice_stays_unlabelled_through_the_views():
    item = {"image": torch.rand(3, 16, 16), "label": torch.full((1, 16, 16), UNLABELLED)}
    for seed in range(5):
        t = Compose(augmentation_transforms("consistent"))
        t.set_random_state(seed)
        assert not labelled_mask(t(dict(item))["label"][None]).any()


def test_augment_names():
    assert augmentation_transforms("none") == [] and batch_mix("none") is None
    assert batch_mix("consistent", "none") is None
    assert batch_mix("consistent", "cutmix").mode == "cutmix"
    with pytest.raises(ValueError, match=r"augment must be one of 'none', 'consistent', got 'flips'"):
        augmentation_transforms("flips")
    with pytest.raises(ValueError, match=r"mix must be one of 'mixup', 'cutmix', 'none', got 'mosaic'"):
        batch_mix("consistent", "mosaic")
