"""Stage ``teacher_pretrain``: a small SAM learns to segment on a broad procedural corpus.

LoRA only makes sense on a pre-trained foundation model, and no SAM weights can be downloaded in
the demo. So a demo teacher (``sam_demo``) is first pre-trained here on
:class:`~tskd.data.corpus.ProceduralCorpus` — many shapes, textures and structures, *not* the
demo task — and saved in the official SAM checkpoint format. Real use gives
``teacher.checkpoint`` instead and this stage does not run.

The result is cached under ``teacher.pretrain.cache_dir`` keyed by a fingerprint of the
architecture, input size, pre-training settings and ``teacher.pretrain.seed`` (not the
experiment's seed: experiments with several seeds share one foundation model), so it is trained
once per machine.
Output: ``base.json`` naming the checkpoint; for an object-store ``output_dir`` the checkpoint
itself is copied into the entry (``sam.pth``, named relatively) so workers on every node fetch it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tskd.artifacts import StageContext, write_json
from tskd.config import EngineConfig, fingerprint, to_dict
from tskd.stages.ray_train import fit_torch_trainer, is_rank_zero, load_result_state, report
from tskd.stages.ray_train import run_storage, worker_setup
from tskd.storage import is_remote, remove_tree

log = logging.getLogger(__name__)

BASE_FILE = "base.json"


PARTS = 10
"""The run is logged, reported and checkpointable in tenths of its steps (its "epochs")."""


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: full pre-training of a SAM built from scratch, stepped through the
    training engine (``teacher.pretrain.engine``), checkpointed every ``ray.checkpoint_every``
    tenths of the run; a restart resumes at the next step, on the same corpus samples."""
    import ray.train.torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from torch.utils.data import DataLoader, Subset

    from tskd.data.corpus import CORPUS_LABELS, ProceduralCorpus
    from tskd.losses import SegLoss
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.stages.engine import build_engine
    from tskd.stages.ray_train import checkpoint, checkpoint_due, fail_point, resume

    p = config["pretrain"]
    device = worker_setup(config["ray"], config["seed"])
    world = ray.train.get_context().get_world_size()
    model = SamSegmenter(build_sam(config["arch"], num_classes=len(CORPUS_LABELS),
                                   img_size=config["img_size"])).train()
    steps = p["steps"]
    per_part = -(-steps // PARTS)
    # Prompt-less SAM never uses its point/mask prompt embeddings nor its IoU head.
    engine = build_engine(
        model, p["engine"], lr=p["lr"], weight_decay=p["weight_decay"],
        batch_size=p["batch_size"], steps_per_epoch=steps, epochs=1, device=device,
        find_unused_parameters=True,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, p["warmup_steps"], total))
    first, _, _ = resume(engine, "teacher pre-training")  # the first part to run
    done = min(steps, (first - 1) * per_part)  # steps already taken
    corpus = ProceduralCorpus(size=config["img_size"], length=steps * p["batch_size"] * world,
                              seed=config["seed"])
    # the samples not yet seen: the distributed sampler deals rank r the indices r, r + world,
    # ... of this range exactly as of the whole corpus (the offset is a multiple of world)
    rest = Subset(corpus, range(done * p["batch_size"] * world, len(corpus)))
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(rest, batch_size=p["batch_size"], shuffle=False, num_workers=0,
                   drop_last=True))
    criterion = SegLoss()
    start, running, n = time.time(), 0.0, 0
    step = done
    for batch in loader:
        step += 1
        part = -(-step // per_part)
        if (step - 1) % per_part == 0:
            fail_point(config, part)
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        loss = criterion(engine(images).logits, masks)
        engine.step(loss)
        running += loss.item()
        n += 1
        if step % per_part and step != steps:
            continue
        metrics = {"pretrain/loss": running / max(n, 1), "step": step, "epoch": part}
        if is_rank_zero():
            log.info("teacher pre-training step %d/%d loss %.4f (%.0f s)", step, steps,
                     metrics["pretrain/loss"], time.time() - start)
        running, n = 0.0, 0
        if checkpoint_due(part, PARTS, config["ray"]["checkpoint_every"]) or step == steps:
            state = engine.state_dict() if step == steps else None  # collective (ZeRO-3)
            checkpoint(metrics, engine=engine, epoch=part,
                       output={"model": {k[len("sam."):]: v for k, v in state.items()}}
                       if state is not None else None)
        else:
            report(metrics)


def cache_path(ctx: StageContext) -> Path:
    t = ctx.cfg.teacher
    pretrain = to_dict(t.pretrain)
    pretrain.pop("cache_dir")
    seed = pretrain.pop("seed")
    if pretrain["engine"] == to_dict(EngineConfig()):  # the default engine: the key as before
        pretrain.pop("engine")                          # the engine seam (same numbers)
    key = fingerprint(t.arch, t.img_size, pretrain, seed)
    return Path(t.pretrain.cache_dir).expanduser() / "teachers" / f"{t.arch}-{t.img_size}px-{key}"


def run(ctx: StageContext) -> dict[str, Any]:
    t = ctx.cfg.teacher
    cache = cache_path(ctx)
    if (cache / "meta.json").is_file() and (cache / "sam.pth").is_file():
        log.info("using the cached pre-trained teacher %s", cache)
        meta = json.loads((cache / "meta.json").read_text())
    else:
        log.info("pre-training %s (%d px) on the procedural corpus for %d steps; cached at %s",
                 t.arch, t.img_size, t.pretrain.steps, cache)
        started = time.time()
        config = {"arch": t.arch, "img_size": t.img_size, "pretrain": to_dict(t.pretrain),
                  "seed": t.pretrain.seed, "ray": to_dict(ctx.cfg.ray)}
        storage = run_storage(ctx)
        result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=ctx.cfg.ray,
                                   name="teacher_pretrain", storage=storage)
        state = load_result_state(result)
        meta = {"pretrain/loss": result.metrics.get("pretrain/loss"),
                "pretrain/wall_time_s": round(time.time() - started, 1), "arch": t.arch,
                "img_size": t.img_size}
        _write_cache(cache, state["model"], meta)
        remove_tree(storage)
    checkpoint = str(cache / "sam.pth")
    if is_remote(ctx.cfg.output_dir):  # workers on other nodes read it from the entry
        shutil.copyfile(cache / "sam.pth", ctx.dir / "sam.pth")
        checkpoint = "sam.pth"
    write_json(ctx.dir / BASE_FILE, {"checkpoint": checkpoint, **meta})
    return {k: v for k, v in meta.items() if k.startswith("pretrain/")}


def _write_cache(cache: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write checkpoint + meta into a temp dir, then move it into place atomically."""
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state_dict, tmp / "sam.pth")
    write_json(tmp / "meta.json", meta)
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)


def base_checkpoint(ctx: StageContext) -> Path:
    """The un-tuned foundation checkpoint: the official file, or the pre-trained demo SAM."""
    if ctx.cfg.teacher.checkpoint is not None:
        path = Path(ctx.cfg.teacher.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint: {path} does not exist")
        return path
    entry = Path(ctx.inputs["teacher_pretrain"])
    # absolute: this machine's cache; relative: inside the entry (object-store outputs)
    return entry / json.loads((entry / BASE_FILE).read_text())["checkpoint"]
