"""Quality and privacy of a synthetic transfer set (TS-KD, Table 16).

For every synthetic image we find the training image closest in pixel space and report the mean
squared error and the PSNR against it. A high PSNR means the generator reproduced a training image
(a near-copy): a privacy risk, because the transfer set may leave the site that owns the data.

The privacy check compares against more than the training images themselves
(:func:`privacy_references`): also their horizontal and vertical flips and the augmented copies
the diffusion model was trained on, so a memorised flipped or augmented copy is caught too.

Core layer: plain numpy + torch, no Ray.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_uint8", "is_grayscale", "to_grayscale", "nearest_neighbours", "quality_report",
           "psnr_from_mse", "json_safe", "privacy_references", "REFERENCE_KINDS"]

REFERENCE_KINDS = ("train", "hflip", "vflip", "augmented")
"""What a privacy reference image is: a training image, its left-right or top-bottom flip, or an
augmented copy the diffusion model was trained on."""


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``uint8 (N, H, W, 3)`` images to ``(N, size, size, 3)``.

    Bilinear with antialiasing (so downscaling does not alias), rounded and clipped back to
    uint8. Images already at ``size`` are returned unchanged (same object).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    for start in range(0, images.shape[0], 256):  # bound the float32 copy
        # torch.tensor copies: the images may be read-only (Ray's object store)
        x = torch.tensor(images[start:start + 256], dtype=torch.float32).permute(0, 3, 1, 2)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        out[start:start + 256] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def is_grayscale(images: np.ndarray) -> bool:
    """True when every pixel of the ``(N, H, W, 3)`` images has R = G = B."""
    return bool(np.all(images[..., 0] == images[..., 1]) and
                np.all(images[..., 0] == images[..., 2]))


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """``uint8 (N, H, W, 3)`` → the same shape with each pixel's channel mean (rounded) in all
    three channels."""
    gray = np.rint(images.astype(np.float32).mean(-1)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    """PSNR in dB for 8-bit images: ``10·log10(255² / mse)``; ``inf`` where ``mse == 0``."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)), np.inf)


