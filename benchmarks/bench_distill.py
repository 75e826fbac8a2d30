"""Distillation epoch vs student-only epoch, with and without the teacher-output cache.

Runs the student bundle and the distill bundle side by side in one process on
the same prepared phantom, the same student and the same data, with
validation switched off so that only training epochs are timed, and prints
the median epoch time of each and the ratios. The teacher is a CPU-sized t1
(`small` preset, 2.7 M parameters) with random weights: the cost of a
forward pass does not depend on what the weights are.

    python benchmarks/bench_distill.py [--data DIR] [--epochs 3] [--scales enc,bn,dec] [--size 96]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="prepared dataset (default: a fresh phantom)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scales", default="enc,bn,dec")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--teacher-preset", default="small")
    args = parser.parse_args()

    from mkd.bundle import run_bundle
    from mkd.data import prepare_dataset, write_phantom
    from mkd.networks import build, save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mkd-bench-distill-"))
    data = args.data
    if data is None:
        task = write_phantom(tmp / "raw", seed=0)
        data = tmp / "data"
        prepare_dataset(task, data, size=args.size, keep="organ", seed=0)
    teacher = build("t1", preset=args.teacher_preset)
    ckpt = save_checkpoint(tmp / "teacher.pt", teacher, run={"image_size": [args.size, args.size]})
    scales = [s for s in args.scales.split(",") if s]
    common = {"image_size": [args.size, args.size], "epochs": args.epochs, "val_interval": 10**6}
    distill = {**common, "teacher_ckpt": str(ckpt), "scales": scales, "pmd": True}

    def epochs(name: str, bundle: str, overrides: dict) -> tuple[float, float]:
        import pandas as pd

        t0 = time.perf_counter()
        run_bundle(bundle, tmp / name, data, overrides=overrides, seed=0)
        total = time.perf_counter() - t0
        times = pd.read_csv(tmp / name / "metrics.csv")["epoch_time_s"].tolist()
        return statistics.median(times), total

    student, _ = epochs("student", "student", common)
    cached, cached_total = epochs("distill-cache", "distill", {**distill, "use_cache": True})
    live, _ = epochs("distill-live", "distill", {**distill, "use_cache": False})
    cache_mb = sum(f.stat().st_size for f in (tmp / "distill-cache" / "teacher_cache").glob("*.npy")) / 1e6

    print(
        f"data: {data}; scales {','.join(scales)} + PMD; teacher t1/{args.teacher_preset} "
        f"({teacher.num_parameters() / 1e6:.2f} M); {args.size}x{args.size}; median of {args.epochs} epochs"
    )
    print("| run | epoch (s) | ratio to student-only |")
    print("|---|---:|---:|")
    print(f"| student only | {student:.2f} | 1.00 |")
    print(f"| distill, teacher cache | {cached:.2f} | {cached / student:.2f} |")
    print(f"| distill, live teacher | {live:.2f} | {live / student:.2f} |")
    print(f"teacher cache: {cache_mb:.0f} MB on disk; whole cached run incl. building the cache {cached_total:.1f} s")


if __name__ == "__main__":
    main()
