"""InfoNCELoss: hand-computed values, bounds, sampling budget, gradients, 2D/3D, autocast."""

from __future__ import annotations

import math

import pytest
import torch

from mkd.losses import InfoNCELoss, sample_locations

# Hand example used by several tests (tau = 0.5). Before normalisation
#   student s0 = (2, 0), s1 = (0, 3)   -> unit (1, 0), (0, 1)
#   teacher t0 = (3, 4), t1 = (5, 0)   -> unit (0.6, 0.8), (1, 0)
# s . t^T = [[0.6, 1.0], [0.8, 0.0]];  / tau  -> logits [[1.2, 2.0], [1.6, 0.0]]
# row 0 (target 0): -log(e^1.2 / (e^1.2 + e^2.0)) = log(1 + e^0.8) = 1.1711007
# row 1 (target 1): -log(e^0   / (e^1.6 + e^0))   = log(1 + e^1.6) = 1.7839007
# mean = 1.4775007
# teacher->student (columns): col 0 [1.2, 1.6] target 0: log(1 + e^0.4) = 0.9130153
#                             col 1 [2.0, 0.0] target 1: log(1 + e^2.0) = 2.1269280
# symmetric = (1.4775007 + (0.9130153 + 2.1269280) / 2) / 2 = 1.4987361
S = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
T = torch.tensor([[3.0, 4.0], [5.0, 0.0]])
ROWS = [math.log1p(math.exp(0.8)), math.log1p(math.exp(1.6))]
COLS = [math.log1p(math.exp(0.4)), math.log1p(math.exp(2.0))]


def test_image_mode_matches_hand_computation():
    assert InfoNCELoss(temperature=0.5)(S, T).item() == pytest.approx(sum(ROWS) / 2, abs=1e-6)
    per_anchor = InfoNCELoss(temperature=0.5, reduction="none")(S, T)
    assert per_anchor.tolist() == pytest.approx(ROWS, abs=1e-6)
    assert InfoNCELoss(temperature=0.5, reduction="sum")(S, T).item() == pytest.approx(sum(ROWS), abs=1e-6)
    sym = InfoNCELoss(temperature=0.5, symmetric=True)(S, T).item()
    assert sym == pytest.approx((sum(ROWS) / 2 + sum(COLS) / 2) / 2, abs=1e-6)


def test_image_mode_pools_spatial_dims_first():
    # a map whose spatial mean is the hand example's vector gives the hand value (2D and 3D)
    for spatial in [(2, 2), (2, 1, 2)]:
        wiggle = torch.tensor([1.0, -1.0]).repeat(2)[: math.prod(spatial)].reshape(spatial)
        s = S[(...,) + (None,) * len(spatial)] + 0.3 * wiggle
        t = T[(...,) + (None,) * len(spatial)] - 0.2 * wiggle
        assert InfoNCELoss(temperature=0.5)(s, t).item() == pytest.approx(sum(ROWS) / 2, abs=1e-5)


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
def test_identical_embeddings_give_log_of_candidates(mode):
    # every student and teacher embedding is the same random vector: all logits equal,
    # so each anchor's softmax is uniform over its candidates: loss = log(#candidates)
    torch.manual_seed(0)
    b, d, h, w = 4, 8, 3, 3
    v = torch.randn(1, d, 1, 1).expand(b, d, h, w)
    labels = torch.randint(0, 2, (b, 1, h, w))
    candidates = b if mode == "image" else b * h * w
    loss = InfoNCELoss(mode=mode, max_samples=1000)(v, v.clone(), labels=labels)
    # (supervised: each positive has log-probability log(1/K), so their mean is still -log K)
    assert loss.item() == pytest.approx(math.log(candidates), abs=1e-5)


@pytest.mark.parametrize("mode", ["image", "pixel"])
def test_matched_pairs_score_lower_than_shuffled(mode):
    torch.manual_seed(0)
    t = torch.randn(8, 16, 4, 4)
    s = t + 0.3 * torch.randn_like(t)
    shuffled = t[torch.roll(torch.arange(8), 1)]
    loss = InfoNCELoss(temperature=0.4, mode=mode)
    assert loss(s, t).item() < loss(s, shuffled).item()


def test_batch_of_one_in_image_mode_warns_and_is_zero():
    s = torch.randn(1, 8, 4, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="batch of 1"):
        loss = InfoNCELoss()(s, torch.randn(1, 8, 4, 4))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so a trainer can call backward
    assert torch.count_nonzero(s.grad) == 0


