"""int8 against fp32 for a trained student: Dice on the test patients and speed, side by side in one run.

For one student checkpoint and its prepared dataset, evaluates the test patients (``mkd.evaluation``:
pooled Dice, per-volume Dice and HD95, with the largest-component filter too) with three runners:
PyTorch, ONNX Runtime fp32 and ONNX Runtime int8 (static quantisation calibrated on 64 slices of the
training split, ``mkd infer --quantize int8``), and times the network on the real CT sample
(112 slices) at the checkpoint's input size. Prints the Dice change of int8 against fp32; the
issue's rule: int8 may become the default only if the Dice change is within 0.005.

Usage::

    python benchmarks/bench_int8.py runs/student-s1/models/model.pt --data mkd_data --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "totalseg_example" / "ct_full.nii.gz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a student checkpoint (RUN/models/model.pt)")
    ap.add_argument("--data", required=True, help="its prepared dataset (test patients, calibration slices)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed volumes per runner (default 5)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mkd.evaluation import evaluate_checkpoint
    from mkd.inference import Segmenter

    common = {"data_dir": args.data, "device": "cpu", "threads": args.threads}
    segs = {
        "torch": Segmenter(args.checkpoint, backend="torch", **common),
        "onnxruntime fp32": Segmenter(args.checkpoint, backend="onnxruntime", **common),
        "onnxruntime int8": Segmenter(args.checkpoint, backend="onnxruntime", quantize="int8", **common),
    }
    rows = {}
    for name, seg in segs.items():
        s = evaluate_checkpoint(args.checkpoint, args.data, runner=seg.backend).summary
        seg.segment(SAMPLE)  # warm-up
        rows[name] = {"pooled": s["pooled"]["dice"], "volume": s["per_volume"]["dice"]["mean"],
                      "volume_lcc": s["per_volume_lcc"]["dice"]["mean"], "hd95": s["per_volume"]["hd95"]["mean"],
                      "hd95_lcc": s["per_volume_lcc"]["hd95"]["mean"], "n": s["n_volumes"], "net": []}  # fmt: skip
    for _ in range(args.reps):
        for name, seg in segs.items():
            t0 = time.perf_counter()
            rows[name]["net"].append(seg.segment(SAMPLE).timings["network"])
            rows[name].setdefault("total", []).append(time.perf_counter() - t0)
    size = "x".join(map(str, segs["torch"].settings.image_size))
    print(f"{args.checkpoint}: {rows['torch']['n']} test volumes of {args.data}; speed on {SAMPLE.name} at {size}, "
          f"{args.threads} threads, median of {args.reps}")  # fmt: skip
    header = ["runner", "pooled Dice", "volume Dice", "volume Dice (LCC)", "HD95 mm", "HD95 mm (LCC)",
              "network / volume", "per volume"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, r in rows.items():
        cells = [name, *(f"{r[k]:.4f}" for k in ("pooled", "volume", "volume_lcc")),
                 *(f"{r[k]:.2f}" for k in ("hd95", "hd95_lcc")),
                 f"{statistics.median(r['net']):.2f} s", f"{statistics.median(r['total']):.2f} s"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    a, b = rows["onnxruntime fp32"], rows["onnxruntime int8"]
    change = {k: b[k] - a[k] for k in ("pooled", "volume", "volume_lcc")}
    worst = max(abs(v) for v in change.values())
    print("int8 - fp32 Dice: " + ", ".join(f"{k} {v:+.4f}" for k, v in change.items())
          + f"; {'within' if worst <= 0.005 else 'beyond'} 0.005; network "
          f"{statistics.median(a['net']) / statistics.median(b['net']):.2f}x faster")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
