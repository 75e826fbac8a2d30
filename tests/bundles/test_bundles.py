"""The teacher and student bundles: one-epoch runs on a tiny phantom, checkpoints, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mkd.bundle import bundle_dir, compose_config, last_checkpoint, run_bundle
from mkd.errors import InputError, MkdError

# tiny but real: 32x32 slices, CPU-sized networks, one epoch
TINY_TEACHER = {"image_size": [32, 32], "network_preset": "tiny", "batch_size": 8}
TINY_STUDENT = {"image_size": [32, 32], "batch_size": 8}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    summary = run_bundle("teacher", out, tiny_prepared, overrides={**TINY_TEACHER, "epochs": 2}, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def student_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    summary = run_bundle("student", out, tiny_prepared, overrides={**TINY_STUDENT, "epochs": 3}, seed=0)
    return out, summary


@pytest.mark.slow
def test_teacher_run_writes_checkpoint_logs_and_reconstruction_metrics(teacher_run):
    out, summary = teacher_run
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert ckpt["network"]["name"] == "t1" and ckpt["network"]["kwargs"]["features"] == [8, 16, 32, 64, 128]
    assert any(k.startswith("recon") for k in ckpt["model"])  # the reconstruction decoder is saved too
    df = pd.read_csv(out / "metrics.csv")
    assert list(df["epoch"]) == [1, 2]
    # both loss terms are logged and the total is seg + 0.2 * recon
    columns = {"train_seg", "train_recon", "val_pooled_dice", "val_mean_dice", "val_mean_iou", "val_psnr"}
    assert columns <= set(df.columns)
    expected = df["train_seg"] + 0.2 * df["train_recon"]
    assert (df["train_loss"] - expected).abs().max() < 1e-4
    assert (df["val_psnr"] > 0).all()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "t1" and config["image_size"] == [32, 32]
    assert summary["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_student_best_checkpoint_is_the_best_validation_epoch(student_run, tiny_prepared):
    """model.pt must be the epoch with the highest pooled validation Dice, re-measured on the validation patients."""
    from monai.bundle import ConfigParser

    out, summary = student_run
    df = pd.read_csv(out / "metrics.csv")
    assert list(df["epoch"]) == [1, 2, 3]
    best = df.loc[df["val_pooled_dice"].idxmax()]
    assert summary["best_epoch"] == int(best["epoch"])

    parser = ConfigParser()
    parser.read_config(str(out / "config.json"))
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True)["model"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert evaluator.state.metrics["val_pooled_dice"] == pytest.approx(float(best["val_pooled_dice"]), abs=1e-5)
    # selection used the validation patients, never the test ones
    datalist = json.loads((Path(tiny_prepared) / "datalist.json").read_text())
    val_patients = {d["patient"] for d in parser.get_parsed_content("validate#data")}
    assert val_patients == set(datalist["patients"]["validation"])
    assert not val_patients & set(datalist["patients"]["test"])


@pytest.mark.slow
def test_same_seed_same_metrics(student_run, tiny_prepared, tmp_path):
    out, _ = student_run
    run_bundle("student", tmp_path / "again", tiny_prepared, overrides={**TINY_STUDENT, "epochs": 3}, seed=0)
    a = pd.read_csv(out / "metrics.csv")
    b = pd.read_csv(tmp_path / "again" / "metrics.csv")
    pd.testing.assert_series_equal(a["val_pooled_dice"], b["val_pooled_dice"])
    pd.testing.assert_series_equal(a["train_loss"], b["train_loss"])


def _mkd(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mkd", *args], env=env, cwd=ROOT, **kwargs)


@pytest.mark.slow
def test_killed_run_resumes_losing_at_most_one_epoch(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    args = ["student", "--data", str(tiny_prepared), "--output", str(out), "--epochs", "6",
            "--set", "image_size=[32, 32]", "--set", "batch_size=4"]  # fmt: skip
    proc = _mkd(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpt = last_checkpoint(out / "models")
        if ckpt and ckpt.endswith("epoch=2.pt"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_checkpoint(out / "models")
    assert killed_at is not None, "the run was killed before its first checkpoint"
    done = int(Path(killed_at).stem.split("=")[1])
    assert done < 6

    resumed = _mkd(*args, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    df = pd.read_csv(out / "metrics.csv")
    assert list(df["epoch"]) == [1, 2, 3, 4, 5, 6]  # no epoch twice, none missing
    assert last_checkpoint(out / "models").endswith("epoch=6.pt")
    # the resumed process continued from the last checkpoint: only the epoch in progress was lost
    assert f"resuming from {killed_at} (epoch {done} of 6)" in log


@pytest.mark.slow
def test_two_process_ddp_epoch(tiny_prepared, tmp_path):
    summary = run_bundle("student", tmp_path / "ddp", tiny_prepared, overrides={**TINY_STUDENT, "epochs": 1}, nproc=2)
    ckpt = torch.load(tmp_path / "ddp" / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped, loads into a plain net
    assert summary["epochs"] == 1


@pytest.mark.slow
def test_two_process_distill_epoch(teacher_run, tiny_prepared, tmp_path):
    teacher_dir, _ = teacher_run
    out = tmp_path / "ddp-distill"
    overrides = {**TINY_STUDENT, "epochs": 1, "teacher_ckpt": str(teacher_dir / "models" / "model.pt"),
                 "scales": ["bn"], "pmd": True}  # fmt: skip
    run_bundle("distill", out, tiny_prepared, overrides=overrides, nproc=2)
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert {k.split(".")[0] for k in ckpt["projector"]} == {"student_heads", "teacher_heads"}
    df = pd.read_csv(out / "metrics.csv")
    assert df["train_contrastive_bn"].iloc[0] > 0 and df["train_pmd"].iloc[0] > 0
    # one cache, written once (by rank 0), no temporary file left behind
    assert sorted(p.name for p in (out / "teacher_cache").iterdir()) == ["bn.npy", "index.json", "logits.npy"]


@pytest.mark.slow
def test_monai_bundle_run_runs_the_same_bundle(tiny_prepared, tmp_path):
    out = tmp_path / "mb"
    configs = [str(ROOT / "bundles/mkd/configs" / f) for f in ("train.json", "student.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs),
           "--dataset_dir", str(tiny_prepared), "--output_dir", str(out),
           "--epochs", "1", "--image_size", "[32, 32]", "--batch_size", "8"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1]
    assert torch.load(out / "models" / "model.pt", weights_only=True)["run"]["role"] == "student"


@pytest.mark.slow
def test_monai_bundle_run_distills_with_the_list_of_configs(teacher_run, tiny_prepared, tmp_path):
    """`python -m monai.bundle run --config_file "['train.json','distill.json']"` is the same run as `mkd distill`."""
    teacher_dir, _ = teacher_run
    out = tmp_path / "mbd"
    configs = [str(ROOT / "bundles/mkd/configs" / f) for f in ("train.json", "distill.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs),
           "--dataset_dir", str(tiny_prepared), "--output_dir", str(out), "--epochs", "1",
           "--image_size", "[32, 32]", "--batch_size", "8", "--pmd", "true",
           "--teacher_ckpt", str(teacher_dir / "models" / "model.pt")]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert ckpt["run"]["role"] == "distilled" and ckpt["run"]["bundle"] == "distill"
    df = pd.read_csv(out / "metrics.csv")
    assert df["train_contrastive_bn"].iloc[0] > 0 and df["train_pmd"].iloc[0] > 0


def test_unknown_override_key_is_a_clear_error(tiny_prepared, tmp_path):
    with pytest.raises(MkdError, match=r"unknown bundle key 'epochz'"):
        run_bundle("student", tmp_path / "x", tiny_prepared, overrides={"epochz": 3})
    assert not (tmp_path / "x").exists()


def test_missing_datalist_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"datalist.json: datalist not found; run `mkd prepare` first"):
        run_bundle("student", tmp_path / "x", tmp_path / "nodata")
    assert not (tmp_path / "x").exists()


def test_wrong_arch_is_a_clear_error(tiny_prepared, tmp_path):
    from click.testing import CliRunner

    from mkd.cli import cli

    result = CliRunner().invoke(cli, ["student", "--arch", "t9", "--data", str(tiny_prepared)])
    assert result.exit_code == 2 and "Invalid value for '--arch'" in result.output
    with pytest.raises(MkdError, match=r"bad bundle setting: unknown network .t9.; expected one of unet, t1, t2"):
        run_bundle("student", tmp_path / "y", tiny_prepared, overrides={"arch": "t9", "epochs": 1})
    assert not (tmp_path / "y").exists()  # config.json and metadata.json were left behind (issue 12, case 4)


def test_resume_without_checkpoint_is_a_clear_error(tiny_prepared, tmp_path):
    with pytest.raises(MkdError, match=r"nothing to resume"):
        run_bundle("student", tmp_path / "z", tiny_prepared, resume=True)


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tiny_prepared, tmp_path):
    models = tmp_path / "z" / "models"
    models.mkdir(parents=True)
    (models / "checkpoint_epoch=1.pt").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(InputError) as err:
        run_bundle("student", tmp_path / "z", tiny_prepared, resume=True)
    assert str(err.value) == (
        f"{models / 'checkpoint_epoch=1.pt'}: truncated or not a checkpoint (was the run killed while writing it?) "
        "and no earlier complete checkpoint_epoch=N.pt to resume from; start the run again with `overwrite=True`"
    )  # not "run without --resume", which asked for --resume or --overwrite: a circle (issue 12, case 5)


def _schema_errors(value, schema, root, where="metadata"):
    """Check ``value`` against the draft-07 subset ``bundles/metadata_schema.json`` uses (jsonschema may be absent)."""
    if schema is False:
        return [f"{where}: not allowed"]
    if "$ref" in schema:
        schema = root["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float), "integer": int}
    wanted = schema.get("type")
    if wanted is not None:
        names = [wanted] if isinstance(wanted, str) else wanted
        ok = any(isinstance(value, kinds[n]) and not (n in ("integer", "number") and isinstance(value, bool))
                 for n in names)  # fmt: skip
        if not ok:
            return [f"{where}: expected {wanted}, got {type(value).__name__}"]
    errors = []
    if "pattern" in schema and not re.match(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for k, v in value.items():
            sub = props.get(k, schema.get("additionalProperties", True))
            if sub is not True:
                errors += _schema_errors(v, sub, root, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += _schema_errors(v, schema["items"], root, f"{where}[{i}]")
    return errors


METADATA_SCHEMA = ROOT / "bundles" / "metadata_schema.json"


def test_metadata_validates_against_the_shipped_schema_offline():
    meta_file = bundle_dir() / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    schema = json.loads(METADATA_SCHEMA.read_text())
    assert _schema_errors(meta, schema, schema) == []
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(meta, schema)


def test_metadata_declares_the_range_of_what_the_network_outputs():
    """The output was declared with value_range [0, 1]; every mkd network returns logits (sigmoid > 0.5 is spleen)."""
    from mkd.networks import NETWORKS, build

    meta = json.loads((bundle_dir() / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    low, high = pred["value_range"] or (-float("inf"), float("inf"))  # [] is MONAI's "not bounded / not known"
    torch.manual_seed(0)
    for name in NETWORKS:
        net = build(name, preset="tiny").eval()
        head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1][-1]
        with torch.no_grad():
            head.bias.fill_(-3.0)  # a confident background: sigmoid(-3) = 0.05 -> logits below 0
            logits = net(torch.rand(2, 3, 32, 32))
        assert low <= float(logits.min()) and float(logits.max()) <= high, (name, pred["value_range"])
    assert "logits" in meta["pred_classes"]


def test_schema_check_catches_what_monai_would_misread():
    schema = json.loads(METADATA_SCHEMA.read_text())
    meta = json.loads((bundle_dir() / "configs" / "metadata.json").read_text())
    meta["optional_packages_version"] = {"itk": "5.4.7"}
    del meta["required_packages_version"]["pytorch-ignite"]
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = "3"
    assert _schema_errors(meta, schema, schema) == [
        "metadata.required_packages_version: missing 'pytorch-ignite'",
        "metadata.network_data_format.inputs.image.num_channels: expected integer, got str",
        "metadata.optional_packages_version: not allowed",
    ]


def test_monai_reads_the_required_packages_of_the_bundle():
    """MONAI 1.6 reads optional_packages_version as required_packages_version, replacing it (issue 12, case 6)."""
    import warnings

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI warns when it renames a deprecated key
        parser.read_meta(str(bundle_dir() / "configs" / "metadata.json"))
        required = parser.get_parsed_content("_meta_#required_packages_version")
    assert {"mkd", "monai", "torch", "pytorch-ignite", "nibabel"} <= set(required)
    assert required["monai"] == parser["_meta_#monai_version"]
    assert "optional_packages_version" not in parser["_meta_"]


def test_bundle_layout_matches_the_model_zoo():
    root = bundle_dir()
    for f in ("train.json", "teacher.json", "student.json", "distill.json", "evaluate.json", "inference.json",
              "multi_gpu_train.json", "metadata.json", "logging.conf", "profile_cpu.json",
              "profile_cpu_teacher.json", "profile_thesis.json"):  # fmt: skip
        assert (root / "configs" / f).is_file(), f
    assert sorted(p.name for p in root.parent.iterdir() if p.is_dir()) == ["mkd"]  # one bundle, no copies
    readme = (root / "docs" / "README.md").read_text()
    for section in ("## Overview", "## Data", "## Training", "## Performance", "## Commands"):
        assert section in readme, section
    # evaluate.json and inference.json are overrides of train.json: they parse only on top of it
    parser = compose_config([root / "configs" / f for f in ("train.json", "student.json", "evaluate.json")])
    assert parser["eval_split"] == "test"


@pytest.mark.slow
def test_distill_bundle_trains_student_and_projector_from_teacher(teacher_run, tiny_prepared, tmp_path):
    from mkd.networks import load_network

    teacher_dir, _ = teacher_run
    out = tmp_path / "distill"
    overrides = {**TINY_STUDENT, "epochs": 1, "teacher_ckpt": str(teacher_dir / "models" / "model.pt"),
                 "scales": ["enc", "bn", "dec"], "pmd": True, "recipe": "thesis"}  # fmt: skip
    run_bundle("distill", out, tiny_prepared, overrides=overrides)
    df = pd.read_csv(out / "metrics.csv")
    for term in ("seg", "contrastive_enc", "contrastive_bn", "contrastive_dec", "pmd"):
        assert df[f"train_{term}"].iloc[0] > 0, term
    w = {"seg": 0.4, "enc": 0.1, "bn": 0.2, "dec": 0.1, "pmd": 0.2}  # the thesis's T1->S1 weights
    total = sum(w[k] * df[f"train_{'contrastive_' + k if k in ('enc', 'bn', 'dec') else k}"] for k in w)
    assert (df["train_loss"] - total).abs().max() < 1e-4
    ckpt = torch.load(out / "models" / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["projector"]} == {"student_heads", "teacher_heads"}
    assert ckpt["run"]["weights"] == w
    assert ckpt["run"]["recipe"] == "thesis" and ckpt["run"]["pmd_temperature"] == 4.0
    assert (out / "teacher_cache" / "index.json").is_file()
    check = json.loads((out / "teacher_check.json").read_text())  # the teacher measured before epoch 1
    assert {"dice", "ece", "background_median"} <= set(check["teacher"]) and check["teacher"]["slices"] > 0
    student, _ = load_network(out / "models" / "model.pt", expected="s1")  # usable like any student
    assert student(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_distill_with_a_teacher_of_another_input_size_is_a_clear_error(tiny_prepared, tmp_path):
    """Fast: an untrained teacher checkpoint that records its input size, nothing is trained."""
    from mkd.networks import build, save_checkpoint

    teacher = save_checkpoint(tmp_path / "t.pt", build("t1", preset="tiny"),
                              run={"bundle": "teacher", "role": "teacher", "image_size": [32, 32]})  # fmt: skip
    overrides = {**TINY_STUDENT, "image_size": [64, 64], "epochs": 1, "teacher_ckpt": str(teacher)}
    with pytest.raises(InputError, match=r"teacher was trained on 32x32 slices but this run feeds 64x64"):
        run_bundle("distill", tmp_path / "d", tiny_prepared, overrides=overrides)
    assert not (tmp_path / "d").exists()


def _untrained_teacher(path: Path) -> Path:
    from mkd.networks import build, save_checkpoint

    run = {"bundle": "teacher", "role": "teacher", "image_size": [32, 32]}
    return save_checkpoint(path, build("t1", preset="tiny"), run=run)


def test_augment_gives_the_baseline_and_the_distilled_student_the_same_views(tiny_prepared, tmp_path):
    """`--set augment=consistent` lives in train.json: the baseline student's training pipeline is the distilled
    student's, random transforms included, and draws the same views from the same seed."""
    from monai.transforms import Compose, Randomizable

    from mkd.bundle import bundle_configs
    from mkd.data import LoadTeacherCached

    common = {"dataset_dir": str(tiny_prepared), "image_size": [32, 32], "augment": "consistent"}
    student = compose_config(bundle_configs("student", "cpu"), common)
    distill = compose_config(bundle_configs("distill", "cpu"),
                             {**common, "teacher_ckpt": str(_untrained_teacher(tmp_path / "t.pt"))})  # fmt: skip
    pipelines, added = [], []
    for parser in (student, distill):
        transforms = parser.get_parsed_content("train#preprocessing").transforms
        pipelines.append(Compose([t for t in transforms if not isinstance(t, LoadTeacherCached)]))  # a no-op here
        # after loading and resizing (the distilled student's FillMissingLabeld, for the transfer set, is extra)
        n_plain = len(parser.get_parsed_content("preprocessing").transforms)
        added.append([type(t).__name__ for t in pipelines[-1].transforms[n_plain:]])
    assert added[0] == added[1] == ["RandFlipd", "RandFlipd", "RandAffined", "RandScaleIntensityd",
                                    "RandShiftIntensityd", "EnsureTyped"]  # fmt: skip
    assert not any(isinstance(t, Randomizable) for t in student.get_parsed_content("preprocessing").transforms)
    item = student.get_parsed_content("train#data")[0]
    assert item in distill.get_parsed_content("train#data")
    plain = student.get_parsed_content("preprocessing")(dict(item))
    views = []
    for pipeline in pipelines:
        pipeline.set_random_state(3)
        views.append(pipeline(dict(item)))
    for key in ("image", "label"):
        assert torch.equal(views[0][key], views[1][key]), key
    assert not torch.equal(views[0]["image"], plain["image"])


