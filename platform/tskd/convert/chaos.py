"""CHAOS abdominal MR (Kavur et al., MedIA 2021; chaos.grand-challenge.org) → 2D tskd slices.

Official training distribution (``CHAOS_Train_Sets.zip``)::

    CHAOS_Train_Sets/Train_Sets/MR/<patient>/       patient ids 1, 2, 3, 5, 8, ...
      T1DUAL/DICOM_anon/InPhase/IMG-0004-00002.dcm ...
      T1DUAL/DICOM_anon/OutPhase/IMG-0004-00001.dcm ...
      T1DUAL/Ground/IMG-0004-00001.png ...          one PNG per slice, shared by In/OutPhase
      T2SPIR/DICOM_anon/IMG-0002-00001.dcm ...
      T2SPIR/Ground/IMG-0002-00001.png ...

``SRC`` may be ``CHAOS_Train_Sets``, ``Train_Sets``, or the ``MR`` folder. The CT part (liver
only, ``liver_GT_000.png``) is not converted. The test sets have no public ground truth, so there
is no official split and none is declared; case ids are ``<patient>_<sequence>_<slice>`` and
dataset.json's ``groups`` maps each to its patient, so tskd splits by patient.

* Slice pairing follows the official CHAOS evaluation code (``CHAOSmetrics.py``: "the orientation
  of the slices is determined by order of image names NOT by position tags in DICOM files"):
  DICOM files sorted by name ↔ ground-truth PNGs sorted by name; their counts must match.
* Ground-truth grey levels (CHAOS data description): liver 63 (55–70), right kidney 126
  (110–135), left kidney 189 (175–200), spleen 252 (240–255) → labels 1–4, 0 = background. Any
  other value is a :class:`DatasetError` naming the PNG and the value.
* Intensities: modality LUT (RescaleSlope/Intercept) applied, then windowed per volume to the
  1st–99th percentile and scaled to uint8.
* Size: resized to 256×256 by default (bilinear image, nearest mask); spacing comes from the
  DICOM ``PixelSpacing`` (row, column) = (sy, sx) scaled by the resize factor. CHAOS patients
  differ in spacing: dataset.json's ``spacing`` is the median over cases and
  ``spacing_per_case`` holds every case's own spacing (read by ``DatasetInfo.spacing_of``).
* ``groups``: every slice's patient id, so tskd's splits (test, validation, labelled) never put
  one patient's slices on two sides.
* ``sequence``: ``T2SPIR`` (default), ``T1DUAL_in`` or ``T1DUAL_out``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tskd.convert.common import (ConversionSummary, DatasetWriter, as_size, image_files,
                                 natural_key, scaled_spacing, source_dir)
from tskd.data.format import DatasetError, read_mask

LABELS = {0: "background", 1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
GREY_RANGES: tuple[tuple[int, int, int], ...] = (  # (low, high, label), inclusive
    (0, 0, 0), (55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
SEQUENCES = {"T2SPIR": ("T2SPIR", ("DICOM_anon",)),
             "T1DUAL_in": ("T1DUAL", ("DICOM_anon", "InPhase")),
             "T1DUAL_out": ("T1DUAL", ("DICOM_anon", "OutPhase"))}
DEFAULT_SIZE = 256


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise DatasetError("the CHAOS converter needs pydicom (pip install pydicom)") from None
    return pydicom


def find_mr_root(src: Path) -> Path:
    for cand in (src, src / "MR", src / "Train_Sets" / "MR",
                 src / "CHAOS_Train_Sets" / "Train_Sets" / "MR"):
        if cand.name == "MR" and cand.is_dir():
            return cand
    if src.is_dir() and any((p / "T2SPIR").is_dir() or (p / "T1DUAL").is_dir()
                            for p in src.iterdir() if p.is_dir()):
        return src
    raise DatasetError(f"{src}: not a CHAOS MR distribution: expected Train_Sets/MR/<patient>/"
                       f"{{T1DUAL,T2SPIR}} (SRC may be CHAOS_Train_Sets, Train_Sets or MR)")


def grey_to_labels(grey: np.ndarray, path: Path) -> np.ndarray:
    """CHAOS MR ground-truth grey levels → labels 0..4; unknown levels raise naming ``path``."""
    labels = np.full(grey.shape, -1, np.int64)
    for lo, hi, value in GREY_RANGES:
        labels[(grey >= lo) & (grey <= hi)] = value
    if (labels < 0).any():
        bad = np.unique(grey[labels < 0])
        raise DatasetError(f"{path}: ground-truth grey level(s) {bad[:10].tolist()} match no "
                           f"organ (liver 55-70, right kidney 110-135, left kidney 175-200, "
                           f"spleen 240-255, background 0)")
    return labels


def read_dicom_slice(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Pixel data (float64, modality LUT applied) and PixelSpacing (sy, sx) of one DICOM file."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as e:  # noqa: BLE001 - any reader failure is a data problem
        raise DatasetError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected a single 2D slice, got pixel data of shape "
                           f"{pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    spacing = getattr(ds, "PixelSpacing", None)
    sp = None if spacing is None or len(spacing) != 2 else (float(spacing[0]), float(spacing[1]))
    return pixels, sp


def window_uint8(volume: np.ndarray) -> np.ndarray:
    """Clip a volume to its 1st–99th percentile and scale to uint8 (constant → 0)."""
    lo, hi = np.percentile(volume, [1, 99])
    if hi <= lo:
        return np.zeros(volume.shape, np.uint8)
    scaled = (np.clip(volume, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


def _patient_key(p: Path) -> tuple:
    return natural_key(p.name)


def convert_chaos(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                  sequence: str = "T2SPIR", size: int | None = DEFAULT_SIZE) -> ConversionSummary:
    """Convert the CHAOS MR training set at ``src`` into 2D tskd slices at ``dst``."""
    if sequence not in SEQUENCES:
        raise DatasetError(f"sequence: invalid value {sequence!r}; allowed: "
                           f"{', '.join(SEQUENCES)}")
    src = source_dir(src)
    mr = find_mr_root(src)
    patients = sorted((p for p in mr.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=_patient_key)
    if not patients:
        raise DatasetError(f"{mr}: no patient folders (empty source)")
    seq_dir, dicom_parts = SEQUENCES[sequence]
    size_hw = as_size(size)
    case_spacing: dict[str, list[float]] = {}
    groups: dict[str, str] = {}
    missing_spacing: list[str] = []
    with DatasetWriter(dst, fmt="chaos", src=src, size=size_hw) as out:
        for patient in patients:
            dcm_dir = patient.joinpath(seq_dir, *dicom_parts)
            gt_dir = patient / seq_dir / "Ground"
            if not dcm_dir.is_dir():
                raise DatasetError(f"{dcm_dir}: DICOM folder of sequence {sequence} is missing")
            dicoms = image_files(dcm_dir, (".dcm",))
            if not dicoms:
                raise DatasetError(f"{dcm_dir}: no .dcm files")
            pngs = image_files(gt_dir, (".png",)) if gt_dir.is_dir() else []
            if not pngs:
                raise DatasetError(f"{gt_dir}: the DICOM series {dcm_dir} has no ground truth "
                                   f"(no PNG files)")
            if len(pngs) != len(dicoms):
                raise DatasetError(f"{gt_dir}: {len(pngs)} ground-truth PNGs but {len(dicoms)} "
                                   f"DICOM slices in {dcm_dir}; slices pair by sorted file "
                                   f"name, so the counts must match")
            dicoms.sort(key=lambda p: natural_key(p.name))
            pngs.sort(key=lambda p: natural_key(p.name))
            slices, spacings = [], []
            for d in dicoms:
                pixels, sp = read_dicom_slice(d)
                if slices and pixels.shape != slices[0].shape:
                    raise DatasetError(f"{d}: slice size {pixels.shape[1]}x{pixels.shape[0]} "
                                       f"differs from {dicoms[0].name} in the same series")
                slices.append(pixels)
                spacings.append(sp)
            volume = window_uint8(np.stack(slices))
            pid = patient.name.zfill(2) if patient.name.isdigit() else patient.name
            for k, (img, png, sp) in enumerate(zip(volume, pngs, spacings)):
                grey = read_mask(png, 256)  # raw 0..255 grey levels (checks single channel)
                if grey.shape != img.shape:
                    raise DatasetError(f"{png}: ground-truth size {grey.shape[1]}x"
                                       f"{grey.shape[0]} differs from DICOM slice "
                                       f"{dicoms[k].name} ({img.shape[1]}x{img.shape[0]})")
                labels = grey_to_labels(grey, png)
                cid = f"{pid}_{sequence}_{k:03d}"
                out.add(cid, img, labels)
                groups[cid] = pid
                if sp is None:
                    missing_spacing.append(cid)
                else:
                    case_spacing[cid] = list(scaled_spacing(sp, img.shape, size_hw))
        spacing = None
        per_case = None
        if case_spacing and not missing_spacing:
            values = np.array(list(case_spacing.values()))
            spacing = [float(v) for v in np.median(values, axis=0)]
            if not np.allclose(values, values[0]):
                per_case = case_spacing
                out.note("pixel spacing differs between patients: dataset.json 'spacing' is the "
                         "median; 'spacing_per_case' holds each case's own")
        elif missing_spacing:
            out.note(f"{len(missing_spacing)} slices have no DICOM PixelSpacing "
                     f"(e.g. {missing_spacing[0]}); spacing left undeclared")
        out.note(f"no official split (test ground truth is not public); none declared. "
                 f"'groups' holds the patient of each slice ({len(set(groups.values()))} "
                 f"patients): tskd splits by patient")
        return out.finish(name=f"CHAOS-MR-{sequence}", modality="MR", labels=LABELS,
                          spacing=spacing, spacing_per_case=per_case, groups=groups)
