"""PH² dermoscopy (Mendonça et al., EMBC 2013) → tskd.

Official distribution layout (the ``PH2Dataset`` archive from the ADDI project)::

    PH2Dataset/
      PH2 Dataset images/
        IMD002/
          IMD002_Dermoscopic_Image/IMD002.bmp     RGB dermoscopic image (~765x574)
          IMD002_lesion/IMD002_lesion.bmp         binary lesion mask (1-bit or RGB BMP, 0/255)
          IMD002_roi/...                          colour-class masks (ignored)
      PH2_dataset.xlsx, PH2_dataset.txt, PH2_Readme.txt

``SRC`` may be the folder holding ``PH2 Dataset images`` or that folder itself. Every ``IMD*``
case folder must hold both BMPs (a missing one is a :class:`DatasetError` naming it).

Labels {0: background, 1: lesion}. PH² has no official train/test split, so none is declared
(tskd then holds out a seeded ``data.test_fraction``). No pixel spacing is published.
"""

from __future__ import annotations

import os
from pathlib import Path

from tskd.convert.common import (ConversionSummary, DatasetWriter, natural_key, read_binary_mask,
                                 source_dir)
from tskd.data.format import DatasetError, read_image

IMAGES_FOLDER = "PH2 Dataset images"
LABELS = {0: "background", 1: "lesion"}


def find_cases_root(src: Path) -> Path:
    """The ``PH2 Dataset images`` folder: ``src`` itself or its child of that name."""
    if (src / IMAGES_FOLDER).is_dir():
        return src / IMAGES_FOLDER
    if src.is_dir() and any(p.is_dir() and p.name.upper().startswith("IMD")
                            for p in src.iterdir()):
        return src
    raise DatasetError(f"{src}: not a PH2 distribution: expected a '{IMAGES_FOLDER}' folder "
                       f"(or IMDxxx case folders directly)")


def convert_ph2(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                size: int | None = None) -> ConversionSummary:
    """Convert the PH² distribution at ``src`` into a tskd dataset at ``dst``."""
    src = source_dir(src)
    root = find_cases_root(src)
    cases = sorted((p for p in root.iterdir() if p.is_dir() and p.name.upper().startswith("IMD")),
                   key=lambda p: natural_key(p.name))
    if not cases:
        raise DatasetError(f"{root}: no IMDxxx case folders (empty source)")
    with DatasetWriter(dst, fmt="ph2", src=src, size=size) as out:
        for case in cases:
            cid = case.name
            image_path = case / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp"
            mask_path = case / f"{cid}_lesion" / f"{cid}_lesion.bmp"
            if not image_path.is_file():
                raise DatasetError(f"{image_path}: dermoscopic image is missing")
            if not mask_path.is_file():
                raise DatasetError(f"{mask_path}: lesion mask (ground truth) is missing")
            image = read_image(image_path)
            mask = read_binary_mask(mask_path)
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} "
                                   f"differs from image size {image.shape[1]}x{image.shape[0]}")
            out.add(cid, image, mask.astype("uint8"))
        out.note("PH2 has no official split; none declared")
        return out.finish(name="PH2", modality="dermoscopy", labels=LABELS)