@pytest.mark.slow
def test_augmented_distillation_runs_the_teacher_live_and_records_its_views(tiny_prepared, tmp_path):
    out = tmp_path / "distill"
    overrides = {**TINY_STUDENT, "epochs": 1, "teacher_ckpt": str(_untrained_teacher(tmp_path / "t.pt")),
                 "scales": ["bn"], "pmd": True, "augment": "consistent"}  # fmt: skip
    run_bundle("distill", out, tiny_prepared, overrides=overrides)
    assert not (out / "teacher_cache").exists()  # no cache: the teacher ran on each augmented batch
    df = pd.read_csv(out / "metrics.csv")
    assert df["train_pmd"].iloc[0] > 0 and df["train_seg"].iloc[0] > 0
    run = torch.load(out / "models" / "model.pt", weights_only=True)["run"]
    assert (run["augment"], run["mix"]) == ("consistent", "mixup")


def test_distill_with_missing_teacher_is_a_clear_error(tiny_prepared, tmp_path):
    overrides = {**TINY_STUDENT, "teacher_ckpt": str(tmp_path / "none.pt")}
    with pytest.raises(InputError, match=r"none\.pt: teacher checkpoint not found"):
        run_bundle("distill", tmp_path / "d", tiny_prepared, overrides=overrides)


