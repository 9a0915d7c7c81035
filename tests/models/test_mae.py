"""MAE objective on a tiny timm ViT: masking ratio, what the encoder sees, the loss by hand."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tskd.models.mae import MaskedAutoencoder, random_masking


def _vit(img_size: int = 32, patch: int = 8) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=32, depth=2,
                             num_heads=2, num_classes=0)


def test_random_masking_keeps_a_quarter_per_image():
    b, n, d = 3, 16, 5
    tokens = torch.arange(b * n, dtype=torch.float32).view(b, n, 1).expand(b, n, d).clone()
    kept, mask, restore = random_masking(tokens, 0.75, torch.Generator().manual_seed(1))
    assert kept.shape == (b, 4, d)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(1) == 12).all()
    for i in range(b):  # the kept tokens are exactly the unmasked positions
        kept_pos = sorted(int(v) - i * n for v in kept[i, :, 0].tolist())
        assert kept_pos == sorted(np.flatnonzero(mask[i].numpy() == 0).tolist())
    # masks differ between images (per-sample shuffles)
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])
    assert sorted(restore[0].tolist()) == list(range(n))


def test_encoder_sees_only_visible_patches_plus_class_token():
    vit = _vit()
    mae = MaskedAutoencoder(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    seen = []
    vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = mae(torch.randn(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert seen == [(2, 1 + 4, 32)]  # 16 patches, 75 % masked, + the class token
    assert out.pred.shape == (2, 16, 8 * 8 * 3) and out.mask.shape == (2, 16)
    assert out.mask.sum().item() == 2 * 12


def test_loss_is_mse_on_normalised_pixels_of_masked_patches():
    vit = _vit()
    mae = MaskedAutoencoder(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = mae(x, torch.Generator().manual_seed(0))
    # reference: patches by F.unfold (channel-major), reordered to (p, p, C) per patch
    p = 8
    cols = F.unfold(x, kernel_size=p, stride=p)  # (B, 3*p*p, N)
    patches = cols.view(2, 3, p * p, 16).permute(0, 3, 2, 1).reshape(2, 16, p * p * 3).numpy()
    pred, mask = out.pred.detach().numpy(), out.mask.numpy()
    errors = []
    for i in range(2):
        for j in range(16):
            if mask[i, j] == 1:
                t = patches[i, j]
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
                errors.append(np.mean((pred[i, j] - t) ** 2))
    assert len(errors) == 24
    np.testing.assert_allclose(out.loss.item(), np.mean(errors), rtol=1e-5)
    # without per-patch normalisation: the raw pixels
    mae.norm_pix_loss = False
    raw = mae(x, torch.Generator().manual_seed(0))
    ref = np.mean([np.mean((raw.pred.detach().numpy()[i, j] - patches[i, j]) ** 2)
                   for i in range(2) for j in range(16) if raw.mask[i, j] == 1])
    np.testing.assert_allclose(raw.loss.item(), ref, rtol=1e-5)


def test_loss_trains_the_shared_encoder():
    vit = _vit()
    mae = MaskedAutoencoder(vit, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    mae(torch.randn(2, 3, 32, 32)).loss.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0
