"""Slices prepared per second on the default phantom (24 volumes of 128x128x40).

Usage: python benchmarks/bench_prepare.py [--size 96] [--cases 24] [--shape 128,128,40]

Times the phantom writing and ``prepare_dataset`` separately; ``prepare`` is the
figure of interest (NIfTI load, RAS, windowing, resize, slicing, writing .npy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from mkd.data import prepare_dataset, write_phantom
    from mkd.data.phantom import PHANTOM_CASES, PHANTOM_SHAPE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cases", type=int, default=PHANTOM_CASES)
    parser.add_argument("--shape", default=",".join(map(str, PHANTOM_SHAPE)))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        task = write_phantom(tmp, cases=args.cases, shape=shape, seed=0)
        t_phantom = time.perf_counter() - t0
        summary = prepare_dataset(task, Path(tmp) / "data", size=args.size, seed=0)
    slices = sum(summary.slices[k] for k in ("training", "validation", "test"))
    print(f"phantom: {args.cases} volumes of {shape} in {t_phantom:.1f} s ({args.cases / t_phantom:.1f} volumes/s)")
    print(f"prepare --size {args.size}: {summary.volumes} volumes, {slices} slices in {summary.seconds:.1f} s")
    print(f"{slices / summary.seconds:.0f} slices/s, {summary.volumes / summary.seconds:.2f} volumes/s")


if __name__ == "__main__":
    main()