def nearest_neighbours(synthetic: np.ndarray, train: np.ndarray, *, chunk: int = 256
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest training image (in pixel MSE) of every synthetic image.

    Args:
        synthetic: ``uint8 (M, H, W, 3)``.
        train: ``uint8 (N, H', W', 3)``; resized to the synthetic size first (bilinear,
            antialiased, see :func:`resize_uint8`) when ``(H', W') != (H, W)``.
        chunk: rows per block on each side; memory is about ``2 · chunk · H·W·3 · 8`` bytes.

    Returns:
        ``idx`` int64 (M,) index into ``train`` (first one on ties), ``mse`` float64 (M,) over all
        pixels and channels of 0..255 values, ``psnr`` float64 (M,) = ``10·log10(255²/mse)``
        (``inf`` for an exact copy).

    The squared distances use ``‖a‖² + ‖b‖² − 2a·b`` in float64 on the integer pixel values:
    every product and partial sum is an integer below 2⁵³, so the sums of squared errors (and
    thus the MSE, the argmin and an exact copy's MSE of 0) are exact.
    """
    if synthetic.dtype != np.uint8 or train.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {synthetic.dtype} and {train.dtype}")
    if synthetic.ndim != 4 or synthetic.shape[-1] != 3:
        raise ValueError(f"synthetic: expected (M, H, W, 3), got shape {synthetic.shape}")
    if len(train) == 0:
        raise ValueError("train: no training images to compare against")
    h, w = synthetic.shape[1:3]
    if h != w:
        raise ValueError(f"synthetic: expected square images, got {h}x{w}")
    train = resize_uint8(train, h)
    d = h * w * 3
    if d * 255 ** 2 >= 2 ** 53:  # pragma: no cover - images of ~4 Gpx
        raise ValueError("images too large for exact float64 distances")
    m = len(synthetic)
    best_sse = np.full(m, np.inf)
    best_idx = np.zeros(m, dtype=np.int64)
    train_flat = train.reshape(len(train), d)
    synth_flat = synthetic.reshape(m, d)
    for j0 in range(0, len(train), chunk):
        # torch.tensor copies: the arrays may be read-only (Ray's object store)
        b = torch.tensor(train_flat[j0:j0 + chunk], dtype=torch.float64)
        b_sq = (b * b).sum(1)
        for i0 in range(0, m, chunk):
            a = torch.tensor(synth_flat[i0:i0 + chunk], dtype=torch.float64)
            sse = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
            val, arg = sse.min(dim=1)  # first minimum on ties
            val = val.numpy()
            better = val < best_sse[i0:i0 + chunk]  # strict: earlier chunk wins ties
            best_sse[i0:i0 + chunk][better] = val[better]
            best_idx[i0:i0 + chunk][better] = arg.numpy()[better] + j0
    mse = np.maximum(best_sse, 0.0) / d
    return best_idx, mse, psnr_from_mse(mse)


def privacy_references(train: np.ndarray, augmented: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images a synthetic image must not nearly copy.

    Args:
        train: ``uint8 (N, H, W, 3)`` training images.
        augmented: ``uint8 (A, H', W', 3)`` the diffusion model's training set as built by
            :func:`tskd.data.augment.augment_copies` (copy ``j`` derives from ``train[j % N]``,
            the first ``min(N, A)`` are the originals and are not repeated here); resized to
            ``(H, W)`` if needed. ``None``: no augmented copies.

    Returns:
        ``refs`` uint8 ``(R, H, W, 3)``: the ``N`` training images, their ``N`` left-right flips,
        their ``N`` top-bottom flips, then the ``A - N`` augmented copies; ``train_index`` int64
        ``(R,)``: the training image each reference derives from; ``kind`` ``(R,)`` strings from
        :data:`REFERENCE_KINDS`.
    """
    if train.dtype != np.uint8 or train.ndim != 4 or train.shape[-1] != 3 or len(train) == 0:
        raise ValueError(f"train: expected non-empty uint8 (N, H, W, 3), got {train.dtype} "
                         f"{train.shape}")
    n, h = len(train), train.shape[1]
    parts = [train, train[:, :, ::-1], train[:, ::-1, :]]
    index = [np.arange(n)] * 3
    kinds = [np.full(n, k) for k in REFERENCE_KINDS[:3]]
    if augmented is not None and len(augmented) > n:
        extra = augmented[n:]
        if extra.shape[1:3] != train.shape[1:3]:
            if train.shape[1] != train.shape[2]:
                raise ValueError(f"augmented: size {extra.shape[1:3]} differs from the "
                                 f"non-square training images {train.shape[1:3]}")
            extra = resize_uint8(extra, h)
        parts.append(extra)
        index.append(np.arange(n, len(augmented)) % n)
        kinds.append(np.full(len(extra), REFERENCE_KINDS[3]))
    refs = np.ascontiguousarray(np.concatenate(parts))
    return refs, np.concatenate(index).astype(np.int64), np.concatenate(kinds)


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {k: None for k in ("mean", "median", "min", "max", "std")}
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "min": float(np.min(x)),
            "max": float(np.max(x)), "std": float(np.std(x))}


def quality_report(idx: np.ndarray, mse: np.ndarray, psnr: np.ndarray, *,
                   near_copy_psnr: float) -> dict[str, Any]:
    """Summary of :func:`nearest_neighbours` output (the paper's Table 16 + a privacy guard).

    Returns a dict with ``n`` (images), ``mse`` and ``psnr`` stats (``mean``/``median``/``min``/
    ``max``/``std``; the PSNR stats cover the finite values only, ``None`` if there are none),
    ``n_exact_copies`` (MSE 0, PSNR inf), ``near_copy_psnr`` (the threshold), ``n_near_copies``
    and ``near_copies``: ``[{"index": i, "nearest_train": j, "psnr": p}]`` for every synthetic image
    ``i`` with ``psnr >= near_copy_psnr`` (``p`` may be ``inf``), in index order.
    """
    idx = np.asarray(idx, dtype=np.int64)
    mse = np.asarray(mse, dtype=np.float64)
    psnr = np.asarray(psnr, dtype=np.float64)
    if not (idx.shape == mse.shape == psnr.shape) or idx.ndim != 1:
        raise ValueError(f"idx, mse, psnr must be 1-D of equal length, got "
                         f"{idx.shape}, {mse.shape}, {psnr.shape}")
    near = np.flatnonzero(psnr >= near_copy_psnr)
    return {
        "n": int(len(mse)),
        "mse": _stats(mse),
        "psnr": _stats(psnr[np.isfinite(psnr)]),
        "n_exact_copies": int(np.sum(np.isinf(psnr))),
        "near_copy_psnr": float(near_copy_psnr),
        "n_near_copies": int(len(near)),
        "near_copies": [{"index": int(i), "nearest_train": int(idx[i]), "psnr": float(psnr[i])}
                        for i in near],
    }


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` (strict JSON has no ``inf``/``nan``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
