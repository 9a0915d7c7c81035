"""Two augmented views for MoCo v3: sizes, value range, independent draws."""

import torch

from tskd.data.views import TwoViews


def test_two_views_are_drawn_independently_per_image_and_view():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 40, 40) * 255
    v1, v2 = TwoViews(32)(images)
    assert v1.shape == v2.shape == (4, 3, 32, 32)
    assert v1.min() >= 0 and v1.max() <= 255.0 + 1e-3
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(v1[0], v1[1])
    # a constant image stays constant through crops, flips and blur (colour ops change its value)
    flat = torch.full((2, 3, 40, 40), 100.0)
    c1, c2 = TwoViews(16)(flat)
    for view in (c1, c2):
        assert torch.allclose(view.amax((1, 2, 3)), view.amin((1, 2, 3)), atol=1.0)
