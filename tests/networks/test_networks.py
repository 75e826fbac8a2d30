"""Networks: parameter counts at thesis width, output and feature shapes (2D and 3D), presets, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mkd.networks import (
    NETWORKS,
    PRESETS,
    FeatureRecorder,
    MultiTaskUNet,
    build,
    describe,
    feature_channels,
    feature_info,
    feature_shapes,
)

# SPEC section 2: parameter counts at the thesis widths (3 -> 1 channels, 2D) and tolerances.
PARAMS = {
    "unet": (31.04e6, 0.02),
    "t1": (43.23e6, 0.02),
    "t2": (172.6e6, 0.10),
    "s1": (0.057e6, 0.10),
    "s2": (0.227e6, 0.10),
}

# (channels, stride) per scale at the thesis widths.
SCALES = {
    "unet": {"enc": (512, 8), "bn": (1024, 16), "dec": (64, 1)},
    "t1": {"enc": (512, 8), "bn": (1024, 16), "dec": (64, 1), "recon": (3, 1)},
    "t2": {"enc": (512, 8), "bn": (1024, 16), "dec": (32, 1), "recon": (3, 1)},
    "s1": {"enc": (32, 2), "bn": (64, 4), "dec": (16, 1)},
    "s2": {"enc": (64, 2), "bn": (128, 4), "dec": (32, 1)},
}


def tiny(name: str, **kwargs):
    if name == "t2" and kwargs.get("spatial_dims") == 3:
        kwargs.setdefault("img_size", 32)
    return build(name, "tiny", **kwargs)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_at_thesis_width(name):
    target, tol = PARAMS[name]
    params = describe(name, input_size=64).params  # meta device: nothing allocated
    assert abs(params - target) / target <= tol, f"{name}: {params / 1e6:.3f} M vs {target / 1e6:.3f} M"


def test_meta_count_equals_real_count_and_cpu_teacher_presets():
    assert describe("s1").params == build("s1").num_parameters() == 57_137
    assert build("s2").num_parameters() == 226_913
    # SPEC section 8: 2-head U-Net 16..256 is 2.7 M, 32..512 is 10.8 M parameters
    assert abs(describe("t1", "small").params - 2.7e6) / 2.7e6 < 0.02
    assert abs(describe("t1", "medium").params - 10.8e6) / 10.8e6 < 0.02
    assert describe("t2", "small").params < 5e6


@pytest.mark.parametrize("name", list(SCALES))
def test_feature_shapes_per_scale_at_thesis_width(name):
    info = describe(name, input_size=256)
    assert info.output_shape == (1, 256, 256)
    expected = {s: (c, 256 // st, 256 // st) for s, (c, st) in SCALES[name].items()}
    assert info.features == expected


@pytest.mark.parametrize("name", list(NETWORKS))
def test_declared_scales(name):
    net = tiny(name)
    multitask = name in ("t1", "t2")
    assert list(net.feature_scales) == ["enc", "bn", "dec"] + (["recon"] if multitask else [])
    modules = dict(net.named_modules())
    assert all(path in modules for path in net.feature_scales.values())
    info = feature_info(net)
    assert {s: i.stride[0] for s, i in info.items()} == {s: st for s, (_, st) in SCALES[name].items()}
    assert feature_channels(net, ["enc"])["enc"] == net.features[-2 if name not in ("t2",) else -1]


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_output_shape_2d(name, size):
    net = tiny(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_output_shape_3d(name):
    net = tiny(name, spatial_dims=3, in_channels=1, out_channels=2).eval()
    x = torch.rand(1, 1, 16, 20, 17)
    with torch.no_grad(), FeatureRecorder(net, list(net.feature_scales)) as rec, rec.recording():
        out = net(x)
    assert out.shape == (1, 2, 16, 20, 17)
    assert rec.features["bn"].ndim == 5
    if name in ("t1", "t2"):
        assert rec.features["recon"].shape == (1, 1, 16, 20, 17)  # recon_channels defaults to in_channels


def test_feature_shapes_match_a_real_forward():
    net = tiny("t2").eval()
    with FeatureRecorder(net, list(net.feature_scales)) as rec, torch.no_grad(), rec.recording():
        net(torch.rand(1, 3, 48, 40))
    assert feature_shapes(net, (48, 40)) == {k: tuple(v.shape[1:]) for k, v in rec.features.items()}


@pytest.mark.parametrize("name", ["t1", "t2"])
def test_reconstruction_recorded_and_skipped(name):
    net = tiny(name).eval()
    assert isinstance(net.reconstruct, bool) and net.reconstruct
    calls = []
    net.recon_decoder.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), FeatureRecorder(net, ["recon"]) as rec:
        with rec.recording():
            seg = net(x)
        assert rec.features["recon"].shape == (2, 3, 32, 32)
        assert seg.shape == (2, 1, 32, 32)  # forward returns the segmentation logits only
        tasks = net.forward_tasks(x)
        torch.testing.assert_close(tasks["seg"], seg)
        torch.testing.assert_close(tasks["recon"], rec.features["recon"])
        net.reconstruct = False
        calls.clear()
        with rec.recording():
            seg2 = net(x)
        assert calls == [] and rec.missing == ["recon"] and rec.features == {}
        torch.testing.assert_close(seg2, seg)
    assert build(name, "tiny", reconstruct=False).reconstruct is False


@pytest.mark.parametrize("name", ["s1", "s2", "t1", "t2"])
def test_gradients_reach_every_parameter(name):
    net = build(name) if name in ("s1", "s2") else tiny(name)
    net.train()
    x = torch.rand(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    if isinstance(net, MultiTaskUNet) or name == "t2":
        with FeatureRecorder(net, ["recon"]) as rec, rec.recording():
            seg = net(x)
        loss = F.binary_cross_entropy_with_logits(seg, y) + 0.2 * F.mse_loss(rec.features["recon"], x)
    else:
        loss = F.binary_cross_entropy_with_logits(net(x), y)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_unknown_name_and_preset_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown network 'vit'.*unet, t1, t2, s1, s2"):
        build("vit")
    with pytest.raises(ValueError, match="unknown preset 'huge'.*thesis, medium, small, tiny"):
        build("t1", "huge")
    assert set(PRESETS) == set(NETWORKS)


def test_bad_inputs_raise_clear_errors():
    net = build("s1")
    with pytest.raises(ValueError, match="too small.*at least 4"):
        net(torch.rand(1, 3, 3, 8))
    with pytest.raises(ValueError, match="1 channels; the network was built with in_channels=3"):
        net(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected \\(N, C, H, W\\)"):
        net(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims=1"):
        build("unet", spatial_dims=1)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build("t2", "tiny", hidden_size=30, num_heads=4)


def test_config_rebuilds_the_same_network():
    net = build("t2", "tiny", out_channels=2)
    again = build(net.network_name, **net.config)
    assert again.config == net.config
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in net.parameters()]
