"""ProjectorHeads and match_spatial: shapes, training, checkpointing, resize-before-project."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mkd.losses import InfoNCELoss
from mkd.networks.projector import ProjectorHeads, match_spatial

S_CH = {"enc": 4, "bn": 8}
T_CH = {"enc": 16, "bn": 32}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_shapes_both_sides_and_student_only(kind):
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 32, 16, 16)
    both = ProjectorHeads(S_CH, T_CH, embed_dim=6, kind=kind)
    s_emb, t_emb = both("bn", s, t)
    assert s_emb.shape == t_emb.shape == (2, 6, 4, 4)
    assert both.out_channels == {"enc": 6, "bn": 6}
    student_only = ProjectorHeads(S_CH, T_CH, kind=kind, project="student")
    s_emb, t_emb = student_only("bn", s, t)
    assert s_emb.shape == t_emb.shape == (2, 32, 4, 4)
    assert torch.equal(t_emb, F.adaptive_avg_pool2d(t, (4, 4)))  # the teacher is only resized
    assert len(student_only.teacher_heads) == 0


def test_3d_heads():
    heads = ProjectorHeads(S_CH, T_CH, embed_dim=5, kind="mlp", spatial_dims=3)
    s_emb, t_emb = heads("enc", torch.randn(2, 4, 2, 3, 4), torch.randn(2, 16, 4, 6, 8))
    assert s_emb.shape == t_emb.shape == (2, 5, 2, 3, 4)


@pytest.fixture
def one_thread():
    # tiny convs: with several intra-op threads on a busy CPU the 20 steps take seconds, not 0.1 s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_heads_train_under_infonce(kind, one_thread):
    # SGD on InfoNCE between fixed random student features and fixed teacher features:
    # only the projector heads learn, and they must receive gradients, change, and lower the loss
    torch.manual_seed(0)
    heads = ProjectorHeads({"bn": 8}, {"bn": 16}, embed_dim=16, kind=kind)
    student = torch.randn(6, 8, 4, 4)
    teacher = torch.randn(6, 16, 8, 8)  # frozen teacher's output: no grad
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    opt = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    loss_fn = InfoNCELoss(temperature=0.4)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(*heads("bn", student, teacher))
        loss.backward()
        losses.append(loss.item())
        for name, p in heads.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert losses[-1] < 0.75 * losses[0]  # about 1.8 -> 0.45 (linear), 1.06 (mlp)
    after = heads.state_dict()
    for k in before:
        assert not torch.equal(before[k], after[k]), k


def test_state_dict_holds_the_heads_and_restores_them():
    torch.manual_seed(0)
    heads = ProjectorHeads(S_CH, T_CH, embed_dim=6, kind="mlp")
    keys = set(heads.state_dict())
    assert {"student_heads.enc.0.weight", "student_heads.bn.2.bias", "teacher_heads.bn.0.weight"} <= keys
    restored = ProjectorHeads(**heads.config)
    restored.load_state_dict(heads.state_dict())
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 16, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(heads("enc", s, t), restored("enc", s, t)))
    built = ProjectorHeads.from_features({"bn": torch.zeros(1, 8, 2, 2)}, {"bn": torch.zeros(1, 32, 4, 4)})
    assert built.config["student_channels"] == {"bn": 8} and built.config["spatial_dims"] == 2


@pytest.mark.parametrize("teacher_size", [(16, 16), (2, 2), (16, 2)])
def test_resize_before_project_pre_pooled_teacher_gives_same_embedding(teacher_size):
    # what the teacher cache does: store match_spatial(teacher, student size) and project later
    torch.manual_seed(0)
    heads = ProjectorHeads(S_CH, T_CH, embed_dim=6, kind="mlp")  # non-linear: order matters
    s = torch.randn(2, 8, 4, 4)
    t_full = torch.randn(2, 32, *teacher_size)
    t_cached = match_spatial(t_full, (4, 4))
    live = heads("bn", s, t_full)
    cached = heads("bn", s, t_cached)
    assert torch.equal(live[0], cached[0]) and torch.equal(live[1], cached[1])
    # and it is resize-then-project, not project-then-resize
    assert torch.equal(live[1], heads.teacher_heads["bn"](t_cached))
    if teacher_size == (16, 16):
        projected_then_pooled = F.adaptive_avg_pool2d(heads.teacher_heads["bn"](t_full), (4, 4))
        assert not torch.allclose(live[1], projected_then_pooled)


def test_match_spatial():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # adaptive average pooling of 2 x 2 blocks: (0+1+4+5)/4 = 2.5, ...
    assert match_spatial(x, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert match_spatial(x, (4, 4)) is x
    assert match_spatial(x, (8, 8)).shape == (1, 1, 8, 8)  # bilinear up
    assert match_spatial(x, (2, 8)).shape == (1, 1, 2, 8)  # mixed: pool then interpolate
    assert match_spatial(torch.randn(1, 2, 4, 6, 8), (2, 3, 4)).shape == (1, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="spatial size"):
        match_spatial(x, (2, 2, 2))


def test_errors():
    heads = ProjectorHeads(S_CH, T_CH)
    with pytest.raises(ValueError, match=r"unknown scale 'dec'.*\['enc', 'bn'\]"):
        heads("dec", torch.randn(1, 4, 2, 2), torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="teacher feature at scale 'bn'"):
        heads("bn", torch.randn(1, 8, 2, 2), torch.randn(1, 31, 2, 2))
    with pytest.raises(ValueError, match="batch sizes"):
        heads("bn", torch.randn(1, 8, 2, 2), torch.randn(2, 32, 2, 2))
    with pytest.raises(ValueError, match="same, non-empty set of scales"):
        ProjectorHeads({"bn": 8}, {"enc": 8})
    with pytest.raises(ValueError, match="kind='deep'"):
        ProjectorHeads(S_CH, T_CH, kind="deep")
    with pytest.raises(ValueError, match="project='teacher'"):
        ProjectorHeads(S_CH, T_CH, project="teacher")
