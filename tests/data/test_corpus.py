"""tskd.data.corpus: the procedural pre-training corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tskd.data.corpus import CORPUS_LABELS, LARGE_FRACTION, ProceduralCorpus, make_corpus_item


def test_item_types_and_range() -> None:
    ds = ProceduralCorpus(size=64, length=10, seed=0)
    assert len(ds) == 10
    item = ds[0]
    assert set(item) == {"image", "mask"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (64, 64)
    assert 0 <= item["image"].min() and item["image"].max() <= 255
    assert torch.equal(item["image"], item["image"].round())  # integral values
    with pytest.raises(IndexError):
        ds[10]
    assert torch.equal(ds[-1]["mask"], ds[9]["mask"])


def test_deterministic_per_index() -> None:
    a = ProceduralCorpus(size=48, length=100, seed=5)
    b = ProceduralCorpus(size=48, length=100, seed=5)
    _ = b[7], b[2]  # access order must not matter
    for i in (3, 7, 2):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    c = ProceduralCorpus(size=48, length=100, seed=6)
    assert not torch.equal(a[3]["image"], c[3]["image"])
    assert not torch.equal(a[3]["image"], a[4]["image"])


def test_classes_shapes_and_variety() -> None:
    """Over 40 items at 128 px: every class appears; thin structures are thin (a 2-step
    erosion removes them almost entirely); large-region pixels mostly come in large amounts;
    both grey and colour images occur."""
    assert CORPUS_LABELS == {0: "background", 1: "large region", 2: "small region",
                             3: "thin structure"}
    n = 128
    seen = np.zeros(4, int)
    thin_survival, large_share, grey = [], [], 0
    for i in range(40):
        img, mask = make_corpus_item(seed=1, index=i, size=n)
        assert img.dtype == np.uint8 and mask.dtype == np.int64
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        seen += np.bincount(mask.ravel(), minlength=4) > 0
        thin = mask == 3
        if thin.any():
            thin_survival.append(ndimage.binary_erosion(thin, iterations=2).sum() / thin.sum())
        if (mask == 1).any():
            large_share.append((mask == 1).mean())
        grey += np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1],
                                                                             img[..., 2])
    assert (seen >= 5).all(), seen
    assert np.mean(thin_survival) < 0.05
    assert np.median(large_share) > LARGE_FRACTION
    assert 8 <= grey <= 32
