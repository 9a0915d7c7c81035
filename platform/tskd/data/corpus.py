"""A broad procedural pre-training corpus: SA-1B in miniature (not the demo task).

Each item is a textured background with several objects drawn from many shape families (ellipses,
random polygons, stars, rings, perturbed blobs, curvilinear and branching lines, textured regions),
with random contrast (brighter or darker, sometimes faint, sometimes edge-only), some nested in a
parent object and painted over it. Every object gets a generic class from its own geometry,
:data:`CORPUS_LABELS`: 1 large region (> 8% of the image), 2 small region (compact, smaller),
3 thin structure (curvilinear); later objects paint over earlier ones, in image and mask::

    >>> ds = ProceduralCorpus(size=128, length=1000, seed=0)
    >>> item = ds[3]
    >>> item["image"].shape, item["image"].dtype, item["mask"].shape, item["mask"].dtype
    (torch.Size([3, 128, 128]), torch.float32, torch.Size([128, 128]), torch.int64)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

CORPUS_LABELS: dict[int, str] = {0: "background", 1: "large region", 2: "small region",
                                 3: "thin structure"}
LARGE_FRACTION = 0.08
"""Objects covering more than this share of the image are class 1 (large region)."""

_Rng = np.random.Generator


# ----------------------------------------------------------------------------------------------
# Textures: float32 (H, W) in roughly 0..1 (grey patterns, coloured by the caller)
# ----------------------------------------------------------------------------------------------


def _smooth_noise(rng: _Rng, shape: tuple[int, int], sigma: float) -> np.ndarray:
    a = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma,
                                mode="wrap")
    return a / (a.std() + 1e-6)


def _texture(rng: _Rng, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A zero-mean, roughly unit-amplitude texture of a random kind on the grid ``yy, xx``."""
    shape = yy.shape
    kind = rng.integers(0, 6)
    if kind == 0:  # fine gaussian noise
        return rng.standard_normal(shape).astype(np.float32) * 0.6
    if kind == 1:  # smooth blotches
        return _smooth_noise(rng, shape, rng.uniform(1.5, max(2.0, max(shape) / 10)))
    if kind == 2:  # speckle
        sig = rng.uniform(0.6, 1.5)
        a = np.hypot(_smooth_noise(rng, shape, sig), _smooth_noise(rng, shape, sig))
        return (a / a.mean() - 1.0).astype(np.float32)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(3, 24)
    u = (xx * np.cos(ang) + yy * np.sin(ang)) * (2 * np.pi / period)
    if kind == 3:  # stripes
        return np.sin(u).astype(np.float32)
    if kind == 4:  # checker
        v = (-xx * np.sin(ang) + yy * np.cos(ang)) * (2 * np.pi / period)
        return np.sign(np.sin(u) * np.sin(v)).astype(np.float32) * 0.8
    # wavy lines
    return np.sin(u + 2 * np.sin(yy * 2 * np.pi / rng.uniform(8, 128))).astype(np.float32)


def _colour(rng: _Rng, grey: bool) -> np.ndarray:
    if grey:
        return np.full(3, rng.uniform(0, 1), np.float32)
    return rng.uniform(0, 1, 3).astype(np.float32)


def _background(rng: _Rng, n: int, yy: np.ndarray, xx: np.ndarray, grey: bool) -> np.ndarray:
    """float32 (H, W, 3) in 0..1: a two-colour gradient, usually with a texture."""
    c0, c1 = _colour(rng, grey), _colour(rng, grey)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(ang) + yy * np.sin(ang)) / n
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
    w = (ramp * rng.uniform(0, 1))[..., None]  # gradient strength
    img = c0 + (c1 - c0) * w
    if rng.random() < 0.8:
        img += _texture(rng, yy, xx)[..., None] * rng.uniform(0.03, 0.2)
    return img.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Shapes: evaluated on a window grid (absolute coordinates yy, xx), return bool masks
# ----------------------------------------------------------------------------------------------

_EXTENT = 1.8
"""Every region shape lies within ``_EXTENT * r`` of its centre."""


def _ellipse(rng: _Rng, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
             r: float) -> np.ndarray:
    asp = rng.uniform(1, 2.5)
    a = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / (r * np.sqrt(asp))
    v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) * np.sqrt(asp) / r
    return u * u + v * v < 1


