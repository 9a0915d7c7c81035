"""Torch dataset over a tskd dataset: cached, resized cases with optional augmentation.

    >>> info = validate_dataset(root)                                          # doctest: +SKIP
    >>> ds = SegmentationDataset(info, splits.labelled, 128, augment=True)     # doctest: +SKIP
    >>> item = ds[0]    # {"image": float32 (3,128,128) 0..255, "mask": int64 (128,128), "id": str}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from tskd.data.format import DatasetInfo, read_case, read_fov

logger = logging.getLogger(__name__)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``uint8 (H, W, 3)`` to ``uint8 (size, size, 3)`` (PIL, antialiased)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_nearest(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``(size, size)``; output pixel ``i`` samples
    input pixel ``floor((i + 0.5) * H / size)`` (pixel centres), so values are preserved."""
    h, w = labels.shape
    if (h, w) == (size, size):
        return labels
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def load_arrays(info: DatasetInfo, case_ids: Sequence[str], size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Read and resize cases.

    Returns images ``uint8 (N, size, size, 3)`` (bilinear) and masks ``int64 (N, size, size)``
    (nearest), in the order of ``case_ids``.
    """
    images = np.empty((len(case_ids), size, size, 3), np.uint8)
    masks = np.empty((len(case_ids), size, size), np.int64)
    for i, case_id in enumerate(case_ids):
        image, mask = read_case(info, case_id)
        images[i] = resize_image(image, size)
        masks[i] = resize_nearest(mask, size)
    return images, masks


def load_fov_arrays(info: DatasetInfo, case_ids: Sequence[str], size: int) -> np.ndarray | None:
    """Field-of-view masks ``bool (N, size, size)``, or ``None`` if the dataset has none."""
    if not info.has_fov:
        return None
    out = np.empty((len(case_ids), size, size), bool)
    for i, case_id in enumerate(case_ids):
        out[i] = resize_nearest(read_fov(info, case_id), size)  # type: ignore[arg-type]
    return out


def _worker_key() -> tuple[int, int] | None:
    worker = get_worker_info()
    return None if worker is None else (worker.id, worker.seed)


class SegmentationDataset(Dataset):
    """Cases of a dataset as ``{"image", "mask", "id"}`` dicts (plus ``"fov"`` if it has one).

    All cases are read once in the constructor, resized (image bilinear, mask nearest) to
    ``size x size`` and kept in memory. Items: ``image`` float32 ``(3, size, size)`` in 0..255,
    ``mask`` int64 ``(size, size)``, ``id`` str, and ``fov`` bool ``(size, size)`` for datasets
    with a ``fov/`` directory. With ``augment=True`` every access draws a new random augmentation
    (:func:`tskd.data.augment.build_augment`, ``strength``); the stream is seeded with ``seed`` in
    the main process and with the DataLoader worker seed in workers (which changes every epoch
    and follows ``torch.manual_seed``).
    """

    def __init__(self, info: DatasetInfo, case_ids: Sequence[str], size: int, *,
                 augment: bool = False, seed: int = 0, strength: str = "default") -> None:
        self.info = info
        self.case_ids = tuple(case_ids)
        self.size = int(size)
        self.augment = augment
        self.seed = int(seed)
        self.images, self.masks = load_arrays(info, self.case_ids, self.size)
        self.fov = load_fov_arrays(info, self.case_ids, self.size)
        self._transform = None
        self._seeded_for: Any = None
        if augment:
            from tskd.data.augment import build_augment

            extra = ("fov",) if self.fov is not None else ()
            self._transform = build_augment(self.size, strength=strength,
                                            label_keys=("mask",) + extra)
            self.set_random_state(self.seed)
        logger.debug("SegmentationDataset: %d cases of %s at %d px", len(self.case_ids),
                     info.name, self.size)

    def set_random_state(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed`` (no-op without augmentation)."""
        if self._transform is not None:
            self._transform.set_random_state(seed=int(seed) % (2**32))
            self._seeded_for = _worker_key()

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.from_numpy(self.images[index].transpose(2, 0, 1).astype(np.float32))
        mask = torch.from_numpy(self.masks[index].copy())
        fov = None if self.fov is None else torch.from_numpy(self.fov[index].copy())
        if self._transform is not None:
            key = _worker_key()
            if key is not None and key != self._seeded_for:  # first item in this worker/epoch
                self.set_random_state(key[1])
            data = {"image": image, "mask": mask[None]}
            if fov is not None:
                data["fov"] = fov[None].to(torch.int64)
            data = self._transform(data)
            image, mask = data["image"], data["mask"][0]
            if fov is not None:
                fov = data["fov"][0] > 0
        item: dict[str, Any] = {"image": image, "mask": mask, "id": self.case_ids[index]}
        if fov is not None:
            item["fov"] = fov
        return item
