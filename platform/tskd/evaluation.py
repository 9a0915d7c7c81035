"""Scoring a segmentation model on a labelled split (core: plain PyTorch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tskd.metrics import SegmentationMetrics


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor,
                   window: int | None = None) -> torch.Tensor:
    """Label map of a model whose output has ``.logits``.

    Args:
        images: float32 (B, 3, H, W) in 0..255.
        window: patch side of a model trained on patches (``data.patch_size``); images larger
            than it are predicted window by window (:func:`window_logits`). None: whole images.

    Returns:
        int64 (B, H, W): argmax of the logits upsampled (bilinear) to the input size.
    """
    logits = window_logits(model, images, window)
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
    return logits.argmax(dim=1)


@torch.no_grad()
def window_logits(model: nn.Module, images: torch.Tensor, window: int | None) -> torch.Tensor:
    """The logits of a model trained on ``window``-px patches, for whole images.

    Args:
        images: float32 (B, 3, H, W) in 0..255.

    Returns:
        ``model(images).logits`` as the model gives them (float32 (B, C, h, w), e.g. 1/4 of the
        input) when the images fit one window (or ``window`` is None): exactly the whole-image
        path; else :func:`sliding_window_logits` (B, C, H, W).
    """
    if window is None or (images.shape[-2] <= window and images.shape[-1] <= window):
        return model(images).logits
    return sliding_window_logits(model, images, window)


@torch.no_grad()
def full_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images).logits`` upsampled (bilinear) to the input size: float32 (B, C, H, W)."""
    logits = model(images).logits
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
    return logits


@torch.no_grad()
def sliding_window_logits(model: nn.Module, images: torch.Tensor, window: int, *,
                          overlap: float = 0.25, batch_size: int = 4,
                          mode: str = "gaussian") -> torch.Tensor:
    """Logits of images larger than the model's working size, window by window (MONAI
    ``sliding_window_inference``: ``window`` x ``window`` tiles with ``overlap``, blended with
    Gaussian weights), so the prediction covers the whole image at its own resolution.

    Args:
        images: float32 (B, 3, H, W) in 0..255, any H, W (smaller sides are padded).

    Returns:
        float32 (B, C, H, W). An image that fits one window gives exactly
        :func:`full_logits` (one tile, weights cancel).
    """
    from monai.inferers import sliding_window_inference

    if images.shape[-2] <= window and images.shape[-1] <= window:
        return full_logits(model, images)
    return sliding_window_inference(images, roi_size=(window, window), sw_batch_size=batch_size,
                                    predictor=lambda x: full_logits(model, x), overlap=overlap,
                                    mode=mode)


@torch.no_grad()
def score_model(model: nn.Module, dataset: Dataset, *, num_classes: int,
                class_names: list[str] | None = None,
                spacing: tuple[float, float] | None = None, batch_size: int = 16,
                device: torch.device | str = "cpu", convention: str = "tskd",
                miou_background: bool = False, window: int | None = None) -> dict[str, Any]:
    """Dice / HD95 / mIoU of ``model`` on ``dataset`` (items with ``image``, ``mask``[, ``fov``]).

    Spacing is per pixel of the dataset's images *at the resolution they are scored at*;
    ``convention`` and ``miou_background`` as in :class:`tskd.metrics.SegmentationMetrics`;
    ``window``: images larger than it are predicted by sliding window (:func:`predict_labels`).
    """
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(num_classes, class_names=class_names, spacing=spacing,
                                  convention=convention, miou_background=miou_background)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pred = predict_labels(model, batch["image"].to(device), window).cpu()
        metrics.update(pred, batch["mask"], batch.get("fov"))
    model.train(was_training)
    return metrics.aggregate()
