"""Two augmented views per image for contrastive pre-training (the MoCo v3 baseline).

:class:`TwoViews` applies MoCo v3's (BYOL's) augmentation recipe, drawn independently per image
and per view, with torchvision's ``transforms.v2`` on tensors: random resized crop (scale
``min_scale``..1), horizontal flip, colour jitter (p 0.8; brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1), grayscale (p 0.2), Gaussian blur (p 1.0 for the first view, 0.1 for
the second) and solarisation (p 0 / 0.2). The two views are asymmetric as in MoCo v3.

``TwoViews(size)(images: float32 (B, 3, H, W) in 0..255) -> (view1, view2)``, each
``float32 (B, 3, size, size)`` in 0..255.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TwoViews"]


class TwoViews:
    """MoCo v3's two asymmetric augmentations (see the module docstring).

    Args:
        size: output side of each view.
        min_scale: smallest crop area as a share of the image (MoCo v3: 0.08).
    """

    def __init__(self, size: int, min_scale: float = 0.08) -> None:
        from torchvision.transforms import v2

        def recipe(p_blur: float, p_solarize: float):
            kernel = max(3, (size // 10) | 1)  # odd, ~10 % of the side (BYOL: 23 at 224 px)
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p_blur),
                v2.RandomSolarize(threshold=0.5, p=p_solarize),
            ])

        self.size = size
        self.first, self.second = recipe(1.0, 0.0), recipe(0.1, 0.2)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = (images / 255.0).clamp(0.0, 1.0)  # the colour transforms expect floats in 0..1
        v1 = torch.stack([self.first(img) for img in x]) * 255.0
        v2 = torch.stack([self.second(img) for img in x]) * 255.0
        return v1, v2
