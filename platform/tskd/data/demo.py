"""Built-in demo data: procedural ultrasound-like images of an organ with a lesion.

Each case is generated on the fly and is a pure function of its seed: a curvilinear-probe sector
on black, Rayleigh speckle (smoothed complex Gaussian field), depth attenuation with partial time-
gain compensation, tissue layers and fascia, a hypoechoic organ (perturbed ellipse, brighter
capsule) and, in ~90% of cases, a darker lesion inside it, sometimes with posterior acoustic
shadowing or enhancement. Labels are :data:`DEMO_LABELS`; at 128 px the organ (class 1, lesion
excluded) covers ~10-20% of the pixels and a lesion (class 2) ~3-6%::

    >>> image, mask = make_demo_case(0)
    >>> image.shape, image.dtype, mask.shape, mask.dtype
    ((128, 128, 3), dtype('uint8'), (128, 128), dtype('int64'))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from tskd.data.format import DATASET_JSON, DatasetError, write_dataset_json

logger = logging.getLogger(__name__)

DEMO_LABELS: dict[int, str] = {0: "background", 1: "organ", 2: "lesion"}
DEMO_NAME = "tskd-demo-ultrasound"
DEMO_FIELD_MM = 38.4
"""Side of the imaged field in mm (spacing = DEMO_FIELD_MM / size, 0.3 mm at 128 px)."""
_GENERATOR_VERSION = 1
_LESION_PROB = 0.9


def _perturbed_radius(rng: np.random.Generator, amp: float, kmax: int = 4
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-frequency radial perturbation r(t) = 1 + sum c_k cos(k t + phi_k), k = 2..kmax."""
    ks = np.arange(2, kmax + 1)
    c = rng.uniform(0.3, 1.0, ks.size) * amp / ks**0.5
    phi = rng.uniform(0, 2 * np.pi, ks.size)
    return ks, c, phi


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
          angle: float, shape: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Signed normalised distance field of a perturbed ellipse (< 0 inside, ~radial units)."""
    ks, c, phi = shape
    ca, sa = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * ca + dy * sa) / rx
    v = (-dx * sa + dy * ca) / ry
    rho = np.hypot(u, v)
    t = np.arctan2(v, u)
    r = 1.0 + np.sum(c[:, None, None] * np.cos(ks[:, None, None] * t + phi[:, None, None]),
                     axis=0)
    return rho - r


def _area_factor(shape: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """Area of the perturbed unit shape over pi: (1/2pi) int r^2 dt = 1 + sum c_k^2 / 2."""
    return 1.0 + float(np.sum(shape[1] ** 2)) / 2.0


def _speckle(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Fully developed speckle: |smoothed complex Gaussian|, Rayleigh-distributed, mean 1."""
    re = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    im = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    amp = np.hypot(re, im)
    return amp / amp.mean()


