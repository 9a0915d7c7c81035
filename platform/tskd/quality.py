"""Quality gates: a model must beat a floor before another model learns from it (core: PyTorch).

The fine-tuned teacher is scored on the validation images (the labelled training images when
model selection is off) and compared with a floor: the Dice of an all-background prediction, of a
tiny U-Net trained from scratch on the same labels for a few epochs (:func:`train_baseline`), and
a fixed ``check.min_dice``. Below it, :class:`QualityCheckFailed` carries a message naming the
measured numbers and the likely causes visible in the data's fingerprint
(:func:`likely_causes`)::

    >>> verdict = check_against_floor("teacher", 0.0, {"all-background": 0.0})  # doctest: +SKIP
    >>> verdict["passed"]                                                         # doctest: +SKIP
    False
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tskd.config import QualityCheckFailed

__all__ = ["QualityCheckFailed", "BackgroundOnly", "tiny_unet", "train_baseline",
           "check_against_floor", "likely_causes", "failure_message"]

log = logging.getLogger(__name__)

SMALL_SHARE = 0.03
"""A class covering less of the pixels than this is "rare" in the likely causes."""
FEW_LABELS = 20
"""Fewer labelled training images than this is "few" in the likely causes."""


class BackgroundOnly(nn.Module):
    """Predicts class 0 everywhere: ``forward(images (B,3,H,W)) -> .logits (B,C,H,W)``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> Any:
        logits = torch.zeros(images.shape[0], self.num_classes, *images.shape[-2:])
        logits[:, 0] = 1.0
        return _Out(logits)


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def tiny_unet(num_classes: int, img_size: int) -> nn.Module:
    """A small MONAI BasicUNet (features 16..128, ~0.5M parameters) in the student contract."""
    from monai.networks.nets import BasicUNet

    from tskd.models.students import MonaiStudent

    features = (16, 16, 32, 64, 128, 16)
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=features)
    return MonaiStudent(num_classes, img_size, net, net.down_4, features[4])


def train_baseline(train_set: Dataset, *, num_classes: int, img_size: int, epochs: int,
                   batch_size: int = 8, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """:func:`tiny_unet` trained from scratch on ``train_set`` (items ``image`` float32
    (3,H,W) 0..255, ``mask`` int64 (H,W)) with 0.2·CE + 0.8·Dice and Adam; returned in eval
    mode."""
    from tskd.losses import SegLoss

    torch.manual_seed(seed)
    model = tiny_unet(num_classes, img_size)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = SegLoss()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = criterion(model(batch["image"]).logits, batch["mask"])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    return model.eval()


def check_against_floor(model: str, dice: float, floors: Mapping[str, float], *,
                        n_images: int, split: str) -> dict[str, Any]:
    """The verdict: ``dice`` must be strictly above every finite value in ``floors``.

    Returns ``{"model", "dice", "floor", "floors", "passed", "n_images", "split"}`` (NaN Dice:
    the split has no foreground anywhere; such a check passes, as nothing can be measured).
    """
    finite = {k: float(v) for k, v in floors.items() if v is not None and math.isfinite(v)}
    floor = max(finite.values()) if finite else 0.0
    passed = (not math.isfinite(dice)) or dice > floor
    return {"model": model, "dice": float(dice), "floor": floor, "floors": finite,
            "passed": bool(passed), "n_images": n_images, "split": split}


def likely_causes(verdict: Mapping[str, Any], fingerprint: Mapping[str, Any] | None,
                  size_warnings: Sequence[str], n_train_labels: int) -> list[str]:
    """Causes of a failed check visible from the data: the resolution (the fingerprint's size
    warnings), rare classes, few labels, an all-background model."""
    causes = []
    if verdict["dice"] == 0.0:
        causes.append(f"the {verdict['model']} predicts no foreground on the "
                      f"{verdict['split']} images (an all-background prediction)")
    causes += [f"resolution: {w}" for w in size_warnings]
    for name, stats in ((fingerprint or {}).get("classes") or {}).items():
        share = stats.get("pixel_share", 1.0)
        if share < SMALL_SHARE:
            causes.append(f"class share: {name!r} covers {100 * share:.2f}% of the pixels, so "
                          "predicting background everywhere costs the loss little")
    if n_train_labels < FEW_LABELS:
        causes.append(f"label count: only {n_train_labels} labelled training images")
    baseline = verdict["floors"].get("tiny scratch U-Net")
    if baseline is not None and math.isfinite(verdict["dice"]) and baseline >= verdict["dice"]:
        causes.append("a tiny U-Net trained from scratch on the same labels does at least as "
                      f"well ({baseline:.4f}): the foundation model, its input size or its "
                      "fine-tuning schedule may not suit this task")
    return causes


def failure_message(verdict: Mapping[str, Any], causes: Sequence[str]) -> str:
    """One paragraph naming the measured numbers and the likely causes."""
    floors = ", ".join(f"{k} {v:.4f}" for k, v in verdict["floors"].items())
    text = (f"{verdict['model']} check failed: Dice {verdict['dice']:.4f} on "
            f"{verdict['n_images']} {verdict['split']} images is not above the floor "
            f"{verdict['floor']:.4f} ({floors})")
    if causes:
        text += ". Likely causes: " + "; ".join(causes)
    return text + (". Fix the cause, or set check.on_fail=continue to go on anyway (the "
                   "results then say that the run continued past a failed check)")
