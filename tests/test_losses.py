"""SegLoss and KDLoss against hand computations."""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------- Table 8 variants


def test_soft_cross_entropy_by_hand() -> None:
    from tskd.losses import soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    expected = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                p = [math.exp(v) for v in t[b, :, i, j].tolist()]
                q = [math.exp(v) for v in s[b, :, i, j].tolist()]
                expected -= sum(pc / sum(p) * math.log(qc / sum(q)) for pc, qc in zip(p, q))
    assert soft_cross_entropy(s, t).item() == pytest.approx(expected / 40, rel=1e-5)


@pytest.mark.parametrize("target", ["interpolated", "teacher", "squeezed"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_logits_variants_against_a_reference(target: str, loss: str) -> None:
    g = torch.Generator().manual_seed(1)
    s_logits = torch.randn(2, 3, 32, 32, generator=g)
    t_logits = torch.randn(2, 3, 8, 8, generator=g)
    hidden = torch.randn(2, 4, 2, 2)
    kd = KDLoss(4, 6, w_logits=0.5, w_hidden=0.0, logits_loss=loss, logits_target=target)
    total, parts = kd((s_logits, hidden), (t_logits, None))
    if target == "interpolated":
        s, t = s_logits, F.interpolate(t_logits, size=(32, 32), mode="bilinear", align_corners=False)
    else:  # the student average-pooled over 4x4 blocks to the teacher's 8x8
        s = s_logits.reshape(2, 3, 8, 4, 8, 4).mean((3, 5))
        t = t_logits
        if target == "squeezed":  # the masks' last (width) axis averaged away
            s, t = s.mean(-1), t.mean(-1)
    if loss == "mse":
        ref = ((s - t) ** 2).mean()
    else:
        ref = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(parts["kd/logits"], ref)
    torch.testing.assert_close(total, 0.5 * ref)


def test_normalize_divides_by_a_running_variance_of_the_target() -> None:
    kd = KDLoss(4, 6, w_logits=1.0, w_hidden=2.0, normalize=True, momentum=0.9)
    with torch.no_grad():
        kd.proj.weight.zero_()
        kd.proj.bias.zero_()  # P(hidden) = 0: the hidden term is mean(t_hidden²)
    g = torch.Generator().manual_seed(2)
    var_l = var_h = None
    for step in range(3):
        s_logits = torch.randn(2, 3, 8, 8, generator=g)
        t_logits = torch.randn(2, 3, 8, 8, generator=g) * (step + 1)
        t_hidden = torch.randn(2, 6, 2, 2, generator=g) * 3.0
        total, parts = kd((s_logits, torch.randn(2, 4, 2, 2)), (t_logits, t_hidden))
        vl, vh = t_logits.var().item(), t_hidden.var().item()
        var_l = vl if var_l is None else 0.9 * var_l + 0.1 * vl
        var_h = vh if var_h is None else 0.9 * var_h + 0.1 * vh
        mse_l = ((s_logits - t_logits) ** 2).mean().item()
        mse_h = (t_hidden ** 2).mean().item()
        assert parts["kd/logits"].item() == pytest.approx(mse_l, rel=1e-5)  # parts: raw terms
        assert total.item() == pytest.approx(mse_l / var_l + 2.0 * mse_h / var_h, rel=1e-5)


def test_unknown_variant_rejected() -> None:
    with pytest.raises(ValueError, match="logits target"):
        KDLoss(4, 6, logits_target="sideways")
    with pytest.raises(ValueError, match="logits loss"):
        KDLoss(4, 6, logits_loss="kl")
