"""tskd.data.augment: MONAI dictionary augmentation and image-only copies."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tskd.data.augment import augment_copies, build_augment


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from threads
    yield
    torch.set_num_threads(n)


def _sample(size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A grey image whose intensity encodes the label: label k -> 40 + 6 k."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.int64)
    mask[4:20, 6:26] = 7
    mask[10:14, 10:30] = 9
    mask[22:30, 2:12] = 3
    grey = (40.0 + 6.0 * mask + rng.uniform(-3, 3, mask.shape)).astype(np.float32)
    return {"image": torch.from_numpy(np.repeat(grey[None], 3, axis=0)),
            "mask": torch.from_numpy(mask[None])}


def test_shapes_types_and_label_set() -> None:
    aug = build_augment(32)
    aug.set_random_state(seed=0)
    data = _sample()
    before = set(data["mask"].unique().tolist())
    for _ in range(15):
        out = aug(dict(data))
        assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor
        assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 32, 32)
        assert out["mask"].dtype == torch.int64 and out["mask"].shape == (1, 32, 32)
        assert set(out["mask"].unique().tolist()) <= before  # nearest: no blended labels
        assert 0 <= out["image"].min() and out["image"].max() <= 255
        img = out["image"]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # stays grey
    assert torch.equal(data["mask"], _sample()["mask"])  # input untouched


def test_geometry_shared_by_image_and_mask() -> None:
    """Image and mask move together: after augmentation the brighter region (label 9 > 7 > 0 by
    construction) still sits where the mask says, up to interpolation at the borders."""
    aug = build_augment(32, strength="strong")
    aug.set_random_state(seed=3)
    for _ in range(10):
        out = aug(_sample())
        img, mask = out["image"][0], out["mask"][0]
        inner7 = (mask == 7) & (torch.nn.functional.max_pool2d(
            (mask != 7).float()[None], 3, 1, 1)[0] == 0)
        inner0 = (mask == 0) & (torch.nn.functional.max_pool2d(
            (mask != 0).float()[None], 3, 1, 1)[0] == 0)
        if inner7.any() and inner0.any():
            assert img[inner7].min() > img[inner0].max() or img[inner7].median() > \
                img[inner0].median() + 10


def test_deterministic_with_seed() -> None:
    runs = []
    for _ in range(2):
        aug = build_augment(32)
        aug.set_random_state(seed=42)
        runs.append([aug(_sample()) for _ in range(3)])
    for a, b in zip(*runs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    aug = build_augment(32)
    aug.set_random_state(seed=43)
    other = [aug(_sample()) for _ in range(3)]
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(runs[0], other))
    # successive draws differ
    assert not all(torch.equal(runs[0][0]["image"], r["image"]) for r in runs[0][1:])


def test_none_strength_is_identity_and_bad_strength() -> None:
    data = _sample()
    out = build_augment(32, strength="none")(dict(data))
    assert torch.equal(out["image"], data["image"]) and torch.equal(out["mask"], data["mask"])
    with pytest.raises(ValueError, match=r"Unsupported strength: 'wild'.*default"):
        build_augment(32, strength="wild")


def test_extra_label_key_follows_mask() -> None:
    aug = build_augment(32, label_keys=("mask", "fov"))
    aug.set_random_state(seed=1)
    data = _sample()
    data["fov"] = (data["mask"] > 0).long()
    for _ in range(5):
        out = aug(dict(data))
        assert torch.equal(out["fov"], (out["mask"] > 0).long())


def test_augment_copies() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    out = augment_copies(images, 8, seed=5)
    assert out.dtype == np.uint8 and out.shape == (8, 24, 20, 3)
    np.testing.assert_array_equal(out[:3], images)
    assert sum(not np.array_equal(out[j], images[j % 3]) for j in range(3, 8)) >= 3
    np.testing.assert_array_equal(out, augment_copies(images, 8, seed=5))
    assert not np.array_equal(out, augment_copies(images, 8, seed=6))
    np.testing.assert_array_equal(augment_copies(images, 2, seed=5), images[:2])
    with pytest.raises(ValueError, match="uint8"):
        augment_copies(images.astype(np.float32), 4, seed=0)
