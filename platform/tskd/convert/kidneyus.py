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

What the converter does with the official data's quirks (534 annotated files):

* **Images without regions are skipped** (47 per reviewer have ``region_count`` 0, i.e. no
  kidney traced; with repository masks: both masks empty). The summary says how many. The
  unannotated images of other organs are skipped too (also counted).
* **Byte-identical copies are grouped.** 20 files are byte-identical copies of other files,
  annotated again (``400_IM-0262-0009…`` and ``404_…`` copy ``102_IM-0262-0009…``). Images with
  the same content hash (SHA-256 of the file) share a group in dataset.json's ``groups`` (the
  group id is the first case id in natural order), so tskd's splits never put a copy and its
  original on two sides.
* **Degenerate regions are ignored** with a warning (:func:`is_degenerate`): a region whose
  bounding box is a thin strip (long side > 20 × short side), or a strip at the top edge (height
  and top both <= 3 % of the image height). This catches reviewer 1's stray "Capsule" rectangle
  of 517×11 px at the top of ``169_IM-0885-0035`` (960×720). With repository masks the rule is
  applied to each connected component of the capsule and regions masks.
* **Spacing from the transducer sheet.** ``OpenKidneyUltrasoundDataSet_TransducerInfo.xlsx``
  (in ``SRC`` or ``SRC/labels``, or ``transducer=PATH``; read with pandas + openpyxl) gives
  "Physical Delta X/Y" per unique image (file names without ``_anon``; copies look up their
  original), in cm per pixel (DICOM ultrasound region calibration; e.g. 0.02 cm = 0.2 mm):
  spacing (sy, sx) = 10 × (|ΔY|, |ΔX|) mm, scaled by the resize. dataset.json gets
  ``spacing_per_case`` and, as ``spacing``, the median over the known cases. Entries that are
  placeholder 1s (24 images, e.g. the ACUSON Sequoia ones), zero, missing or not numbers are
  *unknown*: those cases have no ``spacing_per_case`` entry and fall back to the median
  ``spacing`` (noted in the summary), so HD95 is in mm for all cases, approximately for them.
  Without the sheet no spacing is declared (HD95 in pixels).
* **Resizing**: ``size`` 512 (default, as in the TS-KD paper); ``resize="stretch"`` (default,
  the paper's plain resize; 4:3 and 16:9 images are distorted) or ``"letterbox"`` (aspect kept,
  zero padding). The summary says which.

Options: ``reviewer`` 1 (default) or 2 (``tskd convert kidneyus --reviewer 2``). There is no
official split, so none is declared.

Assumptions: rectangle shapes (one in the CSVs) are filled as rectangles when they carry
``width``/``height``; rows with no shape or no anatomy are ignored; other VIA shapes are an error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
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
TRANSDUCER_SHEET = "OpenKidneyUltrasoundDataSet_TransducerInfo.xlsx"
MAX_ASPECT = 20.0
"""A region whose bounding box's long side exceeds this many short sides is degenerate."""
TOP_STRIP = 0.03
"""A region whose top and height are both within this share of the image height is a strip at
the top edge (degenerate)."""

logger = logging.getLogger(__name__)


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


def is_degenerate(box: tuple[float, float, float, float], hw: tuple[int, int]) -> bool:
    """Whether a region with bounding box ``(x0, y0, x1, y1)`` (pixels) in an image of ``hw``
    is degenerate: a thin strip (long side > :data:`MAX_ASPECT` × short side, or zero area), or
    a strip at the top edge (``y0`` and the height both <= :data:`TOP_STRIP` × image height)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if min(w, h) <= 0 or max(w, h) > MAX_ASPECT * min(w, h):
        return True
    return y0 <= TOP_STRIP * hw[0] and h <= TOP_STRIP * hw[0]


def _polygon_box(pts: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return min(xs), min(ys), max(xs), max(ys)


def drop_degenerate_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Zero every connected component (per label value, 8-connected) of ``mask`` whose pixel
    bounding box :func:`is_degenerate`; returns the cleaned copy and how many were dropped."""
    from scipy import ndimage

    out = mask.copy()
    dropped = 0
    for value in np.unique(mask):
        if value == 0:
            continue
        comps, n = ndimage.label(mask == value, structure=np.ones((3, 3)))
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None:
                continue
            # pixel extents: a component covering rows r0..r1 is r1 - r0 + 1 high
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            if is_degenerate(box, mask.shape):
                out[comps == k] = 0
                dropped += 1
    return out, dropped


