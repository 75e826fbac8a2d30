"""AtomicCheckpointSaver: a run killed while writing a checkpoint keeps the previous one whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from mkd.handlers import AtomicCheckpointSaver


def _train(tmp_path, monkeypatch, fail_on_save: int):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    # the bundles' last_saver: several objects, one file per epoch, only the newest kept
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net, "optimizer": opt}, save_interval=1, n_saved=1,
                                  epoch_level=True)  # fmt: skip
    saver.attach(engine)
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_save:  # half a file, then the process "dies"
            if hasattr(f, "write"):  # an open (temporary) file
                f.write(b"PK\x03\x04 half a checkpoint")
            else:  # a path: written in place
                Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0, 1], max_epochs=5)
    return net


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    net = _train(tmp_path, monkeypatch, fail_on_save=3)
    # epochs 1 and 2 were saved (the first then removed, n_saved=1); epoch 3's write died half-way
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=2.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(state) == {"model", "optimizer"} and torch.equal(state["model"]["weight"], net.weight.detach())


def test_fixed_file_names_are_kept(tmp_path):
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="final.pt").attach(engine)
    engine.run([0], max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]
    assert set(torch.load(tmp_path / "final.pt", weights_only=True)) == {"weight", "bias"}


def test_checkpoints_follow_the_umask(tmp_path):
    """ignite's atomic saver wrote through a 0o600 temporary file (issue 12, case 7)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        engine = Engine(lambda e, b: None)
        AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 1)}, save_interval=1, n_saved=1,
                              epoch_level=True).attach(engine)  # fmt: skip
        engine.run([0], max_epochs=2)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch=2.pt"]
    assert stat.S_IMODE((tmp_path / "model_epoch=2.pt").stat().st_mode) == 0o644


def test_a_resumed_run_removes_the_checkpoint_it_resumed_from(tmp_path):
    """checkpoint_epoch=4.pt (resumed from) and a truncated =5.pt stayed on disk forever (issue 12, case 5)."""
    from ignite.engine import Events

    net = torch.nn.Linear(2, 1)
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=4.pt")
    (tmp_path / "checkpoint_epoch=5.pt").write_bytes(b"PK\x03\x04 cut off")
    (tmp_path / "model.pt").write_bytes(b"best")  # another series: kept
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 4))  # as CheckpointLoader does
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    AtomicCheckpointSaver(str(tmp_path), {"model": net, "optimizer": opt}, save_interval=1, n_saved=1,
                          epoch_level=True).attach(engine)  # fmt: skip
    engine.run([0], max_epochs=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=6.pt", "model.pt"]