def test_pixel_mode_matches_hand_computation():
    # one slice with two locations (1 x 2 grid): the two locations play the roles of the
    # two slices of the hand example, so the value is the same
    s = S.t().reshape(1, 2, 1, 2)
    t = T.t().reshape(1, 2, 1, 2)
    assert InfoNCELoss(temperature=0.5, mode="pixel")(s, t).item() == pytest.approx(sum(ROWS) / 2, abs=1e-6)
    sym = InfoNCELoss(temperature=0.5, mode="pixel", symmetric=True)(s, t).item()
    assert sym == pytest.approx((sum(ROWS) + sum(COLS)) / 4, abs=1e-6)
    # two slices of one location each: the other slice's location is the negative
    s2, t2 = S.reshape(2, 2, 1, 1), T.reshape(2, 2, 1, 1)
    assert InfoNCELoss(temperature=0.5, mode="pixel")(s2, t2).item() == pytest.approx(sum(ROWS) / 2, abs=1e-6)


def test_pixel_mode_respects_the_sampling_budget():
    torch.manual_seed(0)
    # 2 x 128 x 128 = 32768 locations: all pairs would be a 32768^2 float32 matrix (4 GiB);
    # with the budget the logits are 256 x 256 and the per-anchor output has 256 entries
    s = torch.randn(2, 8, 128, 128)
    out = InfoNCELoss(mode="pixel", max_samples=256, reduction="none")(s, s + 0.1)
    assert out.shape == (256,)
    sup = InfoNCELoss(mode="supervised", max_samples=256, reduction="none")
    assert sup(s, s, labels=torch.randint(0, 2, (2, 1, 128, 128))).shape == (256,)
    # fewer locations than the budget: every location is an anchor
    assert InfoNCELoss(mode="pixel", max_samples=256, reduction="none")(s[:, :, :4, :4], s[:, :, :4, :4]).shape == (32,)


def test_pixel_sampling_is_reproducible_given_torch_seed():
    s, t = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    loss = InfoNCELoss(mode="pixel", max_samples=32)
    torch.manual_seed(3)
    a = loss(s, t)
    torch.manual_seed(3)
    b = loss(s, t)
    assert torch.equal(a, b)
    torch.manual_seed(3)
    idx = sample_locations(512, 32)
    assert idx.shape == (32,) and idx.unique().numel() == 32 and int(idx.max()) < 512


def test_balanced_sampling_keeps_a_rare_class():
    torch.manual_seed(0)
    classes = torch.zeros(4096, dtype=torch.long)
    classes[[7, 1000, 2000, 4000]] = 1  # a 0.1% foreground
    idx = sample_locations(4096, 32, classes=classes)
    assert idx.unique().numel() == 32
    assert set(idx.tolist()) >= {7, 1000, 2000, 4000}


def test_supervised_mode_matches_hand_computation():
    # three locations on a 1 x 3 grid, classes (0, 0, 1); tau = 1; unit vectors
    #   teacher t0 = t1 = (1, 0), t2 = (0, 1);  student s0 = (1, 0), s1 = s2 = (0, 1)
    # logits s_i . t_j: row0 [1, 1, 0], row1 [0, 0, 1], row2 [0, 0, 1]
    # positives: anchor 0 -> {t0, t1}, anchor 1 -> {t0, t1}, anchor 2 -> {t2}
    # row0: lse = log(2e + 1) = 1.8619948; loss = -(1/2)(2 (1 - 1.8619948)) = 0.8619948
    # row1: lse = log(2 + e)  = 1.5514447; loss = -(1/2)(2 (0 - 1.5514447)) = 1.5514447
    # row2: lse = 1.5514447;               loss = -(1 - 1.5514447)          = 0.5514447
    # mean = 0.9882947
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 3)
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]).reshape(1, 2, 1, 3)
    # labels at twice the feature resolution, constant on each 2 x 2 block: nearest resize gives (0, 0, 1)
    labels = torch.tensor([[0, 0, 0, 0, 1, 1]] * 2).reshape(1, 1, 2, 6)
    loss = InfoNCELoss(temperature=1.0, mode="supervised", reduction="none")(s, t, labels=labels)
    expected = [2 * math.e + 1, 2 + math.e, 2 + math.e]
    expected = [math.log(expected[0]) - 1, math.log(expected[1]), math.log(expected[2]) - 1]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    # one-hot labels and labels without a channel dim are read the same way
    onehot = torch.cat([1 - labels, labels], 1)
    assert torch.allclose(InfoNCELoss(1.0, "supervised", reduction="none")(s, t, onehot), loss)
    assert torch.allclose(InfoNCELoss(1.0, "supervised", reduction="none")(s, t, labels[:, 0]), loss)


