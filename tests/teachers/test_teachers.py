"""Teachers from outside mkd (mkd.teachers): a MONAI bundle folder or a TorchScript file as `mkd distill --teacher`.

The dataset is the tiny phantom prepared at 32x32 with ``keep="organ"`` (so a training slice's row in
``images/<pid>.npy`` is not its ``z``); its volumes have mixed orientations, so putting a teacher's
logits back on the prepared grid is not a no-op. The example bundle is trained once per module (a
few seconds); the runs are one epoch at 32x32.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mkd.cli import cli
from mkd.data import load_prepare_info, load_split
from mkd.data.teacher_cache import TeacherCache
from mkd.errors import InputError
from mkd.teachers import VolumeTeacher, binary_logits, load_teacher

SIZE = 32  # prepared slices and the student's image_size
CACHED_SPLITS = ("student", "transfer")  # what the default recipe caches: its training list and the transfer set
BUNDLE_ROI = (48, 48, 24)  # smaller than the bundle's ~90x90x42 grid: the sliding window tiles
BUNDLE_CHANNELS = (4, 8, 16)


# --- helpers ----------------------------------------------------------------------------------------


def _distill(teacher, data, out, *extra):
    """``mkd distill`` on the CPU (the tests compare its cache with teachers run here on the CPU)."""
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--epochs", "1",
            "--set", f"image_size=[{SIZE},{SIZE}]", "--device", "cpu", "--output", str(out), *extra]  # fmt: skip
    return CliRunner().invoke(cli, args)


def _one_error(res, out: Path, starts: str, *needles: str) -> str:
    """The run stopped with one ``Error:`` line starting with ``starts``, before training (no run left)."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert res.output.strip().splitlines()[-1] == errors[0], res.output
    assert errors[0].startswith(f"Error: {starts}"), errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists() or not (out / "models").exists(), sorted(p.name for p in out.iterdir())
    return errors[0]


def _cached(run_or_cache: Path) -> dict[str, np.ndarray]:
    """``{"patient:slice": (H, W) float32}`` of a teacher cache folder."""
    index = json.loads((run_or_cache / "index.json").read_text())
    assert index["names"] == ["logits"]
    logits = np.load(run_or_cache / "logits.npy")
    assert logits.dtype == np.float16 and logits.shape[1:] == (1, SIZE, SIZE)
    return {key: logits[row, 0].astype(np.float32) for key, row in index["rows"].items()}


def _build_cache(teacher, items, directory: Path) -> dict[str, np.ndarray]:
    """The teacher cache a distillation run builds for ``items`` (logits only, float16)."""
    TeacherCache.build(teacher, None, items, None, [], directory, (SIZE, SIZE), meta={"test": str(directory)})
    return _cached(directory)


def _items(data: Path, splits=CACHED_SPLITS) -> list[dict]:
    seen, out = set(), []
    for split in splits:
        for item in load_split(data, split):
            key = f"{item['patient']}:{item['slice']}"
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def _fp16_close(actual, expected, ulps: float = 1.0, atol: float = 1e-6) -> float:
    """Assert ``actual`` (from a float16 array) is ``expected`` up to ``ulps`` float16 steps; the worst error."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    step = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32)
    err = np.abs(actual - expected)
    assert (err <= ulps * step + atol).all(), (
        f"max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )
    return float(err.max())


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _NoVolume(torch.nn.Module):
    """Takes neither a 2D nor a 3D image batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 3:
            raise RuntimeError("expects (B, C, L) signals")
        return x


class _Flat(torch.nn.Module):
    """Takes any batch but loses its spatial layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_phantom, tmp_path_factory) -> Path:
    from mkd.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("teachers") / "data"
    prepare_dataset(tiny_phantom, out, size=SIZE, keep="organ", margin=1, seed=0)
    return out


def _write_bundle(folder: Path, config: dict, state_dict=None, script=None) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if state_dict is not None:
        torch.save(state_dict, folder / "models" / "model.pt")
    if script is not None:
        shutil.copy(script, folder / "models" / "model.ts")
    return folder


@pytest.fixture(scope="module")
def plain_config() -> dict:
    """The example bundle's inference.json, small."""
    from mkd.teachers.example import bundle_config

    return bundle_config((-57.0, 164.0), (4.0, 4.0, 5.0), BUNDLE_ROI, BUNDLE_CHANNELS)