def find_transducer_sheet(src: Path) -> Path | None:
    """The transducer sheet in ``SRC`` or ``SRC/labels`` (official name first, else one
    ``*ransducer*.xlsx``), or ``None``."""
    for d in (src, src / "labels"):
        if (d / TRANSDUCER_SHEET).is_file():
            return d / TRANSDUCER_SHEET
        hits = sorted(d.glob("*ransducer*.xlsx")) if d.is_dir() else []
        if hits:
            return hits[0]
    return None


def read_transducer_sheet(path: Path) -> dict[str, tuple[float, float] | None]:
    """Image name (no ``_anon``, no extension) → spacing (sy, sx) in mm, or ``None`` when the
    sheet's "Physical Delta X/Y" are placeholder 1s, zero, empty or not numbers.

    The deltas are DICOM ultrasound-region calibrations in cm per pixel (sign = direction):
    ``(sy, sx) = 10 · (|ΔY|, |ΔX|)``.
    """
    import pandas as pd

    try:
        sheet = pd.read_excel(path, sheet_name=0, engine="openpyxl")
    except ImportError as e:  # pragma: no cover - openpyxl is a dependency
        raise DatasetError(f"{path}: reading the transducer sheet needs openpyxl ({e})") \
            from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a data problem
        raise DatasetError(f"{path}: unreadable spreadsheet ({type(e).__name__}: {e})") \
            from None
    need = ["Filename", "Physical Delta X", "Physical Delta Y"]
    missing = [c for c in need if c not in sheet.columns]
    if missing:
        raise DatasetError(f"{path}: transducer sheet lacks column(s) {missing}; found "
                           f"{[str(c) for c in sheet.columns]}")
    out: dict[str, tuple[float, float] | None] = {}
    for name, dx, dy in zip(sheet["Filename"], sheet["Physical Delta X"],
                            sheet["Physical Delta Y"]):
        if not isinstance(name, str) or not name.strip():
            continue
        key = _sheet_key(name)
        try:
            dx, dy = abs(float(dx)), abs(float(dy))
        except (TypeError, ValueError):
            out[key] = None
            continue
        ok = all(math.isfinite(v) and v > 0 for v in (dx, dy)) and (dx, dy) != (1.0, 1.0)
        out[key] = (10.0 * dy, 10.0 * dx) if ok else None
    return out


def _sheet_key(name: str) -> str:
    """``"12_IM-0464-17664_anon.png"`` / ``"12_IM-0464-17664"`` → ``"12_IM-0464-17664"``."""
    stem = Path(name.strip()).stem if name.strip().lower().endswith(".png") else name.strip()
    return stem[:-len("_anon")] if stem.endswith("_anon") else stem


def content_groups(paths: dict[str, Path]) -> dict[str, str]:
    """Case id → group id for cases whose files are byte-identical (same SHA-256): every member
    of a cluster maps to its first id in natural order. Unique files are left out."""
    by_hash: dict[str, list[str]] = {}
    for case_id in sorted(paths, key=natural_key):
        digest = hashlib.sha256(paths[case_id].read_bytes()).hexdigest()
        by_hash.setdefault(digest, []).append(case_id)
    return {c: ids[0] for ids in by_hash.values() if len(ids) > 1 for c in ids}


