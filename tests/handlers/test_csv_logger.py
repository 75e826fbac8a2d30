"""EpochCSVLogger: one row per epoch with mean loss, named terms and the evaluator's metrics."""

from __future__ import annotations

import csv

import torch
from ignite.engine import Engine, Events

from mkd.handlers import LOSS_TERMS_KEY, EpochCSVLogger


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_rows_hold_mean_loss_terms_and_metrics(tmp_path):
    losses = iter([1.0, 3.0, 0.5, 1.5])  # epoch 1: mean 2.0; epoch 2: mean 1.0

    def step(engine, batch):
        loss = next(losses)
        setattr(engine.state, LOSS_TERMS_KEY, {"seg": torch.tensor(loss / 2)})
        return [{"loss": torch.tensor(loss)}, {"loss": torch.tensor(loss)}]  # decollated output

    trainer = Engine(step)
    evaluator = Engine(lambda e, b: None)

    def validate(engine):
        evaluator.state.epoch = engine.state.epoch
        evaluator.state.metrics = {"val_mean_dice": 0.5 + 0.1 * engine.state.epoch, "not_scalar": [1, 2]}

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    EpochCSVLogger(tmp_path / "m.csv", evaluator=evaluator, log_dir=tmp_path / "tb").attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    rows = _read(tmp_path / "m.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["train_loss"]) for r in rows] == [2.0, 1.0]
    assert [float(r["train_seg"]) for r in rows] == [1.0, 0.5]
    assert [float(r["val_mean_dice"]) for r in rows] == [0.6, 0.7]
    assert "not_scalar" not in rows[0]


def test_resume_drops_rows_of_epochs_that_run_again(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("epoch,train_loss\n1,5.0\n2,4.0\n3,3.0\n")
    trainer = Engine(lambda e, b: {"loss": torch.tensor(1.0)})

    @trainer.on(Events.STARTED)
    def restore(engine):  # what CheckpointLoader does: continue after epoch 2
        engine.state.epoch = 2
        engine.state.iteration = 2

    EpochCSVLogger(path).attach(trainer)
    trainer.run([0], max_epochs=3)
    rows = _read(path)
    assert [(int(r["epoch"]), float(r["train_loss"])) for r in rows] == [(1, 5.0), (2, 4.0), (3, 1.0)]
