"""Autooral oral-ulcer photographs (Jiang et al., Sci. Rep. 14:20085, 2024) → tskd.

The dataset is public: a single archive linked from the authors' repository README
(github.com/wurenkai/HF-UNet-and-Autooral-dataset). It unpacks to ``Autooral_dataset/`` with the
official split, which the authors' loader reads as::

    Autooral_dataset/{train,val,test}/images/<name>.<ext>
    Autooral_dataset/{train,val,test}/masks/<name>.<ext>     binary ulcer masks, 0/255

with the SAME file names reused in every split (``train/images/1.png`` and ``test/images/1.png``
are different photographs). Case ids therefore include the split: ``<split>_<stem>``
(``train_1``, ``val_1``, ``test_1``). ``SRC`` may be the archive's root (holding
``Autooral_dataset/``) or ``Autooral_dataset/`` itself. Also accepted (older private copies):
split folder spellings ``valid|validation``, ``training``, ``testing``; image folders
``images|image|imgs|img``; mask folders ``masks|mask|labels|label|gt|groundtruth``; masks named
like their image, optionally with a ``_mask``/``_gt``/``_label``/``_segmentation`` suffix; and a
flat ``SRC/{images,masks}/`` without splits (case ids are then the plain stems).

Masks are binary (0/1 or 0/255; JPEG noise is thresholded at 128). An image without mask is a
:class:`DatasetError` naming it.

Labels {0: background, 1: ulcer}; 256×256 by default (as in the TS-KD paper). The official split
is kept: ``train`` (the official validation images merged in — tskd carves its own validation
set from inside the label budget) and ``test``. The classification annotations are not
converted.
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
WRAPPER = "Autooral_dataset"


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
    wrapper = _child(src, (WRAPPER.lower(),))
    if wrapper is not None and not any(_child(src, n) for n in SPLIT_DIRS.values()):
        src = wrapper  # the archive's root: SRC/Autooral_dataset/{train,val,test}
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
    raise DatasetError(f"{src}: not an Autooral layout: expected {WRAPPER}/ or train/ and test/ "
                       f"(and val/) folders holding images/ and masks/, or images/ + masks/ "
                       f"directly")


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
                # the official release reuses file names across splits: prefix the split
                cid = image_path.stem if split is None else f"{split}_{image_path.stem}"
                out.add(cid, image, mask.astype(np.uint8))
                if split is not None:
                    splits.setdefault("test" if split == "test" else "train", []).append(cid)
        declared = None
        if splits:
            if "train" not in splits or "test" not in splits:
                raise DatasetError(f"{src}: the official split needs both train/ and test/ "
                                   f"images; found only {sorted(splits)}")
            declared = {k: sorted(v, key=natural_key) for k, v in splits.items()}
            if any(s == "val" for s, _, _ in parts):
                out.note("official validation images merged into 'train' (tskd carves its own "
                         "validation images from inside the label budget)")
            out.note("case ids are <split>_<file stem> (the release reuses file names across "
                     "splits)")
        else:
            out.note("no split folders in the source; no split declared")
        return out.finish(name="Autooral", modality="photograph", labels=LABELS,
                          splits=declared)
