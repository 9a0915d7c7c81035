"""Stage ``ddpm``: the diffusion model the transfer set is sampled from (TS-KD step 2, first
half). Planned only when ``transfer.sources`` has ``synthetic``.

It depends on the labelled images (the ``data`` stage) and ``transfer.diffusion``, never on how
many images are sampled from it: the cells of a grid that differ only in ``transfer.n_images``
share one entry, and each ``transfer`` entry samples its own size from it.

Setup: the DDPM's training images (:func:`tskd.diffusion.ddpm_training_images`: the labelled
training images, with patch training their crops, augmented to
``transfer.diffusion.n_augmented`` copies); the transfer stage's sampler actors are checked
against the cluster first (:func:`tskd.stages.transfer_set.check_sampler_resources`), so a
configuration that cannot sample fails before the DDPM trains.

Loop: a one-worker Ray Train job (:func:`train_diffusion`) through the training engine
(``transfer.diffusion.engine``), checkpointing every ``ray.checkpoint_every`` tenths of its
steps (a restarted build resumes there).

Report: the driver saves the UNet (EMA weights when enabled) and its noise scheduler with
diffusers' ``save_pretrained``, and the training images (the transfer stage's privacy references:
read back, not recomputed, since the augmentation costs about a minute at demo scale); returns
``diffusion/*`` metrics.

Output directory::

    model/               unet/ + scheduler/ (diffusers save_pretrained; diffusion.load_diffusion)
    training_images.npz  labelled (N·k, P, P, 3) and augmented (n_augmented, P, P, 3) uint8,
                         crops_per_image, case_ids (tskd.diffusion.DDPMTrainingImages.load)
    ddpm.json            n_train_images, crops_per_image, n_crops, n_augmented, train_image_size;
                         the model: image_size, train_steps; seed
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tskd.config import DiffusionConfig, ExperimentConfig, to_dict
from tskd.storage import remove_tree

log = logging.getLogger(__name__)

MODEL_DIR = "model"
TRAINING_IMAGES = "training_images.npz"
MANIFEST_FILE = "ddpm.json"


def run(ctx: Any) -> dict[str, Any]:
    """Train the DDPM on the augmented labelled images; see the module docstring. Returns
    ``diffusion/final_loss`` (mean of the last tenth of the steps) and ``diffusion/first_loss``.

    Raises:
        tskd.stages.transfer_set.TransferSetError: the transfer stage's sampler actors could
            not all start on this cluster (checked before training).
    """
    from tskd.artifacts import write_json
    from tskd.diffusion import ddpm_training_images
    from tskd.stages.data_stage import load_data
    from tskd.stages.ray_train import run_storage
    from tskd.stages.transfer_set import check_sampler_resources

    cfg: ExperimentConfig = ctx.cfg
    out = Path(ctx.dir)
    check_sampler_resources(cfg)  # before the DDPM trains, not after it
    info, splits = load_data(ctx.inputs["data"])
    images = ddpm_training_images(info, splits.labelled, cfg)

    metrics = train_diffusion(images.augmented, cfg, out / MODEL_DIR, run_storage(ctx))

    images.save(out / TRAINING_IMAGES)
    d = cfg.transfer.diffusion
    write_json(out / MANIFEST_FILE, {**images.summary(), "image_size": d.image_size,
                                     "train_steps": d.train_steps, "model_dir": MODEL_DIR,
                                     "training_images": TRAINING_IMAGES, "seed": cfg.seed})
    log.info("ddpm: trained on %d images, loss %.4f -> %.4f", len(images.augmented),
             metrics["diffusion/first_loss"], metrics["diffusion/final_loss"])
    return metrics


def train_diffusion(images: np.ndarray, cfg: ExperimentConfig, out_dir: Path, storage: Path
                    ) -> dict[str, Any]:
    """Train the DDPM as a 1-worker Ray Train job and save it to ``out_dir``; return metrics.
    ``images``: ``uint8 (N, H, W, 3)``, what it trains on; ``storage``: the run's Ray storage
    (:func:`tskd.stages.ray_train.run_storage`)."""
    import ray

    from tskd.diffusion import build_scheduler, build_unet, save_diffusion
    from tskd.stages.ray_train import fit_torch_trainer, load_result_state

    dcfg = cfg.transfer.diffusion
    images_ref = ray.put(np.ascontiguousarray(images))
    config = {"diffusion": to_dict(dcfg), "seed": cfg.seed, "ray": to_dict(cfg.ray),
              "images": images_ref}
    log.info("training the DDPM (%d px, channels %s) on %d augmented images for %d steps",
             dcfg.image_size, dcfg.block_out_channels, len(images), dcfg.train_steps)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=cfg.ray,
                               name="ddpm", storage=storage, num_workers=1)
    state = load_result_state(result)
    remove_tree(storage)  # kept after a failure: a re-run resumes
    unet = build_unet(dcfg)
    unet.load_state_dict(state["unet"])
    save_diffusion(unet, out_dir, build_scheduler(dcfg))
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    return {"diffusion/final_loss": float(np.mean(tail)),
            "diffusion/first_loss": float(losses[0])}


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: train the DDPM on the augmented images through the training engine
    (``transfer.diffusion.engine``), checkpointing every ``ray.checkpoint_every`` tenths of its
    steps (a restart resumes there), the UNet (EMA weights when enabled) in the last one."""
    import ray
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.diffusion import (DDPMData, build_ema, build_scheduler, build_unet, check_loss,
                                ddpm_loss, default_warmup)
    from tskd.stages.engine import build_engine
    from tskd.stages.ray_train import (checkpoint, checkpoint_due, fail_point, is_rank_zero,
                                       report, resume, worker_setup)

    seed = int(config["seed"])
    device = worker_setup(config["ray"], seed)
    dcfg = DiffusionConfig(**config["diffusion"])
    unet, scheduler = build_unet(dcfg, seed=seed), build_scheduler(dcfg)
    steps = dcfg.train_steps
    every = max(1, steps // 10)  # a "period": logging, reporting and checkpoint unit
    periods = math.ceil(steps / every)
    engine = build_engine(
        unet, config["diffusion"]["engine"], lr=dcfg.lr, weight_decay=0.01,
        batch_size=dcfg.batch_size, steps_per_epoch=steps, epochs=1, device=device,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, default_warmup(steps), steps))
    data = DDPMData(ray.get(config["images"]), dcfg.image_size, seed=seed,
                    num_train_timesteps=dcfg.num_train_timesteps)
    ema = build_ema(unet, dcfg.ema_decay)
    first, loop, _ = resume(engine, "ddpm")
    losses: list[float] = list(loop.get("losses", []))
    if loop:
        data.load_state_dict(loop["data"])
        if ema is not None:
            ema.load_state_dict(loop["ema"])
    start = time.time()
    rank0 = is_rank_zero()
    engine.train()
    for period in range(first, periods + 1):
        fail_point(config, period)
        for step in range((period - 1) * every + 1, min(steps, period * every) + 1):
            x0, noise, t = (v.to(device) for v in data.next_batch(dcfg.batch_size))
            loss = ddpm_loss(engine, scheduler, x0, noise, t)
            engine.step(loss)
            if ema is not None:
                ema.step(engine.module.parameters())
            losses.append(check_loss(loss, step))
        step = min(steps, period * every)
        mean = float(np.mean(losses[-every:]))
        if rank0:
            log.info("ddpm step %d/%d loss %.4f (%.0f s)", step, steps, mean,
                     time.time() - start)
        metrics = {"diffusion/loss": mean, "step": step}
        if period == periods:
            metrics["diffusion/final_loss"] = mean
            if ema is not None:
                ema.copy_to(engine.module.parameters())
        if checkpoint_due(period, periods, config["ray"]["checkpoint_every"]):
            output = None
            if period == periods:
                output = {"unet": engine.state_dict(), "losses": losses}
            checkpoint(metrics, engine=engine, epoch=period, output=output,
                       loop={"data": data.state_dict(), "losses": losses,
                             "ema": ema.state_dict() if ema is not None else None})
        else:
            report(metrics)


def model_location(ctx: Any) -> Path | str:
    """Where the ``transfer`` stage's sampler actors on any node load the model of its ``ddpm``
    input: the entry's ``model/`` directory, or for an object-store output its URI (each actor
    downloads it: :func:`tskd.stages.outputs.local_copy`)."""
    from tskd.storage import is_remote, join

    where = ctx.input_location("ddpm")
    if is_remote(str(where)):
        return join(str(where), MODEL_DIR)
    return Path(where) / MODEL_DIR


def training_images(ddpm_dir: Path | str):
    """The :class:`tskd.diffusion.DDPMTrainingImages` a ``ddpm`` entry trained on."""
    from tskd.diffusion import DDPMTrainingImages

    return DDPMTrainingImages.load(Path(ddpm_dir) / TRAINING_IMAGES)


__all__ = ["run", "train_diffusion", "model_location", "training_images", "MODEL_DIR",
           "TRAINING_IMAGES", "MANIFEST_FILE"]
