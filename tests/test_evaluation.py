"""Sliding-window inference (MONAI) against whole-image forwards computed independently."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.evaluation import sliding_window_logits


class _Out:
    def __init__(self, logits):
        self.logits = logits


class Conv(nn.Module):
    """A local model (3x3 conv) whose logits come out at half resolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return _Out(self.conv(x / 255.0)[..., ::2, ::2])


def test_one_window_equals_the_whole_image_forward():
    model = Conv().eval()
    images = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        ref = F.interpolate(model.conv(images / 255.0)[..., ::2, ::2], size=(32, 32),
                            mode="bilinear", align_corners=False)
    torch.testing.assert_close(sliding_window_logits(model, images, 32), ref)
    torch.testing.assert_close(sliding_window_logits(model, images, 64), ref)


def test_windows_cover_a_large_image_and_match_a_local_model_inside():
    class Pixelwise(nn.Module):  # a 1x1 model: every window gives the same values per pixel
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return _Out(self.conv(x / 255.0))

    model = Pixelwise().eval()
    images = torch.rand(1, 3, 80, 72) * 255
    out = sliding_window_logits(model, images, 32, overlap=0.5)
    with torch.no_grad():
        ref = model.conv(images / 255.0)
    assert out.shape == (1, 2, 80, 72)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
