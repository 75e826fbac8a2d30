"""Forward and training-step time of every mkd network on this machine's CPU.

Prints a markdown table: per network (and width preset) and input size, the median
no-grad forward time and training-step time (forward + backward + AdamW step) for a
batch, and both as a ratio to ``s1`` at the same size.

The forward is the inference / teacher-caching cost: multi-task teachers run with
``reconstruct=False`` (segmentation path only). The training step is the teacher's
own training step: multi-task teachers compute both outputs and
``BCE(seg) + 0.2 * MSE(recon, x)``; the others BCE on the logits.

Usage::

    python benchmarks/bench_networks.py --threads 1          # default selection (~8 min on 2 cores)
    python benchmarks/bench_networks.py --nets s1,s2,t1:small --sizes 96,128 --reps 5
    python benchmarks/bench_networks.py --nets t1:thesis --sizes 256 --reps 1

A network is ``name`` or ``name:preset`` (presets: thesis, medium, small, tiny).
``--heavy-sizes`` limits the sizes at which thesis-width teachers run (they take
seconds to a minute per step at 256x256 on a CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mkd.networks import FeatureRecorder, build

DEFAULT_NETS = "s1,s2,unet:small,t1:small,t2:small,unet:thesis,t1:thesis,t2:thesis"
HEAVY = {("unet", "thesis"), ("t1", "thesis"), ("t2", "thesis")}


def _time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(name: str, preset: str, size: int, batch: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    net = build(name, preset)
    x = torch.rand(batch, net.in_channels, size, size)
    y = (torch.rand(batch, net.out_channels, size, size) > 0.8).float()
    multitask = hasattr(net, "reconstruct")

    def forward() -> None:
        net.eval()
        if multitask:
            net.reconstruct = False
        with torch.no_grad():
            net(x)

    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    rec = FeatureRecorder(net, ["recon"]) if multitask else None

    def train_step() -> None:
        net.train()
        if multitask:
            net.reconstruct = True
            with rec.recording() as feats:
                seg = net(x)
            loss = F.binary_cross_entropy_with_logits(seg, y) + 0.2 * F.mse_loss(feats["recon"], x)
        else:
            loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fwd = _time(forward, reps, warmup)
    train = _time(train_step, reps, warmup)
    if rec is not None:
        rec.close()
    return {"name": name, "preset": preset, "params": net.num_parameters(), "size": size, "fwd": fwd, "train": train}


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=DEFAULT_NETS, help="comma-separated name[:preset] (default: %(default)s)")
    parser.add_argument("--sizes", default="96,128,256", help="input sizes (default: %(default)s)")
    parser.add_argument("--heavy-sizes", default="96", help="sizes for thesis-width teachers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    parser.add_argument("--heavy-reps", type=int, default=2, help="repetitions for thesis-width teachers")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    heavy_sizes = {int(s) for s in args.heavy_sizes.split(",") if s}
    nets = []
    for item in args.nets.split(","):
        name, _, preset = item.strip().partition(":")
        nets.append((name, preset or "thesis"))
    if ("s1", "thesis") not in nets:
        nets.insert(0, ("s1", "thesis"))  # the reference for the ratios

    rows = []
    t_start = time.perf_counter()
    for name, preset in nets:
        heavy = (name, preset) in HEAVY
        for size in sizes:
            if heavy and size not in heavy_sizes:
                continue
            r = bench_one(name, preset, size, args.batch, args.heavy_reps if heavy else args.reps, args.warmup)
            rows.append(r)
            print(
                f"# {name}:{preset} {size}: fwd {_fmt_time(r['fwd'])}, train {_fmt_time(r['train'])}",
                file=sys.stderr,
                flush=True,
            )
    ref = {r["size"]: r for r in rows if (r["name"], r["preset"]) == ("s1", "thesis")}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"CPU: {os.cpu_count()} cores (load average {load:.1f} at the end), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, batch {args.batch}, fp32, "
        f"median of {args.reps} ({args.heavy_reps} for thesis-width teachers) after {args.warmup} warm-up; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    print()
    print("| network | preset | params | size | no-grad forward | train step | forward / s1 | train / s1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s1 = ref.get(r["size"])
        fr = f"{r['fwd'] / s1['fwd']:.1f}x" if s1 else "-"
        tr = f"{r['train'] / s1['train']:.1f}x" if s1 else "-"
        params = f"{r['params'] / 1e6:.2f} M" if r["params"] >= 1e6 else f"{r['params'] / 1e3:.1f} k"
        print(
            f"| {r['name']} | {r['preset']} | {params} | {r['size']}² | {_fmt_time(r['fwd'])} | "
            f"{_fmt_time(r['train'])} | {fr} | {tr} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
