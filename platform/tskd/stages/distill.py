"""Stages ``distill_ts_kd`` / ``distill_ta_kd``: the student learns from SAM on the transfer set.

Setup: Ray Data streams the synthetic transfer set to Ray Train workers; each worker holds the
frozen teacher (TS-KD: the LoRA-tuned SAM; task-agnostic KD: the un-tuned SAM, whose mask
decoder never runs) and the student (random init). Loop: per batch, each image flipped or not on
its own; the teacher's low-res mask logits and hidden states (``distill.teacher_features``) under
``no_grad`` at the teacher's resolution, the student at its own; loss ``w_logits · L(student
logits, teacher logits) + w_hidden · MSE(P(student hidden), teacher hidden)`` (``L`` and the
logits' resolution match by ``distill.logits_loss`` / ``logits_target``, the Table 8 presets;
task-agnostic KD: ``w_logits = 0``); AdamW, warm-up then cosine. Report: KD losses per epoch;
the student of the last epoch is the stage's output ``student.pt``.

The teacher is placed by :func:`place_teacher` — a seam where later issues add a ZeRO-3 sharded
teacher and a precomputed teacher-target cache.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext
from tskd.config import to_dict
from tskd.models.students import build_student  # the registry; re-exported for other stages
from tskd.stages.data_stage import load_data
from tskd.stages.ray_train import fit_torch_trainer, is_rank_zero, load_result_state, report
from tskd.stages.ray_train import unwrap, worker_setup
from tskd.stages.teacher_pretrain import base_checkpoint

log = logging.getLogger(__name__)

STUDENT_FILE = "student.pt"


class TeacherTargets(torch.nn.Module):
    """The frozen teacher as distillation targets: ``forward(images) -> (logits | None, hidden)``.

    ``images``: float32 (B, 3, H, W) in 0..255 at any size — the segmenter resizes them to the
    resolution it was fine-tuned at (``teacher.img_size``), whatever the student's size.
    ``logits``: (B, C, s/4, s/4), or ``None`` when ``need_logits`` is false (task-agnostic KD):
    then the mask decoder does not run. ``hidden``: the ``features`` the student learns —
    ``neck``: the image embedding (B, 256, s/16, s/16); ``blocks``: the last encoder block's
    tokens before the neck (B, D_enc, s/16, s/16).
    """

    def __init__(self, segmenter: torch.nn.Module, *, need_logits: bool,
                 features: str = "neck") -> None:
        super().__init__()
        if features not in ("neck", "blocks"):
            raise ValueError(f"unknown teacher features {features!r}; allowed: neck, blocks")
        self.segmenter, self.need_logits, self.features = segmenter, need_logits, features
        self._tokens: torch.Tensor | None = None
        if features == "blocks":
            self.segmenter.sam.image_encoder.blocks[-1].register_forward_hook(self._keep_tokens)

    def _keep_tokens(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._tokens = output.permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    @property
    def hidden_dim(self) -> int:
        if self.features == "blocks":
            return int(self.segmenter.sam.image_encoder.neck[0].in_channels)
        return int(self.segmenter.hidden_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        embedding = self.segmenter.encode(images)
        logits = self.segmenter.decode(embedding) if self.need_logits else None
        hidden = self._tokens if self.features == "blocks" else embedding
        self._tokens = None
        return logits, hidden


def place_teacher(config: dict[str, Any], device: torch.device) -> TeacherTargets:
    """The frozen teacher on this worker (replicated: every worker holds a full copy)."""
    from tskd.stages.teacher_finetune import load_base_teacher, load_finetuned_teacher

    t = config["teacher"]
    if t["tuned"]:
        teacher = load_finetuned_teacher(Path(t["stage_dir"]))
    else:
        teacher = load_base_teacher(Path(t["checkpoint"]), arch=t["arch"],
                                    num_classes=t["num_classes"], img_size=t["img_size"])
    teacher.requires_grad_(False)
    d = config["distill"]
    return TeacherTargets(teacher, need_logits=d["w_logits"] > 0,
                          features=d["teacher_features"]).to(device).eval()


def flip_per_sample(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of (B, 3, H, W) flipped horizontally with probability 1/2, independently."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


class Distillation(torch.nn.Module):
    """Student + KD loss (with its learned projection P) as one module, so DDP wraps both and
    its forward is the training objective: ``forward(images, teacher_out) -> (loss, parts)``."""

    def __init__(self, student: torch.nn.Module, kd: torch.nn.Module) -> None:
        super().__init__()
        self.student, self.kd = student, kd

    def forward(self, images: torch.Tensor, teacher_out: Any) -> tuple[torch.Tensor, dict]:
        return self.kd(self.student(images), teacher_out)


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stream the transfer shard, distil teacher → student."""
    import ray.train
    import ray.train.torch
    import torch.nn.functional as F
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.losses import KDLoss
    from tskd.stages.live_metrics import StepTimer

    d = config["distill"]
    device = worker_setup(config["ray"], config["seed"])
    world = ray.train.get_context().get_world_size()
    teacher = place_teacher(config, device)
    student = build_student(config["student"], config["num_classes"],
                            hidden_block=d["student_block"]).to(device)
    kd = KDLoss(student.hidden_dim, teacher.hidden_dim, w_logits=d["w_logits"],
                w_hidden=d["w_hidden"], logits_loss=d["logits_loss"],
                logits_target=d["logits_target"], normalize=d["normalize"]).to(device)
    # A zero-weighted term leaves parameters without gradients (task-agnostic KD never trains
    # the student's head), hence find_unused_parameters.
    bundle = ray.train.torch.prepare_model(
        Distillation(student, kd), parallel_strategy_kwargs={"find_unused_parameters": True})
    optim = torch.optim.AdamW(bundle.parameters(), lr=d["lr"], weight_decay=d["weight_decay"])
    steps_per_epoch = max(1, math.ceil(config["n_transfer"] / (d["batch_size"] * world)))
    total = d["epochs"] * steps_per_epoch
    sched = get_cosine_schedule_with_warmup(optim, int(d["warmup_epochs"] * steps_per_epoch),
                                            total)
    shard = ray.train.get_dataset_shard("transfer")
    size = config["student"]["img_size"]
    start, timer = time.time(), StepTimer()
    for epoch in range(1, d["epochs"] + 1):
        sums: dict[str, float] = {}
        n = 0
        for batch in timer.batches(shard.iter_torch_batches(batch_size=d["batch_size"],
                                              dtypes={"id": torch.int64,
                                                      "image": torch.float32}, device=device,
                                              local_shuffle_buffer_size=4 * d["batch_size"],
                                              local_shuffle_seed=config["seed"] + epoch)):
            # one flip per sample, the same for the teacher's and the student's view; the
            # teacher sees the image at its own resolution, the student at its own
            images = flip_per_sample(batch["image"].permute(0, 3, 1, 2))  # (B, 3, H, W)
            with timer.teacher():
                target = teacher(images)
            if images.shape[-1] != size:
                images = F.interpolate(images, size=(size, size), mode="bilinear",
                                       align_corners=False)
            loss, parts = bundle(images, target)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            n += 1
            sums["distill/loss"] = sums.get("distill/loss", 0.0) + loss.item()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        metrics = {k: v / max(n, 1) for k, v in sums.items()} | {"epoch": epoch} \
            | timer.summary()
        if is_rank_zero():
            log.info("distill epoch %d/%d loss %.5f, %.1f img/s (teacher %.0f%%, data wait %.0f%%), "
                     "%.0f s", epoch, d["epochs"], metrics.get("distill/loss", float("nan")),
                     metrics["perf/images_per_s"], 100 * metrics.get("perf/teacher_share", 0.0),
                     100 * metrics["perf/data_stall"], time.time() - start)
        last = epoch == d["epochs"]
        report(metrics, {"student": unwrap(bundle).student.state_dict()} if last else None)


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.stages.transfer_set import read_transfer_set

    cfg, arm = ctx.cfg, ctx.params["arm"]
    info, _ = load_data(ctx.inputs["data"])
    transfer_dir = ctx.inputs["transfer"]
    n_transfer = json.loads((transfer_dir / "transfer.json").read_text())["n_kept"]
    distill = to_dict(cfg.distill)
    if arm == "ta_kd":
        distill["w_logits"] = 0.0
        teacher = {"tuned": False, "checkpoint": str(base_checkpoint(ctx)),
                   "arch": cfg.teacher.arch, "img_size": cfg.teacher.img_size}
    else:
        teacher = {"tuned": True, "stage_dir": str(ctx.inputs["teacher"])}
    num_classes = teacher["num_classes"] = info.num_classes
    config = {"teacher": teacher, "student": to_dict(cfg.student), "distill": distill,
              "num_classes": num_classes, "n_transfer": n_transfer, "seed": cfg.seed,
              "ray": to_dict(cfg.ray)}
    # the id column lets ray.deterministic sort the rows (Parquet holds them in the order the
    # sampler tasks finished), so every run streams the same batches to the same workers
    dataset = read_transfer_set(transfer_dir).select_columns(["id", "image"])
    log.info("distilling (%s) on %d transfer images for %d epochs", arm, n_transfer,
             cfg.distill.epochs)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name=ctx.name, storage=ctx.dir / "ray",
                               datasets={"transfer": dataset})
    state = load_result_state(result)
    torch.save(state["student"], ctx.dir / STUDENT_FILE)
    shutil.rmtree(ctx.dir / "ray", ignore_errors=True)
    return {k: v for k, v in result.metrics.items() if k.startswith(("distill/", "kd/"))}

