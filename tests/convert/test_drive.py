"""tskd.convert.drive on a tiny fixture in the official DRIVE layout (TIF + GIF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.convert import convert
from tskd.data.format import DatasetError, load_dataset_info, read_case, read_fov

H, W = 10, 12


def _vessels(num: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[num % H, :] = True  # one horizontal vessel per image
    m[:, num % W] = True
    return m


def _fov() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < 20


def make_drive(root: Path, train=(21, 22), test=(1, 2), test_manual=True) -> Path:
    rng = np.random.default_rng(1)
    for folder, nums in (("training", train), ("test", test)):
        for sub in ("images", "1st_manual", "mask"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
        for num in nums:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                root / folder / "images" / f"{num:02d}_{folder}.tif")
            if folder == "training" or test_manual:
                Image.fromarray(_vessels(num).astype(np.uint8) * 255).save(
                    root / folder / "1st_manual" / f"{num:02d}_manual1.gif")
            Image.fromarray(_fov().astype(np.uint8) * 255).save(
                root / folder / "mask" / f"{num:02d}_{folder}_mask.gif")
    return root


def test_drive_official_split_masks_and_fov(tmp_path):
    src = make_drive(tmp_path / "DRIVE")
    summary = convert("drive", tmp_path, tmp_path / "out")  # parent of DRIVE/ is accepted
    info = load_dataset_info(tmp_path / "out")
    assert info.labels == {0: "background", 1: "vessel"}
    assert info.splits == {"train": ["21_training", "22_training"],
                           "test": ["01_test", "02_test"]}
    assert info.has_fov
    for cid, num in (("21_training", 21), ("02_test", 2)):
        image, mask = read_case(info, cid)
        folder = "training" if "training" in cid else "test"
        assert np.array_equal(image, np.asarray(Image.open(src / folder / "images"
                                                           / f"{cid}.tif")))
        assert np.array_equal(mask, _vessels(num).astype(np.int64))
        assert np.array_equal(read_fov(info, cid), _fov())
    assert summary.splits == {"train": 2, "test": 2}
    vessel_px = sum(int(_vessels(n).sum()) for n in (21, 22, 1, 2))
    assert summary.pixel_share["vessel"] == pytest.approx(vessel_px / (4 * H * W))


def test_drive_test_without_manual_is_an_error(tmp_path):
    make_drive(tmp_path / "DRIVE", test_manual=False)
    with pytest.raises(DatasetError, match=r"01_manual1\.gif"):
        convert("drive", tmp_path / "DRIVE", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_drive_missing_fov_and_missing_split(tmp_path):
    src = make_drive(tmp_path / "DRIVE")
    (src / "training" / "mask" / "22_training_mask.gif").unlink()
    with pytest.raises(DatasetError, match="22_training_mask.gif"):
        convert("drive", src, tmp_path / "out")
    other = make_drive(tmp_path / "x" / "DRIVE", test=())
    with pytest.raises(DatasetError, match="no DRIVE images"):
        convert("drive", other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
