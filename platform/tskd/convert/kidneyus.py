"""Open Kidney Ultrasound Data Set (Singla et al., 2022/2023; github.com/rsingla92/kidneyUS) → tskd.

What the official distribution provides (checked against the public repository):

* the images: a flat folder of anonymised B-mode PNGs (``<n>_IM-xxxx-yyyy_anon.png``), sent
  after registration (e.g. ``kidneyUS_images_25_june_2025/``);
* the annotations, in the repository's ``labels/`` folder, for two sonographers r = 1, 2:
  ``reviewed_labels_<r>.csv`` — VGG Image Annotator (VIA) CSV export, one row per region:
  ``filename, file_size, file_attributes, region_count, region_id, region_shape_attributes,
  region_attributes``; shapes are ``{"name": "polygon", "all_points_x": [...],
  "all_points_y": [...]}``, region attributes ``{"Anatomy": "Capsule" | "Central Echo Complex"
  | "Medulla" | "Cortex"}``;
  ``reviewed_masks_<r>/capsule/<image>.png`` (0/1) and ``reviewed_masks_<r>/regions/<image>.png``
  (1 central echo complex, 2 medulla, 3 cortex) — the repository's own rasterisation of those
  CSVs (``src/annotation_analysis/create_masks.py``).

Expected ``SRC`` layout: the repository checkout (or just its ``labels/`` folder contents) with the
image folder placed in it::

    SRC/labels/reviewed_masks_1/{capsule,regions}/*.png   (preferred when present)
    SRC/labels/reviewed_labels_1.csv                      (else: polygons rasterised here)
    SRC/images/*.png  or  SRC/kidneyUS_images*/*.png  or  PNGs directly in SRC

Labels follow the repository's ``LABEL_MAP``: {0 background, 1 capsule, 2 central echo complex,
3 medulla, 4 cortex}. The capsule outlines the whole kidney and the three regions lie inside it,
so the capsule is painted first and the regions over it (central echo complex, then medulla,
then cortex, the repository's drawing order): label 1 is the kidney area not covered by a region.

Options: ``reviewer`` 1 (default) or 2; ``size`` 512 (default, as in the TS-KD paper).
Only annotated images are converted (the unlabelled images of other organs are skipped, noted in
the summary). There is no official split and no per-image spacing in dataset.json (the
transducer sheet is not machine-readable per image), so neither is declared.

Assumptions: rectangle shapes (rare in the CSVs) are filled as rectangles when they carry
``width``/``height``; rows with no shape or no anatomy are ignored; other VIA shapes are an error.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tskd.convert.common import (ConversionSummary, DatasetWriter, image_files, natural_key,
                                 source_dir)
from tskd.data.format import DatasetError, read_image, read_mask

LABELS = {0: "background", 1: "capsule", 2: "central echo complex", 3: "medulla", 4: "cortex"}
ANATOMY = {"capsule": 1, "central echo complex": 2, "medulla": 3, "cortex": 4}
DEFAULT_SIZE = 512
_PAINT_ORDER = (1, 2, 3, 4)


def _labels_dir(src: Path) -> Path:
    return src / "labels" if (src / "labels").is_dir() else src


def find_images_dir(src: Path) -> Path:
    for cand in [src / "images", *sorted(src.glob("kidneyUS_images*"))]:
        if cand.is_dir() and image_files(cand, (".png",)):
            return cand
    if image_files(src, (".png",)):
        return src
    raise DatasetError(f"{src}: no kidneyUS images: expected PNGs in {src / 'images'}, a "
                       f"'kidneyUS_images*' folder, or {src} itself")


def _read_csv_polygons(csv_path: Path) -> dict[str, list[tuple[int, list[tuple[float, float]]]]]:
    """filename → [(label, [(x, y), ...]), ...] from a VIA CSV export (files without regions
    map to an empty list)."""
    regions: dict[str, list[tuple[int, list[tuple[float, float]]]]] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"filename", "region_shape_attributes", "region_attributes"}
            if not need <= set(reader.fieldnames or ()):
                raise DatasetError(f"{csv_path}: not a VIA CSV export: columns "
                                   f"{sorted(need)} are required, found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                name = row["filename"].strip()
                if not name:
                    continue
                shapes = regions.setdefault(name, [])
                try:
                    shape = json.loads(row["region_shape_attributes"] or "{}")
                    attrs = json.loads(row["region_attributes"] or "{}")
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{csv_path}:{line}: malformed JSON in a region "
                                       f"column ({e})") from None
                anatomy = str(attrs.get("Anatomy", "")).strip()
                if not shape or not anatomy:
                    continue
                label = ANATOMY.get(anatomy.lower())
                if label is None:
                    raise DatasetError(f"{csv_path}:{line}: unknown anatomy {anatomy!r} for "
                                       f"{name} (known: Capsule, Central Echo Complex, "
                                       f"Medulla, Cortex)")
                kind = shape.get("name")
                if kind in ("polygon", "polyline"):
                    pts = list(zip(shape["all_points_x"], shape["all_points_y"]))
                elif kind == "rect" and "width" in shape and "height" in shape:
                    x, y, w, h = (shape[k] for k in ("x", "y", "width", "height"))
                    pts = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
                else:
                    raise DatasetError(f"{csv_path}:{line}: unsupported region shape {kind!r} "
                                       f"for {name} (polygon or rect expected)")
                if len(pts) >= 3:
                    shapes.append((label, [(float(px), float(py)) for px, py in pts]))
    except OSError as e:
        raise DatasetError(f"{csv_path}: unreadable ({e})") from None
    return regions


def rasterise(shapes: list[tuple[int, list[tuple[float, float]]]], hw: tuple[int, int]
              ) -> np.ndarray:
    """Fill polygons into an (H, W) label image, capsule first, regions over it."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for label in _PAINT_ORDER:
        for lab, pts in shapes:
            if lab == label:
                draw.polygon(pts, fill=label, outline=label)
    return np.asarray(canvas).astype(np.int64)