def _blob(rng: _Rng, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
    ks = np.arange(2, 7)
    amp = rng.uniform(0.05, 0.35) * rng.uniform(0.3, 1, ks.size) / ks**0.7
    ph = rng.uniform(0, 2 * np.pi, ks.size)
    t = np.arctan2(yy - cy, xx - cx)
    rad = r * (1 + sum(a * np.cos(k * t + p) for a, k, p in zip(amp, ks, ph)))
    return np.hypot(yy - cy, xx - cx) < rad


def _star(rng: _Rng, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
    k = int(rng.integers(3, 9))
    depth = rng.uniform(0.25, 0.6)
    ph = rng.uniform(0, 2 * np.pi)
    t = np.arctan2(yy - cy, xx - cx)
    rad = r * (1 - depth * (0.5 - 0.5 * np.cos(k * t + ph)) ** 0.6)
    return np.hypot(yy - cy, xx - cx) < rad


def _ring(rng: _Rng, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
    outer = _ellipse(rng, yy, xx, cy, cx, r)
    inner_r = r * rng.uniform(0.4, 0.75)
    return outer & (np.hypot(yy - cy, xx - cx) > inner_r)


def _polygon(rng: _Rng, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
             r: float) -> np.ndarray:
    k = int(rng.integers(3, 10))
    t = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.5, 1.3, k)
    y0, x0 = float(yy[0, 0]), float(xx[0, 0])
    pts = [(float(cx - x0 + a * np.cos(b)), float(cy - y0 + a * np.sin(b)))
           for a, b in zip(rad, t)]
    img = Image.new("L", (yy.shape[1], yy.shape[0]), 0)
    ImageDraw.Draw(img).polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


_REGION_SHAPES = (_ellipse, _blob, _star, _ring, _polygon)


def _region(rng: _Rng, n: int, shape: Callable[..., np.ndarray], cy: float, cx: float,
            r: float) -> np.ndarray:
    """Full-size bool (n, n) mask of ``shape`` evaluated only in its bounding window."""
    out = np.zeros((n, n), bool)
    ext = _EXTENT * r + 1
    y0, y1 = max(0, int(cy - ext)), min(n, int(np.ceil(cy + ext)) + 1)
    x0, x1 = max(0, int(cx - ext)), min(n, int(np.ceil(cx + ext)) + 1)
    if y1 <= y0 or x1 <= x0:
        shape(rng, *np.mgrid[0:1, 0:1].astype(np.float32), cy, cx, r)  # keep the rng stream
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = shape(rng, yy, xx, cy, cx, r)
    return out


def _curve_points(rng: _Rng, y: float, x: float, length: float) -> list[tuple[float, float]]:
    """A smooth random walk (a curvilinear path) of about ``length`` px."""
    steps = max(4, int(length / 3))
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.normal(0, 0.25, steps).cumsum() * rng.uniform(0.2, 1)
    pts = [(x, y)]
    for dh in turn:
        x += 3 * np.cos(heading + dh)
        y += 3 * np.sin(heading + dh)
        pts.append((float(x), float(y)))
    return pts


def _thin(rng: _Rng, n: int, cy: float, cx: float) -> np.ndarray:
    """Curvilinear structure, sometimes branching; 1-3 px wide at 128 px."""
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    width = max(1, int(round(rng.uniform(1, 3.2) * n / 128)))
    main = _curve_points(rng, cy, cx, rng.uniform(0.3, 0.9) * n)
    draw.line(main, fill=1, width=width, joint="curve")
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.5 else 0):
        x, y = main[int(rng.integers(0, len(main)))]
        branch = _curve_points(rng, y, x, rng.uniform(0.1, 0.4) * n)
        draw.line(branch, fill=1, width=max(1, width - int(rng.integers(0, 2))), joint="curve")
    return np.asarray(img, dtype=bool)


def _paint(rng: _Rng, img: np.ndarray, region: np.ndarray, thin: bool, grey: bool) -> None:
    """Paint ``region`` onto ``img`` (H, W, 3) in place with a random appearance."""
    ys, xs = np.nonzero(region)
    pad = 4
    y0, y1 = max(0, ys.min() - pad), min(img.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(img.shape[1], xs.max() + pad + 1)
    sub, reg = img[y0:y1, x0:x1], region[y0:y1, x0:x1]
    local = sub[reg].mean(axis=0)
    mode = rng.choice(["solid", "low", "edge", "texture"], p=[0.45, 0.15, 0.15, 0.25])
    if thin:
        mode = "solid" if rng.random() < 0.8 else "low"
    sign = 1.0 if rng.random() < 0.5 else -1.0
    delta = sign * (rng.uniform(0.05, 0.12) if mode == "low" else rng.uniform(0.15, 0.6))
    colour = np.clip(local + delta, 0, 1) if grey or rng.random() < 0.5 \
        else _colour(rng, grey)
    if mode == "edge":  # outline only, interior keeps the background
        edge = reg & ~ndimage.binary_erosion(reg, iterations=int(rng.integers(1, 3)))
        sub[edge] = colour
        return
    patch = np.broadcast_to(colour, sub.shape).astype(np.float32)
    if mode == "texture":
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        patch = patch + _texture(rng, yy, xx)[..., None] * rng.uniform(0.1, 0.3)
    elif rng.random() < 0.5:
        patch = patch + (rng.standard_normal(reg.shape + (1,)).astype(np.float32)
                         * rng.uniform(0.01, 0.06))
    alpha = reg.astype(np.float32)
    if not thin and rng.random() < 0.4:  # soft boundary (the label stays the hard region)
        alpha = ndimage.gaussian_filter(alpha, rng.uniform(0.5, 1.5))
    sub += alpha[..., None] * (patch - sub)


def make_corpus_item(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Item ``index`` of the corpus with ``seed``.

    Returns the image ``uint8 (size, size, 3)`` and the mask ``int64 (size, size)``.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0xC02])
    n = size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    grey = rng.random() < 0.5
    img = _background(rng, n, yy, xx, grey)
    mask = np.zeros((n, n), np.int64)

    n_objects = int(rng.integers(2, 8))
    objects: list[tuple[np.ndarray, bool]] = []
    for k in range(n_objects):
        if k > 0 and rng.random() < 0.2:
            objects.append((_thin(rng, n, rng.uniform(0.1, 0.9) * n, rng.uniform(0.1, 0.9) * n),
                            True))
            continue
        if k == 0 and rng.random() < 0.7:  # usually one large, fairly central region
            frac = rng.uniform(0.1, 0.35)
            cy, cx = rng.uniform(0.25, 0.75, 2) * n
        else:
            frac = np.exp(rng.uniform(np.log(0.004), np.log(0.25)))
            cy, cx = rng.uniform(-0.1, 1.1, 2) * n
        r = float(np.sqrt(frac * n * n / np.pi))
        shape = _REGION_SHAPES[int(rng.integers(0, len(_REGION_SHAPES)))]
        parent = _region(rng, n, shape, cy, cx, r)
        objects.append((parent, False))
        if r > 0.12 * n and rng.random() < 0.4:  # a nested child painted over its parent
            ys, xs = np.nonzero(parent)
            if ys.size:
                j = int(rng.integers(0, ys.size))
                shape = _REGION_SHAPES[int(rng.integers(0, len(_REGION_SHAPES)))]
                child = _region(rng, n, shape, float(ys[j]), float(xs[j]),
                                r * rng.uniform(0.15, 0.45))
                objects.append((child & parent, False))
    # Large before small so that small objects stay visible (children follow their parents);
    # thin structures last.
    areas = [int(region.sum()) for region, _ in objects]
    order = sorted(range(len(objects)), key=lambda i: (objects[i][1], -areas[i], i))
    for i in order:
        region, thin = objects[i]
        if areas[i] == 0:
            continue
        label = 3 if thin else (1 if areas[i] > LARGE_FRACTION * n * n else 2)
        _paint(rng, img, region, thin, grey)
        mask[region] = label

    if rng.random() < 0.3:
        s = rng.uniform(0.3, 1.0)
        img = ndimage.gaussian_filter(img, (s, s, 0))
    img += rng.standard_normal((n, n, 1 if grey else 3)).astype(np.float32) * rng.uniform(0, 0.03)
    lo, hi = rng.uniform(0, 0.15), rng.uniform(0.8, 1.0)  # random global contrast
    out = np.clip((img * (hi - lo) + lo) * 255, 0, 255).round().astype(np.uint8)
    return out, mask


class ProceduralCorpus(Dataset):
    """Torch dataset of ``length`` procedural items; item ``i`` is a pure function of ``(seed, i)``.

    Items are ``{"image": float32 (3, size, size) in 0..255, "mask": int64 (size, size)}`` with
    mask values in :data:`CORPUS_LABELS`. Nothing is cached: generation costs a few ms per item.
    """

    def __init__(self, size: int, length: int, seed: int) -> None:
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.size, self.length, self.seed = int(size), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a corpus of length {self.length}")
        index %= self.length
        image, mask = make_corpus_item(self.seed, index, self.size)
        return {"image": torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)),
                "mask": torch.from_numpy(mask)}
