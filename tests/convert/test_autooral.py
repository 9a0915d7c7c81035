"""tskd.convert.autooral on tiny fixtures in the assumed Autooral release layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.convert import convert
from tskd.data.format import DatasetError, load_dataset_info, read_case

H, W = 16, 16


def _ulcer(i: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[i:i + 4, 2:10] = True
    return m


def make_autooral(root: Path, splits=("train", "val", "test"), per_split: int = 2,
                  suffix: str = "_mask") -> Path:
    rng = np.random.default_rng(3)
    k = 0
    for split in splits:
        base = root / split if split else root
        (base / "images").mkdir(parents=True)
        (base / "masks").mkdir()
        for _ in range(per_split):
            cid = f"ulcer_{k:03d}"
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                base / "images" / f"{cid}.png")
            Image.fromarray(_ulcer(k).astype(np.uint8) * 255).save(
                base / "masks" / f"{cid}{suffix}.png")
            k += 1
    return root


def test_autooral_split_layout(tmp_path):
    src = make_autooral(tmp_path / "Autooral")
    summary = convert("autooral", src, tmp_path / "out", size=0)
    info = load_dataset_info(tmp_path / "out")
    assert info.labels == {0: "background", 1: "ulcer"}
    assert info.splits == {"train": ["train_ulcer_000", "train_ulcer_001", "val_ulcer_002",
                                     "val_ulcer_003"],
                           "test": ["test_ulcer_004", "test_ulcer_005"]}
    for cid in info.case_ids:
        k = int(cid[-3:])
        assert np.array_equal(read_case(info, cid)[1], _ulcer(k).astype(np.int64))
    assert summary.pixel_share["ulcer"] == pytest.approx(32 / (H * W))
    assert any("validation" in n for n in summary.notes)


def test_autooral_default_size_and_flat_layout(tmp_path):
    src = make_autooral(tmp_path / "flat", splits=("",), per_split=1, suffix="")
    convert("autooral", src, tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    image, mask = read_case(info, "ulcer_000")
    assert image.shape == (256, 256, 3) and info.splits is None
    assert np.array_equal(mask[8::16, 8::16], _ulcer(0).astype(np.int64))


def test_autooral_missing_mask_and_missing_test(tmp_path):
    src = make_autooral(tmp_path / "A")
    (src / "test" / "masks" / "ulcer_005_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"ulcer_005\.png: no ulcer mask"):
        convert("autooral", src, tmp_path / "out", size=0)
    src2 = make_autooral(tmp_path / "B", splits=("train",))
    with pytest.raises(DatasetError, match="needs both train/ and test/"):
        convert("autooral", src2, tmp_path / "out", size=0)
    (tmp_path / "C").mkdir()
    with pytest.raises(DatasetError, match="not an Autooral layout"):
        convert("autooral", tmp_path / "C", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def make_official(root: Path) -> Path:
    """The public archive: Autooral_dataset/{train,val,test}/{images,masks}/ with the same file
    names (1.png, 2.png) in every split and 0/255 masks named like their image."""
    rng = np.random.default_rng(5)
    for s_idx, split in enumerate(("train", "val", "test")):
        base = root / "Autooral_dataset" / split
        (base / "images").mkdir(parents=True)
        (base / "masks").mkdir()
        for n in (1, 2):
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
                base / "images" / f"{n}.png")
            Image.fromarray(_ulcer(3 * s_idx + n).astype(np.uint8) * 255).save(
                base / "masks" / f"{n}.png")
    return root


@pytest.mark.parametrize("inner", [False, True])
def test_autooral_official_archive_same_names_across_splits(tmp_path, inner):
    root = make_official(tmp_path / "download")
    src = root / "Autooral_dataset" if inner else root
    summary = convert("autooral", src, tmp_path / "out", size=0)
    info = load_dataset_info(tmp_path / "out")
    assert info.case_ids == ("test_1", "test_2", "train_1", "train_2", "val_1", "val_2")
    assert info.splits == {"train": ["train_1", "train_2", "val_1", "val_2"],
                           "test": ["test_1", "test_2"]}
    for s_idx, split in enumerate(("train", "val", "test")):
        for n in (1, 2):
            image, mask = read_case(info, f"{split}_{n}")
            ref = np.asarray(Image.open(root / "Autooral_dataset" / split / "images" / f"{n}.png"))
            assert np.array_equal(image, ref)
            assert np.array_equal(mask, _ulcer(3 * s_idx + n).astype(np.int64))
    assert summary.n_images == 6
