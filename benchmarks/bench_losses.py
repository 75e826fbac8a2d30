"""Forward + backward time of each distillation loss on the CPU student's real shapes, as a ratio to PMD.

Each loss gets the inputs the distillation handler gives it in a CPU-profile run (batch 16, 96x96
slices, student ``s1``, teacher ``t1`` at the CPU teacher's width preset): logits ``16 x 1 x 96 x 96``;
projector embeddings (``embed_dim`` 128) at the student's grid for the projected feature losses; the raw
student feature and the raw teacher feature brought to the student's grid for the affinity losses;
labels ``16 x 1 x 96 x 96`` for region affinity. Times are the median of ``--reps`` calls of
``loss(...).backward()`` with the student side a leaf that requires grad: the loss's own cost per
step, without the student / teacher forward passes and the projector heads shared by every term.

Usage::

    python benchmarks/bench_losses.py                 # about 20 s on one core
    python benchmarks/bench_losses.py --reps 20 --threads 2 --teacher-preset thesis
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mkd.losses import (
    CWDLoss,
    DISTLoss,
    FeatureMSELoss,
    InfoNCELoss,
    PairwiseAffinityLoss,
    PMDLoss,
    RegionAffinityLoss,
    SoftDiceKD,
)
from mkd.networks import FeatureRecorder, build
from mkd.networks.projector import match_spatial


def _time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _shape(t: torch.Tensor) -> str:
    return f"{t.shape[1]} x {'x'.join(str(d) for d in t.shape[2:])}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--teacher-preset", default="small", help="t1 width preset (the CPU teacher's: small)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    student, teacher = build("s1").eval(), build("t1", args.teacher_preset).eval()
    teacher.reconstruct = False
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad(), FeatureRecorder(student, ["bn", "dec"]) as rs, FeatureRecorder(teacher, ["bn", "dec"]) as rt:
        with rs.recording(), rt.recording():
            s_logits, t_logits = student(x), teacher(x)
        s_feat = dict(rs.features)
        t_feat = {k: match_spatial(v, s_feat[k].shape[2:]) for k, v in rt.features.items()}
    t_logits = t_logits + 2 * torch.randn_like(t_logits)  # the two untrained nets agree too well otherwise
    labels = (torch.rand(args.batch, 1, args.size, args.size) > 0.9).float()
    labels[: args.batch // 4] = -1.0  # a quarter of the slices unlabelled (the transfer set): teacher regions
    emb = {k: torch.randn(args.batch, args.embed_dim, *v.shape[2:]) for k, v in s_feat.items()}

    def case(name, loss, student_side, teacher_side, **extras):
        leaf = student_side.clone().requires_grad_()

        def step() -> None:
            leaf.grad = None
            loss(leaf, teacher_side, **extras).backward()

        return name, _shape(student_side), _shape(teacher_side), _time(step, args.reps)

    rows = [
        case("pmd (T=4)", PMDLoss(4.0), s_logits, t_logits),
        case("cwd (T=4)", CWDLoss(4.0), s_logits, t_logits),
        case("dist", DISTLoss(), s_logits, t_logits),
        case("soft_dice", SoftDiceKD(), s_logits, t_logits),
        case("soft_dice (hard, pseudo-labels)", SoftDiceKD(hard=True), s_logits, t_logits),
        case("contrastive bn (image)", InfoNCELoss(0.4), emb["bn"], torch.randn_like(emb["bn"])),
        case("mse bn", FeatureMSELoss(), emb["bn"], torch.randn_like(emb["bn"])),
        case("cwd bn (projected)", CWDLoss(4.0), emb["bn"], torch.randn_like(emb["bn"])),
        case("affinity bn (raw, pooled to 12x12)", PairwiseAffinityLoss(), s_feat["bn"], t_feat["bn"]),
        case("affinity bn (raw, spatial_size=24)", PairwiseAffinityLoss(24), s_feat["bn"], t_feat["bn"]),
        case("affinity dec (raw, pooled to 12x12)", PairwiseAffinityLoss(), s_feat["dec"], t_feat["dec"]),
        case(
            "region_affinity bn (raw)",
            RegionAffinityLoss(),
            s_feat["bn"],
            t_feat["bn"],
            labels=labels,
            teacher_logits=t_logits,
        ),  # fmt: skip
        case(
            "region_affinity dec (raw)",
            RegionAffinityLoss(),
            s_feat["dec"],
            t_feat["dec"],
            labels=labels,
            teacher_logits=t_logits,
        ),  # fmt: skip
    ]
    ref = rows[0][3]
    print(f"batch {args.batch}, {args.size}x{args.size}, s1 / t1:{args.teacher_preset}, {args.threads} thread(s), "
          f"median of {args.reps}; torch {torch.__version__}")  # fmt: skip
    print("| loss | student input | teacher input | forward + backward (ms) | x PMD |")
    print("|---|---|---|---:|---:|")
    for name, s_shape, t_shape, sec in rows:
        print(f"| {name} | {s_shape} | {t_shape} | {sec * 1e3:.2f} | {sec / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
