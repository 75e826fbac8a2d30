"""FeatureRecorder: scale resolution, switched recording, hook removal, DDP / DataParallel wrapping."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from mkd.networks import FeatureRecorder, build, resolve_scales, unwrap_model


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_records_requested_scales_only_while_on():
    net = build("s1").eval()
    x = torch.rand(2, 3, 32, 32)
    rec = FeatureRecorder(net, ["bn", "enc", "dec"])
    with torch.no_grad():
        net(x)
        assert rec.features == {}  # hooks idle outside recording()
        with rec.recording() as feats:
            out = net(x)
        assert feats is not None and list(rec.features) == ["bn", "enc", "dec"]  # requested order
        assert rec.features["enc"].shape == (2, 32, 16, 16)
        assert rec.features["bn"].shape == (2, 64, 8, 8)
        assert rec.features["dec"].shape == (2, 16, 32, 32)
        assert out.shape == (2, 1, 32, 32)
        first = rec.features["bn"]
        net(torch.rand(2, 3, 32, 32))
        assert rec.features["bn"] is first  # not overwritten while off
        with rec.recording():
            pass
        assert rec.features == {} and rec.missing == ["bn", "enc", "dec"]  # cleared at each start
    rec.close()


def test_detach_option_and_gradients_through_recorded_features():
    net = build("s1")
    x = torch.rand(2, 3, 16, 16)
    with FeatureRecorder(net, ["bn"]) as live, FeatureRecorder(net, ["bn"], detach=True) as frozen:
        with live.recording(), frozen.recording():
            net(x)
        assert live.features["bn"].requires_grad
        assert not frozen.features["bn"].requires_grad
        live.features["bn"].pow(2).mean().backward()
        assert net.encoder[0][0].conv.weight.grad is not None


def test_raw_module_paths_and_unknown_scale_message():
    net = build("t1", "tiny")
    assert resolve_scales(net, ["bn", "encoder.1", "recon"]) == {
        "bn": "bottleneck",
        "encoder.1": "encoder.1",
        "recon": "recon_decoder",
    }
    with pytest.raises(ValueError) as err:
        FeatureRecorder(net, ["enc", "middle"])
    msg = str(err.value)
    assert "'middle'" in msg and "MultiTaskUNet" in msg
    for scale in ("'enc'", "'bn'", "'dec'", "'recon'"):
        assert scale in msg
    assert "encoder.0" in msg and "more)" in msg  # module paths are listed too (truncated)
    assert all_hooks(net) == 0  # a failed construction leaves no hook behind
    with pytest.raises(ValueError, match="unknown feature scale 'recon'"):
        FeatureRecorder(build("s1"), "recon")  # students have no reconstruction


def test_close_removes_every_hook():
    net = build("t2", "tiny")
    before = all_hooks(net)
    rec = FeatureRecorder(net, ["enc", "bn", "dec", "recon", "decoder.head"])
    assert all_hooks(net) == before + 5
    rec.close()
    assert all_hooks(net) == before == 0
    for module in net.modules():
        assert not module._forward_hooks
    rec.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        with rec.recording():
            pass
    with FeatureRecorder(net, ["enc"]):
        assert all_hooks(net) == 1
    assert all_hooks(net) == 0


def test_data_parallel_wrapper_is_unwrapped():
    net = build("s1")
    wrapped = nn.DataParallel(net)  # on CPU it simply calls the module
    assert unwrap_model(wrapped) is net
    with FeatureRecorder(wrapped, ["bn"]) as rec, rec.recording():
        wrapped(torch.rand(2, 3, 16, 16))
    assert rec.features["bn"].shape == (2, 64, 4, 4)


# Run in a child process: a process group is global state, and a rendezvous that
# never completes must fail this test, not hang the suite. The store is TCP on
# the loopback (what torchrun --standalone uses); a FileStore under tmp_path hung
# on CI's file system.
DDP_CHILD = """
import torch, torch.distributed as dist
from torch import nn
from mkd.networks import FeatureRecorder, build
store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
try:
    net = build("s1")
    ddp = nn.parallel.DistributedDataParallel(net)
    with FeatureRecorder(ddp, ["enc", "bn", "dec"]) as rec:
        with rec.recording():
            out = ddp(torch.rand(2, 3, 16, 16))
        shapes = {k: tuple(v.shape) for k, v in rec.features.items()}
        assert shapes == {"enc": (2, 32, 8, 8), "bn": (2, 64, 4, 4), "dec": (2, 16, 16, 16)}, shapes
        (out.mean() + rec.features["bn"].mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
finally:
    dist.destroy_process_group()
print("ddp-ok")
"""


def test_recorder_on_ddp_model():
    result = subprocess.run([sys.executable, "-c", DDP_CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ddp-ok" in result.stdout, result.stderr[-3000:]


def test_a_recorder_of_no_scale_records_nothing_until_closed():
    """PMD-only distillation records no feature: the recorder is open (not 'closed') with zero hooks."""
    net = build("s1")
    rec = FeatureRecorder(net, [])
    with rec.recording() as feats:
        net(torch.zeros(1, 3, 32, 32))
    assert feats == {} and rec.features == {} and rec.missing == []
    assert "idle" in repr(rec)
    rec.close()
    with pytest.raises(RuntimeError, match="FeatureRecorder is closed"):
        with rec.recording():
            pass
