"""Patch sampling with foreground oversampling (core; nnU-Net's sampler, for images larger than
the working size).

:class:`PatchDataset` wraps a dataset of whole images (``{"image": float32 (3,H,W), "mask":
int64 (H,W)[, "fov": bool (H,W)], "id"}``) and returns ``patch x patch`` crops: a share
``fg_fraction`` (nnU-Net: a third) of them centred on a foreground pixel (a random present
foreground class, then a random pixel of it), the others anywhere. Images smaller than the
patch are padded (image 0, mask 0 = background, fov False). Inference on whole images goes
through :func:`tskd.evaluation.sliding_window_logits` with the same window.

The training stages build their labelled sets with :func:`training_set`: with
``data.patch_size`` below ``data.image_size`` a :class:`PatchDataset` of
:func:`patches_per_image` crops per image and epoch; otherwise the whole-image dataset itself
(one patch = the whole image: exactly the whole-image path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """Random crops of ``base``'s items (see the module docstring).

    Args:
        base: whole-image items.
        patch: crop side in pixels.
        fg_fraction: share of crops centred on foreground (``1/3`` as nnU-Net).
        samples_per_item: crops per item and epoch (``len = samples_per_item * len(base)``).
        seed: the crop stream's seed (one stream, advanced per access, as the augmentation).
    """

    def __init__(self, base: Dataset, patch: int, *, fg_fraction: float = 1 / 3,
                 samples_per_item: int = 1, seed: int = 0) -> None:
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.base, self.patch, self.fg_fraction = base, int(patch), float(fg_fraction)
        self.samples_per_item = int(samples_per_item)
        self._rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int) -> None:
        """Restart the crop stream (and ``base``'s augmentation stream, if it has one) from
        ``seed``: the training loops re-seed every epoch, so a resumed run crops as an
        uninterrupted one."""
        self._rng = np.random.default_rng(int(seed) % (2**32))
        if hasattr(self.base, "set_random_state"):
            self.base.set_random_state(seed)

    def __len__(self) -> int:
        return self.samples_per_item * len(self.base)  # type: ignore[arg-type]

    def corner(self, mask: torch.Tensor, foreground: bool) -> tuple[int, int]:
        """Top-left corner ``(y, x)`` of a crop of the (padded) ``mask (H, W)``."""
        h, w = mask.shape
        p = self.patch
        if foreground:
            classes = [int(c) for c in torch.unique(mask) if c > 0]
            if classes:
                c = classes[self._rng.integers(len(classes))]
                ys, xs = torch.nonzero(mask == c, as_tuple=True)
                k = int(self._rng.integers(len(ys)))
                y = int(np.clip(int(ys[k]) - p // 2, 0, h - p))
                x = int(np.clip(int(xs[k]) - p // 2, 0, w - p))
                return y, x
        return int(self._rng.integers(h - p + 1)), int(self._rng.integers(w - p + 1))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index % len(self.base)]  # type: ignore[arg-type]
        p = self.patch
        image, mask = item["image"], item["mask"]
        fov = item.get("fov")
        h, w = mask.shape
        pad = (0, max(0, p - w), 0, max(0, p - h))  # right, bottom
        if any(pad):
            image = F.pad(image, pad)
            mask = F.pad(mask, pad)
            fov = None if fov is None else F.pad(fov, pad)
        y, x = self.corner(mask, self._rng.random() < self.fg_fraction)
        out = dict(item, image=image[:, y:y + p, x:x + p], mask=mask[y:y + p, x:x + p],
                   corner=(y, x))
        if fov is not None:
            out["fov"] = fov[y:y + p, x:x + p]
        return out


def patches_per_image(image_size: int, patch: int) -> int:
    """Crops per image and epoch: ``ceil((image_size / patch)**2)``, so an epoch covers about
    as many pixels as one pass over the whole images (1 when the patch covers the image)."""
    return max(1, math.ceil((image_size / patch) ** 2 - 1e-9))


def training_set(base: Dataset, *, image_size: int, patch: int, fg_fraction: float = 1 / 3,
                 seed: int = 0) -> Dataset:
    """What the training loops iterate: ``base`` itself when ``patch >= image_size`` (whole
    images), else a :class:`PatchDataset` of ``base`` with :func:`patches_per_image` crops per
    image and epoch.

    Args:
        base: whole-image items at ``image_size`` (``image`` float32 (3, S, S), ``mask`` int64
            (S, S)).
    """
    if patch >= image_size:
        return base
    return PatchDataset(base, patch, fg_fraction=fg_fraction,
                        samples_per_item=patches_per_image(image_size, patch), seed=seed)


def crop_arrays(images: np.ndarray, masks: np.ndarray | None, *, patch: int,
                per_image: int = 1, fg_fraction: float = 1 / 3, seed: int = 0) -> np.ndarray:
    """``per_image`` :class:`PatchDataset` crops of each of ``images`` (the transfer set's
    patches: the DDPM's training images, the real unlabelled images).

    Args:
        images: uint8 (N, H, W, 3).
        masks: int64 (N, H, W) for foreground oversampling, or None (crops anywhere).

    Returns:
        uint8 (N * per_image, patch, patch, 3): image ``i``'s crops at ``i * per_image ...``.
    """
    n = len(images)
    items = [{"image": torch.from_numpy(images[i].transpose(2, 0, 1).copy()),
              "mask": torch.zeros(images.shape[1:3], dtype=torch.int64) if masks is None
              else torch.from_numpy(np.asarray(masks[i], np.int64))} for i in range(n)]
    crops = PatchDataset(items, patch, fg_fraction=fg_fraction if masks is not None else 0.0,
                         seed=seed)  # type: ignore[arg-type]
    out = np.empty((n * per_image, patch, patch, 3), np.uint8)
    for i in range(n):
        for k in range(per_image):
            out[i * per_image + k] = crops[i]["image"].numpy().transpose(1, 2, 0)
    return out