def convert_kidneyus(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     reviewer: int = 1, size: int | None = DEFAULT_SIZE,
                     resize: str = "stretch",
                     transducer: str | os.PathLike[str] | None = None) -> ConversionSummary:
    """Convert the Open Kidney Ultrasound Data Set at ``src`` into a tskd dataset at ``dst``
    (see the module docstring; ``transducer`` overrides where the transducer sheet is)."""
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
    sheet_path = Path(transducer).expanduser() if transducer is not None \
        else find_transducer_sheet(src)
    if sheet_path is not None and not sheet_path.is_file():
        raise DatasetError(f"{sheet_path}: transducer sheet not found")
    sheet = read_transducer_sheet(sheet_path) if sheet_path is not None else None

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
    for name in annotated:
        if name not in images:
            raise DatasetError(f"{source}: annotation for {name!r} but no such image in "
                               f"{images_dir}")
    copies = content_groups({Path(n).stem: images[n] for n in annotated})

    with DatasetWriter(dst, fmt="kidneyus", src=src, size=size, resize=resize) as out:
        half, empty, degenerate = 0, [], []
        written: list[str] = []
        spacing_mm: dict[str, tuple[float, float]] = {}
        unknown_spacing: list[str] = []
        for name in annotated:
            case_id = Path(name).stem
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
                    if parts[part] is not None:
                        parts[part], k = drop_degenerate_components(parts[part])
                        degenerate += [f"{name} ({part})"] * k
                half += sum(v is None for v in parts.values())
                mask = combine_masks(parts["capsule"], parts["regions"])
            else:
                shapes = []
                for label, pts in polygons[name]:
                    if is_degenerate(_polygon_box(pts), hw):
                        degenerate.append(f"{name} ({LABELS[label]})")
                    else:
                        shapes.append((label, pts))
                mask = rasterise(shapes, hw)
            if not mask.any():
                empty.append(case_id)
                continue
            out.add(case_id, image, mask)
            written.append(case_id)
            if sheet is not None:
                # a byte-identical copy may be listed under any of its cluster's names
                names = [case_id] + [c for c, g in copies.items()
                                     if case_id in copies and g == copies[case_id]]
                sp = next((sheet[k] for k in map(_sheet_key, names) if sheet.get(k)), None)
                if sp is None:
                    unknown_spacing.append(case_id)
                else:
                    spacing_mm[case_id] = out.spacing_after(sp, hw)

        skipped = len(set(images) - set(annotated))
        if skipped:
            out.note(f"{skipped} images without annotations of reviewer {reviewer} skipped")
        if empty:
            out.note(f"{len(empty)} annotated images with no kidney region (region_count 0 or "
                     f"empty masks) skipped, e.g. {empty[:3]}")
        if degenerate:
            for d in degenerate:
                logger.warning("kidneyus: ignoring a degenerate region of %s (thin strip or "
                               "top-edge strip, see tskd.convert.kidneyus.is_degenerate)", d)
            out.note(f"{len(degenerate)} degenerate region(s) ignored: {degenerate[:5]}")
        if half:
            out.note(f"{half} capsule/regions mask files missing; treated as empty")
        clusters: dict[str, list[str]] = {}
        for c in written:  # natural order: the first written member names the group
            if c in copies:
                clusters.setdefault(copies[c], []).append(c)
        groups = {c: ids[0] for ids in clusters.values() if len(ids) > 1 for c in ids}
        if groups:
            n_copies = len(groups) - len(set(groups.values()))
            out.note(f"{n_copies} images are byte-identical copies of others: grouped with "
                     f"their original in dataset.json 'groups' ({len(set(groups.values()))} "
                     f"groups), so splits never separate them")
        spacing = per_case = None
        if sheet is None:
            out.note("no transducer sheet (" + TRANSDUCER_SHEET + "): spacing unknown, HD95 in "
                     "pixels")
        elif spacing_mm:
            values = np.array(list(spacing_mm.values()))
            spacing = [float(v) for v in np.median(values, axis=0)]
            per_case = {c: list(v) for c, v in spacing_mm.items()}
            out.note(f"spacing from {Path(sheet_path).name} for {len(spacing_mm)} images "
                     f"(median {spacing[0]:.4g} x {spacing[1]:.4g} mm after resizing)"
                     + (f"; {len(unknown_spacing)} have placeholder or missing entries and use "
                        f"the median, e.g. {unknown_spacing[:3]}" if unknown_spacing else ""))
        else:
            out.note(f"{Path(sheet_path).name}: no usable spacing for any converted image; "
                     f"spacing unknown, HD95 in pixels")
        if out.size is not None:
            out.note(f"images resized to {out.size[1]}x{out.size[0]} px by {resize}"
                     + (" (aspect ratio distorted; --resize letterbox keeps it)"
                        if resize == "stretch" else " (aspect kept, zero padding)"))
        out.note(f"annotations: {'repository masks' if use_masks else 'VIA CSV polygons'} "
                 f"of reviewer {reviewer}; no official split, none declared")
        return out.finish(name=f"KidneyUS-reviewer{reviewer}", modality="US", labels=LABELS,
                          spacing=spacing, spacing_per_case=per_case, groups=groups or None)
