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
