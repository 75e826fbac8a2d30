"""CPU inference time per CT volume: student S1 on every backend against teacher T1, measured side by side.

Runs ``mkd.inference.Segmenter.segment`` end to end (read the NIfTI, the ``mkd prepare``
preprocessing, slices in batches through the network, inverse resampling, threshold, largest
connected component; no writing) on the real 112-slice CT sample at 256², for

- S1 (thesis width, 57 k parameters) on PyTorch eager (NCHW), PyTorch channels-last,
  ONNX Runtime (fp32), ONNX Runtime int8 (``mkd.export.INT8_RECIPE``) and, where the CPU has
  native bf16, PyTorch bf16; the PyTorch rows run the network's inference copy
  (``mkd.networks.fuse_for_inference``), as ``mkd infer`` does, and two more rows run the network
  as trained at batch 8 (channels-last fp32 and bf16), the PyTorch path before the copy existed, so
  the copy's gain is measured side by side;
- T1 (thesis width, 43 M parameters) on one backend (``--t1-backend``, default ONNX Runtime).

Random weights (time does not depend on them), saved as checkpoints in a temporary folder so
the ONNX graphs are exported and cached as ``mkd infer`` does (export time is not timed); or,
with ``--checkpoint CKPT --data DATA``, a trained S1 at its own input size, and then every S1
row also gives its pooled and per-volume test Dice on DATA (int8 calibrated on DATA's
training list), so a speed is only claimed for a backend whose Dice is within 0.005 of fp32.
``--dicom-slices N`` also times every S1 row from a DICOM series: the sample resampled to
512² × N and written as one (``benchmarks/bench_dicom.py``), the issue's 150-slice case.
Every S1 configuration gets one warm-up volume (T1: one batch), then the runs are interleaved (S1 configurations
and T1 take turns) so all see the same machine load; each figure is the median of its runs.
It prints a markdown table (seconds per volume end to end and network only, the parts:
read / preprocess / network / invert / LCC), the S1/T1 ratio on the same backend, and whether
S1 meets 2 s per volume (or by how much it misses, and where the time goes).

Usage::

    python benchmarks/bench_inference.py --threads 2                # S1 x4 backends (5 runs), T1 1 run (~5 min)
    python benchmarks/bench_inference.py --threads 2 --quick        # S1 only, 3 runs (~1 min)
    python benchmarks/bench_inference.py --volume my_ct.nii.gz --size 96 --t1-backend torch
    python benchmarks/bench_inference.py --quick --checkpoint RUN/models/model.pt --data DATA --dicom-slices 150
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
TARGET_S = 1.0  # S1 per volume from NIfTI
TARGET_DICOM_S = 2.0  # S1 from a 150-slice DICOM series
DICE_TOLERANCE = 0.005


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", default=str(SAMPLE), help="NIfTI / DICOM volume (default: the real CT sample)")
    ap.add_argument("--size", type=int, default=256, help="network input size (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every backend (default 2)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="slices per forward (default: each backend's own, as mkd infer: "
                         "ONNX Runtime 8, PyTorch 2^18 pixels)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each S1 configuration (default 5)")
    ap.add_argument("--t1-reps", type=int, default=1, help="timed runs of T1 (default 1; minutes each)")
    ap.add_argument("--t1-backend", choices=["torch", "onnxruntime"], default="onnxruntime",
                    help="T1's backend (default onnxruntime, its fastest here)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="S1 only, 3 runs")
    ap.add_argument("--checkpoint", default=None, help="a trained S1 instead of random weights (needs --data)")
    ap.add_argument("--data", default=None, help="its prepared dataset: test Dice per backend, int8 calibration")
    ap.add_argument("--dicom-slices", type=int, default=0, metavar="N",
                    help="also time S1 from a 512² x N DICOM series written from the volume (0: no)")  # fmt: skip
    args = ap.parse_args(argv)
    if (args.checkpoint is None) != (args.data is None):
        ap.error("--checkpoint and --data go together")
    if args.quick:
        args.reps, args.t1_reps = min(args.reps, 3), 0
    torch.set_num_threads(args.threads)

    from mkd.inference import Segmenter, TorchBackend, bf16_supported, onnxruntime_available
    from mkd.networks import CheckpointRecord, build, load_network, save_checkpoint

    path = Path(args.volume)
    ort = onnxruntime_available()
    with tempfile.TemporaryDirectory(prefix="mkd-bench-") as tmp:
        if args.checkpoint is not None:
            s1 = Path(tmp) / "s1.pt"  # a copy: the ONNX graphs are cached beside it, not beside the user's run
            s1.write_bytes(Path(args.checkpoint).read_bytes())
            args.size = int(CheckpointRecord.from_checkpoint(load_network(s1, map_location="cpu")[1]).image_size[0])
        run = {"image_size": [args.size, args.size]}
        torch.manual_seed(0)
        if args.checkpoint is None:
            s1 = save_checkpoint(Path(tmp) / "s1.pt", build("s1"), run=run)
        common = {"device": "cpu", "threads": args.threads, "batch_size": args.batch_size}
        calib = {"data_dir": args.data} if args.data else {"calibration": path}
        bf16 = bf16_supported(torch.device("cpu"))

        def as_trained(**kw) -> Segmenter:  # the network as trained, not its inference copy, at batch 8
            seg = Segmenter(s1, backend="torch", **{**common, "batch_size": args.batch_size or 8}, **kw)
            seg.backend = TorchBackend(seg.model, seg.device, bf16=kw.get("quantize") == "bf16", fuse=False)
            return seg

        configs = [
            ("S1", "torch eager", lambda: Segmenter(s1, backend="torch", channels_last=False, **common)),
            ("S1", "torch channels_last, as trained", as_trained),
            ("S1", "torch channels_last", lambda: Segmenter(s1, backend="torch", **common)),
        ]
        if bf16:
            configs.append(("S1", "torch bf16, as trained", lambda: as_trained(quantize="bf16")))
        if ort:
            configs += [
                ("S1", "onnxruntime", lambda: Segmenter(s1, backend="onnxruntime", **common)),
                ("S1", "onnxruntime int8",
                 lambda: Segmenter(s1, backend="onnxruntime", quantize="int8", **calib, **common)),
            ]  # fmt: skip
        if bf16:
            configs.append(("S1", "torch bf16", lambda: Segmenter(s1, quantize="bf16", **common)))
        dicom = None
        if args.dicom_slices:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_dicom import write_series

            dicom = Path(tmp) / "dicom"
            write_series(dicom, args.dicom_slices, 512)
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
                seg.backend(torch.rand(seg.batch_size, 3, args.size, args.size))
            else:  # warm-up: one volume (allocator, kernels, ORT's first run)
                seg.segment(path)
            params = sum(p.numel() for p in seg.model.parameters())
            dice = None
            if args.data and model == "S1":
                from mkd.evaluation import evaluate_checkpoint

                summary = evaluate_checkpoint(s1, args.data, runner=seg.backend).summary
                dice = (summary["pooled"]["dice"], summary["per_volume"]["dice"]["mean"])
            if dicom is not None and model == "S1":
                seg.segment(dicom)  # warm-up at the DICOM grid
            plan.append({"model": model, "backend": backend, "seg": seg, "reps": reps, "params": params,
                         "setup": setup, "runs": [], "dicom": [], "dice": dice})  # fmt: skip
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
                    if dicom is not None and p["model"] == "S1":
                        t0 = time.perf_counter()
                        p["seg"].segment(dicom)
                        p["dicom"].append(time.perf_counter() - t0)

        def med(p: dict, key: str) -> float:
            return statistics.median(run[key] for run in p["runs"])

        print(f"volume {path.name}, {plan[0]['slices']} slices, network input {args.size}²; "
              f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
              "median of the runs")  # fmt: skip
        header = ["model", "backend", "batch", "params", "runs", "per volume", "network", "network / slice",
                  "read", "preprocess", "invert", "LCC"]  # fmt: skip
        if args.data:
            header += ["test Dice pooled / volume"]
        if dicom is not None:
            header += [f"per volume from DICOM ({args.dicom_slices} x 512²)"]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for p in plan:
            cells = [p["model"], p["backend"], str(p["seg"].batch_size), f"{p['params'] / 1e6:.3f} M",
                     str(len(p["runs"])),
                     f"{med(p, 'total'):.2f} s", f"{med(p, 'network'):.2f} s",
                     f"{1000 * med(p, 'network') / p['slices']:.1f} ms"]  # fmt: skip
            cells += [f"{med(p, k):.2f} s" for k in ("load", "preprocess", "invert", "postprocess")]
            if args.data:
                cells += [f"{p['dice'][0]:.4f} / {p['dice'][1]:.4f}" if p["dice"] else ""]
            if dicom is not None:
                cells += [f"{statistics.median(p['dicom']):.2f} s" if p["dicom"] else ""]
            print("| " + " | ".join(cells) + " |")
        s1 = [p for p in plan if p["model"] == "S1"]
        if args.data:  # a speed counts only for a backend whose Dice stays within the tolerance of fp32
            ref = next(p for p in s1 if p["backend"] == ("onnxruntime" if ort else "torch channels_last"))["dice"]
            kept = [p for p in s1 if max(abs(a - b) for a, b in zip(p["dice"], ref)) <= DICE_TOLERANCE]
            dropped = [p["backend"] for p in s1 if p not in kept]
            print(f"Dice within {DICE_TOLERANCE} of fp32: {', '.join(p['backend'] for p in kept)}"
                  f"{f'; not: {dropped}' if dropped else ''}")  # fmt: skip
            s1 = kept
        if dicom is not None:
            fastest = min(s1, key=lambda p: statistics.median(p["dicom"]))
            t = statistics.median(fastest["dicom"])
            print(f"S1 from a {args.dicom_slices}-slice DICOM series: {t:.2f} s ({fastest['backend']}) "
                  f"{'<=' if t <= TARGET_DICOM_S else '>'} {TARGET_DICOM_S:g} s")  # fmt: skip
        by_name = {p["backend"]: p for p in plan if p["model"] == "S1"}
        for name in ("torch channels_last", "torch bf16"):
            if name in by_name and f"{name}, as trained" in by_name:
                new, old = by_name[name], by_name[f"{name}, as trained"]
                print(f"{name}: the inference copy (batch {new['seg'].batch_size}) against the network as trained "
                      f"(batch {old['seg'].batch_size}): {med(old, 'network') / med(new, 'network'):.2f}x network, "
                      f"{med(old, 'total') / med(new, 'total'):.2f}x per volume")  # fmt: skip
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