def make_demo_case(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One procedural ultrasound-like case, a pure function of ``(seed, size)``.

    Returns the image ``uint8 (size, size, 3)`` (grey replicated) and the mask
    ``int64 (size, size)`` with values in :data:`DEMO_LABELS` (0 background, 1 organ, 2 lesion).
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0xDE70])
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    # Curvilinear-probe sector: apex above the image, arcs at r_min and r_max.
    apex_y, apex_x = -rng.uniform(0.22, 0.30) * s, s / 2 + rng.uniform(-0.02, 0.02) * s
    half_angle = np.deg2rad(rng.uniform(34, 42))
    r_min = -apex_y + rng.uniform(0.04, 0.08) * s
    r_max = -apex_y + rng.uniform(0.92, 1.02) * s
    rr = np.hypot(yy - apex_y, xx - apex_x)
    th = np.arctan2(xx - apex_x, yy - apex_y)
    edge = 0.6  # px of anti-aliasing at the sector border
    fan = (np.clip((rr - r_min) / edge + 0.5, 0, 1) * np.clip((r_max - rr) / edge + 0.5, 0, 1)
           * np.clip((half_angle - np.abs(th)) * rr / edge + 0.5, 0, 1))
    depth = np.clip((rr - r_min) / (r_max - r_min), 0, 1)

    # Background tissue echogenicity: smooth variation, near-field layers, fascia lines.
    low = ndimage.gaussian_filter(rng.standard_normal((size, size)), s * 0.08, mode="reflect")
    tissue = 0.55 + rng.uniform(0.04, 0.10) * low / (low.std() + 1e-12)
    layer_depths = np.sort(rng.uniform(0.03, 0.22, rng.integers(2, 4)))
    for d in layer_depths:  # bright, slightly wavy fascia arcs
        wav = d + 0.01 * np.sin(th * rng.uniform(3, 8) + rng.uniform(0, 6.3))
        tissue += rng.uniform(0.4, 0.9) * np.exp(-0.5 * ((depth - wav) * s / 1.2) ** 2)
    tissue[depth < layer_depths[0]] *= 0.8

    mask = np.zeros((size, size), np.int64)
    # Organ: perturbed ellipse covering 12-20% of the image once the lesion (3-6%) is cut out.
    has_lesion = rng.random() < _LESION_PROB
    lesion_frac = rng.uniform(0.032, 0.058) if has_lesion else 0.0
    organ_frac = rng.uniform(0.125, 0.195) + lesion_frac
    organ_shape = _perturbed_radius(rng, 0.10)
    aspect = rng.uniform(1.0, 1.6)
    ab = organ_frac * s * s / (np.pi * _area_factor(organ_shape))
    orx, ory = np.sqrt(ab * aspect), np.sqrt(ab / aspect)
    angle = rng.uniform(-0.6, 0.6)
    for _ in range(20):  # keep the organ (nearly) inside the sector
        ocy = rng.uniform(0.42, 0.60) * s
        ocx = s / 2 + rng.uniform(-0.12, 0.12) * s
        d_organ = _blob(yy, xx, ocy, ocx, ory, orx, angle, organ_shape)
        inside = d_organ < 0
        if (fan[inside] > 0.5).mean() > 0.99:
            break
        orx, ory = orx * 0.97, ory * 0.97
    organ = inside & (fan > 0.5)

    # Lesion inside the organ, area 3-6% of the image.
    lesion = np.zeros_like(organ)
    d_lesion = None
    if has_lesion:
        lesion_shape = _perturbed_radius(rng, 0.12)
        laspect = rng.uniform(1.0, 1.4)
        lab = lesion_frac * s * s / (np.pi * _area_factor(lesion_shape))
        lrx, lry = np.sqrt(lab * laspect), np.sqrt(lab / laspect)
        langle = rng.uniform(-np.pi, np.pi)
        core = ndimage.binary_erosion(organ, iterations=max(1, round(s / 64)))
        for attempt in range(40):
            off = rng.uniform(0, 0.45) * (1 - attempt / 60)
            t = rng.uniform(0, 2 * np.pi)
            lcy = ocy + off * ory * np.sin(t)
            lcx = ocx + off * orx * np.cos(t)
            d_lesion = _blob(yy, xx, lcy, lcx, lry, lrx, langle, lesion_shape)
            lesion = d_lesion < 0
            if not (lesion & ~core).any():
                break
            lrx, lry = lrx * 0.98, lry * 0.98
        lesion &= organ

    # Echogenicity: hypoechoic organ with brighter capsule; darker lesion with a fuzzy margin.
    organ_level = rng.uniform(0.55, 0.75)
    soft_organ = 1.0 / (1.0 + np.exp(d_organ * min(orx, ory) / 0.8))
    echo = tissue * (1 - soft_organ) + tissue * organ_level * soft_organ
    capsule_w = rng.uniform(0.8, 1.6)
    echo += rng.uniform(0.35, 0.8) * np.exp(-0.5 * (d_organ * min(orx, ory) / capsule_w) ** 2)
    if d_lesion is not None and lesion.any():
        lesion_level = rng.uniform(0.40, 0.65)
        soft_lesion = 1.0 / (1.0 + np.exp(d_lesion * min(lrx, lry) / rng.uniform(0.6, 1.4)))
        echo *= 1 - (1 - lesion_level) * soft_lesion
        if rng.random() < 0.25:  # thin echogenic halo
            echo += 0.25 * np.exp(-0.5 * (d_lesion * min(lrx, lry) / 0.8) ** 2)
        # Posterior acoustic shadowing (attenuating) or enhancement (fluid-like), along the beams.
        kind = rng.choice(["shadow", "enhance", "none"], p=[0.3, 0.3, 0.4])
        if kind != "none":
            th_l, rr_l = th[lesion], rr[lesion]
            lo, hi = th_l.min(), th_l.max()
            mid, half = (lo + hi) / 2, (hi - lo) / 2 * rng.uniform(0.6, 0.9)
            ang = np.clip(1 - np.abs(th - mid) / max(half, 1e-3), 0, 1) ** 0.5
            beyond = np.clip((rr - np.median(rr_l)) / (0.1 * s), 0, 1)
            strength = rng.uniform(0.3, 0.55) if kind == "shadow" else -rng.uniform(0.25, 0.5)
            echo *= 1 - strength * ang * beyond
    # Occasional anechoic vessel cross-section in the tissue outside the organ (a distractor),
    # with a bright wall and posterior enhancement.
    if rng.random() < 0.3:
        vr = rng.uniform(2.5, 5.5) * s / 128
        for _ in range(10):
            vt = rng.uniform(-0.8, 0.8) * half_angle
            vd = rng.uniform(0.15, 0.85) * (r_max - r_min) + r_min
            vy, vx = apex_y + vd * np.cos(vt), apex_x + vd * np.sin(vt)
            dv = np.hypot((yy - vy) / 1.2, xx - vx) - vr
            if (d_organ[dv < 3 * s / 128] > 0.15).all() and 0 < vy < s and 0 < vx < s:
                vessel = np.clip(0.5 - dv, 0, 1)
                echo *= 1 - 0.85 * vessel
                echo += 0.3 * np.exp(-0.5 * (dv / 0.8) ** 2)
                behind = np.clip(1 - np.abs(th - vt) * vd / vr, 0, 1) * (rr > vd)
                echo *= 1 + 0.3 * behind
                break
    # Acquisition: speckle, attenuation + partial TGC, gain, log compression.
    sp_strength = rng.uniform(0.55, 0.95)
    speckle = _speckle(rng, size, (rng.uniform(0.6, 0.9), rng.uniform(1.0, 1.6)))
    signal = echo * ((1 - sp_strength) + sp_strength * speckle)
    atten = rng.uniform(1.2, 2.4)
    tgc = rng.uniform(0.3, 0.7)
    signal *= np.exp(-atten * (1 - tgc) * depth)
    signal *= rng.uniform(0.8, 1.2)  # overall gain
    k = rng.uniform(6, 14)
    out = np.log1p(k * np.clip(signal, 0, None)) / np.log1p(k * 1.6)
    out = ndimage.gaussian_filter(out, 0.5) * fan
    out += rng.uniform(0, 0.02) * rng.random((size, size)) * fan  # electronic noise
    grey = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)

    mask[organ] = 1
    mask[lesion] = 2
    return np.repeat(grey[:, :, None], 3, axis=2), mask


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index]).generate_state(1)[0])