@pytest.mark.slow
def test_single_task_unet_teacher_trains_without_reconstruction(tiny_prepared, tmp_path):
    out = tmp_path / "unet"
    run_bundle("teacher", out, tiny_prepared, overrides={**TINY_TEACHER, "arch": "unet", "epochs": 1})
    df = pd.read_csv(out / "metrics.csv")
    assert "train_recon" not in df.columns and "val_psnr" not in df.columns
    assert torch.load(out / "models" / "model.pt", weights_only=True)["network"]["name"] == "unet"


@pytest.mark.slow
def test_distill_with_transfer_set_never_reads_labels_outside_the_students_half(teacher_run, tiny_prepared, tmp_path):
    """--transfer: the student also sees the other training patients and imagesTs, through the teacher only."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    datalist = json.loads((data / "datalist.json").read_text())
    others = set(datalist["patients"]["training"]) - set(datalist["patients"]["student"])
    assert others and datalist["unlabelled"]
    for pid in others:
        (data / "labels" / f"{pid}.npy").unlink()  # a label read would now fail the run
    teacher_dir, _ = teacher_run
    out = tmp_path / "distill"
    overrides = {**TINY_STUDENT, "epochs": 1, "teacher_ckpt": str(teacher_dir / "models" / "model.pt"),
                 "scales": ["bn"], "pmd": True, "transfer": True}  # fmt: skip
    run_bundle("distill", out, data, overrides=overrides)
    index = json.loads((out / "teacher_cache" / "index.json").read_text())
    n_student = len(datalist["student"])
    n_transfer = sum(d["patient"] in others for d in datalist["training"]) + len(datalist["unlabelled"])
    assert len(index["rows"]) == n_student + n_transfer  # the teacher saw every transfer slice
    assert {k.split(":")[0] for k in index["rows"]} >= others
    assert torch.load(out / "models" / "model.pt", weights_only=True)["run"]["transfer"] is True


def test_a_second_run_into_a_locked_folder_stops_at_once_naming_the_owner(tiny_prepared, tmp_path):
    """Two trainings into one --output both started and interleaved metrics.csv (issue 12, case 1)."""
    import socket

    out = tmp_path / "run"
    out.mkdir()
    lock = out / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "09:00:00"}))
    with pytest.raises(MkdError) as err:
        run_bundle("student", out, tiny_prepared, overrides=TINY_STUDENT, overwrite=True)
    assert str(err.value) == (
        f"{lock}: run run is being run by pid {os.getppid()} on {socket.gethostname()} since 09:00:00; "
        "wait for it, or delete the lock file if that process is gone"
    )
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written, nothing overwritten


@pytest.mark.slow
def test_two_training_processes_into_one_folder(tiny_prepared, tmp_path):
    """A real second `mkd student` while the first trains: one Error line with the first's pid; the first goes on."""
    out = tmp_path / "run"
    args = ["student", "--data", str(tiny_prepared), "--output", str(out), "--set", "image_size=[32, 32]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mkd", *args, "--epochs", "500"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / "models").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "run.lock").is_file()
        from click.testing import CliRunner

        from mkd.cli import cli

        res = CliRunner().invoke(cli, [*args, "--epochs", "1", "--overwrite"])
        assert res.exit_code == 1, res.output
        assert res.output.splitlines()[-1].startswith(f"Error: {out / 'run.lock'}: run run is being run by pid "
                                                      f"{first.pid} on ")  # fmt: skip
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("epochs", "abc", 'epochs="abc": epochs is an integer in the student bundle (15), got a string'),
        ("epochs", 2.5, "epochs=2.5: epochs is an integer in the student bundle (15), got a number"),
        ("image_size", 32, "image_size=32: image_size is a list in the student bundle ([96, 96]), got an integer"),
        ("amp_x", 1, None),
    ],
)
def test_a_set_value_of_the_wrong_type_is_one_line_before_any_file(tiny_prepared, tmp_path, key, value, problem):
    """--set epochs=abc ended in ignite's TypeError after 65 lines, with a half-made run folder (case 3)."""
    if problem is None:  # an unknown key stays its own error
        with pytest.raises(MkdError, match="unknown bundle key 'amp_x'"):
            run_bundle("student", tmp_path / "run", tiny_prepared, overrides={key: value})
        return
    with pytest.raises(MkdError) as err:
        run_bundle("student", tmp_path / "run", tiny_prepared, overrides={key: value})
    assert str(err.value) == f"`overrides` {problem}"  # `mkd student --set` says --set (tests/test_cli.py)
    assert not (tmp_path / "run").exists()


