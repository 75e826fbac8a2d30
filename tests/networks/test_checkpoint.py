"""Checkpoints: round trip, self-describing metadata, wrong architecture, MONAI CheckpointSaver files."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from mkd.errors import InputError
from mkd.networks import CheckpointRecord, NetworkInfo, build, load_checkpoint, load_network, save_checkpoint


def outputs(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", ["s1", "t2"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    net = build(name, "tiny", out_channels=2)
    net.train()
    net(torch.rand(2, 3, 32, 32))  # move BatchNorm running stats away from their init
    x = torch.rand(2, 3, 32, 32)
    path = save_checkpoint(tmp_path / "sub" / "net.pt", net, epoch=3, metrics={"val_dice": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["net.pt"]  # atomic: no temp file left
    loaded, ckpt = load_network(path, expected=name)
    assert loaded.network_name == name and not loaded.training
    assert ckpt["epoch"] == 3 and ckpt["metrics"] == {"val_dice": 0.5}
    assert ckpt["network"] == {"name": name, "kwargs": net.config}
    torch.testing.assert_close(outputs(loaded, x), outputs(net, x), rtol=0, atol=0)


def test_wrong_architecture_and_missing_file(tmp_path):
    path = save_checkpoint(tmp_path / "t1.pt", build("t1", "tiny"))
    with pytest.raises(InputError, match="holds a 't1' network; expected 's1'") as err:
        load_network(path, expected="s1")
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="expected 's1' or 's2'"):
        load_network(path, expected=("s1", "s2"))
    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match="not found") as err:
        load_network(missing)
    assert str(err.value).startswith(str(missing))


class _RunsCode:
    """Unpickling this calls ``print``: what weights-only loading exists to refuse."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_unsafe_or_foreign_files_are_input_errors(tmp_path):
    bad = tmp_path / "pickled.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"model": NetworkInfo("s1")}, fh, protocol=2)  # arbitrary objects: refused by weights_only
    with pytest.raises(InputError, match="weights-only"):
        load_checkpoint(bad)
    mismatch = tmp_path / "mismatch.pt"
    torch.save({"model": build("s2").state_dict(), "network": {"name": "s1", "kwargs": {}}}, mismatch)
    with pytest.raises(InputError, match="weights do not fit a 's1' network"):
        load_network(mismatch)


def test_bare_and_ddp_prefixed_state_dicts(tmp_path):
    net = build("s1")
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, bare)
    with pytest.raises(InputError, match="no 'network' metadata"):
        load_network(bare)
    loaded, _ = load_network(bare, expected="s1")  # rebuilt with the thesis widths
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(outputs(loaded, x), outputs(net, x))


def test_monai_checkpoint_saver_with_network_info(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader, CheckpointSaver

    net = build("t1", "tiny")
    info = NetworkInfo.of(net)
    assert info == NetworkInfo("t1", net.config)
    engine = Engine(lambda engine, batch: None)
    CheckpointSaver(
        str(tmp_path), save_dict={"model": net, "network": info}, save_final=True, final_filename="final.pt"
    ).attach(engine)
    engine.run([0], max_epochs=1)
    loaded, ckpt = load_network(tmp_path / "final.pt", expected="t1")
    assert set(ckpt) == {"model", "network"}
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(outputs(loaded, x), outputs(net, x))
    # and MONAI's loader can restore the metadata object itself
    restored = NetworkInfo()
    CheckpointLoader(str(tmp_path / "final.pt"), {"network": restored}).attach(Engine(lambda e, b: None))
    restored.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True)["network"])
    assert restored == info