def _generator_params(n_images: int, size: int, seed: int, test_fraction: float
                      ) -> dict[str, Any]:
    return {"kind": "tskd.data.demo", "version": _GENERATOR_VERSION, "n_images": int(n_images),
            "size": int(size), "seed": int(seed), "test_fraction": float(test_fraction)}


def _is_complete(root: Path, params: dict[str, Any], name: str = DEMO_NAME) -> bool | None:
    """True: complete demo for ``params``; False: a demo for other params; None: not a demo."""
    try:
        meta = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("name") != name or "generator" not in meta:
        return None
    if meta["generator"] != params:
        return False
    n = params["n_images"]
    images = [p for p in (root / "images").glob("*.png")]
    masks = [p for p in (root / "masks").glob("*.png")]
    return len(images) == n and len(masks) == n


def write_demo_dataset(root: str | os.PathLike[str], *, n_images: int = 360, size: int = 128,
                       seed: int = 0, test_fraction: float = 0.25) -> Path:
    """Write the demo dataset to ``root`` (``images/case_XXXX.png``, ``masks/``, dataset.json).

    ``dataset.json`` has explicit train/test splits (a seeded ``test_fraction``), spacing
    ``DEMO_FIELD_MM / size`` mm and the generator parameters under ``"generator"``. Files are
    written to a temporary directory next to ``root`` and renamed into place, so ``root`` is never
    half-written. An existing complete demo with the same parameters is returned as is; an empty
    directory is filled; anything else at ``root`` raises :class:`DatasetError`.
    """
    params = _generator_params(n_images, size, seed, test_fraction)

    def case(i: int) -> tuple[np.ndarray, np.ndarray, None]:
        image, mask = make_demo_case(_case_seed(seed, i), size)
        return image, mask, None

    return write_procedural_dataset(root, case, params=params, name=DEMO_NAME, modality="US",
                                    labels=DEMO_LABELS, spacing=[DEMO_FIELD_MM / size] * 2)


