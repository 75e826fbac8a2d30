"""The composed configs of every role x profile: the settings and handler lists the three bundles had before they
became one bundle with three roles. Composing is cheap: nothing is built that reads data or trains."""

from __future__ import annotations

import json
import re

import pytest

from mkd.bundle import PROFILES, ROLES, bundle_configs, bundle_dir, compose_config

# the settings of bundles/{teacher,student,distill}/configs/{train,profile_*}.json before the merge, with the
# CPU profiles of issue 17: the teacher up to 30 epochs with smoothed early stopping (at least 12, patience 5),
# the students 15 epochs of a fixed number of steps (one pass over every training and unlabelled slice)
SETTINGS = {
    ("teacher", "cpu"): dict(epochs=30, batch_size=8, learning_rate=1e-3, arch="t1", network_preset="small",
                             image_size=[96, 96], train_split="training", early_stop_patience=5,
                             early_stop_min_epochs=12, early_stop_smoothing=0.6, epoch_splits=None),
    ("teacher", "thesis"): dict(epochs=200, batch_size=8, learning_rate=1e-4, arch="t1", network_preset="thesis",
                                image_size=[256, 256], train_split="training", early_stop_patience=0),
    ("student", "cpu"): dict(epochs=15, batch_size=16, learning_rate=1e-2, arch="s1", network_preset="thesis",
                             image_size=[96, 96], train_split="student", early_stop_patience=0,
                             epoch_splits=["training", "unlabelled"]),
    ("student", "thesis"): dict(epochs=120, batch_size=20, learning_rate=1e-2, arch="s1", network_preset="thesis",
                                image_size=[256, 256], train_split="student", early_stop_patience=0),
}  # fmt: skip
SETTINGS.update({("distill", p): SETTINGS[("student", p)] for p in PROFILES})
OPTIMIZER = {"teacher": "torch.optim.AdamW", "student": "torch.optim.RMSprop", "distill": "torch.optim.RMSprop"}
ROLE = {"teacher": "teacher", "student": "student", "distill": "distilled"}

LOGGERS = ["TrainingProgressBar", "StatsHandler", "TensorBoardStatsHandler", "EpochCSVLogger"]
TRAIN_HANDLERS = {  # rank 0 (and a single process); the other ranks run the first `shared` of them
    "teacher": (["LrScheduleHandler", "ReconstructionLossHandler", "ValidationHandler", *LOGGERS], 3),
    "student": (["LrScheduleHandler", "ValidationHandler", *LOGGERS], 2),
    "distill": (["LrScheduleHandler", "ValidationHandler", "DistillationHandler", "TeacherCheck", *LOGGERS], 3),
}
VAL_SAVERS = ["StatsHandler", "TensorBoardStatsHandler", "AtomicCheckpointSaver"]
VAL_HANDLERS = {  # early stopping is attached in `run` (it needs the trainer), when early_stop_patience > 0
    "teacher": (["ReconstructionOutputHandler", *VAL_SAVERS], 1),
    "student": (VAL_SAVERS, 0),
    "distill": (VAL_SAVERS, 0),
}


class _Rank:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_rank(self) -> int:
        return self.rank


def _handlers(parser, id_: str, rank: int = 0) -> list[str]:
    """The class names of the handler list at ``id_`` (a list, a reference, or an expression over lists)."""
    conf = parser[id_]
    if isinstance(conf, str) and conf.startswith("@"):
        return _handlers(parser, conf[1:].replace("::", "#"), rank)
    if isinstance(conf, str) and conf.startswith("$"):
        lists: dict[str, list[str]] = {}

        def sub(m: re.Match) -> str:
            lists[f"_l{len(lists)}"] = _handlers(parser, m.group(1).replace("::", "#"), rank)
            return f"_l{len(lists) - 1}"

        return eval(re.sub(r"@([\w#:]+)", sub, conf[1:]), {"dist": _Rank(rank), **lists})  # noqa: S307
    names = []
    for i, item in enumerate(conf):
        cid = f"{id_}#{i}"
        if isinstance(item, str):
            cid = item[1:].replace("::", "#")
            item = parser[cid]
        disabled = item.get("_disabled_", False)
        if isinstance(disabled, str):
            disabled = parser.get_parsed_content(f"{cid}#_disabled_")
        if not disabled:
            names.append(item["_target_"].rsplit(".", 1)[-1])
    return names


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("role", ROLES)
def test_every_role_and_profile_composes_the_settings_it_had(role, profile):
    parser = compose_config(bundle_configs(role, profile))
    assert {k: parser[k] for k in SETTINGS[(role, profile)]} == SETTINGS[(role, profile)]
    assert parser["optimizer#_target_"] == OPTIMIZER[role]
    assert (parser["role"], parser["bundle_name"]) == (ROLE[role], role)
    assert _handlers(parser, "train#trainer#train_handlers") == TRAIN_HANDLERS[role][0]
    assert _handlers(parser, "validate#evaluator#val_handlers") == VAL_HANDLERS[role][0]


@pytest.mark.parametrize("role", ROLES)
def test_multi_gpu_runs_the_logging_and_saving_handlers_on_rank_0_only(role):
    parser = compose_config(bundle_configs(role, "cpu", ["multi_gpu_train"]))
    (train, shared), (val, val_shared) = TRAIN_HANDLERS[role], VAL_HANDLERS[role]
    assert _handlers(parser, "train#trainer#train_handlers", rank=0) == train
    assert _handlers(parser, "validate#evaluator#val_handlers", rank=0) == val
    assert _handlers(parser, "train#trainer#train_handlers", rank=1) == train[:shared]
    assert _handlers(parser, "validate#evaluator#val_handlers", rank=1) == val[:val_shared]


