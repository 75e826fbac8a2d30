"""DistillationHandler on a stock SupervisedTrainer: loss composition, gradients, cache parity, errors."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss

from mkd.data.teacher_cache import LoadTeacherCached, TeacherCache
from mkd.errors import InputError
from mkd.handlers import DistillationHandler, build_projector, distillation_terms, distillation_weights, load_teacher
from mkd.losses import InfoNCELoss
from mkd.networks import build, save_checkpoint

SIZE = 32


def _items(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.rand(3, SIZE, SIZE, generator=g)
        label = (image[:1] > 0.6).float()
        items.append({"patient": f"p{i // 4}", "slice": i % 4, "image": image, "label": label})
    return items


def _setup(scales=("enc", "bn", "dec"), pmd=True, loss="contrastive", seed=0):
    torch.manual_seed(seed)
    teacher = build("t1", preset="tiny").eval()
    student = build("s1")
    projector = build_projector(student, teacher, list(scales), embed_dim=16)
    weights = distillation_weights(list(scales), pmd=pmd)
    terms = distillation_terms(weights, loss=loss, temperature=0.4)
    handler = DistillationHandler(teacher, student, projector, terms, seg_weight=weights["seg"])
    return teacher, student, projector, handler


def _trainer(student, projector, data, handler, lr=0.0):
    params = list(student.parameters()) + list(projector.parameters())
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=4, shuffle=False),
        network=student,
        optimizer=torch.optim.SGD(params, lr=lr),
        loss_function=DiceLoss(sigmoid=True),
    )
    handler.attach(trainer)
    records = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        out = engine.state.output[0]  # decollated: one dict per slice, the loss repeated
        records.append({"loss": float(out["loss"]), **{k: float(v) for k, v in engine.state.loss_terms.items()}})

    return trainer, records


def test_loss_is_the_weighted_sum_of_its_terms():
    teacher, student, projector, handler = _setup()
    trainer, records = _trainer(student, projector, _items(), handler)
    trainer.run()
    w = {"seg": handler.seg_weight, **{t["input"] if t["input"] != "logits" else k: t["weight"]
                                       for k, t in handler.terms.items()}}  # fmt: skip
    for r in records:
        expected = (w["seg"] * r["seg"] + w["enc"] * r["contrastive_enc"] + w["bn"] * r["contrastive_bn"]
                    + w["dec"] * r["contrastive_dec"] + w["pmd"] * r["pmd"])  # fmt: skip
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["pmd"] > 0  # the Bernoulli PMD is not the identically-zero softmax over one channel
    assert w == {"seg": 0.4, "enc": 0.1, "bn": 0.2, "dec": 0.1, "pmd": 0.2}


def test_gradients_reach_student_and_projector_never_the_teacher():
    teacher, student, projector, handler = _setup()
    grads = {}

    trainer, _ = _trainer(student, projector, _items(4), handler, lr=0.1)
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def grab(engine):
        grads["projector"] = [p.grad for p in projector.parameters()]
        grads["student"] = [p.grad for p in student.parameters()]
        grads["teacher"] = [p.grad for p in teacher.parameters()]

    trainer.run()
    assert all(g is not None and g.abs().sum() > 0 for g in grads["projector"])
    assert sum(float(g.abs().sum()) for g in grads["student"] if g is not None) > 0
    assert all(g is None for g in grads["teacher"])
    assert all(not p.requires_grad for p in teacher.parameters())
    changed = [k for k, v in projector.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every projector tensor was updated by the optimiser
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_hooks_are_removed_when_the_run_completes():
    teacher, student, projector, handler = _setup()
    trainer, _ = _trainer(student, projector, _items(4), handler)
    assert any(m._forward_hooks for m in student.modules())
    trainer.run()
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


@pytest.mark.parametrize("loss", ["contrastive", "mse"])
def test_cache_and_live_teacher_give_the_same_losses(tmp_path, loss):
    items = _items()
    teacher, student, projector, handler = _setup(loss=loss)
    pool = handler.pool
    assert pool == (loss == "contrastive")  # image-level InfoNCE with linear heads stores one vector per slice
    cache = TeacherCache.build(teacher, student, items, lambda d: d, ["enc", "bn", "dec"], tmp_path / "c",
                               (SIZE, SIZE), logits=True, pool=pool, dtype="float32", batch_size=3)  # fmt: skip
    assert len(cache) == len(items)
    assert cache.lookup(items[0])["teacher_bn"].shape == ((128, 1, 1) if pool else (128, 8, 8))
    live_trainer, live = _trainer(student, projector, items, handler)
    live_trainer.run()
    assert handler.live_steps == 2 and handler.cached_steps == 0

    _, student2, projector2, handler2 = _setup(loss=loss)
    student2.load_state_dict(student.state_dict())
    projector2.load_state_dict(projector.state_dict())
    cached_items = [LoadTeacherCached(cache)(d) for d in items]
    cached_trainer, cached = _trainer(student2, projector2, cached_items, handler2)
    cached_trainer.run()
    assert handler2.cached_steps == 2 and handler2.live_steps == 0
    for a, b in zip(live, cached):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_pmd_only_cache_gives_the_live_teachers_loss(tmp_path):
    """``--scales none --pmd``: the cache holds logits only (no recorder, no shape probe) and matches the live run."""
    items = _items()
    teacher, student, projector, handler = _setup(scales=(), pmd=True)
    assert handler.scales == [] and handler.student_recorder is None
    cache = TeacherCache.build(teacher, student, items, lambda d: d, [], tmp_path / "c", (SIZE, SIZE),
                               logits=True, dtype="float32", batch_size=3)  # fmt: skip
    assert cache.names == ["logits"] and len(cache) == len(items)
    assert cache.lookup(items[0])["teacher_logits"].shape == (1, SIZE, SIZE)
    live_trainer, live = _trainer(student, projector, items, handler)
    live_trainer.run()
    assert handler.live_steps == 2

    _, student2, projector2, handler2 = _setup(scales=(), pmd=True)
    student2.load_state_dict(student.state_dict())
    cached_trainer, cached = _trainer(student2, projector2, [LoadTeacherCached(cache)(d) for d in items], handler2)
    cached_trainer.run()
    assert handler2.cached_steps == 2 and handler2.live_steps == 0
    assert [set(r) for r in cached] == [{"loss", "seg", "pmd"}] * 2
    for a, b in zip(live, cached):
        assert a["pmd"] > 0
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_float16_cache_is_close_to_live(tmp_path):
    items = _items(4)
    teacher, student, projector, handler = _setup()
    cache = TeacherCache.build(teacher, student, items, lambda d: d, ["enc", "bn", "dec"], tmp_path / "c",
                               (SIZE, SIZE), dtype="float16")  # fmt: skip
    row = cache.lookup(items[1])
    assert row["teacher_bn"].shape == (128, 8, 8)  # teacher bn (128 ch, 2x2) stored at the student bn size (8x8)
    from mkd.networks import FeatureRecorder
    from mkd.networks.projector import match_spatial

    teacher.reconstruct = False
    with FeatureRecorder(teacher, ["bn"]) as rec, torch.no_grad():
        with rec.recording():
            teacher(items[1]["image"][None])
        live = match_spatial(rec.features["bn"], (8, 8))[0]
    assert not torch.equal(row["teacher_bn"], live)  # stored in half precision...
    torch.testing.assert_close(row["teacher_bn"], live, rtol=1e-3, atol=1e-3)  # ...to half-precision rounding


def test_unknown_scale_lists_the_valid_ones():
    teacher = build("t1", preset="tiny")
    student = build("s1")
    with pytest.raises(ValueError, match=r"unknown feature scale 'bottleneck2'.*'enc', 'bn', 'dec'"):
        DistillationHandler(teacher, student, torch.nn.Module(), distillation_terms({"seg": 1.0, "bottleneck2": 0.2}))


def test_weights_for_unselected_terms_are_rejected():
    with pytest.raises(ValueError, match=r"weight for 'dec' given, but 'dec' is not a selected scale"):
        distillation_weights(["bn"], {"dec": 0.3})


def test_dice_weight_adds_a_dice_term_against_the_teacher_on_the_logits():
    """``--weights dice=W`` (or a recipe's ``dice``) adds SoftDiceKD on the logits; without it there is no term."""
    from mkd.losses import SoftDiceKD

    assert "dice" not in distillation_weights(["bn"], pmd=True, recipe="transfer")
    weights = distillation_weights(["bn"], {"dice": 0.5}, pmd=True, recipe="transfer")
    assert weights == {"seg": 1.0, "bn": 0.2, "pmd": 1.0, "dice": 0.5}
    soft = distillation_terms(weights)["dice"]
    hard = distillation_terms(weights, dice_hard=True)["dice"]
    assert soft["input"] == "logits" and soft["weight"] == 0.5 and isinstance(soft["loss"], SoftDiceKD)
    assert not soft["loss"].hard and hard["loss"].hard
    # student p = (0.5, 0.5), teacher mask (1, 0): 1 - 2 * 0.5 / (1 + 1) with pseudo-labels
    s, t = torch.zeros(1, 1, 1, 2), torch.tensor([[[[20.0, -20.0]]]])
    assert hard["loss"](s, t).item() == pytest.approx(0.5, abs=1e-4)
    assert list(distillation_terms(weights)) == ["contrastive_bn", "pmd", "dice"]


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"nope\.pt: teacher checkpoint not found"):
        load_teacher(tmp_path / "nope.pt")


