"""Nearest-neighbour MSE/PSNR against brute force, the PSNR formula by hand, the report."""

import math
import warnings

import numpy as np
import pytest
from PIL import Image

from tskd.transfer_quality import nearest_neighbours, psnr_from_mse, quality_report, resize_uint8


def _brute_force(synth, train):
    idx = np.zeros(len(synth), np.int64)
    mse = np.zeros(len(synth))
    for i, a in enumerate(synth):
        best = None
        for j, b in enumerate(train):
            d = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
            if best is None or d < best:
                best, idx[i] = d, j
        mse[i] = best
    return idx, mse


@pytest.mark.parametrize("chunk", [256, 3])
def test_nearest_neighbours_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    synth = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    synth[2] = np.clip(train[7].astype(int) + rng.integers(-3, 4, (8, 8, 3)), 0, 255)
    idx, mse, psnr = nearest_neighbours(synth, train, chunk=chunk)
    ref_idx, ref_mse = _brute_force(synth, train)
    assert idx.dtype == np.int64 and mse.dtype == np.float64 and psnr.dtype == np.float64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(mse, ref_mse, rtol=0, atol=1e-9)
    assert idx[2] == 7
    np.testing.assert_allclose(psnr, 10 * np.log10(255.0 ** 2 / ref_mse), rtol=1e-12)


def test_psnr_by_hand_and_exact_copy():
    train = np.zeros((2, 4, 4, 3), np.uint8)
    train[1] = 100
    synth = np.zeros((3, 4, 4, 3), np.uint8)
    synth[0] = 10          # nearest is train[0], MSE = 100
    synth[1] = 100         # exact copy of train[1]
    synth[2, 0, 0, 0] = 255  # one pixel channel off train[0]: MSE = 255²/48
    idx, mse, psnr = nearest_neighbours(synth, train)
    assert idx.tolist() == [0, 1, 0]
    assert mse[0] == 100.0 and mse[1] == 0.0 and mse[2] == pytest.approx(255 ** 2 / 48)
    assert psnr[0] == pytest.approx(10 * math.log10(65025 / 100))  # 28.1308 dB
    assert psnr[0] == pytest.approx(28.1308, abs=1e-4)
    assert math.isinf(psnr[1])
    assert psnr[2] == pytest.approx(10 * math.log10(48))
    assert psnr_from_mse(np.array([65025.0]))[0] == 0.0

    rep = quality_report(idx, mse, psnr, near_copy_psnr=30.0)
    assert rep["n"] == 3 and rep["n_exact_copies"] == 1 and rep["n_near_copies"] == 1
    assert rep["near_copies"] == [{"index": 1, "nearest_train": 1, "psnr": math.inf}]
    finite = np.array([psnr[0], psnr[2]])
    assert rep["psnr"]["mean"] == pytest.approx(finite.mean())
    assert rep["psnr"]["min"] == pytest.approx(finite.min())
    assert rep["mse"]["mean"] == pytest.approx(np.mean(mse))
    assert rep["mse"]["median"] == pytest.approx(100.0)
    assert rep["mse"]["max"] == pytest.approx(255 ** 2 / 48)
    assert rep["mse"]["std"] == pytest.approx(np.std(mse))


def test_quality_report_threshold_counts():
    idx = np.array([3, 1, 4, 1, 5])
    mse = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    psnr = psnr_from_mse(mse)  # 36.3, 35.1, 33.4, 32.1, 31.2 dB
    rep = quality_report(idx, mse, psnr, near_copy_psnr=33.0)
    assert rep["n_near_copies"] == 3
    assert [c["index"] for c in rep["near_copies"]] == [0, 1, 2]
    assert [c["nearest_train"] for c in rep["near_copies"]] == [3, 1, 4]
    assert quality_report(idx, mse, psnr, near_copy_psnr=0.0)["n_near_copies"] == 5
    assert quality_report(idx, mse, psnr, near_copy_psnr=99.0)["near_copies"] == []
    # the threshold is inclusive
    assert quality_report(idx, mse, psnr, near_copy_psnr=float(psnr[2]))["n_near_copies"] == 3


def test_train_images_are_resized_to_the_synthetic_size():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    small = resize_uint8(train, 8)
    idx, mse, _ = nearest_neighbours(small[[2, 0]], train)
    assert idx.tolist() == [2, 0] and mse.tolist() == [0.0, 0.0]
    # the resize is a proper antialiased bilinear one: close to PIL's
    pil = np.stack([np.asarray(Image.fromarray(t).resize((8, 8), Image.BILINEAR)) for t in train])
    assert np.abs(pil.astype(int) - small).max() <= 2
    # read-only input (as Ray's object store hands it over): the same result, no torch warning
    frozen = train.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(resize_uint8(frozen, 8), small)
        frozen_small = small[[2, 0]].copy()
        frozen_small.flags.writeable = False
        got = nearest_neighbours(frozen_small, frozen)
    assert got[0].tolist() == [2, 0] and got[1].tolist() == [0.0, 0.0]


def test_privacy_references_catch_flipped_and_augmented_copies():
    """A synthetic image equal to a flipped or augmented training copy is a near-copy; an
    unrelated image is not."""
    from tskd.data.augment import augment_copies
    from tskd.transfer_quality import privacy_references

    rng = np.random.default_rng(4)
    # smooth random images (a flip or augmentation of one is far from every other image)
    base = rng.integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    train = np.stack([np.asarray(Image.fromarray(b).resize((16, 16), Image.BILINEAR))
                      for b in base])
    augmented = augment_copies(train, 12, seed=0, strength="strong")
    refs, train_index, kind = privacy_references(train, augmented)
    assert len(refs) == 3 * 5 + 7
    assert list(kind[:5]) == ["train"] * 5 and list(kind[5:10]) == ["hflip"] * 5
    assert list(kind[10:15]) == ["vflip"] * 5 and list(kind[15:]) == ["augmented"] * 7
    np.testing.assert_array_equal(train_index, [*range(5)] * 3 + [j % 5 for j in range(5, 12)])
    np.testing.assert_array_equal(refs[7], train[2][:, ::-1])  # independent: numpy's flip
    np.testing.assert_array_equal(refs[13], train[3][::-1])
    np.testing.assert_array_equal(refs[15 + 4], augmented[9])

    hflip = train[1][:, ::-1].copy()
    # the augmented copy least like any training image (some copies are barely changed)
    _, _, aug_psnr = nearest_neighbours(augmented[5:], train)
    j = 5 + int(np.argmin(aug_psnr))
    aug_copy = np.clip(augmented[j].astype(int) + rng.integers(-2, 3, (16, 16, 3)), 0, 255
                       ).astype(np.uint8)  # copy j derives from train[j % 5], + faint noise
    unrelated = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    synth = np.stack([hflip, aug_copy, unrelated])
    threshold = 30.0
    # against the training images alone the flipped and augmented copies slip through
    _, _, psnr_train = nearest_neighbours(synth, train)
    assert (psnr_train < threshold).all()
    idx, mse, psnr = nearest_neighbours(synth, refs)
    assert psnr[0] == np.inf and kind[idx[0]] == "hflip" and train_index[idx[0]] == 1
    assert psnr[1] >= threshold and kind[idx[1]] == "augmented" and train_index[idx[1]] == j % 5
    assert psnr[2] < threshold
    rep = quality_report(train_index[idx], mse, psnr, near_copy_psnr=threshold)
    assert [c["index"] for c in rep["near_copies"]] == [0, 1]
    assert [c["nearest_train"] for c in rep["near_copies"]] == [1, j % 5]