def test_a_rank_0_handler_added_to_train_json_stays_off_the_other_ranks(tmp_path):
    """Named lists, not a slice: a handler appended to the shared list runs on every rank, one appended to the
    rank-0 list on rank 0 only (the `[: -4]` slice ran a new last handler on every rank and dropped another)."""
    configs = bundle_configs("student", "cpu", ["multi_gpu_train"])
    train = json.loads(configs[0].read_text())
    train["train"]["rank0_handlers"].append({"_target_": "mkd.handlers.TrainingProgressBar"})
    (tmp_path / "train.json").write_text(json.dumps(train))
    parser = compose_config([tmp_path / "train.json", *configs[1:]])
    assert _handlers(parser, "train#trainer#train_handlers", rank=1) == ["LrScheduleHandler", "ValidationHandler"]
    assert _handlers(parser, "train#trainer#train_handlers", rank=0)[-1] == "TrainingProgressBar"


def test_validation_and_checkpointing_live_in_train_json_only():
    """A change to validation or to the checkpoint savers is one edit: no role or profile file sets them."""
    shared = ("validate#key_metric", "validate#additional_metrics", "validate#evaluator#key_val_metric",
              "train#last_saver#save_interval",
              "train#last_saver#n_saved", "validate#best_saver#key_metric_filename", "val_interval")  # fmt: skip
    train = compose_config([bundle_dir() / "configs" / "train.json"])
    for f in (bundle_dir() / "configs").glob("*.json"):
        if f.name in ("train.json", "metadata.json"):
            continue
        keys = set(json.loads(f.read_text()))
        assert not [k for k in keys for s in shared if k == s or k.startswith(s + "#") or s.startswith(k + "#")], f
    for role in ROLES:
        parser = compose_config(bundle_configs(role, "cpu"))
        assert parser["validate#key_metric"] == train["validate#key_metric"]
        assert parser["train#last_saver#save_interval"] == train["train#last_saver#save_interval"]


def test_bundle_configs_lists_train_the_role_and_its_profile():
    teacher = ["train.json", "teacher.json", "profile_cpu_teacher.json"]
    assert [f.name for f in bundle_configs("teacher", "cpu")] == teacher
    assert [f.name for f in bundle_configs("distill", "thesis", ["multi_gpu_train"])] == [
        "train.json", "distill.json", "profile_thesis.json", "multi_gpu_train.json"]  # fmt: skip
    assert [f.name for f in bundle_configs("student", None)] == ["train.json", "student.json"]


@pytest.mark.parametrize("role", ROLES)
def test_early_stopping_is_attached_in_run_and_only_when_it_can_stop(role):
    """Patience 0 (the default but the teacher's CPU profile): no handler, so `validate#evaluator` of a run's
    config.json also runs on its own (an EarlyStopHandler without its trainer raises)."""
    assert compose_config(bundle_configs(role, "thesis")).get_parsed_content("validate#early_stop") is None
    stopper = compose_config(bundle_configs(role, "cpu"), {"early_stop_patience": 3})
    assert stopper.get_parsed_content("validate#early_stop").patience == 3
    for multi in ([], ["multi_gpu_train"]):
        run = compose_config(bundle_configs(role, "cpu", multi))["run"]
        assert sum("@validate#early_stop.attach(@validate#evaluator)" in r.replace("::", "#") for r in run) == 1


@pytest.mark.parametrize(
    ("overrides", "cached"),
    [
        ({}, True),
        ({"augment": "consistent"}, False),
        ({"augment": "consistent", "mix": "none"}, False),  # random views alone
        ({"augmentation": [{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5}]}, False),
        ({"use_cache": False}, False),
    ],
)
def test_the_teacher_cache_is_on_exactly_when_nothing_is_random(overrides, cached):
    """One rule for `augment` and an `augmentation` list: the cache cannot hold the teacher's outputs for random
    views, so any random transform switches it off and the teacher runs live on the student's batch."""
    parser = compose_config(bundle_configs("distill", "cpu"), overrides)
    assert parser.get_parsed_content("teacher_cache#_disabled_") is (not cached)


@pytest.mark.parametrize("role", ["student", "distill"])
def test_augment_adds_the_slice_mix_handler_to_both_students(role):
    plain = compose_config(bundle_configs(role, "cpu"))
    assert "BatchAugmentation" not in _handlers(plain, "train#trainer#train_handlers")
    assert plain.get_parsed_content("augmentation") == [] and plain.get_parsed_content("mix_transform") is None
    parser = compose_config(bundle_configs(role, "cpu"), {"augment": "consistent"})
    assert "BatchAugmentation" in _handlers(parser, "train#trainer#train_handlers")
    mix = parser.get_parsed_content("mix_transform")
    assert (type(mix).__name__, mix.mode) == ("RandMixSlicesd", "mixup")
    cutmix = compose_config(bundle_configs(role, "cpu"), {"augment": "consistent", "mix": "cutmix"})
    assert cutmix.get_parsed_content("mix_transform").mode == "cutmix"
