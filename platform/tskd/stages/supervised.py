"""The supervised loop shared by teacher and student fine-tuning (runs inside a Ray worker).

Per epoch: 0.2·CE + 0.8·Dice over the labelled loader (whole images, or patches of them:
:func:`tskd.data.patches.training_set`), each step through the training engine
(:mod:`tskd.stages.engine`), then, with model selection (a non-empty validation set), Dice on
the validation split: reports ``train/loss``, ``val/dice``, ``val/best_dice``; the state of every
new best validation epoch becomes the run's output. Without validation images
(``data.model_selection`` off, or ``data.val_share`` 0) it trains the fixed schedule, reports
``train/loss`` only and outputs the last epoch (the TS-KD paper's protocol). The output state
always carries ``epoch``, ``val/dice`` (``None`` without validation) and ``selection``
(``"best_val"`` or ``"last_epoch"``).

Every ``ray.checkpoint_every`` epochs (and after the last) the report carries a full-state
checkpoint (engine, RNG, epoch, best Dice and the output so far); a restarted run resumes after
its epoch. The augmentation stream is re-seeded every epoch (``seed``, epoch), so a resumed run
sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from tskd.stages.ray_train import checkpoint, checkpoint_due, is_rank_zero, report, resume

log = logging.getLogger(__name__)


def labelled_sets(config: dict[str, Any]) -> tuple[Dataset, Dataset]:
    """The training set and the validation set of a fine-tuning worker.

    ``config`` carries ``info``, ``labelled``, ``val``, ``image_size``, ``augment``, ``seed``,
    ``patch`` and ``fg_fraction``: the labelled images at ``image_size`` (augmented), as
    ``patch``-px crops when ``patch < image_size`` (:func:`tskd.data.patches.training_set`);
    the validation images whole, at ``image_size`` (scored by sliding window).
    """
    from tskd.data.dataset import SegmentationDataset
    from tskd.data.patches import training_set

    info, size = config["info"], config["image_size"]
    base = SegmentationDataset(info, config["labelled"], size, augment=config["augment"],
                               seed=config["seed"])
    train = training_set(base, image_size=size, patch=config["patch"],
                         fg_fraction=config["fg_fraction"], seed=config["seed"])
    return train, SegmentationDataset(info, config["val"], size)


def fit_supervised(engine: Any, loader: DataLoader, val_set: Dataset | None, *, info: Any,
                   epochs: int, device: torch.device, seed: int, checkpoint_every: int,
                   state_fn: Callable[[torch.nn.Module], dict[str, Any]], tag: str,
                   window: int | None = None) -> None:
    """Train through ``engine`` (:class:`tskd.stages.engine.Engine`) for ``epochs``; see the
    module docstring.

    Args:
        loader: labelled batches ``{"image": (B,3,H,W) 0..255, "mask": (B,H,W) int64}``.
        val_set: validation items (same dict); ``None`` or empty = no model selection.
        seed: seeds the per-epoch augmentation stream (``seed * 100003 + epoch``).
        state_fn: what the stage keeps, given the plain module (e.g. adapters only); called
            with the parameters gathered (ZeRO-3), on every rank.
        tag: name used in progress logs ("teacher", "student").
        window: the training patch side (``data.patch_size``): validation images larger than
            it are predicted by sliding window at their full size; None = whole images.
    """
    from tskd.evaluation import score_model
    from tskd.losses import SegLoss
    from tskd.stages.live_metrics import StepTimer

    criterion = SegLoss()
    validate = val_set is not None and len(val_set) > 0
    first, loop, output = resume(engine, tag)
    best = float(loop.get("best", -1.0))
    start = time.time()
    log_every = max(1, epochs // 10)
    timer = StepTimer()
    for epoch in range(first, epochs + 1):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_random_state"):
            loader.dataset.set_random_state(seed * 100003 + epoch)
        engine.train()
        losses = []
        for batch in timer.batches(loader):
            loss = criterion(engine(batch["image"].to(device)).logits, batch["mask"].to(device))
            engine.step(loss)
            losses.append(loss.item())
        metrics: dict[str, Any] = {"train/loss": sum(losses) / len(losses), "epoch": epoch,
                                   **timer.summary()}
        if validate:
            engine.eval()
            scores = score_model(engine.module, val_set, num_classes=info.num_classes,
                                 class_names=list(info.class_names), device=device,
                                 window=window)
            improved = scores["dice"] > best
            best = max(best, scores["dice"])
            metrics |= {"val/dice": scores["dice"], "val/best_dice": best}
            if improved:
                with engine.gathered():
                    output = state_fn(engine.module) | {"epoch": epoch,
                                                        "val/dice": scores["dice"],
                                                        "selection": "best_val"}
        if epoch == epochs and output is None:
            # no validation (or it never gave a finite Dice): keep the last epoch
            with engine.gathered():
                output = state_fn(engine.module) | {"epoch": epoch, "val/dice": None,
                                                    "selection": "last_epoch"}
        if first > 1:
            metrics["train/resumed_from_epoch"] = first - 1
        if is_rank_zero() and (epoch % log_every == 0 or epoch == epochs):
            val = (f" val dice {metrics['val/dice']:.4f} (best {best:.4f})" if validate
                   else " (no validation: the last epoch is kept)")
            log.info("%s epoch %d/%d loss %.4f%s, %.1f img/s, %.0f s", tag, epoch, epochs,
                     metrics["train/loss"], val, metrics["perf/images_per_s"], time.time() - start)
        if checkpoint_due(epoch, epochs, checkpoint_every):
            checkpoint(metrics, engine=engine, epoch=epoch, loop={"best": best}, output=output)
        else:
            report(metrics)
