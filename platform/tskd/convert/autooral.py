"""Autooral oral-ulcer photographs (Jiang et al., Sci. Rep. 14:20085, 2024) → tskd.

ASSUMED LAYOUT. The dataset is sent by e-mail on request (github.com/wurenkai/HF-UNet-and-
Autooral-dataset); its folder layout is not published — the repository only says to run
``Prepare_Autooral.py`` (not public) to build ``data_train/val/test.npy`` and
``mask_train/val/test.npy``, i.e. the release ships train/val/test splits of images and binary
ulcer masks. This converter therefore accepts the common variants of that layout::

    SRC/{train,val|valid|validation,test}/{images|image|imgs|img}/<id>.<ext>
    SRC/{train,val|valid|validation,test}/{masks|mask|labels|label|gt|groundtruth}/<id>[_mask].<ext>
    or, without a split:  SRC/{images,...}/  +  SRC/{masks,...}/

A mask pairs with an image of the same stem, optionally with a ``_mask``/``_gt``/``_label``/
``_segmentation`` suffix. Masks are binary (0/1 or 0/255; JPEG noise is thresholded at 128).
An image without mask is a :class:`DatasetError` naming it.

Labels {0: background, 1: ulcer}; 256×256 by default (as in the TS-KD paper). The official split
is kept: ``train`` (official validation images merged in — tskd carves its own validation set
from train) and ``test``. The classification annotations are not converted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tskd.convert.common import (ConversionSummary, DatasetWriter, image_files, natural_key,
                                 read_binary_mask, source_dir)
from tskd.data.format import IMAGE_EXTENSIONS, DatasetError, read_image

LABELS = {0: "background", 1: "ulcer"}
DEFAULT_SIZE = 256
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
              "test": ("test", "testing")}
IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labels", "label", "gt", "groundtruth", "ground_truth")
MASK_SUFFIXES = ("", "_mask", "_gt", "_label", "_segmentation", "_seg")


def _child(parent: Path, names: tuple[str, ...]) -> Path | None:
    if not parent.is_dir():
        return None
    by_lower = {p.name.lower(): p for p in parent.iterdir() if p.is_dir()}
    for n in names:
        if n in by_lower:
            return by_lower[n]
    return None


def find_parts(src: Path) -> list[tuple[str | None, Path, Path]]:
    """[(split or None, images dir, masks dir)] of the source."""
    parts: list[tuple[str | None, Path, Path]] = []
    for split, names in SPLIT_DIRS.items():
        d = _child(src, names)
        if d is None:
            continue
        img, msk = _child(d, IMAGE_DIRS), _child(d, MASK_DIRS)
        if img is None:
            raise DatasetError(f"{d}: split folder without an image folder "
                               f"({'/'.join(IMAGE_DIRS)})")
        if msk is None:
            raise DatasetError(f"{d}: split folder without a mask folder "
                               f"({'/'.join(MASK_DIRS)}); every image needs its ulcer mask")
        parts.append((split, img, msk))
    if parts:
        return parts
    img, msk = _child(src, IMAGE_DIRS), _child(src, MASK_DIRS)
    if img is not None and msk is not None:
        return [(None, img, msk)]
    raise DatasetError(f"{src}: not an Autooral layout: expected train/ and test/ (and val/) "
                       f"folders holding images/ and masks/, or images/ + masks/ directly")


def _mask_for(image: Path, masks: dict[str, Path]) -> Path | None:
    for suffix in MASK_SUFFIXES:
        hit = masks.get((image.stem + suffix).lower())
        if hit is not None:
            return hit
    return None


def convert_autooral(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     size: int | None = DEFAULT_SIZE) -> ConversionSummary:
    """Convert an Autooral release at ``src`` into a tskd dataset at ``dst``."""
    src = source_dir(src)
    parts = find_parts(src)
    splits: dict[str, list[str]] = {}
    with DatasetWriter(dst, fmt="autooral", src=src, size=size) as out:
        for split, img_dir, msk_dir in parts:
            masks = {p.stem.lower(): p for p in image_files(msk_dir, IMAGE_EXTENSIONS)}
            for image_path in image_files(img_dir, IMAGE_EXTENSIONS):
                mask_path = _mask_for(image_path, masks)
                if mask_path is None:
                    raise DatasetError(f"{image_path}: no ulcer mask in {msk_dir} "
                                       f"({image_path.stem}[{'|'.join(MASK_SUFFIXES[1:])}].<ext>)")
                image = read_image(image_path)
                mask = read_binary_mask(mask_path)
                if mask.shape != image.shape[:2]:
                    raise DatasetError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} "
                                       f"differs from image size {image.shape[1]}x"
                                       f"{image.shape[0]} of {image_path}")
                out.add(image_path.stem, image, mask.astype(np.uint8))
                if split is not None:
                    splits.setdefault("test" if split == "test" else "train",
                                      []).append(image_path.stem)
        declared = None
        if splits:
            if "train" not in splits or "test" not in splits:
                raise DatasetError(f"{src}: the official split needs both train/ and test/ "
                                   f"images; found only {sorted(splits)}")
            declared = {k: sorted(v, key=natural_key) for k, v in splits.items()}
            if any(s == "val" for s, _, _ in parts):
                out.note("official validation images merged into 'train' (tskd carves its own "
                         "validation split from train)")
        else:
            out.note("no split folders in the source; no split declared")
        return out.finish(name="Autooral", modality="photograph", labels=LABELS,
                          splits=declared)
