"""Stages ``pretrain_mae`` / ``pretrain_mocov3``: self-supervised pre-training of the student's
ViT on the transfer set (the paper's MAE and MoCo v3 baselines, Section 4.2.1).

Setup: Ray Data streams the transfer set to Ray Train workers (as ``distill_*`` does); each
worker builds the student (random init) and wraps its ViT backbone in the objective —
:class:`tskd.models.mae.MaskedAutoencoder` (``mae``: mask ratio 0.75, loss on normalised pixels
of the masked patches) or :class:`tskd.models.mocov3.MoCoV3` (``mocov3``: two augmented views
from :class:`tskd.data.views.TwoViews`, projector + predictor, momentum encoder, symmetric
InfoNCE). AdamW at ``base_lr × global batch / 256``, linear warm-up then cosine (per step),
stepped through the training engine (``mae.engine`` / ``mocov3.engine``,
:mod:`tskd.stages.engine`). Loop: every batch resized to the student's ``img_size``, one step.
Report: the loss per epoch, a full-state checkpoint every ``ray.checkpoint_every`` epochs (with
MoCo v3's momentum encoder; a restarted worker group or re-run resumes from it);
the last epoch's student (ViT pre-trained, FPN head still at random init) is the stage's
``student.pt``, which ``student_<arm>`` fine-tunes exactly as a distilled student. The time
spent in the training loop is ``pretrain/train_time_s`` (the manifest's ``wall_time_s`` adds
Ray's start-up and the dataset sort).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import torch

from tskd.artifacts import StageContext
from tskd.config import scaled_lr, to_dict
from tskd.models.students import build_student
from tskd.stages.data_stage import load_data
from tskd.stages.distill import STUDENT_FILE
from tskd.stages.ray_train import fit_torch_trainer, is_rank_zero, load_result_state, report
from tskd.stages.ray_train import run_storage, worker_setup
from tskd.storage import remove_tree

log = logging.getLogger(__name__)


def build_objective(method: str, student: torch.nn.Module, p: dict[str, Any]) -> torch.nn.Module:
    """The pre-training module around ``student.backbone`` (shared, trained in place)."""
    if method == "mae":
        from tskd.models.mae import MaskedAutoencoder

        return MaskedAutoencoder(student.backbone, decoder_dim=p["decoder_dim"],
                                 decoder_depth=p["decoder_depth"],
                                 decoder_heads=p["decoder_heads"], mask_ratio=p["mask_ratio"],
                                 norm_pix_loss=p["norm_pix_loss"])
    from tskd.models.mocov3 import MoCoV3

    return MoCoV3(student.backbone, dim=p["dim"], mlp_dim=p["mlp_dim"],
                  temperature=p["temperature"], momentum=p["momentum"],
                  freeze_patch_embed=p["freeze_patch_embed"])


def param_groups(method: str, objective: torch.nn.Module,
                 p: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """AdamW's parameter groups and betas as each method's code sets them: MAE betas
    (0.9, 0.95) and no decay on biases and other 1-D parameters (norms) — timm's
    ``param_groups_weight_decay``, the rule of MAE's ``add_weight_decay``; MoCo v3 decays every
    trainable parameter, default betas."""
    if method == "mae":
        from timm.optim import param_groups_weight_decay

        return param_groups_weight_decay(objective, p["weight_decay"]), (0.9, 0.95)
    trainable = [q for q in objective.parameters() if q.requires_grad]
    return [{"params": trainable, "weight_decay": p["weight_decay"]}], (0.9, 0.999)


def momentum_state(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """MoCo v3's momentum encoder (frozen parameters an EMA moves, so the engine's checkpoint,
    which keeps trainable state only, does not hold them); empty for MAE."""
    return {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()
            if k.startswith(("momentum_backbone.", "momentum_projector."))}


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stream the transfer shard, pre-train the student's ViT."""
    import ray.train
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.stages.engine import build_engine
    from tskd.stages.live_metrics import StepTimer
    from tskd.stages.ray_train import checkpoint, checkpoint_due, fail_point, resume

    method, p = config["method"], config["pretrain"]
    device = worker_setup(config["ray"], config["seed"])
    world = ray.train.get_context().get_world_size()
    student = build_student(config["student"], config["num_classes"]).to(device)
    objective = build_objective(method, student, p)
    if method == "mocov3" and world > 1 and config["ray"].get("use_gpu"):
        objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)  # as MoCo v3
    lr = scaled_lr(p["base_lr"], p["batch_size"] * world)
    steps_per_epoch = max(1, math.ceil(config["n_transfer"] / (p["batch_size"] * world)))
    groups, betas = param_groups(method, objective, p)
    engine = build_engine(
        objective, p["engine"], lr=lr, weight_decay=p["weight_decay"],
        batch_size=p["batch_size"], steps_per_epoch=steps_per_epoch, epochs=p["epochs"],
        device=device, param_groups=groups, betas=betas,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, int(p["warmup_epochs"] * per_epoch), total))
    first, loop, _ = resume(engine, method)
    if loop.get("momentum"):
        engine.module.load_state_dict(loop["momentum"], strict=False)
    views = None
    size = config["student"]["img_size"]
    if method == "mocov3":
        from tskd.data.views import TwoViews

        views = TwoViews(size, p["min_crop_scale"])
    preprocess = student.preprocess  # 0..255 -> normalised, resized to img_size (no parameters)
    shard = ray.train.get_dataset_shard("transfer")
    if is_rank_zero():
        log.info("%s pre-training: lr %.3g (base %.3g × batch %d / 256), %d steps per epoch",
                 method, lr, p["base_lr"], p["batch_size"] * world, steps_per_epoch)
    start, timer = time.time(), StepTimer()
    elapsed = float(loop.get("train_time_s", 0.0))  # loop time before a restart
    for epoch in range(first, p["epochs"] + 1):
        fail_point(config, epoch)
        total, n = 0.0, 0
        engine.train()
        for batch in timer.batches(shard.iter_torch_batches(
                batch_size=p["batch_size"], dtypes={"id": torch.int64, "image": torch.float32},
                device=device, local_shuffle_buffer_size=4 * p["batch_size"],
                local_shuffle_seed=config["seed"] + epoch)):
            images = batch["image"].permute(0, 3, 1, 2)  # (B, 3, H, W) 0..255
            if views is None:  # MAE: the image itself
                loss = engine(preprocess(images)).loss
            else:  # MoCo v3: two augmented views (BatchNorm needs 2 samples)
                if images.shape[0] < 2:
                    continue
                v1, v2 = views(images.cpu())
                loss = engine(preprocess(v1.to(device)), preprocess(v2.to(device)))
            engine.step(loss)
            total += loss.item()
            n += 1
        train_time = elapsed + time.time() - start
        metrics = {"pretrain/loss": total / max(n, 1), "pretrain/train_time_s": train_time,
                   "epoch": epoch} | timer.summary()
        if first > 1:
            metrics["pretrain/resumed_from_epoch"] = first - 1
        if is_rank_zero():
            log.info("%s epoch %d/%d loss %.5f, %.1f img/s (data wait %.0f%%), %.0f s", method,
                     epoch, p["epochs"], metrics["pretrain/loss"], metrics["perf/images_per_s"],
                     100 * metrics["perf/data_stall"], train_time)
        if checkpoint_due(epoch, p["epochs"], config["ray"]["checkpoint_every"]):
            with engine.gathered():  # the objective trains student.backbone in place
                state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
                momentum = momentum_state(engine.module)
            checkpoint(metrics, engine=engine, epoch=epoch,
                       loop={"momentum": momentum, "train_time_s": train_time},
                       output={"student": state})
        else:
            report(metrics)


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.stages.transfer_set import read_transfer_set

    cfg, method = ctx.cfg, ctx.params["arm"]
    if cfg.student.arch != "vit":  # the driver's config check rejects this first
        raise ValueError(f"{method} pre-training needs student.arch 'vit', got "
                         f"{cfg.student.arch!r}")
    info, _ = load_data(ctx.inputs["data"])
    transfer_dir = ctx.inputs["transfer"]
    n_transfer = json.loads((transfer_dir / "transfer.json").read_text())["n_kept"]
    p = to_dict(getattr(cfg, method))
    config = {"method": method, "pretrain": p, "student": to_dict(cfg.student),
              "num_classes": info.num_classes, "n_transfer": n_transfer, "seed": cfg.seed,
              "ray": to_dict(cfg.ray)}
    dataset = read_transfer_set(ctx.input_location("transfer"), columns=["id", "image"],
                                materialize_share=cfg.ray.materialize_share)
    log.info("%s pre-training on %d transfer images for %d epochs", method, n_transfer,
             p["epochs"])
    started = time.time()
    storage = run_storage(ctx)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name=ctx.name, storage=storage,
                               datasets={"transfer": dataset},
                               inputs=ctx.input_refs)
    state = load_result_state(result)
    torch.save(state["student"], ctx.dir / STUDENT_FILE)
    remove_tree(storage)
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("pretrain/")}
    metrics["pretrain/fit_time_s"] = round(time.time() - started, 3)
    metrics["pretrain/lr"] = scaled_lr(p["base_lr"], p["batch_size"] * cfg.ray.num_workers)
    log.info("%s pre-training done: loss %.5f, %.1f s in the loop (%.1f s with Ray's start-up)",
             method, metrics.get("pretrain/loss", float("nan")),
             metrics.get("pretrain/train_time_s", float("nan")), metrics["pretrain/fit_time_s"])
    return metrics
