"""CPU inference time per CT volume: student S1 on every backend against teacher T1, measured side by side.

Runs ``mkd.inference.Segmenter.segment`` end to end (read the NIfTI, the ``mkd prepare``
preprocessing, slices in batches through the network, inverse resampling, threshold, largest
connected component; no writing) on the real 112-slice CT sample at 256², for

- S1 (thesis width, 57 k parameters) on PyTorch eager (NCHW), PyTorch channels-last,
  ONNX Runtime (fp32) and ONNX Runtime int8 (static quantisation, calibrated on the volume's slices);
- T1 (thesis width, 43 M parameters) on one backend (``--t1-backend``, default ONNX Runtime).

Random weights (time does not depend on them), saved as checkpoints in a temporary folder so
the ONNX graphs are exported and cached as ``mkd infer`` does (export time is not timed).
Every S1 configuration gets one warm-up volume (T1: one batch), then the runs are interleaved (S1 configurations
and T1 take turns) so all see the same machine load; each figure is the median of its runs.
It prints a markdown table (seconds per volume end to end and network only, the parts:
read / preprocess / network / invert / LCC), the S1/T1 ratio on the same backend, and whether
S1 meets 2 s per volume (or by how much it misses, and where the time goes).

Usage::

    python benchmarks/bench_inference.py --threads 2                # S1 x4 backends (5 runs), T1 1 run (~5 min)
    python benchmarks/bench_inference.py --threads 2 --quick        # S1 only, 3 runs (~1 min)
    python benchmarks/bench_inference.py --volume my_ct.nii.gz --size 96 --t1-backend torch
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "totalseg_example" / "ct_full.nii.gz"
PARTS = ("load", "preprocess", "network", "invert", "postprocess")
TARGET_S = 2.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", default=str(SAMPLE), help="NIfTI / DICOM volume (default: the real CT sample)")
    ap.add_argument("--size", type=int, default=256, help="network input size (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every backend (default 2)")
    ap.add_argument("--batch-size", type=int, default=8, help="slices per forward (default 8)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each S1 configuration (default 5)")
    ap.add_argument("--t1-reps", type=int, default=1, help="timed runs of T1 (default 1; minutes each)")
    ap.add_argument("--t1-backend", choices=["torch", "onnxruntime"], default="onnxruntime",
                    help="T1's backend (default onnxruntime, its fastest here)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="S1 only, 3 runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.t1_reps = min(args.reps, 3), 0
    torch.set_num_threads(args.threads)

    from mkd.inference import Segmenter, onnxruntime_available
    from mkd.networks import build, save_checkpoint

    path = Path(args.volume)
    ort = onnxruntime_available()
    with tempfile.TemporaryDirectory(prefix="mkd-bench-") as tmp:
        run = {"image_size": [args.size, args.size]}
        torch.manual_seed(0)
        s1 = save_checkpoint(Path(tmp) / "s1.pt", build("s1"), run=run)
        common = {"device": "cpu", "threads": args.threads, "batch_size": args.batch_size}
        configs = [
            ("S1", "torch eager", lambda: Segmenter(s1, backend="torch", channels_last=False, **common)),
            ("S1", "torch channels_last", lambda: Segmenter(s1, backend="torch", **common)),
        ]
        if ort:
            configs += [
                ("S1", "onnxruntime", lambda: Segmenter(s1, backend="onnxruntime", **common)),
                ("S1", "onnxruntime int8",
                 lambda: Segmenter(s1, backend="onnxruntime", quantize="int8", calibration=path, **common)),
            ]  # fmt: skip
        if args.t1_reps:
            t1 = save_checkpoint(Path(tmp) / "t1.pt", build("t1"), run=run)
            t1_backend = args.t1_backend if ort else "torch"
            t1_name = "onnxruntime" if t1_backend == "onnxruntime" else "torch channels_last"
            configs.append(("T1", t1_name, lambda: Segmenter(t1, backend=t1_backend, **common)))
        plan = []
        for model, backend, make in configs:
            t0 = time.perf_counter()
            seg = make()
            setup = time.perf_counter() - t0
            reps = args.t1_reps if model == "T1" else args.reps
            if model == "T1":  # warm-up: one batch (a whole volume takes minutes)
                seg.backend(torch.rand(args.batch_size, 3, args.size, args.size))
            else:  # warm-up: one volume (allocator, kernels, ORT's first run)
                seg.segment(path)
            params = sum(p.numel() for p in seg.model.parameters())
            plan.append({"model": model, "backend": backend, "seg": seg, "reps": reps, "params": params,
                         "setup": setup, "runs": []})  # fmt: skip
            print(f"  ready: {model} {backend} (setup {setup:.1f} s)", file=sys.stderr, flush=True)
        for r in range(max(p["reps"] for p in plan)):
            for p in plan:
                if r < p["reps"]:
                    t0 = time.perf_counter()
                    res = p["seg"].segment(path)
                    p["runs"].append({"total": time.perf_counter() - t0, **res.timings})
                    p["slices"] = res.slices
                    print(f"  {p['model']} {p['backend']} run {r + 1}: {p['runs'][-1]['total']:.2f} s",
                          file=sys.stderr, flush=True)  # fmt: skip

        def med(p: dict, key: str) -> float:
            return statistics.median(run[key] for run in p["runs"])

        print(f"volume {path.name}, {plan[0]['slices']} slices, network input {args.size}²; "
              f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; batch {args.batch_size}; "
              "median of the runs")  # fmt: skip
        header = ["model", "backend", "params", "runs", "per volume", "network", "network / slice",
                  "read", "preprocess", "invert", "LCC"]  # fmt: skip
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for p in plan:
            cells = [p["model"], p["backend"], f"{p['params'] / 1e6:.3f} M", str(len(p["runs"])),
                     f"{med(p, 'total'):.2f} s", f"{med(p, 'network'):.2f} s",
                     f"{1000 * med(p, 'network') / p['slices']:.1f} ms"]  # fmt: skip
            cells += [f"{med(p, k):.2f} s" for k in ("load", "preprocess", "invert", "postprocess")]
            print("| " + " | ".join(cells) + " |")
        s1 = [p for p in plan if p["model"] == "S1"]
        best = min(s1, key=lambda p: med(p, "total"))
        total = med(best, "total")
        print()
        if total <= TARGET_S:
            print(f"S1 meets the target: {total:.2f} s per volume end to end on {args.threads} threads "
                  f"({best['backend']}) <= {TARGET_S:g} s")  # fmt: skip
        else:
            parts = ", ".join(f"{k} {med(best, k):.2f} s" for k in PARTS)
            print(f"S1 misses the target by {total - TARGET_S:.2f} s: {total:.2f} s per volume on {args.threads} "
                  f"threads ({best['backend']}) > {TARGET_S:g} s; the time goes to {parts}")  # fmt: skip
        for t in (p for p in plan if p["model"] == "T1"):
            same = next((p for p in s1 if p["backend"] == t["backend"]), None)
            if same is None:
                continue
            print(f"T1/S1 on {t['backend']}: {med(t, 'total') / med(same, 'total'):.1f}x per volume end to end, "
                  f"{med(t, 'network') / med(same, 'network'):.1f}x network only (target >= 50x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
