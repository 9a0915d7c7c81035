"""Patch sampling: crops are slices of the original, foreground oversampling by share."""

from __future__ import annotations

import torch

from tskd.data.patches import PatchDataset


def _items(n=4, size=64):
    items = []
    for i in range(n):
        image = torch.arange(3 * size * size, dtype=torch.float32).reshape(3, size, size) + i
        mask = torch.zeros(size, size, dtype=torch.int64)
        mask[50:53, 5:8] = 1  # a 3x3 speck: a random 16-px crop rarely holds it
        items.append({"image": image, "mask": mask, "id": f"c{i}",
                      "fov": torch.ones(size, size, dtype=torch.bool)})
    return items


def test_crops_are_slices_of_the_image():
    base = _items()
    ds = PatchDataset(base, 16, fg_fraction=0.5, samples_per_item=3, seed=1)
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        y, x = item["corner"]
        src = base[i % 4]
        assert torch.equal(item["image"], src["image"][:, y:y + 16, x:x + 16])
        assert torch.equal(item["mask"], src["mask"][y:y + 16, x:x + 16])
        assert item["fov"].shape == (16, 16) and item["id"] == src["id"]


def test_foreground_share_follows_fg_fraction():
    always = PatchDataset(_items(), 16, fg_fraction=1.0, samples_per_item=20, seed=0)
    assert all(always[i]["mask"].any() for i in range(len(always)))
    never = PatchDataset(_items(), 16, fg_fraction=0.0, samples_per_item=50, seed=0)
    hits = sum(bool(never[i]["mask"].any()) for i in range(len(never)))
    # a uniform corner (49 x 49 choices) holds some of the speck (rows 50-52, cols 5-7) only
    # for y in 35..48 and x in 0..7: 14 * 8 / 49**2 = 4.7% of the crops
    assert hits < 0.15 * len(never)
    third = PatchDataset(_items(), 16, samples_per_item=75, seed=0)
    share = sum(bool(third[i]["mask"].any()) for i in range(len(third))) / len(third)
    assert 0.25 < share < 0.5


def test_small_images_are_padded_with_background():
    item = {"image": torch.ones(3, 10, 12), "mask": torch.ones(10, 12, dtype=torch.int64),
            "id": "s"}
    out = PatchDataset([item], 16, fg_fraction=0.0)[0]
    assert out["image"].shape == (3, 16, 16) and out["corner"] == (0, 0)
    assert out["mask"][:10, :12].all() and not out["mask"][10:].any()
    assert not out["mask"][:, 12:].any()


def test_training_set_is_the_whole_image_set_when_the_patch_covers_it():
    from tskd.data.patches import patches_per_image, training_set

    base = _items()
    assert training_set(base, image_size=64, patch=64) is base
    assert training_set(base, image_size=64, patch=96) is base
    crops = training_set(base, image_size=64, patch=32, fg_fraction=0.5, seed=3)
    assert isinstance(crops, PatchDataset) and crops.patch == 32 and crops.fg_fraction == 0.5
    # an epoch covers about the whole images' pixels: ceil((64/32)^2) = 4, ceil((64/48)^2) = 2
    assert len(crops) == 4 * len(base)
    assert (patches_per_image(64, 32), patches_per_image(64, 48), patches_per_image(64, 64)) \
        == (4, 2, 1)


def test_set_random_state_replays_the_crop_stream():
    ds = PatchDataset(_items(), 16, samples_per_item=2, seed=0)
    ds.set_random_state(7)
    first = [ds[i]["corner"] for i in range(len(ds))]
    ds.set_random_state(7)
    assert [ds[i]["corner"] for i in range(len(ds))] == first
    ds.set_random_state(8)
    assert [ds[i]["corner"] for i in range(len(ds))] != first


def test_crop_arrays_cuts_uint8_patches_from_the_images():
    import numpy as np

    from tskd.data.patches import crop_arrays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 48), np.int64)
    masks[:, 30:33, 40:43] = 1
    out = crop_arrays(images, masks, patch=16, per_image=2, fg_fraction=1.0, seed=1)
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.uint8
    for j, crop in enumerate(out):
        src = images[j // 2]
        hits = [(y, x) for y in range(40 - 15) for x in range(48 - 15)
                if np.array_equal(src[y:y + 16, x:x + 16], crop)]
        assert hits  # a slice of its own image
        assert any(y <= 32 and y + 16 > 30 and x <= 42 and x + 16 > 40 for y, x in hits)
