"""Built-in thin-structure demo: procedural fundus-like images with branching vessels.

Each case is a pure function of its seed: a circular field of view (``fov/``) on black, an
orange-red background with vignetting (radial fall-off) and low-frequency choroidal texture, a
bright optic disc off-centre, a darker macula on the other side, and four vessel trees leaving the
disc (the superior and inferior arcades plus two nasal trees). Vessels are random walks with slowly
varying curvature that branch and thin out: 4 px wide at the disc (at 128 px; widths scale with
``size / 128``), down to 1 px, darker in the green channel in proportion to their width (thin
vessels have low contrast, as in real fundus photographs). The mask (class 1, ``vessel``) holds
the pixels within half a width of a centreline, inside the field of view::

    >>> image, mask, fov = make_vessels_case(0)
    >>> image.shape, mask.shape, fov.dtype
    ((128, 128, 3), (128, 128), dtype('bool'))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from tskd.data.demo import _case_seed, write_procedural_dataset

logger = logging.getLogger(__name__)

VESSELS_LABELS: dict[int, str] = {0: "background", 1: "vessel"}
VESSELS_NAME = "tskd-demo-vessels"
_GENERATOR_VERSION = 1
_MAX_WIDTH, _MIN_WIDTH = 4.0, 1.0
"""Vessel widths in pixels at 128 px (scaled by size / 128)."""


def _centrelines(rng: np.random.Generator, size: int, disc: tuple[float, float],
                 fov_r: float, centre: float, side: float) -> list[tuple[float, float, float]]:
    """Points ``(y, x, width)`` along the vessel trees, 0.5 px apart (width in pixels)."""
    scale = size / 128.0
    points: list[tuple[float, float, float]] = []
    # the arcades leave the disc towards the macula side (offset +-0.9 rad from the direction
    # disc -> macula) and bend around it; two smaller nasal trees go the other way
    toward = 0.0 if side < 0 else np.pi
    stack = []
    for off, w, arcade in ((-1, _MAX_WIDTH, True), (1, _MAX_WIDTH, True),
                           (-1, _MAX_WIDTH * 0.75, False), (1, _MAX_WIDTH * 0.75, False)):
        if arcade:
            heading = toward + off * rng.uniform(0.8, 1.1)
            curv = -off * rng.uniform(0.011, 0.019)
        else:
            heading = toward + np.pi - off * rng.uniform(0.5, 0.9)
            curv = rng.normal(0, 0.006)
        stack.append((disc[0], disc[1], heading, w * rng.uniform(0.9, 1.0), curv))
    budget = 60000
    while stack and budget > 0:
        y, x, heading, width, curv = stack.pop()
        length = 0.0
        max_length = rng.uniform(14, 24) * width * scale  # thin vessels are short
        next_branch = rng.uniform(10, 22) * scale
        while budget > 0 and length < max_length:
            budget -= 1
            if np.hypot(y - centre, x - centre) > fov_r - 1:
                break
            points.append((y, x, width * scale))
            heading += (curv / scale + rng.normal(0, 0.02)) * 0.5
            y += 0.5 * np.sin(heading)
            x += 0.5 * np.cos(heading)
            length += 0.5
            if length >= next_branch:
                child = width * rng.uniform(0.45, 0.75)
                if child >= _MIN_WIDTH:
                    turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                    stack.append((y, x, heading + turn, child, rng.normal(0, 0.01)))
                width = max(_MIN_WIDTH, width * rng.uniform(0.85, 0.97))
                next_branch = length + rng.uniform(10, 22) * scale
    return points


def _render(points: list[tuple[float, float, float]], size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mask (pixel centres within half a width of a centreline), the signed distance to the
    nearest vessel edge (pixels, < 0 inside; 1e3 far away) and the width of that vessel."""
    dist = np.full((size, size), np.inf)
    width = np.zeros((size, size))
    for y, x, w in points:
        r = w / 2
        y0, y1 = max(0, int(y - r - 1)), min(size, int(y + r + 2))
        x0, x1 = max(0, int(x - r - 1)), min(size, int(x + r + 2))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        d = np.hypot(yy - y, xx - x) - r  # < 0 inside this disc
        win = dist[y0:y1, x0:x1]
        closer = d < win
        win[closer] = d[closer]
        width[y0:y1, x0:x1][closer] = w
    return dist <= 0, np.where(np.isfinite(dist), dist, 1e3), width