def write_procedural_dataset(root: str | os.PathLike[str], case: Any, *,
                             params: dict[str, Any], name: str, modality: str,
                             labels: dict[int, str], spacing: list[float] | None) -> Path:
    """Write a procedural dataset atomically (see :func:`write_demo_dataset`).

    ``case(i)`` returns case ``i``'s image ``uint8 (H, W, 3)``, mask ``int64 (H, W)`` and field
    of view ``bool (H, W)`` or ``None``; ``params`` (with ``n_images``, ``seed``,
    ``test_fraction``) is stored as ``dataset.json``'s ``generator`` and identifies the dataset.
    """
    root = Path(root).expanduser()
    n_images, seed, test_fraction = params["n_images"], params["seed"], params["test_fraction"]
    if n_images < 2:
        raise DatasetError(f"n_images must be >= 2, got {n_images}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")

    def check_existing() -> bool:
        if not root.exists():
            return False
        if root.is_dir() and not any(root.iterdir()):
            return False
        state = _is_complete(root, params, name) if root.is_dir() else None
        if state:
            logger.info("demo dataset already present at %s", root)
            return True
        what = ("a demo dataset with other parameters (or incomplete)" if state is False
                else "other content")
        raise DatasetError(f"{root}: exists and holds {what}; expected an empty directory or "
                           f"the demo dataset for {params}")

    if check_existing():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        width = max(4, len(str(n_images - 1)))
        ids = [f"case_{i:0{width}d}" for i in range(n_images)]
        for i, case_id in enumerate(ids):
            image, mask, fov = case(i)
            grey = (image[:, :, 0] == image[:, :, 1]).all() and (
                image[:, :, 0] == image[:, :, 2]).all()
            Image.fromarray(image[:, :, 0] if grey else image, mode="L" if grey else "RGB").save(
                tmp / "images" / f"{case_id}.png")
            Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp / "masks" / f"{case_id}.png")
            if fov is not None:
                (tmp / "fov").mkdir(exist_ok=True)
                Image.fromarray(fov.astype(np.uint8) * 255, mode="L").save(
                    tmp / "fov" / f"{case_id}.png")
        n_test = min(n_images - 1, max(1, round(test_fraction * n_images)))
        perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5B117]).permutation(n_images)
        test = sorted(ids[j] for j in perm[:n_test])
        train = sorted(set(ids) - set(test))
        write_dataset_json(tmp, name=name, modality=modality, labels=labels, spacing=spacing,
                           splits={"train": train, "test": test}, extra={"generator": params})
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:  # another process won the race: accept its result if it is ours
            if check_existing():
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%d images) to %s", name, n_images, root)
    return root