def test_setting_types_accept_what_the_bundle_can_use():
    from mkd.bundle import check_setting_type

    check_setting_type("learning_rate", 1, 0.01)  # an integer is a number
    check_setting_type("epochs", "$2 * 3", 25)  # an expression is the user's to get right
    check_setting_type("baseline_ckpt", "runs/s1/models/model.pt", None)  # an unset setting takes anything
    check_setting_type("amp", True, "$@device.type == 'cuda'")  # a computed setting too
    check_setting_type("epoch_splits", None, ["training", "unlabelled"])  # null: one pass per epoch
    with pytest.raises(MkdError, match="epochs is an integer"):
        check_setting_type("epochs", None, 25)  # null is not a number of epochs
    with pytest.raises(MkdError, match=r"`overrides` pmd=1: pmd is true or false in the distill bundle \(false\), got"):
        check_setting_type("pmd", 1, False, "distill")


def test_a_missing_slice_file_is_found_at_start(tiny_prepared, tmp_path):
    """A prepared dataset with images/*.npy missing failed after 105 lines of traceback (case 3)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    datalist = json.loads((data / "datalist.json").read_text())
    listed = {item[k] for split in ("student", "validation") for item in datalist[split] for k in ("image", "label")}
    gone = sorted(listed)[:2]
    for f in gone:
        (data / f).unlink()
    with pytest.raises(InputError) as err:
        run_bundle("student", tmp_path / "run", data, overrides=TINY_STUDENT)
    assert str(err.value) == (
        f"{data / gone[0]}: slice file listed in datalist.json (student/validation) is missing; 2 of the "
        f"{len(listed)} files of those splits are missing; run `mkd prepare` again"
    )
    assert not (tmp_path / "run").exists()


def test_an_error_before_the_first_epoch_leaves_no_files(tiny_prepared, tmp_path):
    """A text-file teacher left config.json and metadata.json behind (case 4); earlier files stay."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_text("not a checkpoint\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")  # e.g. mkd ablate's, written before the training
    overrides = {**TINY_STUDENT, "teacher_ckpt": str(teacher), "epochs": 1, "use_cache": False}
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        run_bundle("distill", run, tiny_prepared, overrides=overrides)
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        run_bundle("distill", tmp_path / "new", tiny_prepared, overrides=overrides)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_resume_passes_over_a_truncated_checkpoint_to_the_newest_complete_one(tiny_prepared, tmp_path):
    """The older valid checkpoint beside a truncated one was never offered (issue 12, case 5)."""
    from click.testing import CliRunner

    from mkd.cli import cli

    out = tmp_path / "run"
    args = ["student", "--data", str(tiny_prepared), "--output", str(out), "--set", "image_size=[32, 32]"]
    assert CliRunner().invoke(cli, [*args, "--epochs", "1"]).exit_code == 0
    models = out / "models"
    (models / "checkpoint_epoch=2.pt").write_bytes(b"PK\x03\x04 cut off")  # killed while writing epoch 2
    res = CliRunner().invoke(cli, [*args, "--epochs", "3", "--resume"])
    assert res.exit_code == 0, res.output
    skipped = f"{models / 'checkpoint_epoch=2.pt'}: truncated (was the run killed while writing it?); skipped"
    assert skipped in res.output
    assert f"resuming from {models / 'checkpoint_epoch=1.pt'} (epoch 1 of 3)" in res.output
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=3.pt", "model.pt"]
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_bundle_checkpoints_record_their_role_and_task_heads(teacher_run):
    out, _ = teacher_run
    run = torch.load(out / "models" / "model.pt", weights_only=True)["run"]
    assert run["role"] == "teacher" and run["tasks"] == ["segmentation", "reconstruction"]


