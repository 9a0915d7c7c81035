"""Stages ``student_<arm>``: fine-tune a student on the labelled subset (TS-KD step 4).

Setup: the student distilled by ``distill_<arm>`` (or, for ``scratch``, a random init — the
baseline). Loop: 0.2·CE + 0.8·Dice on the augmented labelled subset, AdamW, warm-up then cosine.
The step runs through ``student_finetune.engine`` (``reference.engine`` for the reference).
Report: validation Dice every epoch; the student of the best validation epoch is the output
``student.pt`` (without validation images, ``data.model_selection`` off: the last epoch's).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext
from tskd.config import to_dict
from tskd.stages.data_stage import load_data
from tskd.stages.distill import STUDENT_FILE, build_student
from tskd.stages.engine import build_engine
from tskd.stages.ray_train import fit_torch_trainer, load_result_state, run_storage, worker_setup
from tskd.stages.supervised import fit_supervised, labelled_sets
from tskd.storage import remove_tree

log = logging.getLogger(__name__)


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: supervised fine-tuning with per-epoch validation."""
    import ray.train.torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from torch.utils.data import DataLoader

    f = config["finetune"]
    device = worker_setup(config["ray"], config["seed"])
    info = config["info"]
    student = build_student(config["student"], info.num_classes)
    if config["init"] is not None:
        student.load_state_dict(torch.load(config["init"], map_location="cpu", weights_only=True))
    train_set, val_set = labelled_sets(config)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_set, batch_size=f["batch_size"], shuffle=True))
    engine = build_engine(
        student, f["engine"], lr=f["lr"], weight_decay=f["weight_decay"],
        batch_size=f["batch_size"], steps_per_epoch=len(loader), epochs=f["epochs"],
        device=device,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, int(f["warmup_epochs"] * per_epoch), total))
    fit_supervised(engine, loader, val_set, info=info, window=config["patch"],
                   epochs=f["epochs"], device=device, seed=config["seed"],
                   checkpoint_every=config["ray"]["checkpoint_every"],
                   state_fn=lambda m: {"student": {k: v.detach().cpu().clone()
                                                   for k, v in m.state_dict().items()}},
                   tag="student")


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, arm = ctx.cfg, ctx.params["arm"]
    # the student to start from: a distill_<arm> stage's, or a baseline's (params init_stage)
    source = ctx.params.get("init_stage", f"distill_{arm}")
    init = None if arm == "scratch" else str(ctx.inputs[source] / STUDENT_FILE)
    finetune = cfg.student_finetune.resolved(cfg.student.arch)  # lr, weight decay: by arch
    return fit_student(ctx, to_dict(cfg.student), to_dict(finetune), init, arm)


def fit_student(ctx: StageContext, student: dict[str, Any], finetune: dict[str, Any],
                init: str | None, what: str) -> dict[str, Any]:
    """Fine-tune ``student`` (a StudentConfig dict) from ``init`` (a state dict file, or None:
    random init) with ``finetune``'s loop settings; save the best-validation ``student.pt`` in
    the stage directory; return its metrics and footprint (``student/params``, ``/size_mb``,
    ``/latency_ms``). Also the ``reference`` stage's loop."""
    cfg = ctx.cfg
    info, splits = load_data(ctx.inputs["data"])
    config = {"student": student, "finetune": finetune,
              "init": init, "info": info, "labelled": list(splits.labelled),
              "val": list(splits.val), "image_size": cfg.data.image_size,
              "patch": cfg.data.patch, "fg_fraction": cfg.data.fg_fraction,
              "augment": cfg.data.augment, "seed": cfg.seed, "ray": to_dict(cfg.ray)}
    log.info("fine-tuning the %s student on %d labelled images", what, len(splits.labelled))
    storage = run_storage(ctx)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name=ctx.name, storage=storage,
                               inputs=ctx.input_refs)
    state = load_result_state(result)
    torch.save(state["student"], ctx.dir / STUDENT_FILE)
    remove_tree(storage)
    model = load_student(ctx.dir, student, info.num_classes)
    return {"val/dice": state["val/dice"], "student/best_epoch": state["epoch"],
            "train/loss": result.metrics.get("train/loss")} | footprint_metrics(
                model, student["img_size"], cfg.ray)


def footprint_metrics(model: torch.nn.Module, img_size: int, ray_cfg: Any) -> dict[str, Any]:
    """``student/params``, ``student/size_mb``, ``student/latency_ms``: CPU, batch 1, measured
    here (the stage's driver) with the workers' intra-op threads (``ray.torch_threads``, 0 =
    this node's CPUs / ``ray.num_workers``)."""
    from tskd.models.footprint import model_footprint

    threads = latency_threads(ray_cfg)
    fp = model_footprint(model, img_size, threads=threads)
    log.info("student at %d px: %.2fM parameters, %.1f MB, %.1f ms/image on %d CPU threads",
             img_size, fp.params / 1e6, fp.size_mb, fp.latency_ms, threads)
    return {"student/params": fp.params, "student/size_mb": fp.size_mb,
            "student/latency_ms": fp.latency_ms}


def latency_threads(ray_cfg: Any) -> int:
    """The intra-op threads latency is measured with: a training worker's
    (``ray.torch_threads``; 0 = this node's CPUs / ``ray.num_workers``)."""
    return ray_cfg.torch_threads or max(1, (os.cpu_count() or 1) // ray_cfg.num_workers)


def load_student(stage_dir: Path, student_cfg: dict[str, Any],
                 num_classes: int) -> torch.nn.Module:
    """The fine-tuned student of a completed ``student_<arm>`` stage, in eval mode."""
    student = build_student(student_cfg, num_classes)
    student.load_state_dict(torch.load(Path(stage_dir) / STUDENT_FILE, map_location="cpu",
                                       weights_only=True))
    return student.eval()
