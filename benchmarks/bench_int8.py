"""int8 (or bf16) against fp32 for trained students: Dice, mask agreement and speed, side by side in one run.

For each student checkpoint and its prepared dataset: the patients of ``--split`` evaluated
(``mkd.evaluation``: pooled Dice, per-volume Dice, with the largest-component filter too) with ONNX
Runtime fp32 and ONNX Runtime int8 (``mkd infer --quantize int8``: static quantisation, the recipe of
``mkd.export.INT8_RECIPE``, calibrated on the checkpoint's training list); the share of voxels whose
mask is the same with both on the real CT sample (112 slices); and the network time on that sample,
the two runners alternating. The closing lines say whether every checkpoint stays within the
tolerance (Dice change ≤ 0.005, ≥ 99.5 % of the voxels identical): int8 may become the CPU default
only then.

Usage::

    python benchmarks/bench_int8.py RUN1/models/model.pt RUN2/models/model.pt ... --data mkd_data --threads 2
    python benchmarks/bench_int8.py ... --variant bf16     # PyTorch autocast bf16 against ONNX Runtime fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "totalseg_example" / "ct_full.nii.gz"
DICE_TOLERANCE = 0.005
VOXEL_AGREEMENT = 0.995


def _dice(summary: dict) -> dict[str, float]:
    return {"pooled": summary["pooled"]["dice"], "volume": summary["per_volume"]["dice"]["mean"],
            "volume_lcc": summary["per_volume_lcc"]["dice"]["mean"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="student checkpoints (RUN/models/model.pt)")
    ap.add_argument("--data", required=True, help="their prepared dataset (evaluation, calibration slices)")
    ap.add_argument("--split", default="test", help="datalist split to evaluate (default test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed volumes per runner and checkpoint (default 3)")
    ap.add_argument("--variant", choices=["int8", "bf16"], default="int8",
                    help="int8 (ONNX Runtime) or bf16 (PyTorch autocast) against ONNX Runtime fp32")  # fmt: skip
    ap.add_argument("--speed-size", type=int, default=None, metavar="N",
                    help="also time the network alone at N x N on the sample's slices, first checkpoint's weights: "
                         "fp32, int8 as the recipe, int8 with every layer quantised")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mkd.evaluation import evaluate_checkpoint
    from mkd.export import INT8_RECIPE
    from mkd.inference import Segmenter

    common = {"data_dir": args.data, "device": "cpu", "threads": args.threads}
    v = args.variant
    header = ["checkpoint", "fp32 pooled", f"{v} − fp32 pooled", "fp32 volume", f"{v} − fp32 volume",
              f"{v} − fp32 volume (LCC)", "voxels identical (CT sample)", f"network fp32 / {v}",
              f"end to end fp32 / {v}"]  # fmt: skip
    what = f"int8 recipe {INT8_RECIPE}" if v == "int8" else "bf16 (PyTorch autocast)"
    print(f"{what}; {args.split} patients of {args.data}; speed on {SAMPLE.name}, "
          f"{args.threads} threads, median of {args.reps}")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    changes, agreements, ratios = [], [], []
    for ckpt in args.checkpoints:
        segs = {
            "fp32": Segmenter(ckpt, backend="onnxruntime", **common),
            "int8": Segmenter(ckpt, quantize=v, backend="onnxruntime" if v == "int8" else "torch", **common),
        }
        dice = {k: _dice(evaluate_checkpoint(ckpt, args.data, split=args.split, runner=s.backend).summary)
                for k, s in segs.items()}  # fmt: skip
        masks = {k: s.segment(SAMPLE).mask for k, s in segs.items()}  # also the warm-up
        agree = float(np.mean(np.asarray(masks["fp32"]) == np.asarray(masks["int8"])))
        net: dict[str, list[float]] = {"fp32": [], "int8": []}
        total: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(args.reps):
            for k, s in segs.items():
                t0 = time.perf_counter()
                net[k].append(s.segment(SAMPLE).timings["network"])
                total[k].append(time.perf_counter() - t0)
        change = {m: dice["int8"][m] - dice["fp32"][m] for m in dice["fp32"]}
        changes.append(change)
        agreements.append(agree)
        fp, q = statistics.median(net["fp32"]), statistics.median(net["int8"])
        ratios.append(fp / q)
        tf, tq = statistics.median(total["fp32"]), statistics.median(total["int8"])
        name = Path(ckpt).parent.parent.name or str(ckpt)
        print(f"| {name} | {dice['fp32']['pooled']:.4f} | {change['pooled']:+.4f} | {dice['fp32']['volume']:.4f} | "
              f"{change['volume']:+.4f} | {change['volume_lcc']:+.4f} | {100 * agree:.3f} % | {fp:.2f} / {q:.2f} s | "
              f"{tf:.2f} / {tq:.2f} s |")  # fmt: skip
    for m in ("pooled", "volume", "volume_lcc"):
        d = [c[m] for c in changes]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        print(f"{v} − fp32 {m} Dice over {len(d)} checkpoints: {statistics.mean(d):+.4f} ± {sd:.4f}, "
              f"largest |change| {max(abs(x) for x in d):.4f}")  # fmt: skip
    worst = max(abs(c[m]) for c in changes for m in c)
    within = worst <= DICE_TOLERANCE and min(agreements) >= VOXEL_AGREEMENT
    print(f"voxels identical: min {100 * min(agreements):.3f} %; network time fp32/{v} "
          f"{statistics.median(ratios):.2f}x (median over checkpoints)")  # fmt: skip
    print(f"{'within' if within else 'NOT within'} tolerance (|Dice change| <= {DICE_TOLERANCE}, voxels identical "
          f">= {100 * VOXEL_AGREEMENT} %) on every checkpoint")  # fmt: skip
    if args.speed_size:
        _network_speed(args.checkpoints[0], args.data, args.speed_size, args.threads, max(args.reps, 5))
    return 0


def _network_speed(checkpoint: str, data: str, size: int, threads: int, reps: int) -> None:
    """The ONNX graph alone at ``size``²: fp32, the int8 recipe and all-int8, the runs alternating."""
    import tempfile

    import torch.nn.functional as F

    from mkd.data.transforms import volume_to_slices
    from mkd.export import export_model, quantize_int8
    from mkd.inference import load_volume
    from mkd.inference.backends import OnnxRuntimeBackend, TorchBackend, bf16_supported
    from mkd.inference.geometry import preprocess
    from mkd.inference.settings import resolve_settings
    from mkd.networks import CheckpointRecord, load_network

    model, ckpt = load_network(checkpoint, map_location="cpu")
    settings = resolve_settings(CheckpointRecord.from_checkpoint(ckpt), data_dir=data)

    pre = preprocess(load_volume(SAMPLE), settings)
    x = torch.as_tensor(volume_to_slices(pre.image, channels=settings.channels), dtype=torch.float32)
    x = F.interpolate(x, size=(size, size), mode="area").numpy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_model(model.eval(), "onnx", fp32, (size, size), {"source": "bench"}, check=False)
        calib = x[np.linspace(0, len(x) - 1, 64).round().astype(int)]
        graphs = {"fp32": fp32, "int8 (recipe)": quantize_int8(fp32, Path(tmp) / "q.onnx", calib),
                  "int8 (every layer)": quantize_int8(fp32, Path(tmp) / "qa.onnx", calib, keep_fp32=[])}  # fmt: skip
        runners = {k: OnnxRuntimeBackend(p, threads) for k, p in graphs.items()}
        cpu = torch.device("cpu")
        runners["torch fp32 (channels_last)"] = TorchBackend(model, cpu)
        if bf16_supported(cpu):
            runners["torch bf16 (channels_last)"] = TorchBackend(model, cpu, bf16=True)
        times: dict[str, list[float]] = {k: [] for k in runners}
        batch = torch.from_numpy(x)
        for r in runners.values():
            r(batch[:8])  # warm-up
        for _ in range(reps):
            for k, r in runners.items():
                t0 = time.perf_counter()
                for i in range(0, len(batch), 16):
                    r(batch[i : i + 16])
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    cells = [f"{k} {statistics.median(v):.2f} s ({base / statistics.median(v):.2f}x)" for k, v in times.items()]
    print(f"network alone, {len(x)} slices at {size}x{size}, {threads} threads, median of {reps}: " + ", ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