@pytest.fixture(scope="module")
def plain_bundle(plain_config, tmp_path_factory) -> Path:
    """An untrained bundle (random weights): for the checks that stop before anything runs."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in plain_config["network_def"].items() if k != "_target_"})
    return _write_bundle(tmp_path_factory.mktemp("plain") / "bundle", plain_config, network.state_dict())


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:
    """The example bundle (mkd.teachers.example) trained 20 steps: models/model.pt and models/model.ts."""
    from mkd.teachers.example import train_example_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    torch.manual_seed(0)
    train_example_bundle(data, out, steps=20, roi_size=BUNDLE_ROI, channels=BUNDLE_CHANNELS)
    return out


@pytest.fixture(scope="module")
def bundle_run(bundle, data, tmp_path_factory):
    """``mkd distill --teacher BUNDLE`` with the default recipe, one epoch: ``(result, RUN)``."""
    out = tmp_path_factory.mktemp("runs") / "bundle"
    return _distill(bundle, data, out), out


def _hand_volume(bundle: Path, source: str, depth_check: int) -> np.ndarray:
    """The bundle's binary logits of one source volume, on the prepared grid at SIZE, computed step by step.

    Bundle preprocessing, sliding window as in its inferer, z1 - z0 (two-class softmax), MONAI's
    Invertd back to the source grid, flip to RAS (the phantom's affines are diagonal), area resize.
    """
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    config = json.loads((bundle / "configs" / "inference.json").read_text())
    parser = ConfigParser()
    parser.update({k: config[k] for k in ("network_def", "preprocessing")})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing")
    d = pre({"image": source})
    inferer = config["inferer"]
    with torch.no_grad():
        z = sliding_window_inference(d["image"][None], inferer["roi_size"], inferer["sw_batch_size"], network,
                                     overlap=inferer["overlap"])[0]  # fmt: skip
    binary = (z[1:2] - z[0:1]).as_tensor()
    pred = MetaTensor(binary, meta=d["image"].meta, applied_operations=d["image"].applied_operations)
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(
        {"image": d["image"], "pred": pred}
    )["pred"]
    affine = np.asarray(inverted.affine)[:3, :3]
    assert np.count_nonzero(affine - np.diag(np.diagonal(affine))) == 0, affine  # flips are RAS only if diagonal
    t = torch.as_tensor(inverted).float()
    for axis in range(3):
        if affine[axis, axis] < 0:
            t = t.flip(axis + 1)
    assert t.shape[-1] == depth_check
    return F.interpolate(t[None], size=(SIZE, SIZE, t.shape[-1]), mode="area")[0, 0].numpy()


# --- 1. binary logits --------------------------------------------------------------------------------


def test_binary_logits_softmax_three_classes_is_the_log_odds_of_the_label():
    z = torch.tensor([[[1.0, -0.5], [0.2, 2.0], [-1.0, 0.3]]])  # (B=1, K=3, 2 voxels)
    got = binary_logits(z, 2, "softmax")
    assert got.shape == (1, 1, 2)
    for v in range(2):
        exps = [math.exp(float(z[0, k, v])) for k in range(3)]
        p = exps[2] / sum(exps)
        assert float(got[0, 0, v]) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    # label 0 of the same output: the others are channels 1 and 2
    p0 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.2) + math.exp(-1.0))
    assert float(binary_logits(z, 0, "softmax")[0, 0, 0]) == pytest.approx(math.log(p0 / (1 - p0)), abs=1e-6)


def test_binary_logits_two_classes_is_the_difference_and_sigmoid_picks_the_channel():
    z = torch.tensor([[[0.5, -2.0, 3.0], [1.75, 1.0, -0.25]]])  # (1, 2, 3)
    assert binary_logits(z, 1, "softmax").flatten().tolist() == pytest.approx([1.25, 3.0, -3.25], abs=1e-6)
    assert binary_logits(z, 0, "softmax").flatten().tolist() == pytest.approx([-1.25, -3.0, 3.25], abs=1e-6)
    assert binary_logits(z, 1, "sigmoid").flatten().tolist() == [1.75, 1.0, -0.25]
    assert binary_logits(z, 0, "sigmoid").flatten().tolist() == [0.5, -2.0, 3.0]
    one = torch.tensor([[[-0.75, 4.0]]])
    assert binary_logits(one, 0, "sigmoid").flatten().tolist() == [-0.75, 4.0]


@pytest.mark.parametrize("label", [3, -1])
def test_binary_logits_label_out_of_range(label):
    z = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match=rf"label {label} is not an output channel \(the teacher has 3\)"):
        binary_logits(z, label, "softmax")
    with pytest.raises(ValueError, match=rf"label {label} is not an output channel"):
        binary_logits(z, label, "sigmoid")
    with pytest.raises(ValueError, match="a softmax over one channel is constant"):
        binary_logits(torch.zeros(1, 1, 2), 0, "softmax")
    with pytest.raises(ValueError, match="activation must be one of"):
        binary_logits(z, 0, "relu")


# --- the dataset the rest relies on -----------------------------------------------------------------


def test_the_dataset_makes_alignment_checks_meaningful(data):
    info = load_prepare_info(data)
    entries = [*info["volumes"].values(), *info["unlabelled"].values()]
    y_signs = {np.sign(np.asarray(e["source_affine"])[1][1]) for e in entries}
    assert y_signs == {-1.0, 1.0}, "the phantom should mix orientations"
    assert any(it["slice"] != it["z"] for it in _items(data)), "keep=organ should drop slices"
    assert {tuple(np.load(data / "images" / f"{pid}.npy").shape[2:]) for pid in info["volumes"]} == {(SIZE, SIZE)}


# --- 2. a bundle teacher (model.pt) -------------------------------------------------------------------


@pytest.mark.slow
def test_bundle_teacher_distils_and_caches_the_bundles_own_logits(bundle_run, bundle, data):
    res, out = bundle_run
    assert res.exit_code == 0, res.output
    assert (out / "models" / "model.pt").is_file()
    cached = _cached(out / "teacher_cache")
    items = _items(data)
    assert sorted(cached) == sorted(f"{it['patient']}:{it['slice']}" for it in items)
    info = load_prepare_info(data)
    for pid in sorted({it["patient"] for it in items}):
        entry = info["volumes"].get(pid) or info["unlabelled"][pid]
        volume = _hand_volume(bundle, entry["image"], entry["source_shape"][2])
        for it in (it for it in items if it["patient"] == pid):
            _fp16_close(cached[f"{pid}:{it['slice']}"], volume[..., it["z"]], atol=5e-5)
    check = json.loads((out / "teacher_check.json").read_text())
    assert check["teacher"]["slices"] == len(load_split(data, "validation"))


# --- 3. the same network as TorchScript -------------------------------------------------------------


@pytest.mark.slow
def test_torchscript_only_bundle_gives_the_same_cache(bundle_run, bundle, data, tmp_path):
    res, out = bundle_run
    assert res.exit_code == 0, res.output
    ts_bundle = tmp_path / "ts_bundle"
    shutil.copytree(bundle / "configs", ts_bundle / "configs")
    (ts_bundle / "models").mkdir()
    shutil.copy(bundle / "models" / "model.ts", ts_bundle / "models" / "model.ts")
    teacher = load_teacher(ts_bundle, image_size=(SIZE, SIZE), data_dir=data)
    assert isinstance(teacher, VolumeTeacher) and isinstance(teacher.network, torch.jit.ScriptModule)
    assert (teacher.label, teacher.activation, teacher.spatial_dims) == (1, "softmax", 3)
    got = _build_cache(teacher, _items(data), tmp_path / "cache")
    expected = _cached(out / "teacher_cache")
    assert sorted(got) == sorted(expected)
    for key in expected:
        _fp16_close(got[key], expected[key], ulps=1.0, atol=1e-4)


# --- 4. alignment: an identity network gives back the prepared image --------------------------------


def _identity_2d() -> torch.nn.Module:
    """A 1x1 2D convolution that copies its one input channel: a 2D network (it refuses a 5D batch)."""
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    return conv


@pytest.mark.slow
@pytest.mark.parametrize("dims", [3, 2])
def test_identity_torchscript_teacher_lands_on_each_slice(data, tmp_path, dims):
    """3D: one sliding-window pass over the volume; 2D: the network runs on each slice along the last axis."""
    teacher = _script(_Identity() if dims == 3 else _identity_2d(), tmp_path / "identity.pt")
    out = tmp_path / "run"
    res = _distill(teacher, data, out, "--set", "teacher_roi=[48,48,8]")
    assert res.exit_code == 0, res.output
    cached = _cached(out / "teacher_cache")
    items = _items(data)
    assert sorted(cached) == sorted(f"{it['patient']}:{it['slice']}" for it in items)
    images = {}
    for it in items:
        pid = it["patient"]
        if pid not in images:
            images[pid] = np.load(data / "images" / f"{pid}.npy").astype(np.float32)
        expected = images[pid][it["slice"], 0]
        err = np.abs(cached[f"{pid}:{it['slice']}"] - expected).max()
        assert err < 1e-3, f"{pid} slice {it['slice']} (z={it['z']}): off by {err}"
    index = json.loads((out / "teacher_cache" / "index.json").read_text())
    meta = index["meta"]["volume_teacher"]
    assert (meta["label"], meta["activation"], meta["spatial_dims"]) == (0, "sigmoid", dims)


# --- 5. --teacher-label ----------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_label_zero_is_the_negative_of_label_one(bundle_run, bundle, data, tmp_path):
    res, out = bundle_run
    assert res.exit_code == 0, res.output
    teacher = load_teacher(bundle, image_size=(SIZE, SIZE), data_dir=data, label=0)
    got = _build_cache(teacher, _items(data), tmp_path / "cache")
    expected = _cached(out / "teacher_cache")
    assert sorted(got) == sorted(expected)
    for key in expected:
        _fp16_close(got[key], -expected[key], ulps=0.0, atol=0.0)


def test_three_class_teacher_needs_teacher_label(data, tmp_path):
    teacher = _script(torch.nn.Conv3d(1, 3, 1), tmp_path / "three.ts")
    out = tmp_path / "run"
    _one_error(_distill(teacher, data, out), out, str(teacher.resolve()), "3 output channels", "--teacher-label")


def test_teacher_label_not_an_output_channel(plain_bundle, data, tmp_path):
    out = tmp_path / "run"
    _one_error(_distill(plain_bundle, data, out, "--teacher-label", "5"), out, str(plain_bundle.resolve()),
               "--teacher-label 5 is not an output channel (the teacher has 2)")  # fmt: skip


# --- 6. a bundle config that would run code --------------------------------------------------------


def _lambda(config):
    config["preprocessing"]["transforms"].insert(2, {"_target_": "Lambdad", "keys": "image", "func": "abs"})
    return "preprocessing#transforms#2#_target_: _target_ 'Lambdad' is not a MONAI network, transform or inferer"


def _unknown(config):
    config["preprocessing"]["transforms"].append({"_target_": "NoSuchTransformd", "keys": "image"})
    return "preprocessing#transforms#6#_target_: _target_ 'NoSuchTransformd' names no MONAI class"


def _expression(config):
    config["network_def"]["out_channels"] = "$1 + 1"
    return "network_def#out_channels: '$1 + 1' is a MONAI expression or reference ('$...'), not a value"


@pytest.mark.parametrize("change", [_lambda, _unknown, _expression], ids=["Lambdad", "unknown", "expression"])
def test_a_config_that_runs_code_is_refused(change, plain_config, plain_bundle, data, tmp_path):
    config = json.loads(json.dumps(plain_config))
    problem = change(config)
    teacher = _write_bundle(tmp_path / "bundle", config)
    shutil.copy(plain_bundle / "models" / "model.pt", teacher / "models" / "model.pt")
    out = tmp_path / "run"
    _one_error(_distill(teacher, data, out), out, str(teacher.resolve() / "configs" / "inference.json"), problem,
               "--allow-expressions")  # fmt: skip


def test_allow_expressions_runs_the_config(plain_config, plain_bundle, data, tmp_path):
    config = json.loads(json.dumps(plain_config))
    _expression(config)
    teacher = _write_bundle(tmp_path / "bundle", config)
    shutil.copy(plain_bundle / "models" / "model.pt", teacher / "models" / "model.pt")
    # through the CLI: accepted, and "$1 + 1" counts as two output channels (the run stops at the label check)
    out = tmp_path / "run"
    _one_error(_distill(teacher, data, out, "--allow-expressions", "--teacher-label", "2"), out, str(teacher.resolve()),
               "--teacher-label 2 is not an output channel (the teacher has 2)")  # fmt: skip
    # and it runs: the same logits as the plain bundle
    items = [it for it in _items(data) if it["patient"] == _items(data)[0]["patient"]]
    expr = load_teacher(teacher, image_size=(SIZE, SIZE), data_dir=data, allow_expressions=True)
    plain = load_teacher(plain_bundle, image_size=(SIZE, SIZE), data_dir=data)
    assert (expr.label, expr.activation) == (1, "softmax")
    torch.testing.assert_close(expr.slice_logits(items), plain.slice_logits(items))
    with pytest.raises(InputError, match=r"network_def#out_channels: '\$1 \+ 1' is a MONAI expression"):
        load_teacher(teacher, image_size=(SIZE, SIZE), data_dir=data)


# --- 7. a network that takes no 2D or 3D image -----------------------------------------------------


@pytest.mark.parametrize("network", [_NoVolume, _Flat], ids=["refuses-4d-5d", "wrong-output-ndim"])
def test_network_without_2d_or_3d_input_is_refused(network, data, tmp_path):
    teacher = _script(network(), tmp_path / "net.ts")
    out = tmp_path / "run"
    _one_error(_distill(teacher, data, out), out, str(teacher.resolve()), "cannot tell the network's input")


# --- 8. what a volume teacher cannot do ------------------------------------------------------------


def test_no_cache_needs_an_mkd_teacher(plain_bundle, data, tmp_path):
    out = tmp_path / "run"
    _one_error(_distill(plain_bundle, data, out, "--no-cache"), out, str(plain_bundle.resolve()), "--no-cache",
               "need an mkd teacher")  # fmt: skip


def test_feature_scales_need_an_mkd_teacher(plain_bundle, data, tmp_path):
    out = tmp_path / "run"
    res = _distill(plain_bundle, data, out, "--scales", "bn")
    _one_error(res, out, "scales bn", str(plain_bundle), "logits")
    assert res.exit_code == 2  # a usage error, caught by the CLI before the bundle starts


@pytest.mark.slow
def test_default_recipe_drops_its_feature_term(bundle_run):
    from mkd.handlers.settings import distillation_settings

    assert distillation_settings()["scales"], "the default recipe distils a feature scale"
    res, out = bundle_run
    assert res.exit_code == 0, res.output
    assert json.loads((out / "teacher_cache" / "index.json").read_text())["names"] == ["logits"]
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(ckpt["run"]["weights"]) == {"seg", "pmd", "dice"}
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train_pmd" in header and not any("contrastive" in c or c.startswith("train_feat") for c in header)