def test_supervised_mode_needs_consistent_labels():
    s = torch.randn(2, 4, 3, 3)
    loss = InfoNCELoss(mode="supervised")
    with pytest.raises(ValueError, match="needs labels"):
        loss(s, s)
    with pytest.raises(ValueError, match="do not match"):
        loss(s, s, labels=torch.zeros(3, 1, 3, 3))
    with pytest.raises(ValueError, match="spatial"):
        loss(s[:, :, 0, 0], s[:, :, 0, 0], labels=torch.zeros(2, 1))


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_reach_student_not_detached_teacher(mode, symmetric):
    torch.manual_seed(0)
    student = torch.randn(3, 8, 4, 4, requires_grad=True)
    teacher_src = torch.randn(3, 8, 4, 4, requires_grad=True)
    labels = torch.randint(0, 2, (3, 1, 8, 8))
    loss = InfoNCELoss(mode=mode, symmetric=symmetric, max_samples=20)(student, teacher_src.detach(), labels)
    loss.backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0
    assert teacher_src.grad is None


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
def test_3d_inputs(mode):
    torch.manual_seed(0)
    s = torch.randn(2, 4, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 6, 8, 10))
    loss = InfoNCELoss(mode=mode, max_samples=50)(s, s.detach() + 0.1 * torch.randn_like(s), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.count_nonzero(s.grad) > 0


def test_float32_under_autocast():
    torch.manual_seed(0)
    s, t = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    ref = InfoNCELoss()(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = InfoNCELoss()(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode='patch'"):
        InfoNCELoss(mode="patch")
    with pytest.raises(ValueError, match="temperature=0"):
        InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="reduction='avg'"):
        InfoNCELoss(reduction="avg")
    with pytest.raises(ValueError, match="max_samples=0"):
        InfoNCELoss(max_samples=0)
    with pytest.raises(ValueError, match="same shape"):
        InfoNCELoss()(torch.randn(2, 4), torch.randn(2, 5))


# --- false-negative masking of neighbouring slices (neighbour_distance) -------------------
# Hand example (tau = 0.5), unit vectors at known angles (the student is scaled by 2 to
# exercise the normalisation):
#   student s0, s1, s2 at 0, 90, 180 degrees;  teacher t0, t1, t2 at 0, 60, 270 degrees
#   cosines s.t^T = [[1, 1/2, 0], [0, sqrt3/2, -1], [-1, -1/2, 0]]
#   logits (/ 0.5)  = [[2, 1, 0], [0, sqrt3, -2], [-2, -1, 0]]
# slices 0 and 1: patient "a" at z 10 and 11; slice 2: patient "b" at z 10.
# With neighbour_distance=1, candidate 1 leaves anchor 0's denominator and candidate 0 anchor 1's.
R3 = math.sqrt(3.0)
S3 = 2.0 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
T3 = torch.tensor([[1.0, 0.0], [0.5, R3 / 2], [0.0, -1.0]])
GROUPS3, Z3 = ["a", "a", "b"], [10, 11, 10]


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_neighbour_mask_image_mode_matches_hand_computation():
    expected = [
        _lse(2.0, 0.0) - 2.0,  # anchor 0: row [2, (1), 0], candidate 1 masked
        _lse(R3, -2.0) - R3,  # anchor 1: row [(0), sqrt3, -2], candidate 0 masked
        _lse(-2.0, -1.0, 0.0),  # anchor 2 (patient b): nothing masked
    ]
    loss = InfoNCELoss(temperature=0.5, reduction="none", neighbour_distance=1)
    assert loss(S3, T3, groups=GROUPS3, positions=Z3).tolist() == pytest.approx(expected, abs=1e-6)
    # unmasked, for contrast: anchor 0 keeps candidate 1
    plain = InfoNCELoss(temperature=0.5, reduction="none")(S3, T3)
    assert plain.tolist() == pytest.approx([_lse(2.0, 1.0, 0.0) - 2.0, _lse(0.0, R3, -2.0) - R3, expected[2]], abs=1e-6)
    # integer ids, tensors and a larger distance give the same mask
    for groups, z in [([7, 7, 3], torch.tensor(Z3)), (torch.tensor([0, 0, 1]), Z3)]:
        other = InfoNCELoss(temperature=0.5, reduction="none", neighbour_distance=5)(S3, T3, groups=groups, positions=z)
        assert other.tolist() == pytest.approx(expected, abs=1e-6)
    # symmetric: columns [2, (0), -2] target 0, [(1), sqrt3, -1] target 1, [0, -2, 0] target 2
    cols = [_lse(2.0, -2.0) - 2.0, _lse(R3, -1.0) - R3, _lse(0.0, -2.0, 0.0)]
    sym = InfoNCELoss(temperature=0.5, reduction="none", symmetric=True, neighbour_distance=1)
    out = sym(S3, T3, groups=GROUPS3, positions=Z3)
    assert out.tolist() == pytest.approx([(r + c) / 2 for r, c in zip(expected, cols)], abs=1e-6)


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_neighbour_distance_zero_is_the_unmasked_loss(mode, symmetric):
    torch.manual_seed(0)
    s, t = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    labels = torch.randint(0, 2, (4, 1, 3, 3))
    kw = dict(mode=mode, symmetric=symmetric, max_samples=20, reduction="none")
    torch.manual_seed(1)
    ref = InfoNCELoss(**kw)(s, t, labels)
    torch.manual_seed(1)
    off = InfoNCELoss(neighbour_distance=0, **kw)(s, t, labels, groups=["a"] * 4, positions=[0, 1, 2, 3])
    assert torch.equal(off, ref)
    torch.manual_seed(1)
    assert torch.equal(InfoNCELoss(neighbour_distance=0, **kw)(s, t, labels), ref)  # ids not needed when off


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
def test_distance_below_the_slice_gap_masks_nothing(mode):
    torch.manual_seed(0)
    s, t = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2)
    labels = torch.randint(0, 2, (3, 1, 2, 2))
    ref = InfoNCELoss(mode=mode, max_samples=100, reduction="none")(s, t, labels)
    # same patient, slices 3 apart: a distance of 2 does not reach them
    out = InfoNCELoss(mode=mode, max_samples=100, reduction="none", neighbour_distance=2)(
        s, t, labels, groups=["a", "a", "a"], positions=[0, 3, 6]
    )
    assert torch.equal(out, ref)
    near = InfoNCELoss(mode=mode, max_samples=100, reduction="none", neighbour_distance=3)(
        s, t, labels, groups=["a", "a", "a"], positions=[0, 3, 6]
    )
    assert not torch.allclose(near, ref)


def _brute_force(s, t, groups, z, d, tau, classes=None, symmetric=False):
    """Reference with explicit loops: every location of a (B, D, H, W) map is an anchor."""
    b, dim = s.shape[:2]
    n = s[0, 0].numel()
    se = torch.nn.functional.normalize(s.reshape(b, dim, n).permute(0, 2, 1).reshape(b * n, dim).double(), dim=1)
    te = torch.nn.functional.normalize(t.reshape(b, dim, n).permute(0, 2, 1).reshape(b * n, dim).double(), dim=1)
    cls = None if classes is None else classes.reshape(-1).tolist()

    def one_direction(anchors, candidates):
        out = []
        for i in range(b * n):
            pos, denom = [], []
            for j in range(b * n):
                logit = float(anchors[i] @ candidates[j]) / tau
                positive = (j == i) if cls is None else (cls[j] == cls[i])
                bi, bj = i // n, j // n
                neighbour = bi != bj and groups[bi] == groups[bj] and abs(z[bi] - z[bj]) <= d
                if neighbour and not positive:
                    continue
                denom.append(logit)
                if positive:
                    pos.append(logit)
            lse = math.log(sum(math.exp(x) for x in denom))
            out.append(-sum(p - lse for p in pos) / len(pos))
        return out

    loss = one_direction(se, te)
    if symmetric:
        loss = [(a + c) / 2 for a, c in zip(loss, one_direction(te, se))]
    return loss


# patient p1 at z 0, 1, 5 (slices 0, 1, 3) and patient p2 at z 1 (slice 2); with d = 2
# slices 0 and 1 are neighbours, slice 3 is too far and slice 2 is another patient
GROUPS4, Z4 = ["p1", "p1", "p2", "p1"], [0, 1, 1, 5]


@pytest.mark.parametrize("symmetric", [False, True])
def test_neighbour_mask_pixel_mode_matches_brute_force(symmetric):
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    loss = InfoNCELoss(temperature=0.5, mode="pixel", symmetric=symmetric, max_samples=1000, reduction="none")
    masked = InfoNCELoss(
        temperature=0.5, mode="pixel", symmetric=symmetric, max_samples=1000, reduction="none", neighbour_distance=2
    )
    out = masked(s, t, groups=GROUPS4, positions=Z4)
    expected = _brute_force(s, t, GROUPS4, Z4, d=2, tau=0.5, symmetric=symmetric)
    assert out.shape == (16,)
    assert out.tolist() == pytest.approx(expected, abs=1e-5)
    # the mask changed slices 0 and 1 only
    plain = loss(s, t)
    assert torch.allclose(out[8:], plain[8:]) and not torch.allclose(out[:8], plain[:8])


@pytest.mark.parametrize("symmetric", [False, True])
def test_neighbour_mask_supervised_mode_matches_brute_force(symmetric):
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    labels = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]]).reshape(4, 1, 2, 2)
    masked = InfoNCELoss(
        temperature=0.5,
        mode="supervised",
        symmetric=symmetric,
        max_samples=1000,
        reduction="none",
        neighbour_distance=2,
    )
    out = masked(s, t, labels, groups=GROUPS4, positions=Z4)
    expected = _brute_force(s, t, GROUPS4, Z4, d=2, tau=0.5, classes=labels, symmetric=symmetric)
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


