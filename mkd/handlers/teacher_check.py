"""Is the teacher worth distilling? Its validation Dice and calibration, logged when a distillation run starts.

A teacher that is not trained to convergence has weak, under-confident logits;
prediction-map distillation then copies its bias (false positives) instead of its
knowledge (SPEC §4b). :class:`TeacherCheck` measures the frozen teacher on the
run's validation patients before the first epoch -- pooled Dice, ECE and the
median background / foreground logit -- writes them to ``teacher_check.json`` and
warns in one line when the teacher is no better than the student it is meant to
teach: the baseline student's checkpoint when one is given, and at the end of the
run the distilled student's own best validation score.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.4", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.4", min_version, "Engine")

__all__ = ["TeacherCheck", "validation_quality"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_quality(
    network: torch.nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str = "cpu"
) -> dict[str, float | None]:
    """Pooled Dice / recall / precision, ECE and logit medians of ``network`` over ``batches``.

    Args:
        network: a logits-out segmenter with one output channel (put in eval mode here; a
            multi-task teacher runs with its reconstruction switched off), or a
            :class:`~mkd.teachers.VolumeTeacher`, whose logits of each slice come from its volume.
        batches: dicts with ``image`` ``(B, C, H, W)`` and ``label`` ``(B, 1, H, W)``.
        device: where the network runs.

    Returns:
        ``{"dice", "recall", "precision", "ece", "background_median", "foreground_median", "slices"}``.

    Raises:
        MkdError: the network's output is NaN or infinite.
    """
    from mkd.metrics import metrics_from_counts
    from mkd.metrics.calibration import expected_calibration_error, logit_summary
    from mkd.networks.base import reconstruction

    was_training = network.training
    network.eval()
    logits, labels = [], []
    try:
        with reconstruction(network, False):
            for batch in batches:
                if hasattr(network, "slice_logits"):  # a volume teacher (mkd.teachers): its logits of these slices
                    out = network.slice_logits(batch)
                else:
                    out = network(torch.as_tensor(batch["image"]).to(device))
                logits.append(out.float().cpu().numpy())
                labels.append(torch.as_tensor(batch["label"]).cpu().numpy() > 0.5)
    finally:
        network.train(was_training)
    z = np.concatenate(logits)
    y = np.concatenate(labels)
    bad = int((~np.isfinite(z)).sum())
    if bad:
        from mkd.errors import MkdError

        raise MkdError(
            f"the network's output holds {bad} NaN or infinite value(s) on {z.shape[0]} validation slices; its "
            "weights are broken (a diverged run?): retrain it or use an earlier checkpoint"
        )
    pred = z > 0
    counts = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    pooled = metrics_from_counts(*counts)
    probs = 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))  # no overflow for a very confident network
    return {
        "dice": pooled["dice"],
        "recall": pooled["recall"],
        "precision": pooled["precision"],
        "ece": expected_calibration_error(probs, y),
        **logit_summary(z, y),
        "slices": int(z.shape[0]),
    }


class TeacherCheck:
    """Measure the frozen teacher on the validation data when training starts; warn when it cannot teach.

    Args:
        teacher: the frozen teacher.
        data_loader: the validation loader (``image`` and ``label`` batches).
        device: where the networks run.
        baseline_ckpt: optional checkpoint of the baseline student (``mkd student``); it is measured
            the same way and the warning fires when the teacher's pooled Dice is not above it.
        evaluator: optional; at the end of the run the teacher is compared with the best score of
            this evaluator (the distilled student's pooled validation Dice).
        output_file: where to write the measurements (JSON); ``None`` writes nothing.
        margin: the teacher must beat the student by more than this.
        reference_ckpt: optional checkpoint of the same student trained on *all* training labels
            (``mkd student --data-fraction 1.0``); measured the same way, and a teacher whose pooled
            Dice is not above it gets a warning: it knows nothing a student with its labels could
            not learn, so distillation can pass on only the labels it saw.

    Attributes:
        report: the measurements (``teacher``, and ``baseline`` when given).
        warnings: the warning lines issued.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        data_loader: Iterable[Mapping[str, Any]],
        device: torch.device | str = "cpu",
        baseline_ckpt: str | os.PathLike | None = None,
        evaluator: Engine | None = None,
        output_file: str | os.PathLike | None = None,
        margin: float = 0.0,
        reference_ckpt: str | os.PathLike | None = None,
    ) -> None:
        self.teacher = teacher
        self.data_loader = data_loader
        self.device = device
        self.baseline_ckpt = baseline_ckpt or None
        self.evaluator = evaluator
        self.output_file = output_file
        self.margin = float(margin)
        self.reference_ckpt = reference_ckpt or None
        self.report: dict[str, Any] = {}
        self.warnings: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.check)
        engine.add_event_handler(Events.COMPLETED, self.compare_with_result)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        logger.warning(text)

    def _save(self) -> None:
        if self.output_file is not None:
            from mkd.utils import write_json

            Path(self.output_file).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.output_file, self.report)

    def check(self, engine: Engine | None = None) -> dict[str, Any]:
        """Measure the teacher (and the baseline student); log one line; warn when the teacher is not better."""
        from mkd.errors import MkdError

        try:
            teacher = validation_quality(self.teacher, self.data_loader, self.device)
        except MkdError as err:
            raise MkdError(f"teacher check: {err}") from None
        self.report["teacher"] = teacher
        logger.info(
            "teacher on %d validation slices: pooled Dice %.3f (recall %.3f, precision %.3f), ECE %.3f, "
            "median logit background %s / spleen %s",
            teacher["slices"], teacher["dice"], teacher["recall"], teacher["precision"], teacher["ece"],
            _fmt(teacher["background_median"]), _fmt(teacher["foreground_median"]),
        )  # fmt: skip
        if self.baseline_ckpt is not None:
            base = self._measure("baseline", self.baseline_ckpt)
            if not teacher["dice"] > base["dice"] + self.margin:
                self._warn(
                    f"the teacher is no better than the student it is meant to teach: validation pooled Dice "
                    f"{teacher['dice']:.3f} (teacher) vs {base['dice']:.3f} (baseline {self.baseline_ckpt}); "
                    "train the teacher longer (a larger `early_stop_patience`) before distilling"
                )
        if self.reference_ckpt is not None:
            ref = self._measure("reference", self.reference_ckpt)
            if not teacher["dice"] > ref["dice"] + self.margin:
                self._warn(
                    f"the teacher is no better than the student trained on all labels: validation pooled Dice "
                    f"{teacher['dice']:.3f} (teacher) vs {ref['dice']:.3f} ({self.reference_ckpt}); it can pass on "
                    "the labels it saw, not knowledge the student could not learn from them"
                )
        self._save()
        return self.report

    def _measure(self, name: str, checkpoint: str | os.PathLike) -> dict[str, Any]:
        """Measure a student checkpoint on the validation data, as the teacher; keep it in the report as ``name``."""
        from mkd.networks import load_network

        network, _ = load_network(checkpoint, map_location="cpu")
        out = validation_quality(network.to(self.device), self.data_loader, self.device)
        self.report[name] = {**out, "checkpoint": str(checkpoint)}
        return out

    def compare_with_result(self, engine: Engine | None = None) -> None:
        """At the end: warn when the distilled student's best validation score reached the teacher's."""
        best = getattr(getattr(self.evaluator, "state", None), "best_metric", None)
        teacher = self.report.get("teacher")
        if teacher is None or best is None or not np.isfinite(best) or best < 0:
            return
        self.report["student_best_val"] = float(best)
        if not teacher["dice"] > float(best) + self.margin:
            self._warn(
                f"the distilled student reached validation pooled Dice {best:.3f}, the teacher has "
                f"{teacher['dice']:.3f}: a teacher no better than its student has nothing left to teach"
            )
        with contextlib.suppress(OSError):
            self._save()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"
