"""The supervised loop shared by teacher and student fine-tuning (runs inside a Ray worker).

Per epoch: 0.2·CE + 0.8·Dice over the labelled loader, then, with model selection (a non-empty
validation set), Dice on the validation split: reports ``train/loss``, ``val/dice``,
``val/best_dice`` and checkpoints the state of every new best validation epoch (so the run's
final checkpoint is the best one). Without validation images (``data.model_selection`` off, or
``data.val_share`` 0) it trains the fixed schedule, reports ``train/loss`` only and checkpoints
the last epoch (the TS-KD paper's protocol). The checkpointed state always carries ``epoch``,
``val/dice`` (``None`` without validation) and ``selection`` (``"best_val"`` or
``"last_epoch"``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from tskd.stages.ray_train import is_rank_zero, report, unwrap

log = logging.getLogger(__name__)


def fit_supervised(model: torch.nn.Module, loader: DataLoader, val_set: Dataset | None, *,
                   info: Any,
                   optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int,
                   device: torch.device, state_fn: Callable[[torch.nn.Module], dict[str, Any]],
                   tag: str) -> None:
    """Train ``model`` (possibly DDP-wrapped) for ``epochs``; see the module docstring.

    Args:
        loader: labelled batches ``{"image": (B,3,H,W) 0..255, "mask": (B,H,W) int64}``.
        val_set: validation items (same dict); ``None`` or empty = no model selection.
        state_fn: what to checkpoint, given the unwrapped model (e.g. adapters only).
        tag: name used in progress logs ("teacher", "student").
    """
    from tskd.evaluation import score_model
    from tskd.losses import SegLoss
    from tskd.stages.live_metrics import StepTimer

    criterion = SegLoss()
    validate = val_set is not None and len(val_set) > 0
    best, start, checkpointed = -1.0, time.time(), False
    log_every = max(1, epochs // 10)
    timer = StepTimer()
    for epoch in range(1, epochs + 1):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in timer.batches(loader):
            loss = criterion(model(batch["image"].to(device)).logits, batch["mask"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        metrics: dict[str, Any] = {"train/loss": sum(losses) / len(losses), "epoch": epoch,
                                   **timer.summary()}
        state = None
        if validate:
            scores = score_model(unwrap(model), val_set, num_classes=info.num_classes,
                                 class_names=list(info.class_names), device=device)
            improved = scores["dice"] > best
            best = max(best, scores["dice"])
            metrics |= {"val/dice": scores["dice"], "val/best_dice": best}
            if improved:
                state = state_fn(unwrap(model)) | {"epoch": epoch, "val/dice": scores["dice"],
                                                   "selection": "best_val"}
        if epoch == epochs and state is None and not checkpointed:
            # no validation (or it never gave a finite Dice): keep the last epoch
            state = state_fn(unwrap(model)) | {"epoch": epoch, "val/dice": None,
                                               "selection": "last_epoch"}
        checkpointed = checkpointed or state is not None
        if is_rank_zero() and (epoch % log_every == 0 or epoch == epochs):
            val = (f" val dice {metrics['val/dice']:.4f} (best {best:.4f})" if validate
                   else " (no validation: the last epoch is kept)")
            log.info("%s epoch %d/%d loss %.4f%s, %.1f img/s, %.0f s", tag, epoch, epochs,
                     metrics["train/loss"], val, metrics["perf/images_per_s"], time.time() - start)
        report(metrics, state)
