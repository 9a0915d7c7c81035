"""Stages ``distill_ts_kd`` / ``distill_ta_kd``: the student learns from SAM on the transfer set.

Setup: Ray Data streams the synthetic transfer set to Ray Train workers; each worker holds the
frozen teacher (TS-KD: the LoRA-tuned SAM; task-agnostic KD: the un-tuned SAM, whose mask
decoder never runs) and the student (random init). Loop: per batch, each image flipped or not on
its own; the teacher's low-res mask logits and hidden states (``distill.teacher_features``) under
``no_grad`` at the teacher's resolution, the student at its own; loss ``w_logits · L(student
logits, teacher logits) + w_hidden · MSE(P(student hidden), teacher hidden)`` (``L`` and the
logits' resolution match by ``distill.logits_loss`` / ``logits_target``, the Table 8 presets;
task-agnostic KD: ``w_logits = 0``); AdamW, warm-up then cosine, stepped through the training
engine (``distill.engine``: DeepSpeed on GPUs and DDP on CPU by default,
:mod:`tskd.stages.engine`). Report: KD losses
per epoch, a full-state checkpoint every ``ray.checkpoint_every`` epochs (a restarted worker
group or re-run resumes from it); the student of the last epoch is the stage's output
``student.pt``. With patch training (``data.patch_size`` < ``data.image_size``) the transfer
stage already holds patch-sized images (the DDPM's samples, and crops of the real unlabelled
images), so the teacher sees each crop at its ``img_size`` and the student at its own.

The teacher is placed by :func:`place_teacher` (``distill.teacher_placement``): ``replicated``
(every worker holds it), ``sharded`` (partitioned over the workers with ZeRO-3 and gathered layer
by layer in its forward, through :class:`tskd.stages.engine.ShardedModule`; built partitioned
and loaded a layer at a time, never whole on a worker), or ``cached`` (a
``targets_<arm>`` stage ran it once; :class:`CachedTargets` reads its outputs). Each epoch reports
the teacher's parameter memory per worker (``perf/teacher_param_mb``: held between batches;
``perf/teacher_param_peak_mb``: the most held at once inside its forward).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext
from tskd.config import to_dict
from tskd.models.students import build_student  # the registry; re-exported for other stages
from tskd.stages.data_stage import load_data
from tskd.stages.engine import build_engine, held_param_bytes, peak_param_bytes
from tskd.stages.ray_train import (checkpoint, checkpoint_due, fail_point, fit_torch_trainer,
                                   is_rank_zero, load_result_state, report, resume, run_storage,
                                   worker_setup)
from tskd.stages.teacher_pretrain import base_checkpoint
from tskd.storage import remove_tree

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


def place_teacher(config: dict[str, Any], device: torch.device) -> Any:
    """The frozen teacher on this worker, called as ``teacher(images) -> (logits | None,
    hidden)`` (:class:`TeacherTargets`' contract, with its ``hidden_dim``):

    - ``replicated``: a whole :class:`TeacherTargets` on ``device``;
    - ``sharded``: the same module partitioned over the process group with ZeRO-3
      (:class:`tskd.stages.engine.ShardedModule`); collective: every worker calls it on every
      batch. It is partitioned from its construction on: each sub-module is built with only
      this worker's shard of its parameters, and the weights are written one sub-module at a
      time from the memory-mapped base checkpoint and the adapters (LoRA merged per weight), so
      no worker ever holds the whole teacher, in host or device memory."""
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.stages.teacher_finetune import (load_base_teacher, load_finetuned_teacher,
                                              plan_teacher_weights, teacher_spec)

    t, d = config["teacher"], config["distill"]

    def targets_of(segmenter: torch.nn.Module) -> TeacherTargets:
        segmenter.requires_grad_(False)
        return TeacherTargets(segmenter, need_logits=d["w_logits"] > 0,
                              features=d["teacher_features"]).eval()

    if d.get("teacher_placement") == "sharded":
        from tskd.stages.engine import ShardedModule

        spec = teacher_spec(t)

        def make(partitioned: Any) -> TeacherTargets:
            return targets_of(SamSegmenter(build_sam(
                spec["arch"], num_classes=spec["num_classes"], img_size=spec["img_size"],
                module_context=partitioned)).eval())

        def plan_of(targets: TeacherTargets) -> dict[str, Any]:
            plan = plan_teacher_weights(spec, targets.segmenter,
                                        stage_dir=Path(t["stage_dir"]) if t["tuned"] else None)
            return {f"segmenter.{k}": v for k, v in plan.items()}

        return ShardedModule.build(make, plan_of, batch_size=d["batch_size"], device=device,
                                   persist_below=d["shard_persist_below"],
                                   prefetch_numel=d["shard_prefetch"])
    if t["tuned"]:
        teacher = load_finetuned_teacher(Path(t["stage_dir"]))
    else:
        teacher = load_base_teacher(Path(t["checkpoint"]), arch=t["arch"],
                                    num_classes=t["num_classes"], img_size=t["img_size"])
    return targets_of(teacher).to(device)


def draw_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` bool: which samples of a batch are flipped (probability 1/2, independently)."""
    return torch.rand(n, generator=generator) < 0.5


def apply_flips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) with the samples where ``flip`` is true flipped along the last axis."""
    return torch.where(flip.to(x.device).view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def flip_per_sample(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of (B, 3, H, W) flipped horizontally with probability 1/2, independently."""
    return apply_flips(images, draw_flips(images.shape[0], generator))


