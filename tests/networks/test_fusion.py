"""The inference copy: same logits as the network, BatchNorm folded, no decoder concatenation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from mkd.networks import build, fuse_for_inference
from mkd.networks.fusion import _MaxPool2x2, _SplitUpBlock


def _random_statistics(net: nn.Module) -> nn.Module:
    """BatchNorm layers with running statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net.eval()


@pytest.mark.parametrize(
    "name, size",
    [("s1", (67, 45)), ("s1", (96, 96)), ("s2", (33, 40)), ("unet", (50, 37)), ("t1", (64, 48)), ("t2", (64, 64))],
)
def test_the_inference_copy_gives_the_networks_logits(name, size):
    torch.manual_seed(0)
    net = _random_statistics(build(name, "tiny"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = net(x)
        fused = fuse_for_inference(net)
        got = fused(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the network itself is untouched (weights, BatchNorm layers, blocks)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    # in the copy: no BatchNorm after a convolution, every U-Net decoder block split
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    n_up = sum(type(m).__name__ == "UpBlock" for m in net.modules())
    assert sum(isinstance(m, _SplitUpBlock) for m in fused.modules()) == n_up > 0
    assert not any(p.requires_grad for p in fused.parameters())


def test_the_student_copy_writes_no_concatenated_map(monkeypatch):
    net = _random_statistics(build("s1"))
    fused = fuse_for_inference(net)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    with torch.no_grad():
        net(torch.rand(1, 3, 32, 32))
        assert len(calls) == 2  # the network as trained: one concatenation per decoder block
        fused(torch.rand(1, 3, 32, 32))
    assert len(calls) == 2  # the copy: none


def test_batch_norm_folds_into_the_convolution_by_hand():
    """conv weight 2, then BN (mean 1, var 4, gamma 3, beta 0.5, eps 0): 3 * (2x - 1) / 2 + 0.5 = 3x - 1."""
    unit = Convolution(2, 1, 1, kernel_size=1, act="relu", norm="batch", bias=False)
    unit.conv.weight.data.fill_(2.0)
    bn = unit.adn.N
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    bn.eps = 0.0
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    fused = fuse_for_inference(nn.Sequential(unit))
    conv = fused[0].conv
    assert conv.weight.item() == 3.0 and conv.bias.item() == -1.0
    assert isinstance(fused[0].adn.N, nn.Identity) and fused[0].adn.A.inplace
    x = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    assert fused(x).flatten().tolist() == [0.0, 2.0, 5.0, 0.0]  # relu(3x - 1)


def test_a_network_in_training_mode_stays_in_training_mode():
    net = build("s1", "tiny").train()
    fused = fuse_for_inference(net)
    assert net.training and not fused.training


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (1, 1, 2, 3)])
def test_max_pool_of_four_views_equals_max_pool2d(shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    x.view(-1)[0] = float("-inf")
    x.view(-1)[-1] = float("nan")
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.to(torch.bfloat16)):
        torch.testing.assert_close(_MaxPool2x2()(t), F.max_pool2d(t, 2), equal_nan=True, rtol=0, atol=0)


def test_only_plain_2x2_pooling_is_replaced():
    assert _MaxPool2x2.applies(nn.MaxPool2d(2))
    assert not _MaxPool2x2.applies(nn.MaxPool2d(3))
    assert not _MaxPool2x2.applies(nn.MaxPool2d(2, ceil_mode=True))
    assert not _MaxPool2x2.applies(nn.MaxPool3d(2))


def test_a_3d_unet_keeps_its_logits():
    torch.manual_seed(0)
    net = _random_statistics(build("unet", "tiny", spatial_dims=3, features=(4, 8, 16)))
    x = torch.rand(1, 3, 17, 16, 18)
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(net)(x), net(x), rtol=1e-4, atol=1e-5)