def combine_masks(capsule: np.ndarray | None, regions: np.ndarray | None) -> np.ndarray:
    """Repository masks → one label image: capsule (0/1) → 1, regions 1/2/3 → 2/3/4 over it."""
    ref = capsule if capsule is not None else regions
    assert ref is not None
    out = np.zeros(ref.shape, np.int64)
    if capsule is not None:
        out[capsule > 0] = 1
    if regions is not None:
        for value in (1, 2, 3):
            out[regions == value] = value + 1
    return out


def convert_kidneyus(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     reviewer: int = 1, size: int | None = DEFAULT_SIZE) -> ConversionSummary:
    """Convert the Open Kidney Ultrasound Data Set at ``src`` into a tskd dataset at ``dst``."""
    if reviewer not in (1, 2):
        raise DatasetError(f"reviewer: invalid value {reviewer!r}; allowed: 1, 2")
    src = source_dir(src)
    labels_dir = _labels_dir(src)
    masks_dir = labels_dir / f"reviewed_masks_{reviewer}"
    csv_path = labels_dir / f"reviewed_labels_{reviewer}.csv"
    use_masks = (masks_dir / "capsule").is_dir() or (masks_dir / "regions").is_dir()
    if not use_masks and not csv_path.is_file():
        raise DatasetError(f"{src}: no kidneyUS annotations of reviewer {reviewer}: expected "
                           f"{masks_dir}/{{capsule,regions}}/ or {csv_path}")
    images_dir = find_images_dir(src)
    images = {p.name: p for p in image_files(images_dir, (".png",))}

    if use_masks:
        names: set[str] = set()
        for part in ("capsule", "regions"):
            if (masks_dir / part).is_dir():
                names |= {p.name for p in image_files(masks_dir / part, (".png",))}
        annotated = sorted(names, key=natural_key)
        source = str(masks_dir)
    else:
        polygons = _read_csv_polygons(csv_path)
        annotated = sorted(polygons, key=natural_key)
        source = str(csv_path)
    if not annotated:
        raise DatasetError(f"{source}: no annotated images (empty source)")

    with DatasetWriter(dst, fmt="kidneyus", src=src, size=size) as out:
        half = 0
        for name in annotated:
            if name not in images:
                raise DatasetError(f"{source}: annotation for {name!r} but no such image in "
                                   f"{images_dir}")
            image = read_image(images[name])
            hw = image.shape[:2]
            if use_masks:
                parts = {}
                for part, n in (("capsule", 2), ("regions", 4)):
                    p = masks_dir / part / name
                    parts[part] = read_mask(p, n) if p.is_file() else None
                    if parts[part] is not None and parts[part].shape != hw:
                        raise DatasetError(f"{p}: mask size {parts[part].shape[1]}x"
                                           f"{parts[part].shape[0]} differs from image size "
                                           f"{hw[1]}x{hw[0]} of {images[name]}")
                half += sum(v is None for v in parts.values())
                mask = combine_masks(parts["capsule"], parts["regions"])
            else:
                mask = rasterise(polygons[name], hw)
            out.add(Path(name).stem, image, mask)
        skipped = len(set(images) - set(annotated))
        if skipped:
            out.note(f"{skipped} images without annotations of reviewer {reviewer} skipped")
        if half:
            out.note(f"{half} capsule/regions mask files missing; treated as empty")
        out.note(f"annotations: {'repository masks' if use_masks else 'VIA CSV polygons'} "
                 f"of reviewer {reviewer}; no official split, none declared")
        return out.finish(name=f"KidneyUS-reviewer{reviewer}", modality="US", labels=LABELS)
