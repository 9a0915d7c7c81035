"""The procedural vessel demo: deterministic, thin (1-4 px) structures inside the field of view,
a valid tskd dataset."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tskd.data.demo_vessels import VESSELS_LABELS, make_vessels_case, write_vessels_dataset
from tskd.data.format import read_case, read_fov, validate_dataset


def test_case_is_a_pure_function_of_the_seed():
    a, b = make_vessels_case(3), make_vessels_case(3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], make_vessels_case(4)[1])


def test_vessels_are_thin_inside_the_fov_and_darker():
    for seed in range(3):
        image, mask, fov = make_vessels_case(seed, 128)
        vessel = mask == 1
        assert vessel.any() and not (vessel & ~fov).any()
        assert 0.02 < vessel.mean() < 0.2
        # independent width check: a 1-4 px vessel is gone after 3 erosions of a 3x3 cross
        # (removes up to 3 px from each side: anything narrower than 7 px), a 5x5 blob is not
        assert not ndimage.binary_erosion(vessel, iterations=3).any()
        # vessels are darker in green than the tissue around them
        green = image[..., 1].astype(float)
        ring = ndimage.binary_dilation(vessel, iterations=3) & ~vessel & fov
        assert green[vessel].mean() < green[ring].mean()
        assert (image[~fov] == 0).all()


def test_written_dataset_is_valid_with_fov(tmp_path):
    root = write_vessels_dataset(tmp_path / "v", n_images=4, size=64, seed=1)
    info = validate_dataset(root)
    assert info.labels == VESSELS_LABELS and info.has_fov and len(info.case_ids) == 4
    image, mask = read_case(info, info.case_ids[0])
    expected = make_vessels_case(_seed_of(1, 0), 64)
    np.testing.assert_array_equal(image, expected[0])
    np.testing.assert_array_equal(mask, expected[1])
    np.testing.assert_array_equal(read_fov(info, info.case_ids[0]), expected[2])
    assert write_vessels_dataset(tmp_path / "v", n_images=4, size=64, seed=1) == root  # reused


def _seed_of(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
