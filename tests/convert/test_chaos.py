"""tskd.convert.chaos on tiny DICOM + PNG fixtures in the official CHAOS MR layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from tskd.convert import convert  # noqa: E402
from tskd.data.format import DatasetError, load_dataset_info, read_case  # noqa: E402

ROWS, COLS = 12, 16
GREY = {0: 0, 1: 63, 2: 126, 3: 189, 4: 252}  # label -> official grey level
SPACING = {"1": (1.5, 2.0), "2": (1.5, 2.0)}


def write_dicom(path: Path, pixels: np.ndarray, instance: int, spacing=(1.5, 2.0)) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)


def organ_of(patient: int, k: int) -> int:
    """Which organ slice k of a patient shows (1..4)."""
    return 1 + (patient + k) % 4


def slice_pixels(patient: int, k: int, phase: int) -> np.ndarray:
    base = np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS) * (10 + phase)
    return base + 100 * k


def make_chaos(root: Path, n_slices: int = 3, patients=(1, 2), grey_shift: int = 0) -> Path:
    """``root/Train_Sets/MR/<p>/{T2SPIR,T1DUAL}`` with n_slices per series.

    File names follow CHAOS (``IMG-00pp-000nn``); InstanceNumber runs *against* the name order
    so that the test shows pairing by file name (the official convention)."""
    mr = root / "Train_Sets" / "MR"
    for p in patients:
        for seq, phases in (("T2SPIR", {"": 0}), ("T1DUAL", {"InPhase": 1, "OutPhase": 2})):
            for k in range(n_slices):
                for phase_dir, phase in phases.items():
                    number = 2 * k + (2 if phase_dir == "InPhase" else 1)
                    d = mr / str(p) / seq / "DICOM_anon" / phase_dir
                    write_dicom(d / f"IMG-{p:04d}-{number:05d}.dcm",
                                slice_pixels(p, k, phase), instance=100 - k,
                                spacing=SPACING.get(str(p), (1.0, 1.0)))
                mask = np.zeros((ROWS, COLS), np.uint8)
                mask[3:9, 4:12] = GREY[organ_of(p, k)] + grey_shift
                mask[0, 0] = 60  # inside the liver range 55-70
                gt = mr / str(p) / seq / "Ground"
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(gt / f"IMG-{p:04d}-{2 * k + 1:05d}.png")
    return root


def expected_mask(p: int, k: int) -> np.ndarray:
    m = np.zeros((ROWS, COLS), np.int64)
    m[3:9, 4:12] = organ_of(p, k)
    m[0, 0] = 1
    return m


def test_chaos_t2spir_native_size(tmp_path):
    src = make_chaos(tmp_path / "CHAOS_Train_Sets")
    summary = convert("chaos", src, tmp_path / "out", size=0)
    info = load_dataset_info(tmp_path / "out")
    assert info.labels == {0: "background", 1: "liver", 2: "right kidney", 3: "left kidney",
                           4: "spleen"}
    assert info.case_ids == tuple(f"{p:02d}_T2SPIR_{k:03d}" for p in (1, 2) for k in range(3))
    assert info.spacing == (1.5, 2.0) and info.splits is None
    for p in (1, 2):
        vol = np.stack([slice_pixels(p, k, 0) for k in range(3)]).astype(float)
        lo, hi = np.percentile(vol, 1), np.percentile(vol, 99)
        for k in range(3):
            image, mask = read_case(info, f"{p:02d}_T2SPIR_{k:03d}")
            assert np.array_equal(mask, expected_mask(p, k))
            raw = slice_pixels(p, k, 0).astype(float)
            ref = np.clip((raw - lo) / (hi - lo) * 255, 0, 255)
            assert np.abs(image[..., 0] - ref).max() <= 0.5 + 1e-9
    assert summary.n_images == 6 and summary.modality == "MR"
    assert summary.pixel_share["background"] == pytest.approx(1 - (48 + 1) / (ROWS * COLS))


def test_chaos_default_256_scales_spacing(tmp_path):
    src = make_chaos(tmp_path / "CHAOS_Train_Sets", n_slices=1, patients=(1,))
    convert("chaos", src / "Train_Sets" / "MR", tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    image, mask = read_case(info, "01_T2SPIR_000")
    assert image.shape == (256, 256, 3)
    assert info.spacing == pytest.approx((1.5 * ROWS / 256, 2.0 * COLS / 256))
    assert set(np.unique(mask)) == {0, 1, organ_of(1, 0)}


def test_chaos_t1dual_phases_and_case_spacing(tmp_path):
    SPACING["2"] = (1.0, 1.0)
    try:
        src = make_chaos(tmp_path / "CHAOS_Train_Sets", n_slices=2)
    finally:
        SPACING["2"] = (1.5, 2.0)
    convert("chaos", src, tmp_path / "in", sequence="T1DUAL_in", size=0)
    convert("chaos", src, tmp_path / "out", sequence="T1DUAL_out", size=0)
    info_in, info_out = load_dataset_info(tmp_path / "in"), load_dataset_info(tmp_path / "out")
    img_in, m_in = read_case(info_in, "01_T1DUAL_in_001")
    img_out, m_out = read_case(info_out, "01_T1DUAL_out_001")
    assert np.array_equal(m_in, expected_mask(1, 1)) and np.array_equal(m_out, m_in)
    assert not np.array_equal(img_in, img_out)  # different phase data (phase 1 vs 2 ramps)
    meta = json.loads((tmp_path / "in" / "dataset.json").read_text())
    assert meta["spacing_per_case"]["01_T1DUAL_in_000"] == [1.5, 2.0]
    assert meta["spacing_per_case"]["02_T1DUAL_in_000"] == [1.0, 1.0]
    assert meta["spacing"] == [1.25, 1.5]  # median over the 4 cases
    assert info_in.spacing_of("02_T1DUAL_in_001") == (1.0, 1.0)
    assert info_in.spacing_of("01_T1DUAL_in_001") == (1.5, 2.0)
    # slices are grouped by patient, and splits keep a patient on one side
    assert meta["groups"] == {f"{p:02d}_T1DUAL_in_{k:03d}": f"{p:02d}"
                              for p in (1, 2) for k in range(2)}
    from tskd.data.format import make_splits
    for seed in range(4):
        s = make_splits(info_in, n_labels=2, n_val=0, seed=seed, test_fraction=0.5)
        assert len({c[:2] for c in s.test}) == 1 and len(s.test) == 2
        assert {c[:2] for c in s.labelled} == {c[:2] for c in info_in.case_ids} - \
            {c[:2] for c in s.test}


def test_chaos_unknown_grey_level_names_file_and_value(tmp_path):
    src = make_chaos(tmp_path / "CHAOS_Train_Sets", n_slices=1, grey_shift=10)  # 73, 136, ...
    with pytest.raises(DatasetError, match=r"IMG-0001-00001\.png.*\[(73|136|199)\]"):
        convert("chaos", src, tmp_path / "out", size=0)
    assert not (tmp_path / "out").exists()


def test_chaos_series_without_ground_truth(tmp_path):
    src = make_chaos(tmp_path / "CHAOS_Train_Sets", n_slices=1)
    for png in (src / "Train_Sets" / "MR" / "2" / "T2SPIR" / "Ground").iterdir():
        png.unlink()
    with pytest.raises(DatasetError, match=r"MR/2/T2SPIR/Ground.*no ground truth"):
        convert("chaos", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chaos_count_mismatch_bad_sequence_and_empty(tmp_path):
    src = make_chaos(tmp_path / "CHAOS_Train_Sets", n_slices=2, patients=(1,))
    next((src / "Train_Sets/MR/1/T2SPIR/Ground").iterdir()).unlink()
    with pytest.raises(DatasetError, match="counts must match"):
        convert("chaos", src, tmp_path / "out")
    with pytest.raises(DatasetError, match="sequence"):
        convert("chaos", src, tmp_path / "out", sequence="T1")
    (tmp_path / "empty" / "MR").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no patient folders"):
        convert("chaos", tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
