"""MoCo v3 objective: InfoNCE by hand, symmetry of the two views, the momentum update."""

from __future__ import annotations

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from tskd.models.mocov3 import MoCoV3, contrastive_loss, symmetric_loss


def _info_nce(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    """-mean_i log softmax_j(q_i·k_j / tau)[i] over L2-normalised rows, times 2·tau."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))]
        total += -(logits[i] - np.log(np.sum(np.exp(logits))))
    return total / len(q) * 2 * tau


def test_contrastive_loss_equals_hand_computed_info_nce():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    np.testing.assert_allclose(contrastive_loss(q, k, 0.2).item(),
                               _info_nce(q.numpy(), k.numpy(), 0.2), rtol=1e-5)
    # a query equal to its own key (and orthogonal to the others) has a lower loss
    e = torch.eye(3, 4)
    assert contrastive_loss(e, e, 0.2) < contrastive_loss(e, e.roll(1, 0), 0.2)


def test_symmetric_loss_pairs_each_query_with_the_other_views_key():
    g = torch.Generator().manual_seed(1)
    q1, q2, k1, k2 = (torch.randn(4, 5, generator=g) for _ in range(4))
    loss = symmetric_loss(q1, q2, k1, k2, 0.2).item()
    ref = _info_nce(q1.numpy(), k2.numpy(), 0.2) + _info_nce(q2.numpy(), k1.numpy(), 0.2)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(symmetric_loss(q2, q1, k2, k1, 0.2).item(), ref, rtol=1e-5)


def _moco(momentum: float = 0.99) -> MoCoV3:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0)
    return MoCoV3(vit, dim=8, mlp_dim=16, temperature=0.2, momentum=momentum)


def test_module_loss_is_symmetric_in_the_views_and_trains_only_the_base():
    moco = _moco().train()
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    a = moco(x1, x2)
    b = moco(x2, x1)
    torch.testing.assert_close(a, b)
    a.backward()
    assert moco.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert moco.predictor[0].weight.grad is not None
    assert all(p.grad is None for p in moco.momentum_backbone.parameters())


def test_momentum_encoder_is_an_ema_of_the_base():
    moco = _moco(momentum=0.9)
    before = moco.momentum_backbone.blocks[0].mlp.fc1.weight.clone()
    with torch.no_grad():
        moco.backbone.blocks[0].mlp.fc1.weight.add_(1.0)
    moco.update_momentum_encoder()
    expected = 0.9 * before + 0.1 * moco.backbone.blocks[0].mlp.fc1.weight
    torch.testing.assert_close(moco.momentum_backbone.blocks[0].mlp.fc1.weight, expected)


def test_frozen_patch_projection_gets_no_gradient():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0)
    moco = MoCoV3(vit, dim=8, mlp_dim=16, freeze_patch_embed=True)
    moco(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)).backward()
    assert vit.patch_embed.proj.weight.grad is None
    assert vit.blocks[0].attn.qkv.weight.grad is not None
