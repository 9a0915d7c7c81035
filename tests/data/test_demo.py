"""tskd.data.demo: procedural ultrasound-like cases and the demo dataset writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tskd.data.demo import DEMO_LABELS, make_demo_case, write_demo_dataset
from tskd.data.format import DatasetError, make_splits, read_case, validate_dataset


def test_labels() -> None:
    assert DEMO_LABELS == {0: "background", 1: "organ", 2: "lesion"}


def test_deterministic_and_typed() -> None:
    img, mask = make_demo_case(11)
    img2, mask2 = make_demo_case(11)
    assert img.dtype == np.uint8 and img.shape == (128, 128, 3)
    assert mask.dtype == np.int64 and mask.shape == (128, 128)
    assert img.tobytes() == img2.tobytes() and mask.tobytes() == mask2.tobytes()
    other, _ = make_demo_case(12)
    assert not np.array_equal(img, other)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    small, small_mask = make_demo_case(11, size=48)
    assert small.shape == (48, 48, 3) and small_mask.shape == (48, 48)


def test_class_shares_and_geometry() -> None:
    """Over 40 cases: organ (class 1) 12-20% of pixels, lesion 3-6% when present (~90%), the
    lesion strictly inside the organ, darker than it, and the organ darker than its
    surroundings; the sector's top corners are black."""
    organ, lesion, with_lesion = [], [], 0
    for seed in range(40):
        img, mask = make_demo_case(seed, 128)
        grey = img[..., 0].astype(float)
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert grey[0, 0] == 0 and grey[0, -1] == 0 and grey[:4].mean() < grey[40:90].mean()
        organ.append((mask == 1).mean())
        les = mask == 2
        if les.any():
            with_lesion += 1
            lesion.append(les.mean())
            # every neighbour of a lesion pixel is lesion or organ, never background
            assert not (ndimage.binary_dilation(les, iterations=2) & (mask == 0)).any()
            assert grey[les].mean() < 0.9 * grey[mask == 1].mean()
        around = ndimage.binary_dilation(mask > 0, iterations=8) & (mask == 0)
        assert grey[mask == 1].mean() < grey[around].mean()
    assert 0.12 <= min(organ) and max(organ) <= 0.20, (min(organ), max(organ))
    assert 0.03 <= min(lesion) and max(lesion) <= 0.06, (min(lesion), max(lesion))
    assert 32 <= with_lesion <= 39  # ~10% without lesion
    assert 0.14 < np.mean(organ) < 0.18 and 0.04 < np.mean(lesion) < 0.05


def test_write_demo_dataset_round_trip(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", n_images=12, size=32, seed=3)
    assert root == tmp_path / "demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp dir left behind
    info = validate_dataset(root, n_labels=5, n_val=2)
    assert info.name == "tskd-demo-ultrasound" and info.modality == "US"
    assert info.labels == DEMO_LABELS
    assert info.spacing == pytest.approx((38.4 / 32, 38.4 / 32))
    assert len(info.case_ids) == 12 and info.case_ids[0] == "case_0000"
    assert len(info.splits["test"]) == 3 and len(info.splits["train"]) == 9
    assert not set(info.splits["test"]) & set(info.splits["train"])
    s = make_splits(info, n_labels=5, n_val=2, seed=0)
    assert set(s.test) == set(info.splits["test"])
    image, mask = read_case(info, "case_0004")
    assert image.shape == (32, 32, 3) and set(np.unique(mask)) <= {0, 1, 2}
    assert (mask == 1).any()
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["generator"]["n_images"] == 12 and meta["generator"]["seed"] == 3


def test_write_demo_dataset_idempotent_and_guarded(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", n_images=6, size=32, seed=0)
    png = root / "images" / "case_0001.png"
    stamp = png.stat().st_mtime_ns
    content = png.read_bytes()
    assert write_demo_dataset(root, n_images=6, size=32, seed=0) == root
    assert png.stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(DatasetError, match=r"demo.*other parameters"):
        write_demo_dataset(root, n_images=6, size=32, seed=1)

    # same parameters elsewhere give identical bytes
    again = write_demo_dataset(tmp_path / "again", n_images=6, size=32, seed=0)
    assert (again / "images" / "case_0001.png").read_bytes() == content

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"foreign.*other content"):
        write_demo_dataset(foreign, n_images=6, size=32)
    assert (foreign / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(validate_dataset(write_demo_dataset(empty, n_images=6, size=32)).case_ids) == 6

    # an incomplete demo (a file lost) is not mistaken for a complete one
    (root / "masks" / "case_0002.png").unlink()
    with pytest.raises(DatasetError, match="incomplete"):
        write_demo_dataset(root, n_images=6, size=32, seed=0)
