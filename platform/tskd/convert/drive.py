"""DRIVE retinal vessels (Staal et al., IEEE TMI 2004) → tskd.

Official distribution layout (``DRIVE.zip`` → ``training.zip`` + ``test.zip``)::

    DRIVE/
      training/images/21_training.tif        RGB fundus image, 565x584 (ids 21..40)
      training/1st_manual/21_manual1.gif     vessel annotation (0/255)
      training/mask/21_training_mask.gif     field-of-view mask (0/255)
      test/images/01_test.tif                (ids 01..20)
      test/1st_manual/01_manual1.gif         first observer (shipped in the full release)
      test/2nd_manual/01_manual2.gif         second observer (ignored)
      test/mask/01_test_mask.gif

``SRC`` may be the ``DRIVE`` folder or its parent. Labels {0: background, 1: vessel}; ``fov/``
comes from the mask GIFs; the official split is kept: ``splits = {"train": training ids,
"test": test ids}``; case ids are the image stems (``21_training``, ``01_test``).

Errors (:class:`DatasetError` naming the file): a missing manual annotation (e.g. the
grand-challenge re-distribution, whose test set ships without ``1st_manual``), a missing FOV mask.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tskd.convert.common import ConversionSummary, DatasetWriter, read_binary_mask, source_dir
from tskd.data.format import DatasetError, read_image

LABELS = {0: "background", 1: "vessel"}
_SPLITS = (("training", "train"), ("test", "test"))
_IMAGE = re.compile(r"^(\d+)_(training|test)\.tiff?$", re.IGNORECASE)


def find_root(src: Path) -> Path:
    for cand in (src, src / "DRIVE"):
        if (cand / "training").is_dir() or (cand / "test").is_dir():
            return cand
    raise DatasetError(f"{src}: not a DRIVE distribution: expected 'training/' and 'test/' "
                       f"folders (or a 'DRIVE/' folder holding them)")


def convert_drive(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                  size: int | None = None) -> ConversionSummary:
    """Convert the DRIVE distribution at ``src`` into a tskd dataset at ``dst``."""
    src = source_dir(src)
    root = find_root(src)
    for folder, _ in _SPLITS:
        if not (root / folder / "images").is_dir():
            raise DatasetError(f"{root / folder / 'images'}: DRIVE {folder} images are missing "
                               f"(the official split needs both training/ and test/)")
    splits: dict[str, list[str]] = {}
    with DatasetWriter(dst, fmt="drive", src=src, size=size) as out:
        for folder, split in _SPLITS:
            ids: list[str] = []
            for image_path in sorted((root / folder / "images").iterdir()):
                m = _IMAGE.match(image_path.name)
                if not m:
                    continue
                num = m.group(1)
                manual = root / folder / "1st_manual" / f"{num}_manual1.gif"
                fov_path = root / folder / "mask" / f"{num}_{folder}_mask.gif"
                if not manual.is_file():
                    raise DatasetError(f"{manual}: manual vessel annotation (ground truth) of "
                                       f"{image_path.name} is missing")
                if not fov_path.is_file():
                    raise DatasetError(f"{fov_path}: field-of-view mask of {image_path.name} "
                                       f"is missing")
                image = read_image(image_path)
                vessels = read_binary_mask(manual)
                fov = read_binary_mask(fov_path)
                for what, path, a in (("annotation", manual, vessels), ("FOV mask", fov_path, fov)):
                    if a.shape != image.shape[:2]:
                        raise DatasetError(f"{path}: {what} size {a.shape[1]}x{a.shape[0]} "
                                           f"differs from image size {image.shape[1]}x"
                                           f"{image.shape[0]}")
                cid = image_path.stem
                out.add(cid, image, vessels.astype(np.uint8), fov=fov)
                ids.append(cid)
            if not ids:
                raise DatasetError(f"{root / folder / 'images'}: no DRIVE images "
                                   f"(NN_{folder}.tif)")
            splits[split] = ids
        return out.finish(name="DRIVE", modality="fundus", labels=LABELS, splits=splits)
