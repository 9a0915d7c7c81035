"""The supervised loop shared by teacher and student fine-tuning (runs inside a Ray worker).

Per epoch: 0.2·CE + 0.8·Dice over the labelled loader, then Dice on the validation split;
reports ``train/loss``, ``val/dice``, ``val/best_dice`` and checkpoints the state of every new
best validation epoch (so the run's final checkpoint is the best one).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from tskd.stages.ray_train import is_rank_zero, report, unwrap

log = logging.getLogger(__name__)


def fit_supervised(model: torch.nn.Module, loader: DataLoader, val_set: Dataset, *, info: Any,
                   optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int,
                   device: torch.device, state_fn: Callable[[torch.nn.Module], dict[str, Any]],
                   tag: str) -> None:
    """Train ``model`` (possibly DDP-wrapped) for ``epochs``; see the module docstring.

    Args:
        loader: labelled batches ``{"image": (B,3,H,W) 0..255, "mask": (B,H,W) int64}``.
        state_fn: what to checkpoint, given the unwrapped model (e.g. adapters only).
        tag: name used in progress logs ("teacher", "student").
    """
    from tskd.evaluation import score_model
    from tskd.losses import SegLoss

    criterion = SegLoss()
    best, start = -1.0, time.time()
    log_every = max(1, epochs // 10)
    for epoch in range(1, epochs + 1):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in loader:
            loss = criterion(model(batch["image"].to(device)).logits, batch["mask"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        scores = score_model(unwrap(model), val_set, num_classes=info.num_classes,
                             class_names=list(info.class_names), device=device)
        improved = scores["dice"] > best
        best = max(best, scores["dice"])
        metrics = {"train/loss": sum(losses) / len(losses), "val/dice": scores["dice"],
                   "val/best_dice": best, "epoch": epoch}
        if is_rank_zero() and (epoch % log_every == 0 or epoch == epochs):
            log.info("%s epoch %d/%d loss %.4f val dice %.4f (best %.4f, %.0f s)", tag, epoch,
                     epochs, metrics["train/loss"], scores["dice"], best, time.time() - start)
        state = None
        if improved:
            state = state_fn(unwrap(model)) | {"epoch": epoch, "val/dice": scores["dice"]}
        report(metrics, state)