def test_supervised_mode_never_masks_a_positive():
    # a single class: every candidate is a positive of every anchor, so the mask has nothing
    # to take out, even though all slices are neighbours of one patient
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    labels = torch.zeros(3, 1, 2, 2, dtype=torch.long)
    ref = InfoNCELoss(mode="supervised", max_samples=1000, reduction="none")(s, t, labels)
    out = InfoNCELoss(mode="supervised", max_samples=1000, reduction="none", neighbour_distance=10)(
        s, t, labels, groups=["a"] * 3, positions=[0, 1, 2]
    )
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_negatives_masked_gives_zero_and_finite_gradients(mode, symmetric):
    # two slices of one location each, neighbours of one patient, of different classes:
    # each anchor keeps only its own positive, so its loss is -log 1 = 0
    student = torch.randn(2, 4, 1, 1, requires_grad=True)
    teacher = torch.randn(2, 4, 1, 1, requires_grad=True)
    labels = torch.tensor([0, 1]).reshape(2, 1, 1, 1)
    loss = InfoNCELoss(mode=mode, symmetric=symmetric, reduction="none", neighbour_distance=1)
    out = loss(student, teacher, labels, groups=["a", "a"], positions=torch.tensor([4, 5]))
    assert out.tolist() == [0.0, 0.0]
    out.sum().backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


