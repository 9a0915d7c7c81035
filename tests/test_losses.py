"""SegLoss and KDLoss against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tskd.losses import KDLoss, SegLoss


def _hand_seg_loss(logits: torch.Tensor, target: torch.Tensor, ce_w: float = 0.2, dice_w: float = 0.8) -> torch.Tensor:
    """0.2·CE + 0.8·(1 - soft Dice), Dice per (image, class) with MONAI's 1e-5 smoothing, then mean."""
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)
    g = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * g).sum((2, 3))  # (B, C)
    den = p.sum((2, 3)) + g.sum((2, 3))
    dice_loss = (1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()
    return ce_w * ce + dice_w * dice_loss


def test_segloss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, 20, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (3, 16, 20))
    target[1][target[1] == 3] = 0  # a class absent from one image: smoothing matters there
    loss = SegLoss()(logits, target)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, _hand_seg_loss(logits, target), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SegLoss(1.0, 0.0)(logits, target), F.cross_entropy(logits, target))


def test_segloss_upsamples_low_res_logits() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 32, 32))
    loss = SegLoss()(logits, target)
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, _hand_seg_loss(up, target), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_segloss_invalid() -> None:
    with pytest.raises(ValueError):
        SegLoss(-0.1, 0.8)
    with pytest.raises(ValueError):
        SegLoss()(torch.randn(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("s_grid,t_grid", [(4, 8), (16, 8), (8, 8)])
def test_kdloss_matches_hand_computation(s_grid: int, t_grid: int) -> None:
    torch.manual_seed(2)
    kd = KDLoss(8, 6, w_logits=0.2, w_hidden=0.1)
    s_logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    s_hidden = torch.randn(2, 8, s_grid, s_grid, requires_grad=True)
    t_logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    t_hidden = torch.randn(2, 6, t_grid, t_grid, requires_grad=True)
    total, parts = kd((s_logits, s_hidden), (t_logits, t_hidden))

    w, b = kd.proj.weight.detach(), kd.proj.bias.detach()
    proj = torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], s_hidden) + b.view(1, -1, 1, 1)
    proj = F.interpolate(proj, size=(t_grid, t_grid), mode="bilinear", align_corners=False)
    up_t = F.interpolate(t_logits, size=(32, 32), mode="bilinear", align_corners=False)
    ref_logits = ((s_logits - up_t) ** 2).mean()
    ref_hidden = ((proj - t_hidden) ** 2).mean()
    torch.testing.assert_close(parts["kd/logits"], ref_logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kd/hidden"], ref_hidden.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.2 * ref_logits + 0.1 * ref_hidden, rtol=1e-5, atol=1e-6)

    total.backward()
    assert t_logits.grad is None and t_hidden.grad is None  # teacher detached
    assert s_logits.grad is not None and s_hidden.grad is not None
    assert kd.proj.weight.grad is not None and kd.proj.weight.grad.abs().sum() > 0


def test_kdloss_task_agnostic_skips_logits() -> None:
    torch.manual_seed(3)
    kd = KDLoss(8, 6, w_logits=0.0, w_hidden=0.5)
    s_hidden = torch.randn(2, 8, 4, 4)
    t_hidden = torch.randn(2, 6, 4, 4)
    # logits are None: computing the logit term would fail
    total, parts = kd((None, s_hidden), (None, t_hidden))
    assert set(parts) == {"kd/hidden"}
    ref = ((kd.proj(s_hidden) - t_hidden) ** 2).mean()
    torch.testing.assert_close(total, 0.5 * ref)


@pytest.mark.parametrize("w_logits,w_hidden", [(-0.1, 0.1), (0.2, -1.0), (0.0, 0.0)])
def test_kdloss_invalid_weights(w_logits: float, w_hidden: float) -> None:
    with pytest.raises(ValueError, match=f"w_logits={w_logits}, w_hidden={w_hidden}"):
        KDLoss(8, 6, w_logits=w_logits, w_hidden=w_hidden)
