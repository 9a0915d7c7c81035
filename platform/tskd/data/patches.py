"""Patch sampling with foreground oversampling (core; nnU-Net's sampler, for images larger than
the working size).

:class:`PatchDataset` wraps a dataset of whole images (``{"image": float32 (3,H,W), "mask":
int64 (H,W)[, "fov": bool (H,W)], "id"}``) and returns ``patch x patch`` crops: a share
``fg_fraction`` (nnU-Net: a third) of them centred on a foreground pixel (a random present
foreground class, then a random pixel of it), the others anywhere. Images smaller than the
patch are padded (image 0, mask 0 = background, fov False). Inference on whole images goes
through :func:`tskd.evaluation.sliding_window_logits` with the same window.

Not wired into the training stages yet (``data.image_size`` whole-image training is what the
stages do); see the issue on patch training.
"""

from __future__ import annotations

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
