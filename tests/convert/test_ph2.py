"""tskd.convert.ph2 on a tiny fixture in the official PH2 layout (BMP files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.convert import convert
from tskd.data.format import DatasetError, load_dataset_info, read_case

H, W = 12, 16


def _lesion(i: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[2:2 + 4 + i, 4:12] = True  # 8 * (4 + i) lesion pixels
    return m


def make_ph2(root: Path, n: int = 3) -> Path:
    """``root/PH2 Dataset images/IMD00x/...`` with lesion BMPs in the three encodings PH2 uses."""
    rng = np.random.default_rng(0)
    images = root / "PH2 Dataset images"
    for i in range(n):
        cid = f"IMD{i + 2:03d}"
        case = images / cid
        (case / f"{cid}_Dermoscopic_Image").mkdir(parents=True)
        (case / f"{cid}_lesion").mkdir()
        (case / f"{cid}_roi").mkdir()  # colour-class folder, ignored
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            case / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp")
        m = _lesion(i)
        if i % 3 == 0:
            lesion = Image.fromarray(m)  # 1-bit BMP
        elif i % 3 == 1:
            lesion = Image.fromarray(np.stack([m.astype(np.uint8) * 255] * 3, axis=2))  # RGB
        else:
            lesion = Image.fromarray(m.astype(np.uint8) * 255)  # 8-bit grey
        lesion.save(case / f"{cid}_lesion" / f"{cid}_lesion.bmp")
    (root / "PH2_Readme.txt").write_text("readme")
    return root


def test_ph2_converts_official_layout(tmp_path):
    src = make_ph2(tmp_path / "PH2Dataset")
    summary = convert("ph2", src, tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    assert info.case_ids == ("IMD002", "IMD003", "IMD004")
    assert info.labels == {0: "background", 1: "lesion"}
    assert info.splits is None and info.spacing is None
    for i, cid in enumerate(info.case_ids):
        image, mask = read_case(info, cid)
        original = np.asarray(Image.open(src / "PH2 Dataset images" / cid
                                         / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp"))
        assert np.array_equal(image, original)  # lossless
        assert np.array_equal(mask, _lesion(i).astype(np.int64))
    lesion_px = sum(8 * (4 + i) for i in range(3))
    assert summary.n_images == 3
    assert summary.pixel_share["lesion"] == pytest.approx(lesion_px / (3 * H * W))
    assert summary.splits is None
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["name"] == "PH2" and "splits" not in meta


def test_ph2_accepts_images_folder_itself_and_resizes(tmp_path):
    src = make_ph2(tmp_path / "PH2Dataset", n=1)
    convert("ph2", src / "PH2 Dataset images", tmp_path / "out", size=8)
    info = load_dataset_info(tmp_path / "out")
    image, mask = read_case(info, "IMD002")
    assert image.shape == (8, 8, 3)
    expected = np.zeros((8, 8), np.int64)  # rows 2..5 of 12, cols 4..11 of 16, nearest
    expected[np.ix_([y for y in range(8) if 2 <= int((y + .5) * 12 / 8) < 6],
                    [x for x in range(8) if 4 <= int((x + .5) * 16 / 8) < 12])] = 1
    assert np.array_equal(mask, expected)


def test_ph2_missing_lesion_is_an_error_and_dst_untouched(tmp_path):
    src = make_ph2(tmp_path / "PH2Dataset")
    missing = src / "PH2 Dataset images" / "IMD003" / "IMD003_lesion" / "IMD003_lesion.bmp"
    missing.unlink()
    with pytest.raises(DatasetError, match="IMD003_lesion.bmp"):
        convert("ph2", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PH2Dataset"]  # no temp dir left


def test_ph2_empty_or_wrong_source(tmp_path):
    (tmp_path / "empty" / "PH2 Dataset images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no IMDxxx"):
        convert("ph2", tmp_path / "empty", tmp_path / "out")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="not a PH2 distribution"):
        convert("ph2", tmp_path / "other", tmp_path / "out")
    assert not (tmp_path / "out").exists()
