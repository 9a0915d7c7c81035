"""Rungs inside distillation: intermediate results that ``tskd tune``'s ASHA can compare.

A search whose objective is a fine-tuned student's validation Dice would otherwise get one
result per trial, after distillation and fine-tuning: ASHA could stop nothing early. With
``distill.rung_every = k`` the distillation stage, every ``k`` epochs, fine-tunes a *copy* of the
current student for ``distill.rung_epochs`` epochs on the labelled training images (the student
fine-tuning's loss, augmentation, batch size and learning rate) and reports its validation
Dice as ``rung/val_dice``. The number means the same in every trial of a space — weights
``w_logits = 0`` included — because it is always "a short fine-tune, then validation Dice".
The distillation itself is untouched: the copy is built from the gathered student weights and
its RNG is forked, so a run with rungs distils exactly the student a run without them does.

Inside a Tune trial, :func:`tune_callback` forwards each rung to Tune as the trial's objective,
so ASHA's rungs fall inside distillation and a stopped trial saves the rest of its distillation
and all of its fine-tuning. Stages layer (PyTorch plus, lazily, Ray).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

RUNG_KEY = "rung/val_dice"
"""The metric each rung reports."""

OBJECTIVE = "objective"
"""The name a Tune trial reports its objective under (``tskd.tune`` uses it too)."""


def rung_dice(student_state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
              device: torch.device) -> float:
    """Validation Dice of a short fine-tune of a copy of the student.

    Args:
        student_state: the current student's full state dict (gathered under ZeRO-3).
        config: ``student`` (a StudentConfig dict), ``num_classes`` and ``rungs``: ``info``
            (DatasetInfo), ``labelled`` and ``val`` (case ids), ``image_size``, ``augment``,
            ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``seed`` and (optional)
            ``patch``, ``fg_fraction``: crops as the fine-tuning stages train on, validation
            by sliding window.
        device: where to train the copy.

    Returns:
        Mean foreground Dice on the validation images after ``epochs`` epochs (0: the student
        as it is). The global RNG state is the same afterwards as before.
    """
    from torch.utils.data import DataLoader

    from tskd.data.dataset import SegmentationDataset
    from tskd.data.patches import training_set
    from tskd.evaluation import score_model
    from tskd.losses import SegLoss
    from tskd.models.students import build_student

    r = config["rungs"]
    info = r["info"]
    patch = r.get("patch", r["image_size"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(r["seed"])
        model = build_student(config["student"], config["num_classes"])
        model.load_state_dict(copy.deepcopy(dict(student_state)))
        model.to(device).train()
        if r["epochs"] > 0:
            train_set = training_set(
                SegmentationDataset(info, list(r["labelled"]), r["image_size"],
                                    augment=r["augment"], seed=r["seed"]),
                image_size=r["image_size"], patch=patch,
                fg_fraction=r.get("fg_fraction", 1 / 3), seed=r["seed"])
            loader = DataLoader(train_set, batch_size=r["batch_size"], shuffle=True,
                                generator=torch.Generator().manual_seed(r["seed"]))
            optim = torch.optim.AdamW(model.parameters(), lr=r["lr"],
                                      weight_decay=r["weight_decay"])
            criterion = SegLoss()
            for _ in range(r["epochs"]):
                for batch in loader:
                    loss = criterion(model(batch["image"].to(device)).logits,
                                     batch["mask"].to(device))
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    optim.step()
        val = SegmentationDataset(info, list(r["val"]), r["image_size"])
        scores = score_model(model, val, num_classes=info.num_classes,
                             class_names=list(info.class_names), device=device,
                             window=patch)
    return float(scores["dice"])


def tune_callback(key: str = RUNG_KEY) -> Any:
    """A Ray Train callback that forwards every rank-0 report holding ``key`` to the enclosing
    Tune trial as ``{OBJECTIVE: value, "rung": epoch}`` (other reports stay with Ray Train).
    Only valid inside a Tune trial (``ray.tune`` raises otherwise)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class RungsToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            first = metrics[0] if metrics else {}
            if key in first:
                super().after_report(run_context, [{OBJECTIVE: first[key],
                                                    "rung": first.get("epoch")}], None)

    return RungsToTune()


def in_tune_trial() -> bool:
    """Whether this process runs a Ray Tune trial."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:
        return False
    return bool(_in_tune_session())