@pytest.mark.parametrize("mode", ["image", "pixel", "supervised"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_reach_student_with_neighbour_mask(mode, symmetric):
    torch.manual_seed(0)
    student = torch.randn(4, 8, 3, 3, requires_grad=True)
    teacher = torch.randn(4, 8, 3, 3)
    labels = torch.randint(0, 2, (4, 1, 3, 3))
    loss = InfoNCELoss(mode=mode, symmetric=symmetric, max_samples=30, neighbour_distance=2)
    out = loss(student, teacher, labels, groups=GROUPS4, positions=Z4)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(student.grad).all() and torch.count_nonzero(student.grad) > 0


def test_neighbour_mask_invalid_arguments():
    with pytest.raises(ValueError, match="neighbour_distance=-1"):
        InfoNCELoss(neighbour_distance=-1)
    with pytest.raises(ValueError, match="neighbour_distance=1.5"):
        InfoNCELoss(neighbour_distance=1.5)
    loss = InfoNCELoss(neighbour_distance=1)
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs the batch's patient ids .* got groups=None"):
        loss(s, s, positions=Z3)
    with pytest.raises(ValueError, match="needs the batch's patient ids .* got positions=None"):
        loss(s, s, groups=GROUPS3)
    with pytest.raises(ValueError, match="groups and positions=None"):
        InfoNCELoss(mode="pixel", neighbour_distance=1)(s, s)
    with pytest.raises(ValueError, match=r"one entry per slice, shape \(3,\); got \(2,\)"):
        loss(s, s, groups=["a", "b"], positions=Z3)
    with pytest.raises(ValueError, match="positions must be integer"):
        loss(s, s, groups=GROUPS3, positions=[10.0, 11.5, 10.0])
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        loss(s, s, groups=torch.tensor([0.0, 0.0, 1.0]), positions=Z3)
