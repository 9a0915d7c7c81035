"""Masked autoencoder (He et al., 2022) around the student's timm ViT: the MAE baseline.

:class:`MaskedAutoencoder` wraps an existing timm ``VisionTransformer`` (the student's
``backbone``, shared, not copied) as the MAE encoder and adds a small decoder made of timm
``Block``s. Per image a random ``mask_ratio`` of the patch tokens is dropped before the encoder
(after their position embeddings are added, as MAE does); the decoder sees the encoded visible
tokens plus a shared learned mask token at every masked position (with fixed 2-D sin-cos position
embeddings) and predicts each patch's pixels. The loss is the mean squared error on the
**masked** patches only, against per-patch normalised pixels (``norm_pix_loss``, MAE's default
recipe).

Tensor contract: ``forward(x)`` takes the student's *normalised* input ``(B, 3, S, S)`` (what
``Student.preprocess`` returns, ``S`` the backbone's ``img_size``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["MaeOutput", "MaskedAutoencoder", "patchify", "random_masking", "masked_patch_loss"]


class MaeOutput(NamedTuple):
    """Output of :class:`MaskedAutoencoder`.

    Attributes:
        loss: scalar, mean over masked patches of the per-patch MSE.
        pred: ``(B, N, p*p*3)`` predicted pixels of every patch (visible ones are not scored).
        mask: ``(B, N)`` 1 where the patch was masked (dropped from the encoder), 0 where kept.
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``, patches in row-major order, pixels ``(p, p, C)``."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def random_masking(tokens: Tensor, mask_ratio: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random ``1 - mask_ratio`` share of each sequence (MAE's per-sample shuffle).

    Args:
        tokens: ``(B, N, D)``.
    Returns:
        ``kept (B, K, D)`` with ``K = int(N * (1 - mask_ratio))``, ``mask (B, N)`` (1 = dropped),
        ``ids_restore (B, N)`` (the permutation that puts shuffled positions back in order).
    """
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    noise = torch.rand(b, n, generator=generator, device="cpu").to(tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, *,
                      norm_pix: bool = True) -> Tensor:
    """Mean over masked patches of the per-patch MSE; ``target`` optionally normalised per patch
    (mean 0, variance 1 with MAE's ``eps = 1e-6``). Shapes: ``(B, N, P)``, ``(B, N, P)``,
    ``(B, N)``."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(nn.Module):
    """MAE pre-training objective for a timm ViT encoder.

    Args:
        encoder: a timm ``VisionTransformer`` (its ``patch_embed``, ``_pos_embed``, ``blocks``
            and ``norm`` are used; it is trained in place).
        decoder_dim, decoder_depth, decoder_heads: the decoder's width, blocks and heads.
        mask_ratio: share of patches dropped per image (0.75 in MAE and the paper).
        norm_pix_loss: normalise each target patch by its own mean and std.

    ``forward(x: normalised (B, 3, S, S), generator=None) -> MaeOutput``.
    """

    def __init__(self, encoder: nn.Module, *, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_prefix = int(encoder.num_prefix_tokens)
        dim = int(encoder.embed_dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed 2-D sin-cos position embeddings of the patch grid, as MAE's decoder
        pos = build_sincos2d_pos_embed(list(grid), decoder_dim)  # (N, decoder_dim)
        self.register_buffer("decoder_pos_embed", pos[None].float(), persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: Tensor, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Visible tokens through the encoder: ``(B, prefix + K, D)``, ``mask``, ``ids_restore``."""
        enc = self.encoder
        tokens = enc._pos_embed(enc.patch_embed(x))  # prefix tokens + patches, positions added
        prefix, patches = tokens[:, :self.num_prefix], tokens[:, self.num_prefix:]
        kept, mask, ids_restore = random_masking(patches, self.mask_ratio, generator)
        h = enc.norm_pre(torch.cat([prefix, kept], dim=1))
        h = enc.norm(enc.blocks(h))
        return h, mask, ids_restore

    def decode(self, h: Tensor, ids_restore: Tensor) -> Tensor:
        """Encoded ``(B, prefix + K, D)`` -> predicted pixels ``(B, N, p*p*3)``."""
        h = self.decoder_embed(h)
        prefix, kept = h[:, :self.num_prefix], h[:, self.num_prefix:]
        b, n = ids_restore.shape
        filled = torch.cat([kept, self.mask_token.expand(b, n - kept.shape[1], -1)], dim=1)
        filled = torch.gather(filled, 1, ids_restore[..., None].expand(-1, -1, h.shape[-1]))
        y = torch.cat([prefix, filled + self.decoder_pos_embed], dim=1)
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y[:, self.num_prefix:])

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> MaeOutput:
        h, mask, ids_restore = self.encode(x, generator)
        pred = self.decode(h, ids_restore)
        target = patchify(x, self.patch_size)
        loss = masked_patch_loss(pred, target, mask, norm_pix=self.norm_pix_loss)
        return MaeOutput(loss, pred, mask)
