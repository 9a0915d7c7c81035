"""Stages ``teacher_check`` and ``check_distill_ts_kd``: is the model good enough to learn from?

Setup: the data's validation images (the labelled training images when model selection is off)
at ``data.image_size`` (scored by sliding window with patches, as the training loops do), and the model: the LoRA-tuned teacher (``params.model == "teacher"``) or
the TS-KD student as distillation left it. Loop: its Dice on those images, and the floor
(:mod:`tskd.quality`): an all-background prediction, ``check.min_dice`` and, for the teacher, a
tiny U-Net trained from scratch on the same labels for ``check.baseline_epochs``. Report: the
verdict (``check/passed``, ``check/dice``, ``check/floor``, ``check/floors``) and, when it
failed, ``check/message`` (the numbers and the likely causes from the data stage's fingerprint).
The stage never raises on a failed check: it records it, and the pipeline stops after it unless
``check.on_fail`` is ``continue`` (:func:`tskd.pipeline.run_pipeline`), so a re-run with
``continue`` reuses the verdict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext, read_manifest
from tskd.config import to_dict
from tskd.stages.data_stage import FINGERPRINT_FILE, load_data

log = logging.getLogger(__name__)

TEACHER_CHECK = "teacher_check"


def load_checked_model(ctx: StageContext, num_classes: int) -> torch.nn.Module:
    """The model the check scores (eval mode): the tuned teacher, or the distilled student."""
    if ctx.params["model"] == "teacher":
        from tskd.stages.teacher_finetune import load_finetuned_teacher

        return load_finetuned_teacher(ctx.inputs["teacher"])
    from tskd.stages.student_finetune import load_student

    return load_student(ctx.inputs[ctx.params["model"]], to_dict(ctx.cfg.student), num_classes)


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.data.dataset import SegmentationDataset
    from tskd.data.patches import training_set
    from tskd.evaluation import score_model
    from tskd.quality import (BackgroundOnly, check_against_floor, failure_message,
                              likely_causes, train_baseline)

    cfg, what = ctx.cfg, ctx.params["model"]
    info, splits = load_data(ctx.inputs["data"])
    split = "validation" if splits.val else "labelled training"
    ids = list(splits.val or splits.labelled)
    size, patch = int(cfg.data.image_size), cfg.data.patch
    eval_set = SegmentationDataset(info, ids, size)

    def dice(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(score_model(model, eval_set, num_classes=info.num_classes,
                                     class_names=list(info.class_names), window=patch)["dice"])

    floors: dict[str, float] = {"all-background": dice(BackgroundOnly(info.num_classes)),
                                "check.min_dice": cfg.check.min_dice}
    if what == "teacher" and cfg.check.baseline_epochs > 0:
        train = training_set(SegmentationDataset(info, splits.labelled, size), image_size=size,
                             patch=patch, fg_fraction=cfg.data.fg_fraction, seed=cfg.seed)
        baseline = train_baseline(train, num_classes=info.num_classes, img_size=patch,
                                  epochs=cfg.check.baseline_epochs, seed=cfg.seed)
        floors["tiny scratch U-Net"] = dice(baseline)
    name = "teacher" if what == "teacher" else f"student after {what.removeprefix('distill_')}"
    verdict = check_against_floor(name, dice(load_checked_model(ctx, info.num_classes)), floors,
                                  n_images=len(ids), split=split)
    out = {f"check/{k}": v for k, v in verdict.items()}
    if verdict["passed"]:
        log.info("%s check passed: Dice %.4f > floor %.4f (%s)", name, verdict["dice"],
                 verdict["floor"], ", ".join(f"{k} {v:.4f}" for k, v in verdict["floors"].items()))
        return out
    record = _fingerprint(ctx.inputs["data"])
    causes = likely_causes(verdict, record.get("fingerprint"), record.get("size_warnings", []),
                           splits.n_train_labels)
    out["check/message"] = failure_message(verdict, causes)
    log.warning("%s", out["check/message"])
    return out


def _fingerprint(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_results(inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``{stage: verdict}`` of every check stage among ``inputs`` (for ``results.json``)."""
    out = {}
    for name, entry in inputs.items():
        metrics = (read_manifest(entry) or {}).get("metrics", {})
        if "check/passed" in metrics:
            out[name] = {k.removeprefix("check/"): v for k, v in metrics.items()
                         if k.startswith("check/")}
    return out