class CachedTargets:
    """The teacher's targets read from a ``targets_<arm>`` cache instead of a live teacher:
    ``(batch) -> (images, (logits | None, hidden))`` with one view drawn per sample — the same
    draw :func:`flip_per_sample` makes — so the pairs equal the replicated placement's.

    ``hidden_dim``: channels of the cached hidden states (from the cache's shapes)."""

    def __init__(self, shapes: dict[str, list[int]]) -> None:
        self.hidden_dim = int(shapes["hidden0"][0])
        self.logits = "logits0" in shapes
        self.shapes = shapes

    def probe(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Zero targets of the cached shapes for ``images`` (B, ...): a stand-in teacher for
        probes that only need which parameters a loss reaches."""
        b = images.shape[0]
        zeros = lambda key: torch.zeros(b, *self.shapes[key], device=images.device)  # noqa: E731
        return (zeros("logits0") if self.logits else None), zeros("hidden0")

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        flip = draw_flips(batch["image"].shape[0])
        images = apply_flips(batch["image"].permute(0, 3, 1, 2), flip)
        hidden = torch.where(flip.to(images.device)[:, None, None, None], batch["hidden1"],
                             batch["hidden0"])
        logits = torch.where(flip.to(images.device)[:, None, None, None], batch["logits1"],
                             batch["logits0"]) if self.logits else None
        return images, (logits, hidden)


def batch_pairs(batch: dict[str, torch.Tensor], teacher: Any, *, cached: bool, size: int,
                timer: Any = None) -> tuple[torch.Tensor, Any]:
    """One batch of the transfer shard as ``(student images (B, 3, size, size), teacher
    targets)``: one flip per sample, the same for the teacher's and the student's view; the
    teacher sees the image at its own resolution (live: ``teacher(images)``, timed by
    ``timer.teacher()`` when given; ``cached``: :class:`CachedTargets` picks the stored view),
    the student at ``size`` (bilinear)."""
    import torch.nn.functional as F

    if cached:
        images, target = teacher(batch)
    else:
        images = flip_per_sample(batch["image"].permute(0, 3, 1, 2))  # (B, 3, H, W)
        with timer.teacher() if timer is not None else contextlib.nullcontext():
            target = teacher(images)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, target


class Distillation(torch.nn.Module):
    """Student + KD loss (with its learned projection P) as one module, so the engine wraps both
    and its forward is the training objective: ``forward(images, teacher_out) -> (loss, parts)``."""

    def __init__(self, student: torch.nn.Module, kd: torch.nn.Module) -> None:
        super().__init__()
        self.student, self.kd = student, kd

    def forward(self, images: torch.Tensor, teacher_out: Any) -> tuple[torch.Tensor, dict]:
        return self.kd(self.student(images), teacher_out)


def freeze_unreached(bundle: Distillation, teacher: TeacherTargets, size: int) -> list[str]:
    """Freeze the parameters no loss term reaches (task-agnostic KD: the student's logits head)
    and return their names: one probe forward/backward on a fixed random batch (its own
    generator: the global RNG is untouched). Under DeepSpeed every optimised parameter gets a
    gradient (zeros for unreached ones), so AdamW's weight decay would shrink them; torch's
    AdamW skips them. Frozen, both engines leave them as initialised."""
    g = torch.Generator().manual_seed(0)
    device = next(bundle.parameters()).device
    buffers = {k: v.detach().clone() for k, v in bundle.named_buffers()}  # BN stats, KD vars
    images = (torch.rand(2, 3, size, size, generator=g) * 255).to(device)
    loss, _ = bundle(images, teacher(images))
    loss.backward()
    with torch.no_grad():
        for key, value in bundle.named_buffers():
            value.copy_(buffers[key])
    names = [n for n, p in bundle.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in bundle.named_parameters():
        param.grad = None
        if name in names:
            param.requires_grad_(False)
    return names


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stream the transfer shard, distil teacher → student."""
    import ray.train
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.losses import KDLoss
    from tskd.stages.live_metrics import StepTimer
    from tskd.stages.rungs import RUNG_KEY, rung_dice

    d = config["distill"]
    device = worker_setup(config["ray"], config["seed"])
    world = ray.train.get_context().get_world_size()
    cached = config.get("cache")  # the targets' shapes, when the placement is cached
    teacher = CachedTargets(cached) if cached else place_teacher(config, device)
    student = build_student(config["student"], config["num_classes"],
                            hidden_block=d["student_block"])
    kd = KDLoss(student.hidden_dim, teacher.hidden_dim, w_logits=d["w_logits"],
                w_hidden=d["w_hidden"], logits_loss=d["logits_loss"],
                logits_target=d["logits_target"], normalize=d["normalize"])
    steps_per_epoch = max(1, math.ceil(config["n_transfer"] / (d["batch_size"] * world)))
    bundle = Distillation(student, kd).to(device)
    memory: dict[str, float] = {}
    if cached:
        unreached = freeze_unreached(bundle, teacher.probe, config["student"]["img_size"])
    else:  # the probe's teacher forward also measures the teacher's parameter memory
        module = getattr(teacher, "module", teacher)
        held = held_param_bytes(module)
        with peak_param_bytes(module) as peak:
            unreached = freeze_unreached(bundle, teacher, config["student"]["img_size"])
        memory = {"perf/teacher_param_mb": held / 2**20,
                  "perf/teacher_param_peak_mb": peak[0] / 2**20}
        if is_rank_zero():
            log.info("distill: teacher %s, %.1f MB of parameters per worker (%.1f MB at most "
                     "inside its forward)",
                     "sharded" if d["teacher_placement"] == "sharded" else "replicated",
                     *memory.values())
    if unreached and is_rank_zero():
        log.info("distill: %d parameter tensors no loss term reaches stay frozen (e.g. %s)",
                 len(unreached), unreached[0])
    engine = build_engine(
        bundle, d["engine"], lr=d["lr"], weight_decay=d["weight_decay"],
        batch_size=d["batch_size"], steps_per_epoch=steps_per_epoch, epochs=d["epochs"],
        device=device,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, int(d["warmup_epochs"] * per_epoch), total))
    first, loop, _ = resume(engine, "distill")
    shard = ray.train.get_dataset_shard("transfer")
    size = config["student"]["img_size"]
    start, timer = time.time(), StepTimer()
    rungs = list(loop.get("rungs", []))  # rung results before a restart
    dtypes = {"id": torch.int64, "image": torch.float32} | (
        {k: torch.float32 for k in cached} if cached else {})  # fp16 targets -> fp32
    for epoch in range(first, d["epochs"] + 1):
        fail_point(config, epoch)
        sums: dict[str, float] = {}
        n = 0
        engine.train()
        for batch in timer.batches(shard.iter_torch_batches(batch_size=d["batch_size"],
                                              dtypes=dtypes, device=device,
                                              local_shuffle_buffer_size=4 * d["batch_size"],
                                              local_shuffle_seed=config["seed"] + epoch)):
            images, target = batch_pairs(batch, teacher, cached=bool(cached), size=size,
                                         timer=timer)
            loss, parts = engine(images, target)
            engine.step(loss)
            n += 1
            sums["distill/loss"] = sums.get("distill/loss", 0.0) + loss.item()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        metrics = {k: v / max(n, 1) for k, v in sums.items()} | {"epoch": epoch} \
            | timer.summary() | memory
        if first > 1:
            metrics["distill/resumed_from_epoch"] = first - 1
        if is_rank_zero():
            log.info("distill epoch %d/%d loss %.5f, %.1f img/s (teacher %.0f%%, data wait %.0f%%), "
                     "%.0f s", epoch, d["epochs"], metrics.get("distill/loss", float("nan")),
                     metrics["perf/images_per_s"], 100 * metrics.get("perf/teacher_share", 0.0),
                     100 * metrics["perf/data_stall"], time.time() - start)
        rung = d["rung_every"] and epoch % d["rung_every"] == 0
        due = checkpoint_due(epoch, d["epochs"], config["ray"]["checkpoint_every"])
        student_state = None
        if rung or due:  # collective under ZeRO-3: every rank gathers
            student_state = {k[len("student."):]: v for k, v in engine.state_dict().items()
                             if k.startswith("student.")}
        if rung and is_rank_zero():
            metrics[RUNG_KEY] = rung_dice(student_state, config, device)
            rungs.append(metrics[RUNG_KEY])
            log.info("distill rung at epoch %d: a %d-epoch fine-tune of the student reaches "
                     "validation Dice %.4f", epoch, d["rung_epochs"], metrics[RUNG_KEY])
        if rungs:
            metrics["rung/history"] = list(rungs)
        if due:
            checkpoint(metrics, engine=engine, epoch=epoch, loop={"rungs": rungs},
                       output={"student": student_state})
        else:
            report(metrics)


def teacher_config(ctx: StageContext, arm: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(teacher, distill) as :func:`place_teacher` reads them, for ``arm``: TS-KD the
    LoRA-tuned teacher stage, task-agnostic KD the un-tuned base SAM and no logits term."""
    cfg = ctx.cfg
    info, _ = load_data(ctx.inputs["data"])
    distill = to_dict(cfg.distill)
    if arm == "ta_kd":
        distill["w_logits"] = 0.0
        teacher = {"tuned": False, "checkpoint": str(base_checkpoint(ctx)),
                   "arch": cfg.teacher.arch, "img_size": cfg.teacher.img_size}
    else:
        teacher = {"tuned": True, "stage_dir": str(ctx.inputs["teacher"])}
    teacher["num_classes"] = info.num_classes
    return teacher, distill


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.stages.rungs import RUNG_KEY, in_tune_trial, tune_callback
    from tskd.stages.teacher_cache import check_cache, expected_cache, read_targets
    from tskd.stages.transfer_set import read_transfer_set

    cfg, arm = ctx.cfg, ctx.params["arm"]
    info, splits = load_data(ctx.inputs["data"])
    transfer_dir = ctx.inputs["transfer"]
    n_transfer = json.loads((transfer_dir / "transfer.json").read_text())["n_kept"]
    cache_dir = ctx.inputs.get(f"targets_{arm}")
    if cache_dir is None:
        teacher, distill = teacher_config(ctx, arm)
    else:  # the cached placement: the teacher never runs here
        teacher, distill = {}, to_dict(cfg.distill) | ({"w_logits": 0.0} if arm == "ta_kd"
                                                        else {})
    config = {"teacher": teacher, "student": to_dict(cfg.student), "distill": distill,
              "num_classes": info.num_classes, "n_transfer": n_transfer, "seed": cfg.seed,
              "ray": to_dict(cfg.ray)}
    callbacks = []
    if cfg.distill.rung_every:
        f = cfg.student_finetune.resolved(cfg.student.arch)
        config["rungs"] = {"info": info, "labelled": list(splits.labelled),
                           "val": list(splits.val), "image_size": cfg.data.image_size,
                           "patch": cfg.data.patch, "fg_fraction": cfg.data.fg_fraction,
                           "augment": cfg.data.augment, "epochs": cfg.distill.rung_epochs,
                           "batch_size": f.batch_size, "lr": f.lr,
                           "weight_decay": f.weight_decay, "seed": cfg.seed}
        if in_tune_trial():  # each rung is an intermediate result of the trial (ASHA)
            callbacks.append(tune_callback(RUNG_KEY))
    # the id column lets ray.deterministic sort the rows (Parquet holds them in the order the
    # sampler tasks finished), so every run streams the same batches to the same workers
    if cache_dir is None:
        dataset = read_transfer_set(ctx.input_location("transfer"), columns=["id", "image"],
                                    materialize_share=cfg.ray.materialize_share)
    else:
        cache = check_cache(cache_dir, expected_cache(ctx, arm))
        config["cache"] = cache["shapes"]
        dataset = read_targets(ctx.input_location(f"targets_{arm}"), check=False,
                               materialize_share=cfg.ray.materialize_share)
    placement = "cached" if cache_dir else distill["teacher_placement"]
    if placement == "auto":  # auto chose not to cache (the pipeline resolved it)
        placement = distill["teacher_placement"] = "replicated"
    if placement == "sharded" and cfg.ray.num_workers < 2:
        log.warning("distill.teacher_placement is sharded but ray.num_workers is %d: one "
                    "worker holds the whole teacher (sharding saves memory from 2 workers)",
                    cfg.ray.num_workers)
    log.info("distilling (%s) on %d transfer images for %d epochs, teacher %s", arm,
             n_transfer, cfg.distill.epochs, placement)
    storage = run_storage(ctx)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name=ctx.name, storage=storage, datasets={"transfer": dataset},
                               callbacks=callbacks,
                               inputs=ctx.input_refs)
    state = load_result_state(result)
    torch.save(state["student"], ctx.dir / STUDENT_FILE)
    remove_tree(storage)
    return {k: v for k, v in result.metrics.items()
            if k.startswith(("distill/", "kd/", "rung/history", "perf/"))}

