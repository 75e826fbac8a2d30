"""A small 3D MONAI bundle trained here, in the model zoo's layout: a teacher to try ``mkd distill`` with.

The tests and docs/teachers.md need a bundle teacher that was never downloaded. This trains a
3D MONAI ``UNet`` (two output channels, softmax, as the zoo's ``spleen_ct_segmentation``) on the
training patients of a prepared dataset, from the source volumes ``mkd prepare`` read, and writes

    OUT/configs/inference.json   network_def, preprocessing, inferer, postprocessing (zoo style)
    OUT/configs/metadata.json
    OUT/models/model.pt          the state dict
    OUT/models/model.ts          the same network as TorchScript (``torchscript=True``)

Run it as ``python -m mkd.teachers.example --data mkd_data --out phantom_bundle``. The phantom
teaches the pipeline, not anatomy: a bundle trained on it finds no spleen in real CT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["bundle_config", "train_example_bundle"]

logger = logging.getLogger(__name__)


def bundle_config(
    window: Sequence[float],
    pixdim: Sequence[float],
    roi_size: Sequence[int],
    channels: Sequence[int],
    out_channels: int = 2,
) -> dict[str, Any]:
    """The ``inference.json`` of the example bundle: the zoo's spleen layout, smaller."""
    low, high = (float(w) for w in window)
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": int(out_channels),
            "channels": [int(c) for c in channels],
            "strides": [2] * (len(channels) - 1),
            "num_res_units": 1,
            "norm": "batch",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [float(p) for p in pixdim], "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": low,
                    "a_max": high,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },  # fmt: skip
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(r) for r in roi_size],
            "sw_batch_size": 4,
            "overlap": 0.5,
        },  # fmt: skip
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },  # fmt: skip
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }


def _volumes(info: dict, split: str) -> list[dict[str, str]]:
    from mkd.teachers.volume import source_volume

    out = []
    for pid, v in info["volumes"].items():
        if v["split"] == split:
            image = source_volume(info, pid)
            label = Path(v["label"])
            if not label.is_file():
                label = Path(info["task"]["dir"]) / label.parent.name / label.name
            out.append({"image": str(image), "label": str(label), "patient": pid})
    return out


def train_example_bundle(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    steps: int = 600,
    roi_size: Sequence[int] = (64, 64, 32),
    channels: Sequence[int] = (8, 16, 32, 64),
    pixdim: Sequence[float] = (4.0, 4.0, 5.0),
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    seed: int = 0,
    torchscript: bool = True,
) -> dict[str, Any]:
    """Train the example 3D bundle on the dataset's training patients (all their labels) and write it to ``out``.

    Returns:
        ``{"steps", "seconds", "validation_dice"}``: mean per-volume Dice of the validation patients on
        the bundle's own grid (argmax of the softmax), also written to ``OUT/models/training.json``.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        ScaleIntensityRanged,
        Spacingd,
    )
    from monai.utils import set_determinism

    from mkd.data.prepare import load_prepare_info
    from mkd.metrics import metrics_from_counts
    from mkd.utils import atomic_dir

    info = load_prepare_info(data_dir)
    window = info["settings"]["window"]
    if window == "max":
        window = (-57.0, 164.0)
    config = bundle_config(window, pixdim, roi_size, channels)  # it infers with the window it was trained on
    set_determinism(seed=seed)
    keys = ("image", "label")
    fixed = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(pixdim), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
    ]
    random = [
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=tuple(roi_size), pos=1, neg=1, num_samples=2, allow_smaller=True
        ),  # fmt: skip
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
    ]
    train = CacheDataset(_volumes(info, "training"), Compose(fixed + random), cache_rate=1.0, progress=False)
    loader = DataLoader(train, batch_size=max(1, batch_size // 2), shuffle=True, num_workers=0)
    net_kwargs = {k: v for k, v in config["network_def"].items() if k != "_target_"}
    network = UNet(**net_kwargs)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    t0 = time.perf_counter()
    step = 0
    network.train()
    while step < steps:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(network(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0 or step == steps:
                logger.info("example bundle: step %d/%d, loss %.4f", step, steps, loss.item())
            if step >= steps:
                break
    seconds = time.perf_counter() - t0
    network.eval()
    dices = []
    with torch.no_grad():
        for item in _volumes(info, "validation"):
            d = Compose(fixed)(item)
            logits = sliding_window_inference(d["image"][None], config["inferer"]["roi_size"], 4, network, overlap=0.5)
            pred = logits.argmax(1)[0].numpy() == 1
            true = d["label"][0].numpy() > 0.5
            counts = (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()
            dices.append(float(metrics_from_counts(*counts)["dice"]))
    result = {"steps": steps, "seconds": round(seconds, 1), "validation_dice": float(np.mean(dices)) if dices else None,
              "seed": seed, "pixdim": list(pixdim), "channels": list(channels)}  # fmt: skip
    with atomic_dir(out) as tmp:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
        meta = {"version": "0.1.0", "name": "mkd example 3D spleen bundle (phantom)",
                "description": "A small 3D UNet trained by mkd.teachers.example on a prepared dataset's training "
                "patients; the phantom teaches the pipeline, not anatomy.", "training": result}  # fmt: skip
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        torch.save(network.state_dict(), tmp / "models" / "model.pt")
        if torchscript:
            torch.jit.script(network).save(str(tmp / "models" / "model.ts"))
        (tmp / "models" / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mkd.teachers.example", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mkd_data", help="a folder written by `mkd prepare`")
    parser.add_argument("--out", default="phantom_bundle", help="the bundle folder to write (must not exist)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pixdim", default="4,4,5", help="voxel size of the bundle's Spacingd, mm (X,Y,Z)")
    parser.add_argument("--channels", default="8,16,32,64", help="UNet channels per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pixdim = tuple(float(v) for v in args.pixdim.split(","))
    channels = tuple(int(v) for v in args.channels.split(","))
    result = train_example_bundle(args.data, args.out, args.steps, seed=args.seed, pixdim=pixdim, channels=channels)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
