"""HD95 speed: medpy's ``hd95``, MONAI's ``HausdorffDistanceMetric(percentile=95)`` and ``tskd.metrics.hd95``.

    python benchmarks/metrics_speed.py                 # 30 pairs of 512x512 masks
    python benchmarks/metrics_speed.py --pairs 10 --size 256

The pairs are seeded random smooth blobs: half with a few large blobs (10-40% of the image), half
with many small ones (0.5-3%); each prediction is its target's smooth field plus a smooth
perturbation, thresholded at the same coverage (so the pair overlaps like a real prediction with
boundary errors and stray blobs). All three run on the same pairs in this run, one pass each after
one warm-up call; the times are per pair (mean), ratios are medpy/tskd and monai/tskd. medpy and
tskd compute the same quantity (the largest relative difference is printed); MONAI computes a
different one (max of the two directed percentiles), timed for reference.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from medpy.metric.binary import hd95 as medpy_hd95
from monai.metrics import HausdorffDistanceMetric
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from tskd.metrics import hd95 as tskd_hd95  # noqa: E402


def _field(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """A smooth random field: a ``grid x grid`` random array upsampled (cubic) to ``size``."""
    return ndi.zoom(rng.standard_normal((grid, grid)), size / grid, order=3)[:size, :size]


def make_pairs(n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        large = i % 2 == 0
        grid = int(rng.integers(3, 7)) if large else int(rng.integers(12, 25))
        cover = rng.uniform(0.10, 0.40) if large else rng.uniform(0.005, 0.03)
        f = _field(rng, grid, size)
        g = f + rng.uniform(0.1, 0.4) * _field(rng, 2 * grid, size)  # the "prediction"
        t = f > np.quantile(f, 1 - cover)
        p = g > np.quantile(g, 1 - cover)
        pairs.append((p, t, "large" if large else "small"))
    return pairs


def real_pairs(directory: Path, n: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Real ground-truth masks (``*.png`` under ``directory``, > 127 = foreground), each paired
    with a plausible prediction: the mask shifted by (3, -2) px and dilated twice."""
    from PIL import Image

    pairs = []
    for path in sorted(directory.rglob("*.png"))[:n]:
        target = np.array(Image.open(path).convert("L")) > 127
        pred = ndi.binary_dilation(np.roll(target, (3, -2), axis=(0, 1)), iterations=2)
        if target.any():
            pairs.append((pred, target, "real"))
    return pairs


def time_all(fn, pairs) -> tuple[float, list[float]]:
    """Seconds per pair (mean over one pass, after one warm-up call) and the values."""
    fn(pairs[0][0], pairs[0][1])
    start = time.perf_counter()
    vals = [fn(p, t) for p, t, _ in pairs]
    return (time.perf_counter() - start) / len(pairs), vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, nargs=2, default=None, metavar=("S_H", "S_W"))
    ap.add_argument("--real-masks", type=Path, default=None,
                    help="use real masks under this folder (e.g. ../shared/data/busi) instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spacing = tuple(args.spacing) if args.spacing else None
    pairs = (real_pairs(args.real_masks, args.pairs) if args.real_masks
             else make_pairs(args.pairs, args.size))

    monai = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")

    def monai_hd95(p: np.ndarray, t: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            v = float(monai(torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float(),
                            spacing=list(spacing) if spacing else None)[0, 0])
        monai.reset()
        return v

    t_medpy, v_medpy = time_all(lambda p, t: medpy_hd95(p, t, voxelspacing=spacing), pairs)
    t_monai, v_monai = time_all(monai_hd95, pairs)
    t_tskd, v_tskd = time_all(lambda p, t: tskd_hd95(p, t, spacing), pairs)

    v_medpy, v_monai, v_tskd = map(np.asarray, (v_medpy, v_monai, v_tskd))
    max_rel = float(np.max(np.abs(v_tskd - v_medpy) / np.maximum(v_medpy, 1e-300)))
    n_small = sum(kind == "small" for *_, kind in pairs)
    if args.real_masks:
        print(f"{len(pairs)} real masks from {args.real_masks} (native sizes), each against a "
              "shifted+dilated copy")
    else:
        print(f"{len(pairs)} pairs of {args.size}x{args.size} masks ({len(pairs) - n_small} "
              f"large-blob, {n_small} small-blob), spacing {spacing or 'pixels'}, torch threads 1")
    print(f"  medpy hd95                            {t_medpy * 1e3:8.2f} ms/pair")
    print(f"  MONAI HausdorffDistanceMetric(p=95)   {t_monai * 1e3:8.2f} ms/pair")
    print(f"  tskd.metrics.hd95                     {t_tskd * 1e3:8.2f} ms/pair")
    print(f"  medpy / tskd = {t_medpy / t_tskd:.1f}x    monai / tskd = {t_monai / t_tskd:.1f}x")
    print(f"  max |tskd - medpy| / medpy = {max_rel:.2e}; MONAI above medpy on "
          f"{int((v_monai > v_medpy * (1 + 1e-4)).sum())}/{len(pairs)} pairs "
          f"(median {np.median(v_monai / v_medpy - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
