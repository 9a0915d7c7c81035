"""tskd.data.dataset: cached, resized torch dataset over a tskd dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tskd.data.dataset import SegmentationDataset, load_arrays, resize_nearest
from tskd.data.format import load_dataset_info, write_dataset_json


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _block_mask(h: int, w: int) -> np.ndarray:
    """Labels constant on 2x2 blocks: block (i, j) -> (i + 2 j) % 3."""
    i, j = np.mgrid[0:h // 2, 0:w // 2]
    return np.kron((i + 2 * j) % 3, np.ones((2, 2), np.int64)).astype(np.uint8)


def _write(root: Path, n: int = 3, h: int = 16, w: int = 16, fov: bool = False,
           same_image: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if fov:
        (root / "fov").mkdir()
    for k in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2] = (200, 100, 50) if same_image else (10 * k, 20, 30)
        img[:, w // 2:] = (0, 50, 250)
        Image.fromarray(img).save(root / "images" / f"c{k}.png")
        Image.fromarray(_block_mask(h, w)).save(root / "masks" / f"c{k}.png")
        if fov:
            f = np.zeros((h, w), np.uint8)
            f[2:, :] = 255
            Image.fromarray(f).save(root / "fov" / f"c{k}.png")
    write_dataset_json(root, name="t", modality="US", labels={0: "a", 1: "b", 2: "c"})
    return root


def test_resize_nearest_hand_computed() -> None:
    m = _block_mask(16, 16).astype(np.int64)
    np.testing.assert_array_equal(resize_nearest(m, 8), m[1::2, 1::2])
    m = _block_mask(16, 12).astype(np.int64)  # columns: floor((j + 0.5) * 1.5)
    np.testing.assert_array_equal(resize_nearest(m, 8),
                                  m[1::2][:, [0, 2, 3, 5, 6, 8, 9, 11]])
    up = resize_nearest(np.array([[1, 2], [3, 4]]), 4)
    np.testing.assert_array_equal(up, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


def test_items_native_size(tmp_path: Path) -> None:
    info = load_dataset_info(_write(tmp_path / "d"))
    ds = SegmentationDataset(info, ["c2", "c0"], 16)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"image", "mask", "id"} and item["id"] == "c2"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (16, 16)
    assert item["image"][:, 0, 0].tolist() == [20.0, 20.0, 30.0]
    assert item["image"][:, 5, 12].tolist() == [0.0, 50.0, 250.0]
    np.testing.assert_array_equal(item["mask"].numpy(), _block_mask(16, 16))
    item["mask"][:] = 9  # consumers cannot corrupt the cache
    assert ds[0]["mask"].max() == 2


def test_resized_items(tmp_path: Path) -> None:
    info = load_dataset_info(_write(tmp_path / "d", h=16, w=12))  # non-square, squashed
    ds = SegmentationDataset(info, info.case_ids, 8)
    item = ds[1]
    assert item["image"].shape == (3, 8, 8) and item["mask"].shape == (8, 8)
    np.testing.assert_array_equal(item["mask"].numpy(),
                                  resize_nearest(_block_mask(16, 12).astype(np.int64), 8))
    # columns 0-1 lie in the left half (constant colour), columns 6-7 in the right half
    assert torch.all(item["image"][:, :, :2] == torch.tensor([10.0, 20, 30])[:, None, None])
    assert torch.all(item["image"][:, :, 6:] == torch.tensor([0.0, 50, 250])[:, None, None])
    images, masks = load_arrays(info, ["c0", "c2"], 8)
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)
    assert masks.dtype == np.int64 and masks.shape == (2, 8, 8)
    np.testing.assert_array_equal(images[1], ds[2]["image"].permute(1, 2, 0).numpy())


def test_fov_key(tmp_path: Path) -> None:
    info = load_dataset_info(_write(tmp_path / "d", fov=True))
    ds = SegmentationDataset(info, info.case_ids, 8)
    fov = ds[0]["fov"]
    assert fov.dtype == torch.bool and fov.shape == (8, 8)
    assert not fov[0].any() and fov[1:].all()  # rows 0-1 of 16 outside -> row 0 of 8
    aug = SegmentationDataset(info, info.case_ids, 8, augment=True, seed=0)
    assert all(set(aug[i]) == {"image", "mask", "id", "fov"} for i in range(3))
    assert aug[0]["fov"].dtype == torch.bool


def test_augmented_items(tmp_path: Path) -> None:
    info = load_dataset_info(_write(tmp_path / "d"))
    a = SegmentationDataset(info, info.case_ids, 16, augment=True, seed=4)
    b = SegmentationDataset(info, info.case_ids, 16, augment=True, seed=4)
    first = [a[0] for _ in range(3)]
    for x, y in zip(first, [b[0] for _ in range(3)]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert any(not torch.equal(first[0]["image"], x["image"]) for x in first[1:])
    for x in first:
        assert x["image"].shape == (3, 16, 16) and x["mask"].dtype == torch.int64
        assert set(x["mask"].unique().tolist()) <= {0, 1, 2}
        assert x["id"] == "c0"


def test_dataloader_workers_get_distinct_streams(tmp_path: Path) -> None:
    """Identical cases served by two workers must not receive identical augmentations."""
    info = load_dataset_info(_write(tmp_path / "d", n=4, same_image=True))
    ds = SegmentationDataset(info, info.case_ids, 16, augment=True, seed=0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    batches = list(loader)  # worker 0 serves items 0, 2; worker 1 serves 1, 3
    assert [b["id"][0] for b in batches] == ["c0", "c1", "c2", "c3"]
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
