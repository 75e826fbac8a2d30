"""Distillation epoch vs student-only epoch, with and without the teacher-output cache and with augmentation.

Runs the student bundle and the distill bundle side by side in one process on
the same prepared phantom, the same student and the same data, with
validation switched off so that only training epochs are timed, and prints
the median epoch time of each and the ratios. Two shared CPU cores drift by
10-20 % from minute to minute, so the runs are interleaved over ``--rounds``
rounds (student, cached distillation, live distillation, augmented student,
augmented distillation, then again), each run's first epoch (warm-up) is
dropped, and the ratio of every round is printed beside the median. The
augmented rows use ``augment=--augment`` (per-slice random views and the slice
mix); augmented distillation runs the teacher live (the cache cannot hold
outputs for random views), so its ratio to the cached distillation epoch is
the price of a consistent teacher. The teacher is a CPU-sized t1
(`small` preset, 2.7 M parameters) with random weights: the cost of a
forward pass does not depend on what the weights are.

    python benchmarks/bench_distill.py [--data DIR] [--epochs 4] [--rounds 3] [--scales enc,bn,dec] [--size 96]
                                       [--augment consistent]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset (default: a fresh phantom)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the three runs")
    parser.add_argument("--scales", default="enc,bn,dec")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--teacher-preset", default="small")
    parser.add_argument("--augment", default="consistent", help="the augmented rows' `augment` setting")
    args = parser.parse_args()

    from mkd.bundle import run_bundle
    from mkd.data import prepare_dataset, write_phantom
    from mkd.networks import build, save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mkd-bench-distill-"))
    try:  # the folder is this run's own: removed at the end, whatever happens
        data = args.data
        if data is None:
            task = write_phantom(tmp / "raw", seed=0)
            data = tmp / "data"
            prepare_dataset(task, data, size=args.size, keep="organ", seed=0)
        teacher = build("t1", preset=args.teacher_preset)
        run = {"image_size": [args.size, args.size], "role": "teacher"}
        ckpt = save_checkpoint(tmp / "teacher.pt", teacher, run=run)
        scales = [s for s in args.scales.split(",") if s]
        common = {"image_size": [args.size, args.size], "epochs": args.epochs, "val_interval": 10**6}
        distill = {**common, "teacher_ckpt": str(ckpt), "scales": scales, "pmd": True}

        def epoch_times(name: str, bundle: str, overrides: dict) -> list[float]:
            import pandas as pd

            run_bundle(bundle, tmp / name, data, overrides=overrides, seed=0)
            return pd.read_csv(tmp / name / "metrics.csv")["epoch_time_s"].tolist()[1:]

        runs = {
            "student only": ("student", common),
            "distill, teacher cache": ("distill", {**distill, "use_cache": True}),
            "distill, live teacher": ("distill", {**distill, "use_cache": False}),
            "student only, augmented": ("student", {**common, "augment": args.augment}),
            "distill, augmented, live teacher": ("distill", {**distill, "augment": args.augment}),
        }
        times: dict[str, list[list[float]]] = {label: [] for label in runs}
        for r in range(args.rounds):
            for i, (label, (bundle, overrides)) in enumerate(runs.items()):
                times[label].append(epoch_times(f"r{r}-{i}", bundle, overrides))
        cache_mb = sum(f.stat().st_size for f in (tmp / "r0-1" / "teacher_cache").glob("*.npy")) / 1e6

        def median(label: str, r: int | None = None) -> float:
            return statistics.median(times[label][r] if r is not None else sum(times[label], []))

        base, cached = "student only", "distill, teacher cache"
        print(
            f"data: {data}; scales {','.join(scales)} + PMD; teacher t1/{args.teacher_preset} "
            f"({teacher.num_parameters() / 1e6:.2f} M); {args.size}x{args.size}; "
            f"{args.rounds} interleaved rounds of {args.epochs} epochs (first epoch of each run not timed)"
        )
        print("| run | median epoch (s) | ratio to student-only | ratio in each round | ratio to cached distillation |")
        print("|---|---:|---:|---|---:|")
        for label in runs:
            per_round = ", ".join(f"{median(label, r) / median(base, r):.2f}" for r in range(args.rounds))
            print(
                f"| {label} | {median(label):.2f} | {median(label) / median(base):.2f} | {per_round} "
                f"| {median(label) / median(cached):.2f} |"
            )
        print(f"teacher cache: {cache_mb:.0f} MB on disk")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
