"""Stage ``reference``: a label-only network trained beside the students, so no result is read
without it ("does this beat a U-Net trained on my labels?").

Setup: ``reference.arch`` (default MONAI ``BasicUNet``) from the student registry, random init,
at ``reference.img_size`` (null: ``data.image_size``, or the patch side with patches). Loop: the students' fine-tuning loop
(:func:`tskd.stages.student_finetune.fit_student`: the same labelled subset, augmentation and
0.2·CE + 0.8·Dice, AdamW, warm-up then cosine) with ``reference``'s epochs, batch size and
learning rate. Report: validation Dice per epoch; the best-validation network is ``student.pt``;
its parameters, size and CPU latency as for the students. The ``evaluate`` stage scores it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext
from tskd.config import ExperimentConfig, to_dict
from tskd.stages.student_finetune import fit_student, load_student

log = logging.getLogger(__name__)


def reference_student(cfg: ExperimentConfig) -> dict[str, Any]:
    """The reference network as a student config dict (for ``tskd.models.students``)."""
    return to_dict(cfg.reference.student(cfg.data.patch))


def run(ctx: StageContext) -> dict[str, Any]:
    ref = to_dict(ctx.cfg.reference)
    loop = {k: ref[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                "engine")}
    return fit_student(ctx, reference_student(ctx.cfg), loop, None,
                       f"label-only reference ({ref['arch']})")


def load_reference(stage_dir: Path, cfg: ExperimentConfig, num_classes: int) -> torch.nn.Module:
    """The trained reference network of a completed ``reference`` stage, in eval mode."""
    return load_student(stage_dir, reference_student(cfg), num_classes)
