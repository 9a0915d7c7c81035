"""Stage ``teacher``: adapt the foundation SAM to the task with LoRA (TS-KD step 1).

Setup: the base SAM (official checkpoint or the pre-trained demo SAM) with a mask decoder of C
outputs, LoRA on the q/v slices of every encoder block; the decoder trained as ``teacher.decoder``
says (``full`` as SAMed, ``lora``, ``frozen``; see :mod:`tskd.lora`), every other weight frozen. Loop: 0.2·CE + 0.8·Dice on the augmented labelled subset, AdamW, linear
warm-up then polynomial decay (as SAMed), stepped through ``teacher.finetune.engine``. Report: validation Dice per epoch; the adapter of the
best epoch is kept.

Output: ``lora.pt`` (what was trained: the adapters and the trained decoder weights; its size
is the metric ``teacher/adapter_mb``, the paper's Table 7 "LoRA SAM extra memory") and ``teacher.json`` (base checkpoint, arch,
classes, input size, LoRA spec); :func:`load_finetuned_teacher` rebuilds the merged teacher.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tskd.artifacts import StageContext, write_json
from tskd.config import to_dict
from tskd.stages.data_stage import load_data
from tskd.stages.engine import build_engine
from tskd.stages.ray_train import (fit_torch_trainer, is_rank_zero, load_result_state,
                                   run_storage, worker_setup)
from tskd.stages.supervised import fit_supervised, labelled_sets
from tskd.stages.teacher_pretrain import base_checkpoint
from tskd.storage import remove_tree

if TYPE_CHECKING:
    from tskd.models.sam import ValueFn

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.json"
LORA_FILE = "lora.pt"


def build_teacher(spec: dict[str, Any], *, lora: bool) -> torch.nn.Module:
    """A :class:`SamSegmenter` from a ``teacher.json``-shaped spec, optionally with LoRA."""
    from tskd.lora import LoraSpec, apply_lora
    from tskd.models.sam import SamSegmenter, build_sam

    model = SamSegmenter(build_sam(spec["arch"], num_classes=spec["num_classes"],
                                   img_size=spec["img_size"], checkpoint=spec["base_checkpoint"]))
    if lora:
        model = apply_lora(model, LoraSpec(**spec["lora"]))
    return model


def warmup_steps(requested: int, total: int) -> int:
    """Warm-up iterations, capped at a fifth of a run shorter than the requested warm-up."""
    if requested > total // 5:
        capped = total // 5
        log.warning("warm-up of %d iterations exceeds a fifth of the %d training iterations; "
                    "using %d", requested, total, capped)
        return capped
    return requested


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA fine-tuning on the labelled subset, validation every epoch."""
    import ray.train.torch
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup
    from torch.utils.data import DataLoader

    from tskd.lora import count_trainable, lora_state_dict

    f = config["finetune"]
    device = worker_setup(config["ray"], config["seed"])
    model = build_teacher(config["teacher"], lora=True)
    if is_rank_zero():
        log.info("teacher LoRA: %d trainable parameters", count_trainable(model))
    info = config["info"]
    train_set, val_set = labelled_sets(config)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_set, batch_size=f["batch_size"], shuffle=True))
    engine = build_engine(
        model, f["engine"], lr=f["lr"], weight_decay=f["weight_decay"],
        batch_size=f["batch_size"], steps_per_epoch=len(loader), epochs=f["epochs"],
        device=device,
        schedule=lambda opt, per_epoch, total: get_polynomial_decay_schedule_with_warmup(
            opt, warmup_steps(f["warmup_iters"], total), total, lr_end=0.0, power=0.9))
    fit_supervised(engine, loader, val_set, info=info, window=config["patch"],
                   epochs=f["epochs"], device=device, seed=config["seed"],
                   checkpoint_every=config["ray"]["checkpoint_every"],
                   state_fn=lambda m: {"lora": lora_state_dict(m)}, tag="teacher")


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    info, splits = load_data(ctx.inputs["data"])
    spec = {"arch": cfg.teacher.arch, "num_classes": info.num_classes,
            "img_size": cfg.teacher.img_size, "base_checkpoint": str(base_checkpoint(ctx)),
            "lora": to_dict(cfg.teacher.lora) | {"decoder": cfg.teacher.decoder}}
    config = {"teacher": spec, "finetune": to_dict(cfg.teacher.finetune), "info": info,
              "labelled": list(splits.labelled), "val": list(splits.val),
              "image_size": cfg.data.image_size, "patch": cfg.data.patch,
              "fg_fraction": cfg.data.fg_fraction, "augment": cfg.data.augment,
              "seed": cfg.seed, "ray": to_dict(cfg.ray)}
    storage = run_storage(ctx)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name="teacher", storage=storage,
                               inputs=ctx.input_refs)
    state = load_result_state(result)
    torch.save(state["lora"], ctx.dir / LORA_FILE)
    write_json(ctx.dir / TEACHER_FILE, {**spec, "best_epoch": state["epoch"]})
    remove_tree(storage)
    return {"val/dice": state["val/dice"], "teacher/best_epoch": state["epoch"],
            "teacher/adapter_mb": round((ctx.dir / LORA_FILE).stat().st_size / 2**20, 3),
            "teacher/trained_params": sum(t.numel() for t in state["lora"].values()),
            "train/loss": result.metrics.get("train/loss")}