def make_vessels_case(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fundus-like case, a pure function of ``(seed, size)``.

    Returns the image ``uint8 (size, size, 3)`` RGB, the mask ``int64 (size, size)`` (0
    background, 1 vessel) and the field of view ``bool (size, size)``.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0xF0D5])
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    centre = s / 2 + rng.uniform(-0.01, 0.01) * s
    fov_r = rng.uniform(0.45, 0.49) * s
    rr = np.hypot(yy - centre, xx - centre) / fov_r
    fov = rr <= 1.0

    side = rng.choice([-1.0, 1.0])  # the disc left or right of the centre (left / right eye)
    disc = (centre + rng.uniform(-0.06, 0.06) * s, centre + side * rng.uniform(0.24, 0.32) * s)
    macula = (centre + rng.uniform(-0.03, 0.03) * s, centre - side * rng.uniform(0.06, 0.12) * s)
    disc_r = rng.uniform(0.055, 0.075) * s

    # background: orange-red fundus, vignetting, choroidal texture, darker macula
    base = np.array([rng.uniform(0.70, 0.85), rng.uniform(0.30, 0.40), rng.uniform(0.10, 0.18)])
    vignette = 1.0 - rng.uniform(0.35, 0.55) * rr**2
    tex = ndimage.gaussian_filter(rng.standard_normal((size, size)), s * 0.03)
    tex = 1.0 + rng.uniform(0.03, 0.07) * tex / (tex.std() + 1e-12)
    dm = np.hypot(yy - macula[0], xx - macula[1]) / (rng.uniform(0.08, 0.12) * s)
    macula_dark = 1.0 - rng.uniform(0.25, 0.4) * np.exp(-0.5 * dm**2)
    image = base[None, None, :] * (vignette * tex * macula_dark)[:, :, None]
    # optic disc: bright yellowish with a soft edge and a brighter cup
    dd = np.hypot(yy - disc[0], xx - disc[1]) / disc_r
    disc_soft = 1.0 / (1.0 + np.exp((dd - 1.0) * 6.0))
    cup = np.exp(-0.5 * (dd / 0.45) ** 2)
    disc_colour = np.array([1.0, 0.85, 0.55])
    image = image * (1 - disc_soft[:, :, None]) + disc_colour * (
        0.8 + 0.2 * cup)[:, :, None] * disc_soft[:, :, None]

    points = _centrelines(rng, size, disc, fov_r, centre, side)
    mask, dist, width = _render(points, size)
    mask &= fov
    # vessels: darker (mostly green), contrast grows with width; anti-aliased edge
    coverage = np.clip(0.5 - dist, 0, 1)
    contrast = np.clip(0.22 + 0.12 * width / (size / 128.0), 0, 0.75) * coverage
    absorb = np.array([0.35, 1.0, 0.7])
    image = image * (1 - contrast[:, :, None] * absorb[None, None, :])
    image = ndimage.gaussian_filter(image, (0.5 * s / 128, 0.5 * s / 128, 0))
    image += rng.normal(0, rng.uniform(0.01, 0.025), image.shape)
    image *= rng.uniform(0.85, 1.1)  # exposure
    image *= fov[:, :, None]
    rgb = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return rgb, mask.astype(np.int64), fov


def _generator_params(n_images: int, size: int, seed: int, test_fraction: float
                      ) -> dict[str, Any]:
    return {"kind": "tskd.data.demo_vessels", "version": _GENERATOR_VERSION,
            "n_images": int(n_images), "size": int(size), "seed": int(seed),
            "test_fraction": float(test_fraction)}


def write_vessels_dataset(root: str | os.PathLike[str], *, n_images: int = 360,
                          size: int = 128, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """Write the vessel demo to ``root`` (``images/``, ``masks/``, ``fov/``, dataset.json with
    train/test splits), atomically, as :func:`tskd.data.demo.write_demo_dataset` does."""
    params = _generator_params(n_images, size, seed, test_fraction)
    return write_procedural_dataset(
        root, lambda i: make_vessels_case(_case_seed(seed, i), size), params=params,
        name=VESSELS_NAME, modality="fundus", labels=VESSELS_LABELS, spacing=None)
