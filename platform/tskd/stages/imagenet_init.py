"""Stage ``init_imagenet_mae``: the student with its ViT initialised from an ImageNet MAE
checkpoint (the paper's ImageNet-MAE baseline; ``imagenet_mae.checkpoint``).

Setup: the student (random init) for the dataset's classes. Loop: none — the checkpoint's
encoder weights are copied into the ViT by :func:`tskd.models.vit_checkpoint.load_vit_checkpoint`
(MAE decoder and heads dropped; position / patch embeddings that do not fit the student's input
size or patch size interpolated or skipped by ``imagenet_mae.mismatch``). Report:
``checkpoint_load.json`` and the metrics ``init/interpolated``, ``init/skipped`` (key lists) and
``init/loaded`` (count), also in the manifest; the output ``student.pt`` is fine-tuned by
``student_imagenet_mae`` exactly as a distilled student. Single process: no Ray Train.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext, write_json
from tskd.config import to_dict
from tskd.models.students import build_student
from tskd.stages.data_stage import load_data
from tskd.stages.distill import STUDENT_FILE

log = logging.getLogger(__name__)

REPORT_FILE = "checkpoint_load.json"


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.models.vit_checkpoint import load_vit_checkpoint

    cfg = ctx.cfg
    info, _ = load_data(ctx.inputs["data"])
    path = Path(cfg.imagenet_mae.checkpoint).expanduser()
    torch.manual_seed(cfg.seed)  # the head (and any skipped embedding) starts from this seed
    student = build_student(to_dict(cfg.student), info.num_classes)
    report = load_vit_checkpoint(student.backbone, path, mismatch=cfg.imagenet_mae.mismatch)
    log.info("imagenet_mae: %s", report.summary())
    torch.save(student.state_dict(), ctx.dir / STUDENT_FILE)
    write_json(ctx.dir / REPORT_FILE, {"checkpoint": str(path),
                                       "mismatch": cfg.imagenet_mae.mismatch} | report.as_dict())
    return {"init/loaded": len(report.loaded), "init/interpolated": sorted(report.interpolated),
            "init/skipped": sorted(report.skipped), "init/dropped": len(report.dropped)}