def load_finetuned_teacher(stage_dir: Path) -> torch.nn.Module:
    """The LoRA-tuned teacher of a completed ``teacher`` stage, adapters merged, in eval mode."""
    from tskd.lora import load_lora_state_dict, merge_lora

    stage_dir = Path(stage_dir)
    spec = json.loads((stage_dir / TEACHER_FILE).read_text())
    model = build_teacher(spec, lora=True)
    path = stage_dir / LORA_FILE
    load_lora_state_dict(model, torch.load(path, map_location="cpu", weights_only=True),
                         source=str(path))
    return merge_lora(model).eval()


def teacher_spec(teacher: dict[str, Any]) -> dict[str, Any]:
    """The ``teacher.json``-shaped spec of the distillation teacher in a stage config's
    ``teacher`` section: the tuned teacher's file (``tuned``), or the foundation SAM's."""
    if teacher["tuned"]:
        return json.loads((Path(teacher["stage_dir"]) / TEACHER_FILE).read_text())
    return {"arch": teacher["arch"], "num_classes": teacher["num_classes"],
            "img_size": teacher["img_size"], "base_checkpoint": str(teacher["checkpoint"])}


def plan_teacher_weights(spec: dict[str, Any], segmenter: torch.nn.Module, *,
                         stage_dir: Path | None) -> dict[str, ValueFn]:
    """The weights :func:`load_finetuned_teacher` (``stage_dir`` given) or
    :func:`load_base_teacher` would give ``segmenter`` (a plain :class:`SamSegmenter` of
    ``spec``'s shape, possibly partitioned), key by key and lazily: the base checkpoint is
    memory-mapped and each value is read or merged only when its entry is called."""
    from tskd.lora import LoraSpec, plan_merged_lora
    from tskd.models.sam import plan_sam_state_dict, read_sam_checkpoint

    source = str(spec["base_checkpoint"])
    base, _ = plan_sam_state_dict(segmenter.sam, read_sam_checkpoint(source, mmap=True),
                                  arch=spec["arch"], source=source)
    plan = {f"sam.{k}": v for k, v in base.items()}
    if stage_dir is None:
        return plan
    path = Path(stage_dir) / LORA_FILE
    adapters = torch.load(path, map_location="cpu", weights_only=True)
    return plan_merged_lora(plan, adapters, LoraSpec(**spec["lora"]), source=str(path))


def load_base_teacher(checkpoint: Path, *, arch: str, num_classes: int,
                      img_size: int) -> torch.nn.Module:
    """The un-tuned foundation SAM (task-agnostic KD's teacher), in eval mode."""
    spec = {"arch": arch, "num_classes": num_classes, "img_size": img_size,
            "base_checkpoint": str(checkpoint)}
    return build_teacher(spec, lora=False).eval()
