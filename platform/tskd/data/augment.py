"""Augmentation: MONAI dictionary transforms over ``{"image", "mask"}`` (channel-first).

One :class:`monai.transforms.RandAffined` does rotation, zoom, translation and shear in a single
resampling (bilinear for the image, nearest for label keys, zero padding), followed by flips and a
mild intensity jitter on the image only. Mask values stay integer labels (a subset of the input
values plus 0 from padding). Deterministic after ``set_random_state``::

    >>> aug = build_augment(128)
    >>> _ = aug.set_random_state(seed=0)
    >>> out = aug({"image": image_chw_float, "mask": mask_1hw})      # doctest: +SKIP
    >>> out["image"].dtype, out["mask"].dtype                        # doctest: +SKIP
    (torch.float32, torch.int64)

MONAI is imported lazily so that ``import tskd.data`` stays light.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from monai.transforms import Compose

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Strength:
    p_affine: float
    rotate_deg: float
    scale: float
    translate: float  # fraction of the image side
    shear: float
    p_vflip: float
    p_intensity: float
    intensity_scale: float  # relative
    intensity_shift: float  # in 0..255 units
    gamma: tuple[float, float]


STRENGTHS: dict[str, _Strength | None] = {
    "none": None,
    "light": _Strength(0.5, 10, 0.10, 0.05, 0.05, 0.0, 0.3, 0.05, 5, (0.9, 1.1)),
    "default": _Strength(0.8, 15, 0.15, 0.08, 0.10, 0.0, 0.5, 0.10, 10, (0.8, 1.25)),
    "strong": _Strength(0.9, 30, 0.25, 0.12, 0.15, 0.2, 0.7, 0.20, 20, (0.7, 1.5)),
}
"""Presets for :func:`build_augment`'s ``strength`` (``none`` only fixes types)."""


def _clamp_0_255(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 255.0)


def build_augment(size: int | tuple[int, int], *, strength: str = "default",
                  image_keys: Sequence[str] = ("image",),
                  label_keys: Sequence[str] = ("mask",)) -> Compose:
    """Random augmentation of channel-first dicts, returning plain tensors.

    Input: ``image`` float32 ``(3, H, W)`` in 0..255 and ``mask`` ``(1, H, W)`` integer labels
    (numpy or torch). Output: ``image`` float32 ``(3, *size)`` clamped to 0..255, ``mask`` int64
    ``(1, *size)``. ``label_keys`` may add more nearest-interpolated keys (e.g. ``"fov"``) that
    follow the same geometry; an empty ``label_keys`` augments images only. ``strength`` is one of
    :data:`STRENGTHS`.
    """
    from monai.transforms import (CastToTyped, Compose, EnsureTyped, Lambdad, RandAdjustContrastd,
                                  RandAffined, RandFlipd, RandScaleIntensityd,
                                  RandShiftIntensityd)

    if strength not in STRENGTHS:
        raise ValueError(f"Unsupported strength: {strength!r}, available options are "
                         f"{list(STRENGTHS)}")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    img_keys, lab_keys = list(image_keys), list(label_keys)
    keys = img_keys + lab_keys
    modes = ["bilinear"] * len(img_keys) + ["nearest"] * len(lab_keys)
    cfg = STRENGTHS[strength]
    transforms: list = [EnsureTyped(keys=keys, data_type="tensor", track_meta=False),
                        CastToTyped(keys=keys, dtype=torch.float32)]
    if cfg is not None:
        transforms += [
            RandAffined(keys=keys, prob=cfg.p_affine, rotate_range=math.radians(cfg.rotate_deg),
                        scale_range=(cfg.scale, cfg.scale),
                        translate_range=(cfg.translate * hw[0], cfg.translate * hw[1]),
                        shear_range=(cfg.shear, cfg.shear), mode=modes, padding_mode="zeros",
                        spatial_size=hw),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        ]
        if cfg.p_vflip > 0:
            transforms.append(RandFlipd(keys=keys, prob=cfg.p_vflip, spatial_axis=0))
        transforms += [
            RandScaleIntensityd(keys=img_keys, factors=cfg.intensity_scale,
                                prob=cfg.p_intensity),
            RandShiftIntensityd(keys=img_keys, offsets=cfg.intensity_shift,
                                prob=cfg.p_intensity),
            RandAdjustContrastd(keys=img_keys, gamma=cfg.gamma, prob=cfg.p_intensity,
                                retain_stats=True),
            Lambdad(keys=img_keys, func=_clamp_0_255),
        ]
    transforms += [EnsureTyped(keys=keys, data_type="tensor", track_meta=False)]
    if lab_keys:
        transforms.append(CastToTyped(keys=lab_keys, dtype=torch.int64))
    return Compose(transforms)


def augment_copies(images: np.ndarray, n_out: int, seed: int, *,
                   strength: str = "default") -> np.ndarray:
    """Image-only augmented copies: ``uint8 (N, H, W, 3)`` → ``uint8 (n_out, H, W, 3)``.

    Output ``j`` derives from input ``j % N``; the first ``min(N, n_out)`` outputs are the
    originals unchanged, the rest are augmented (deterministic given ``seed``). Used to enlarge
    the labelled images for the diffusion model.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if n_out < 0:
        raise ValueError(f"n_out must be >= 0, got {n_out}")
    n, h, w, _ = images.shape
    out = np.empty((n_out, h, w, 3), np.uint8)
    k = min(n, n_out)
    out[:k] = images[:k]
    if n_out > n:
        aug = build_augment((h, w), strength=strength, label_keys=())
        aug.set_random_state(seed=int(seed) % (2**32))
        for j in range(n, n_out):
            chw = torch.from_numpy(images[j % n].transpose(2, 0, 1).astype(np.float32))
            res = aug({"image": chw})["image"]
            out[j] = res.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out