class CosineKD(torch.nn.Module):
    """A distillation loss mkd does not have: 1 - cosine similarity of the spatially pooled embeddings."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = student.flatten(2).mean(2), teacher.flatten(2).mean(2)
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=1)).mean()


@pytest.mark.slow
def test_a_new_kd_loss_is_one_class_and_one_config_entry(tiny_prepared, tmp_path):
    """The loss above plus one `terms` entry: no edit to the handler or the CLI; it trains and its term is logged."""
    from mkd.networks import build, save_checkpoint

    teacher = save_checkpoint(tmp_path / "t.pt", build("t1", preset="tiny"),
                              run={"role": "teacher", "image_size": [32, 32]})  # fmt: skip
    term = {"input": "bn", "loss": {"_target_": f"{__name__}.CosineKD"}, "weight": 0.5}
    overrides = {**TINY_STUDENT, "epochs": 1, "teacher_ckpt": str(teacher), "terms": {"cosine_bn": term},
                 "recipe": "recommended"}  # fmt: skip
    run_bundle("distill", tmp_path / "d", tiny_prepared, overrides=overrides)
    df = pd.read_csv(tmp_path / "d" / "metrics.csv")
    assert (df["train_cosine_bn"] > 0).all() and (df["train_contrastive_bn"] > 0).all()
    # the recommended recipe runs B+PMD as it was measured: its seg, bn and pmd weights, plus the new term
    w = {"seg": 1.0, "contrastive_bn": 0.2, "pmd": 1.0, "cosine_bn": 0.5}
    assert (df["train_loss"] - sum(v * df[f"train_{k}"] for k, v in w.items())).abs().max() < 1e-4


@pytest.mark.slow
def test_evaluate_json_runs_mkd_evaluation(teacher_run, tiny_prepared, tmp_path):
    """`monai.bundle run [train, teacher, evaluate]` gives the metrics of `mkd evaluate` (one evaluation path)."""
    from mkd.evaluation import evaluate_checkpoint

    out, _ = teacher_run
    configs = [str(ROOT / "bundles/mkd/configs" / f) for f in ("train.json", "teacher.json", "evaluate.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs),
           "--dataset_dir", str(tiny_prepared), "--output_dir", str(tmp_path / "ev"),
           "--ckpt_dir", str(out / "models"), "--device", "$torch.device('cpu')"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "eval" / "test" / "summary.json").read_text())
    expected = evaluate_checkpoint(out / "models" / "model.pt", tiny_prepared, device="cpu").summary
    assert summary["pooled"] == pytest.approx(expected["pooled"])
    assert (tmp_path / "ev" / "eval" / "test" / "per_volume.csv").is_file()


@pytest.mark.slow
def test_inference_json_runs_the_segmenter(teacher_run, tiny_phantom, tmp_path):
    """[train, teacher, inference] writes the masks of `mkd infer` (mkd.inference.Segmenter): one inference path."""
    import nibabel as nib

    from mkd.inference import Segmenter

    out, _ = teacher_run
    configs = [bundle_dir() / "configs" / f for f in ("train.json", "teacher.json", "inference.json")]
    settings = {"output_dir": str(tmp_path / "inf"), "ckpt_dir": str(out / "models"),
                "input_dir": str(tiny_phantom / "imagesTs"), "device": "$torch.device('cpu')"}  # fmt: skip
    parser = compose_config(configs, settings)
    parser.get_parsed_content("run", lazy=True)
    Segmenter(out / "models" / "model.pt", device="cpu").segment_folder(tiny_phantom / "imagesTs", tmp_path / "ref")
    masks = sorted((tmp_path / "inf" / "pred").iterdir())
    assert [p.name for p in masks] == sorted(p.name for p in (tmp_path / "ref").iterdir()) and masks
    for p in masks:
        assert (nib.load(p).get_fdata() == nib.load(tmp_path / "ref" / p.name).get_fdata()).all()