def test_load_errors_are_mkd_words_and_never_suggest_unsafe_loading(tmp_path, capsys):
    """PyTorch's message advises weights_only=False (arbitrary code execution); mkd's never does."""
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": build("s1", "tiny").state_dict(), "extra": _RunsCode()}, crafted)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": _RunsCode()}, protocol=4))
    good = save_checkpoint(tmp_path / "good.pt", build("s1", "tiny"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    expected = {
        crafted: "holds Python objects (print) besides tensors and plain data",
        plain: "a plain pickle file, not a weights-only PyTorch checkpoint",
        truncated: "truncated PyTorch checkpoint (the zip archive has no end",
        text: "not a PyTorch checkpoint (no zip archive",
    }
    for path, problem in expected.items():
        with pytest.raises(InputError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"{path}: cannot read: {problem}")
        assert "weights_only=False" not in message and "weights_only` set to `False`" not in message
        assert "\n" not in message and err.value.__cause__ is None
    assert "unpickled" not in capsys.readouterr().out  # nothing in the files ran


# --- the checkpoint record -----------------------------------------------------------------------------------------

#: ``run`` of a distilled student as train.json#run_info and distill.json write it (values as a run records them)
BUNDLE_RUN = {
    "bundle": "distill",
    "role": "distilled",
    "tasks": ["segmentation"],
    "image_size": [96, 96],
    "seed": 2,
    "train_split": "student",
    "preprocessing": {"window": [-57.0, 164.0], "channels": "replicate", "spacing": None, "size": 128},
    "augment": "none",
    "mix": "mixup",
    "teacher": "runs/teacher-t1/models/model.pt",
    "recipe": "thesis",
    "weights": {"bn": 1.0},
}


def test_record_reads_every_field_a_bundle_run_writes(tmp_path):
    path = save_checkpoint(tmp_path / "d.pt", build("s1"), run=BUNDLE_RUN)
    record = CheckpointRecord.from_checkpoint(load_network(path)[1])
    assert record == CheckpointRecord(
        arch="s1",
        network_kwargs=build("s1").config,
        role="distilled",
        bundle="distill",
        tasks=("segmentation",),
        image_size=(96, 96),
        preprocessing={"window": [-57.0, 164.0], "channels": "replicate", "spacing": None, "size": 128},
        train_split="student",
        seed=2,
        recipe="thesis",
        teacher="runs/teacher-t1/models/model.pt",
        augment="none",
        mix="mixup",
        run=BUNDLE_RUN,
    )
    assert CheckpointRecord.from_checkpoint(record) is record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.arch = "s2"


def test_record_of_old_or_bare_checkpoints_is_empty_where_nothing_was_recorded():
    empty = CheckpointRecord()
    assert CheckpointRecord.from_checkpoint({}) == CheckpointRecord.from_checkpoint(None) == empty
    assert empty.image_size is None and empty.role is None and empty.tasks == () and empty.preprocessing == {}
    bare = CheckpointRecord.from_checkpoint({"model": {}, "network": {"name": "t1"}})
    assert (bare.arch, bare.network_kwargs, bare.run) == ("t1", {}, {})
    # a bundle run written before roles were recorded: the role of its bundle; an unknown role is none
    assert CheckpointRecord.from_checkpoint({"run": {"bundle": "distill"}}).role == "distilled"
    assert CheckpointRecord.from_checkpoint({"run": {"bundle": "teacher"}}).role == "teacher"
    assert CheckpointRecord.from_checkpoint({"run": {"role": "oracle", "bundle": "other"}}).role is None
    # a run entry that is not a mapping reads as no run
    assert CheckpointRecord.from_checkpoint({"run": ["image_size", 64]}) == empty


def test_record_preprocessing_prefers_the_top_level_entry_and_sizes_become_integers():
    top = {"window": "max", "size": 64}
    ckpt = {"preprocessing": top, "run": {"preprocessing": {"window": [0, 1]}, "image_size": 64.0, "seed": 1.0}}
    record = CheckpointRecord.from_checkpoint(ckpt)
    assert record.preprocessing == top and record.preprocessing is not top  # a copy
    assert record.image_size == (64, 64) and record.seed == 1
    assert CheckpointRecord.from_checkpoint({"run": {"preprocessing": {"size": 96}}}).preprocessing == {"size": 96}
    assert CheckpointRecord.from_checkpoint({"run": {"image_size": ["128", 96.0]}}).image_size == (128, 96)
    with pytest.raises(ValueError) as err:
        CheckpointRecord.from_checkpoint({"run": {"image_size": "96x96"}})
    assert str(err.value) == "image_size must be two integers (H, W), got '96x96' (from the checkpoint)"
