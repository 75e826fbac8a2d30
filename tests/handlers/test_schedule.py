"""The schedule: fixed optimiser steps per epoch, and early stopping on a smoothed validation curve."""

from __future__ import annotations

import json

import pytest
from ignite.engine import Engine, Events

from mkd.handlers import SmoothedEarlyStopping, steps_per_epoch

#: the real-CT CPU teacher's validation pooled Dice over epochs 1-7 (issue 17): patience 3 on the raw
#: curve stopped it at epoch 7, although its test Dice (0.81) showed it was still learning
NOISY = [0.20, 0.49, 0.04, 0.63, 0.49, 0.60, 0.20]


def _first_stop(stopper: SmoothedEarlyStopping, curve) -> int | None:
    for epoch, score in enumerate(curve, start=1):
        if stopper.update(score, epoch):
            return epoch
    return None


def test_the_old_rule_stops_the_noisy_teacher_at_epoch_7():
    # smoothing 0 and no minimum is ignite's EarlyStopping: best 0.63 at epoch 4, then 3 worse
    old = SmoothedEarlyStopping(patience=3, score_function=float)
    assert _first_stop(old, NOISY) == 7


def test_the_cpu_teacher_rule_does_not_stop_the_noisy_teacher():
    new = SmoothedEarlyStopping(patience=5, score_function=float, min_epochs=12, smoothing=0.6)
    assert _first_stop(new, NOISY) is None
    # the moving average, by hand: m1 = 0.2, m2 = 0.6*0.2 + 0.4*0.49 = 0.316, m3 = 0.6*0.316 + 0.4*0.04 = 0.2056,
    # m4 = 0.6*0.2056 + 0.4*0.63 = 0.37536; the smoothed curve still rises at epoch 6 (m6 = 0.49313)
    smoothed = [h[2] for h in new.history]
    assert smoothed[:4] == pytest.approx([0.2, 0.316, 0.2056, 0.37536])
    assert smoothed[5] == pytest.approx(0.6 * (0.6 * 0.37536 + 0.4 * 0.49) + 0.4 * 0.60)
    assert new.counter == 1  # only epoch 7 failed to improve it


def test_smoothed_rule_stops_after_patience_once_the_minimum_is_reached():
    # a curve that plateaus at epoch 4: without smoothing, patience 2 and a minimum of 8 epochs, the
    # counter reaches 2 at epoch 6 but the stop waits for epoch 8
    curve = [0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    stopper = SmoothedEarlyStopping(patience=2, score_function=float, min_epochs=8)
    assert _first_stop(stopper, curve) == 8
    assert _first_stop(SmoothedEarlyStopping(patience=2, score_function=float), curve) == 6


def test_a_nan_validation_counts_as_no_improvement_and_leaves_the_average_alone():
    stopper = SmoothedEarlyStopping(patience=2, score_function=float, smoothing=0.5)
    assert not stopper.update(0.4, 1)
    assert not stopper.update(float("nan"), 2)
    assert stopper.history[-1][2] == pytest.approx(0.4) and stopper.counter == 1
    assert not stopper.update(0.8, 3)  # m = 0.5*0.4 + 0.5*0.8
    assert stopper.history[-1][2] == pytest.approx(0.6) and stopper.counter == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patience": 0}, "patience"), ({"patience": 2, "smoothing": 1.0}, "smoothing"),
     ({"patience": 2, "min_epochs": -1}, "min_epochs"), ({"patience": 2, "min_delta": -0.1}, "min_delta")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmoothedEarlyStopping(score_function=float, **kwargs)


def test_it_terminates_the_trainer_replaying_a_curve():
    curve = iter([0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    trainer = Engine(lambda e, b: None)
    evaluator = Engine(lambda e, b: None)
    stopper = SmoothedEarlyStopping(patience=2, score_function=lambda e: next(curve), min_epochs=3)
    stopper.set_trainer(trainer)
    stopper.attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    trainer.run([0, 1], max_epochs=6)
    assert stopper.stopped_epoch == 4 and trainer.state.epoch == 4  # counter 2 at epoch 4, minimum 3 reached


def _datalist(tmp_path, **lists):
    items = {k: [{"image": f"images/{k}_{i}.npy", "label": f"labels/{k}_{i}.npy"} for i in range(n)]
             for k, n in lists.items()}  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps(items))
    return tmp_path


def test_steps_per_epoch_counts_the_listed_slices(tmp_path):
    data = _datalist(tmp_path, training=50, student=25, validation=10, test=10, unlabelled=13)
    assert steps_per_epoch(data, None, 16) is None  # one pass over the training loader
    assert steps_per_epoch(data, [], 16) is None
    assert steps_per_epoch(data, ["training", "unlabelled"], 16) == (50 + 13) // 16 == 3
    assert steps_per_epoch(data, ["student"], 8) == 3
    assert steps_per_epoch(data, ["training", "unlabelled"], 8, world_size=2) == 63 // 16
    assert steps_per_epoch(data, ["student"], 64) == 1  # never zero
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(data, ["student"], 0)
    with pytest.raises(ValueError, match="split must be one of"):
        steps_per_epoch(data, ["nonsense"], 4)


def test_cpu_student_profile_gives_baseline_all_labels_and_transfer_runs_the_same_steps(tiny_prepared):
    from mkd.bundle import bundle_configs, compose_config
    from mkd.data import load_split

    n = len(load_split(tiny_prepared, "training")) + len(load_split(tiny_prepared, "unlabelled"))
    lengths = set()
    for role, overrides in (("student", {}), ("student", {"train_split": "training"}),
                            ("distill", {"transfer": True})):  # fmt: skip
        config = compose_config(bundle_configs(role, "cpu"), {"dataset_dir": str(tiny_prepared), **overrides})
        lengths.add(config.get_parsed_content("epoch_length"))
        assert config.get_parsed_content("batch_size") == 16
    assert lengths == {max(1, n // 16)}
    teacher = compose_config(bundle_configs("teacher", "cpu"), {"dataset_dir": str(tiny_prepared)})
    assert teacher.get_parsed_content("epoch_length") is None  # the teacher's epoch is one pass
    stopper = teacher.get_parsed_content("validate#early_stop")
    assert (stopper.patience, stopper.min_epochs, stopper.smoothing) == (5, 12, 0.6)