def test_teacher_student_input_size_mismatch_is_a_clear_error(tmp_path):
    teacher = build("t1", preset="tiny")
    path = save_checkpoint(tmp_path / "t.pt", teacher, run={"image_size": [96, 96]})
    with pytest.raises(InputError, match=r"teacher was trained on 96x96 slices but this run feeds 128x128"):
        load_teacher(path, image_size=[128, 128])
    loaded = load_teacher(path, image_size=[96, 96])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_pooling_before_the_linear_heads_gives_the_loss_of_pooling_after():
    """Image-level InfoNCE pools the projected map; a 1x1 conv commutes with the mean, so pool-first is exact."""
    from mkd.networks.projector import match_spatial

    torch.manual_seed(0)
    teacher, student, projector, handler = _setup(pmd=False)
    assert handler.pool
    x = torch.rand(6, 3, SIZE, SIZE)
    from mkd.networks import FeatureRecorder

    with FeatureRecorder(student, ["enc", "bn", "dec"]) as rs, FeatureRecorder(teacher, ["enc", "bn", "dec"]) as rt:
        with rs.recording(), rt.recording():
            student(x)
            teacher(x)
        for scale in ("enc", "bn", "dec"):
            s, t = rs.features[scale], rt.features[scale]
            loss = handler.terms[f"contrastive_{scale}"]["loss"]
            after = loss(*projector(scale, s, t))  # project the maps, InfoNCE pools them
            t_pooled = match_spatial(t, s.shape[2:]).mean(dim=(2, 3), keepdim=True)
            before = loss(*projector(scale, s.mean(dim=(2, 3), keepdim=True), t_pooled))
            torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_that_is_not_a_teacher_is_refused_as_teacher(tmp_path, caplog):
    """A student checkpoint passed as --teacher ran an s1 -> s1 'distillation' without a word (issue 12, case 2)."""
    from mkd.errors import InputError
    from mkd.handlers import load_teacher
    from mkd.networks import build, checkpoint_role, save_checkpoint, task_heads

    student = save_checkpoint(tmp_path / "s.pt", build("s1"), run={"bundle": "student", "role": "student"})
    with pytest.raises(InputError) as err:
        load_teacher(student)
    assert str(err.value) == (
        f"{student}: is a student checkpoint ('s1'), not a teacher; pass a checkpoint of `mkd teacher`, "
        "or `allow_student_teacher=True` to distil from it on purpose"
    )  # the CLI writes it as --allow-student-teacher (mkd.cli_options.as_flags)
    assert load_teacher(student, allow_student=True).network_name == "s1"  # on purpose
    # written before roles were recorded: the bundle names the role; no metadata: the architecture does
    old_distilled = save_checkpoint(tmp_path / "d.pt", build("s1"), run={"bundle": "distill"})
    with pytest.raises(InputError, match="is a distilled checkpoint"):
        load_teacher(old_distilled)
    with pytest.raises(InputError, match="is a student checkpoint"):
        load_teacher(save_checkpoint(tmp_path / "bare_s2.pt", build("s2")))
    teacher = build("t1", "tiny")
    bare_t1 = save_checkpoint(tmp_path / "t.pt", teacher)
    assert load_teacher(bare_t1).network_name == "t1"
    assert "records no role (teacher / student / distilled); taken as a teacher ('t1' network)" in caplog.text
    assert checkpoint_role({"run": {"role": "teacher", "bundle": "student"}}) == "teacher"
    assert checkpoint_role({"model": {}}) is None
    assert task_heads(teacher) == ["segmentation", "reconstruction"]
    assert task_heads(build("unet", "tiny")) == task_heads(build("s1")) == ["segmentation"]


