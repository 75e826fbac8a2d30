"""CPU inference time per CT volume: student S1 against teacher T1, measured side by side.

Runs ``mkd.inference.Segmenter`` (read, the ``mkd prepare`` preprocessing, slices in batches
through the network, inverse resampling, threshold, no writing) on one ~100-slice volume
for each network, with random weights (time does not depend on them), and prints a
markdown table: end-to-end seconds per volume, the network's share, milliseconds per
slice, and each model's time as a multiple of S1's at the same size. The goal of the
thesis's setting is S1 at least 100x faster than T1 (thesis width, 43 M parameters) at 256².

Runs of the models are interleaved (s1, t1, s1, ...) so that both see the same machine
load; each figure is the median of its runs. Multi-task teachers run with
``reconstruct=False``.

Usage::

    python benchmarks/bench_inference.py --threads 1            # s1, t1:small at 96 and 256, t1:thesis at 256 (~6 min)
    python benchmarks/bench_inference.py --models s1,t1:small --sizes 96 --reps 5
    python benchmarks/bench_inference.py --volume my_ct.nii.gz --models s1,s2,t1:thesis --sizes 256

Default volume: the real TotalSegmentator CT sample (122 x 101 x 112, 3 mm), or, when it is not
there, a phantom volume of 128 x 128 x 100 voxels.
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
DEFAULT_MODELS = "s1,t1:small,t1:thesis"


def _volume(path: str | None, tmp: Path) -> Path:
    if path:
        return Path(path)
    if SAMPLE.is_file():
        return SAMPLE
    import nibabel as nib

    from mkd.data.phantom import phantom_case

    image, _, affine = phantom_case(shape=(128, 128, 100), seed=0)
    out = tmp / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), out)
    return out


def _parse_models(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        name, _, preset = item.strip().partition(":")
        out.append((name, preset or "thesis"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", help="NIfTI / DICOM volume (default: the real CT sample, else a phantom)")
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"name[:preset],... (default {DEFAULT_MODELS})")
    ap.add_argument("--sizes", default="96,256", help="network input sizes (default 96,256)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per model (default 3)")
    ap.add_argument("--heavy-reps", type=int, default=1, help="timed runs of thesis-width teachers (default 1)")
    ap.add_argument("--heavy-sizes", default="256", help="sizes at which thesis-width teachers run (default 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="slices per forward (default 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from mkd.inference import Segmenter, load_volume
    from mkd.networks import build

    models = _parse_models(args.models)
    sizes = [int(s) for s in args.sizes.split(",")]
    heavy_sizes = {int(s) for s in args.heavy_sizes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        path = _volume(args.volume, Path(tmp))
        volume = load_volume(path)
        print(
            f"volume {path} {tuple(volume.shape)}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"{os.cpu_count()} CPU(s); batch {args.batch_size}; random weights, fp32, no grad"
        )
        rows = []
        for size in sizes:
            plan = []
            for name, preset in models:
                heavy = preset == "thesis" and name in ("unet", "t1", "t2")
                if heavy and size not in heavy_sizes:
                    continue
                torch.manual_seed(0)
                net = build(name, preset)
                seg = Segmenter(net, size=size, batch_size=args.batch_size, device="cpu")
                with torch.no_grad():  # warm-up (allocator, kernels): one batch, not a whole volume
                    net.eval()(torch.rand(args.batch_size, net.in_channels, size, size))
                plan.append(
                    {
                        "name": f"{name}:{preset}",
                        "seg": seg,
                        "reps": args.heavy_reps if heavy else args.reps,
                        "params": sum(p.numel() for p in net.parameters()),
                        "total": [],
                        "network": [],
                    }
                )
            for r in range(max(p["reps"] for p in plan)):
                for p in plan:
                    if r < p["reps"]:
                        t0 = time.perf_counter()
                        res = p["seg"].segment(volume)
                        p["total"].append(time.perf_counter() - t0)
                        p["network"].append(res.timings["network"])
                        p["slices"] = res.slices
                        print(f"  {size}: {p['name']} run {r + 1}: {p['total'][-1]:.2f} s", file=sys.stderr, flush=True)
            base = next((p for p in plan if p["name"].startswith("s1")), plan[0])
            base_total = statistics.median(base["total"])
            base_net = statistics.median(base["network"])
            for p in plan:
                total, netw = statistics.median(p["total"]), statistics.median(p["network"])
                rows.append(
                    [
                        p["name"],
                        f"{p['params'] / 1e6:.3f} M",
                        f"{size}²",
                        str(p["slices"]),
                        str(len(p["total"])),
                        f"{total:.2f} s",
                        f"{netw:.2f} s",
                        f"{1000 * netw / p['slices']:.1f} ms",
                        f"{total / base_total:.1f}x",
                        f"{netw / base_net:.1f}x",
                    ]
                )
        header = [
            "model",
            "params",
            "size",
            "slices",
            "runs",
            "per volume",
            "network",
            "network / slice",
            "volume / s1",
            "network / s1",
        ]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
