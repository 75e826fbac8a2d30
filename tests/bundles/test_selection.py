"""What every bundle selects on and trains with: pooled validation Dice, a loss with gradient on empty slices,
the teacher's early stopping. Read from the shipped configs; nothing is trained."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from mkd.bundle import BUNDLES, KEY_METRIC, bundle_configs, compose_config


def _parsed(name: str, overrides: dict | None = None):
    return compose_config(bundle_configs(name, "cpu"), overrides)


def _validation_score(metric, preds: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    """Run an ignite metric handler over (pred, label) slices the way the bundles' evaluator feeds it."""
    engine = Engine(lambda e, batch: [{"pred": p, "label": y} for p, y in zip(*batch)])
    metric.attach(engine, "score")
    engine.run([(preds, labels)])
    return float(engine.state.metrics["score"])


def _slices(false_positives: bool):
    """Four 8x8 slices: two hold a 4x4 organ (predicted exactly), two are empty (4 stray pixels each, or none)."""
    organ = torch.zeros(1, 8, 8)
    organ[:, 2:6, 2:6] = 1
    empty = torch.zeros(1, 8, 8)
    stray = torch.zeros(1, 8, 8)
    stray[:, 0, :4] = 1
    labels = [organ, organ, empty, empty]
    preds = [organ, organ, stray if false_positives else empty, stray if false_positives else empty]
    return preds, labels


@pytest.mark.parametrize("name", BUNDLES)
def test_selection_ranks_false_positives_on_empty_slices_below_a_clean_prediction(name):
    config = _parsed(name)
    key = config.get_parsed_content("validate#key_metric")
    assert list(key) == [KEY_METRIC]
    clean = _validation_score(key[KEY_METRIC], *_slices(false_positives=False))
    noisy = _validation_score(_parsed(name).get_parsed_content("validate#key_metric")[KEY_METRIC],
                              *_slices(false_positives=True))  # fmt: skip
    assert clean == pytest.approx(1.0)
    # pooled: TP 32, FP 8, FN 0 -> 2 * 32 / (2 * 32 + 8) = 8 / 9
    assert noisy == pytest.approx(64 / 72, abs=1e-6)
    # MeanDice(ignore_empty=True), the old key metric, cannot tell the two apart
    old = config.get_parsed_content("validate#additional_metrics")["val_mean_dice"]
    old_noisy = _validation_score(_parsed(name).get_parsed_content("validate#additional_metrics")["val_mean_dice"],
                                  *_slices(false_positives=True))  # fmt: skip
    assert _validation_score(old, *_slices(false_positives=False)) == pytest.approx(old_noisy) == pytest.approx(1.0)


@pytest.mark.parametrize("name", BUNDLES)
def test_segmentation_loss_has_gradient_on_an_all_empty_batch(name):
    loss = _parsed(name).get_parsed_content("loss")
    logits = torch.full((4, 1, 8, 8), 2.0, requires_grad=True)  # confident false positives everywhere
    value = loss(logits, torch.zeros(4, 1, 8, 8))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert logits.grad.abs().min() > 1e-4  # every pixel is pushed towards background
    assert (logits.grad > 0).all()


def test_every_bundle_trains_with_the_same_segmentation_loss():
    configs = {name: _parsed(name).config["loss"] for name in BUNDLES}
    assert configs["teacher"] == configs["student"] == configs["distill"] or (
        configs["distill"]["_target_"] == "mkd.losses.LabelledOnly"
        and configs["distill"]["loss"] == configs["student"] == configs["teacher"]
    )


def test_teacher_stops_early_when_validation_stops_improving():
    # the raw-curve rule (no smoothing, no minimum); the CPU profile's smoothed rule: tests/handlers/test_schedule.py
    config = _parsed("teacher", {"early_stop_patience": 2, "early_stop_min_epochs": 0, "early_stop_smoothing": 0.0})
    stopper = config.get_parsed_content("validate#early_stop")
    trainer = Engine(lambda e, b: None)
    stopper.set_trainer(trainer)
    scores = iter([0.5, 0.6, 0.6, 0.59, 0.7])
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def fake_metric(engine):
        engine.state.metrics[KEY_METRIC] = next(scores)

    stopper.attach(evaluator)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        evaluator.run([0])

    trainer.run([0], max_epochs=5)
    assert trainer.state.epoch == 4  # two epochs without a better score after 0.6: stopped before the 0.7
    assert _parsed("teacher", {"early_stop_patience": 0}).get_parsed_content("validate#early_stop") is None  # off