class CosineKD(torch.nn.Module):
    """A distillation loss the package does not have: 1 - cosine similarity of the pooled embeddings."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = student.flatten(2).mean(2), teacher.flatten(2).mean(2)
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=1)).mean()


def test_a_new_loss_is_one_class_and_one_term():
    """No edit to the handler: the new term is computed, weighted into the loss and logged under its name."""
    teacher, student, projector, _ = _setup(scales=("bn",), pmd=False)
    terms = {"contrastive_bn": {"input": "bn", "loss": InfoNCELoss(temperature=0.4), "weight": 0.2},
             "cosine_bn": {"input": "bn", "loss": CosineKD(), "weight": 0.5}}  # fmt: skip
    handler = DistillationHandler(teacher, student, projector, terms, seg_weight=1.0)
    trainer, records = _trainer(student, projector, _items(4), handler)
    trainer.run()
    (r,) = records
    assert set(r) == {"loss", "seg", "contrastive_bn", "cosine_bn"}
    assert 0 < r["cosine_bn"] <= 2
    assert r["loss"] == pytest.approx(r["seg"] + 0.2 * r["contrastive_bn"] + 0.5 * r["cosine_bn"], rel=1e-5)


def test_a_term_that_is_not_input_loss_weight_is_a_clear_error():
    teacher, student, projector, _ = _setup(scales=("bn",), pmd=False)
    with pytest.raises(ValueError, match=r"term 'kl' must have the keys input, loss and weight; got \['loss', 'w'\]"):
        DistillationHandler(teacher, student, projector, {"kl": {"loss": CosineKD(), "w": 1.0}})
    with pytest.raises(ValueError, match=r"term 'kl': weight must be >= 0; got -1"):
        DistillationHandler(teacher, student, projector, {"kl": {"input": "bn", "loss": CosineKD(), "weight": -1}})


def test_the_clis_settings_give_the_terms_they_gave_before():
    terms = distillation_terms(distillation_weights(["enc", "bn"], pmd=True, recipe="thesis"), loss="mse")
    assert {k: (t["input"], type(t["loss"]).__name__, t["weight"]) for k, t in terms.items()} == {
        "mse_enc": ("enc", "FeatureMSELoss", 0.1), "mse_bn": ("bn", "FeatureMSELoss", 0.2),
        "pmd": ("logits", "PMDLoss", 0.2)}  # fmt: skip
    with pytest.raises(ValueError, match=r"'kl' is not a valid value"):
        distillation_terms({"seg": 1.0, "bn": 0.2}, loss="kl")


def _declared(**kwargs):
    """The dense-prediction losses of mkd.losses.LOSSES declared by name, as plain data (no _target_)."""
    terms = {
        "cwd": {"input": "logits", "loss": "cwd", "weight": 1.0, "kwargs": {"temperature": 4.0}},
        "dist": {"input": "logits", "loss": "dist", "weight": 1.0},
        "affinity_bn": {"input": "bn", "loss": "affinity", "weight": 1.0},
        "region_bn": {"input": "bn", "loss": "region_affinity", "weight": 1.0},
    }
    terms.update(kwargs)
    return terms


def test_losses_named_by_a_string_train_through_the_handler():
    """Terms name their loss in LOSSES (plus kwargs); one step: logged, weighted, gradients reach the student."""
    from mkd.losses import CWDLoss, PairwiseAffinityLoss, RegionAffinityLoss

    teacher, student, projector, _ = _setup(scales=("bn",), pmd=False)
    terms = {"contrastive_bn": {"input": "bn", "loss": InfoNCELoss(temperature=0.4), "weight": 0.2}, **_declared()}
    handler = DistillationHandler(teacher, student, projector, terms, seg_weight=1.0)
    assert isinstance(handler.terms["cwd"]["loss"], CWDLoss) and handler.terms["cwd"]["loss"].temperature == 4.0
    assert isinstance(handler.terms["affinity_bn"]["loss"], PairwiseAffinityLoss)
    assert isinstance(handler.terms["region_bn"]["loss"], RegionAffinityLoss)
    assert handler.needs_logits and not handler.pool  # region affinity takes teacher logits; affinities need maps
    items = _items(4)
    items[3]["label"] = torch.full_like(items[3]["label"], -1.0)  # a transfer-set slice: the teacher's regions
    before = [p.detach().clone() for p in student.parameters()]
    trainer, records = _trainer(student, projector, items, handler, lr=0.1)
    trainer.run()
    (r,) = records
    assert set(r) == {"loss", "seg", "contrastive_bn", "cwd", "dist", "affinity_bn", "region_bn"}
    assert all(r[k] > 0 for k in ("cwd", "dist", "affinity_bn"))
    expected = r["seg"] + 0.2 * r["contrastive_bn"] + r["cwd"] + r["dist"] + r["affinity_bn"] + r["region_bn"]
    assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_raw_feature_terms_and_teacher_logits_come_from_the_cache_as_live(tmp_path):
    """Affinity terms take raw features and region affinity the teacher logits: cached and live steps agree."""
    from mkd.handlers import needs_logits, pools_features

    items = _items()
    terms = _declared()
    teacher, student, projector, _ = _setup(scales=("bn",), pmd=False)
    handler = DistillationHandler(teacher, student, projector, terms)
    logits, pool = needs_logits(terms), pools_features(terms, "linear")
    assert logits and not pool
    cache = TeacherCache.build(teacher, student, items, lambda d: d, ["bn"], tmp_path / "c", (SIZE, SIZE),
                               logits=logits, pool=pool, dtype="float32", batch_size=4)  # fmt: skip
    live_trainer, live = _trainer(student, projector, items, handler)
    live_trainer.run()
    _, student2, projector2, _ = _setup(scales=("bn",), pmd=False)
    student2.load_state_dict(student.state_dict())
    handler2 = DistillationHandler(teacher, student2, projector2, terms)
    cached_trainer, cached = _trainer(student2, projector2, [LoadTeacherCached(cache)(d) for d in items], handler2)
    cached_trainer.run()
    assert handler.live_steps == 2 and handler2.cached_steps == 2 and handler2.live_steps == 0
    for a, b in zip(live, cached):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_needs_logits_and_pools_features_for_declared_terms():
    from mkd.handlers import needs_logits, pools_features

    contrastive = {"contrastive_bn": {"input": "bn", "loss": "contrastive", "weight": 0.2}}
    assert pools_features(contrastive, "linear") and not needs_logits(contrastive)
    for name, term in _declared().items():
        terms = {**contrastive, name: term}
        # logits terms and region affinity (teacher logits for unlabelled slices) need the teacher's logits
        assert needs_logits(terms) == (name != "affinity_bn"), name
        # the affinity losses compare maps of raw features: nothing is pooled
        assert pools_features(terms, "linear") == (term["input"] == "logits"), name
        assert not needs_logits({name: {**term, "weight": 0.0}})


def test_resolving_a_loss_named_by_a_string():
    from mkd.handlers import resolve_loss, resolve_terms

    assert resolve_loss("dist", {"beta": 2.0}).beta == 2.0
    cosine = CosineKD()
    assert resolve_loss(cosine) is cosine
    with pytest.raises(ValueError, match=r"'kl' is not a loss in mkd.losses.LOSSES; known: contrastive, mse, cwd"):
        resolve_loss("kl")
    with pytest.raises(ValueError, match=r"CWDLoss \('cwd'\) takes no argument \['tau'\]"):
        resolve_loss("cwd", {"tau": 1.0})
    with pytest.raises(ValueError, match="kwargs are for a loss named by a string"):
        resolve_loss(cosine, {"temperature": 1.0})
    with pytest.raises(
        ValueError, match=r"term 'd': DISTLoss applies to logits, not to input 'bn'; use input 'logits'"
    ):
        resolve_terms({"d": {"input": "bn", "loss": "dist", "weight": 1.0}})
    with pytest.raises(ValueError, match=r"term 'a': PairwiseAffinityLoss applies to features, not to input 'logits'"):
        resolve_terms({"a": {"input": "logits", "loss": "affinity", "weight": 1.0}})
    with pytest.raises(ValueError, match=r"keys input, loss and weight; got \['input', 'kw', 'loss', 'weight'\]"):
        resolve_terms({"c": {"input": "logits", "loss": "cwd", "weight": 1.0, "kw": {}}})
    # the CLI's --loss: a feature loss applies to every scale; dist compares predictions only
    terms = distillation_terms({"seg": 1.0, "bn": 0.2}, loss="affinity")
    assert type(terms["affinity_bn"]["loss"]).__name__ == "PairwiseAffinityLoss"
    with pytest.raises(ValueError, match=r"loss='dist' \(DISTLoss\) compares predictions, not feature scales"):
        distillation_terms({"seg": 1.0, "bn": 0.2}, loss="dist")


def test_the_diagnosis_grids_declared_terms_reach_the_bundle_as_plain_data():
    """grids/kd_cpu.yaml names the new losses by string in settings.terms; the distill bundle resolves them."""
    from pathlib import Path

    from mkd.ablation import load_grid
    from mkd.bundle import bundle_configs, compose_config
    from mkd.handlers import resolve_terms

    grid = load_grid(Path(__file__).parents[2] / "grids" / "kd_cpu.yaml")
    runs = {r.id.split("-")[-2]: r for r in grid.runs if r.kind == "distill" and "terms" in r.settings}
    assert set(runs) >= {"cwd", "dist", "affinity", "region"}
    for tag, run in runs.items():
        assert "_target_" not in str(run.settings["terms"])
        parser = compose_config(bundle_configs("distill", "cpu"), run.bundle_overrides("runs"))
        terms = resolve_terms(parser.get_parsed_content("distill_terms"))
        assert {"contrastive_bn", "pmd"} < set(terms), tag  # added to the recommended B+PMD recipe
        assert parser.get_parsed_content("teacher_cache#logits")  # PMD, and region affinity's teacher logits
        # the affinity terms need the teacher's bn maps, not vectors
        assert parser.get_parsed_content("teacher_cache#pool") == (tag in ("cwd", "dist")), tag


def test_augmented_step_gives_the_teacher_the_students_very_input():
    """Function matching: in one step with random views and the slice mix, the live teacher's input is the tensor
    the student received (after every random transform and the mix), not the un-augmented slice."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from mkd.data import RandMixSlicesd, augmentation_transforms
    from mkd.handlers import BatchAugmentation

    set_determinism(seed=0)
    items = _items(4)
    teacher, student, projector, handler = _setup(scales=("bn",), pmd=True)
    loader = DataLoader(Dataset(items, Compose(augmentation_transforms("consistent"))), batch_size=4)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(list(student.parameters()) + list(projector.parameters()), lr=0.0),
        loss_function=DiceLoss(sigmoid=True),
    )
    BatchAugmentation(RandMixSlicesd(keys="image", label_key="label", prob=1.0)).attach(trainer)
    handler.attach(trainer)
    seen = {}
    for name, net in (("student", student), ("teacher", teacher)):
        net.register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, args[0].clone()))
    trainer.run()
    set_determinism(seed=None)
    assert handler.live_steps == 1 and handler.cached_steps == 0
    assert torch.equal(seen["teacher"], seen["student"])
    plain = torch.stack([d["image"] for d in items])
    assert seen["student"].shape == plain.shape and not torch.equal(seen["student"], plain)
