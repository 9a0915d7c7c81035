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


def test_window_logits_one_window_is_the_raw_whole_image_forward():
    """An image that fits the window gives the model's own logits (no blending, no resize):
    the whole-image path the stages had before patches."""
    from tskd.evaluation import predict_labels, window_logits

    model = Conv().eval()
    images = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        raw = model.conv(images / 255.0)[..., ::2, ::2]
        ref_labels = F.interpolate(raw, size=(32, 32), mode="bilinear",
                                   align_corners=False).argmax(1)
    for window in (None, 32, 48):
        assert torch.equal(window_logits(model, images, window), raw)
        assert torch.equal(predict_labels(model, images, window), ref_labels)


def test_score_model_with_a_window_scores_full_resolution_predictions():
    """A pixel-wise model thresholds brightness; on 80-px images scored with 32-px windows its
    prediction is the hand-computed threshold map at full resolution, and the Dice is the one
    computed by hand from it."""
    from tskd.evaluation import score_model

    class Threshold(nn.Module):  # logit of class 1 = brightness - 128 (a 1x1 model)
        def forward(self, x):
            g = x.mean(1, keepdim=True)
            return _Out(torch.cat([torch.zeros_like(g), g - 128.0], 1))

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 80, 80, generator=gen) * 255
    masks = (torch.rand(2, 80, 80, generator=gen) < 0.5).long()
    masks[:, :40] = (images[:, :, :40].mean(1) > 128).long()  # half agrees with the model
    items = [{"image": images[i], "mask": masks[i]} for i in range(2)]
    scores = score_model(Threshold(), items, num_classes=2, window=32)
    pred = (images.mean(1) > 128).numpy()
    gt = masks.numpy().astype(bool)
    dice = [2 * (p & g).sum() / (p.sum() + g.sum()) for p, g in zip(pred, gt)]
    assert abs(scores["dice"] - float(sum(dice) / 2)) < 1e-6
