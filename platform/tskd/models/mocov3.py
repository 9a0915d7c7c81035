"""MoCo v3 (Chen, Xie and He, 2021) around the student's timm ViT: the MoCo v3 baseline.

:class:`MoCoV3` holds the base encoder (the student's ``backbone``, shared, trained in place) with
a 3-layer projection MLP and a 2-layer prediction MLP, and a momentum encoder (a frozen copy of
backbone + projector, updated as an exponential moving average with ``momentum``). Two augmented
views ``x1, x2`` of the same images give queries ``q = predictor(projector(backbone(x)))`` and keys
``k = momentum_projector(momentum_backbone(x))``; the loss is the symmetric InfoNCE
``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k) = 2τ · CE(q·kᵀ / τ, positives on the diagonal)``
over L2-normalised vectors, keys gathered from every process when ``torch.distributed`` runs (as
MoCo v3's code). The MLPs follow MoCo v3's ``_build_mlp`` (Linear without bias, BatchNorm, ReLU;
the projector's last BatchNorm has no affine parameters).

Tensor contract: inputs are the student's *normalised* views ``(B, 3, S, S)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoCoV3", "build_mlp", "contrastive_loss", "symmetric_loss"]


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``num_layers`` Linear layers (no bias) with BatchNorm + ReLU between them;
    a final affine-free BatchNorm when ``last_bn``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def _gather(x: Tensor) -> tuple[Tensor, int]:
    """``x`` from every process concatenated (no gradient), and this process's rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x, 0
    world = torch.distributed.get_world_size()
    if world == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts), torch.distributed.get_rank()


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries ``q (B, d)`` against keys ``k (B, d)`` (positives: same row), keys of
    all processes as negatives; scaled by ``2τ`` as MoCo v3 does. ``k`` carries no gradient."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    k_all, rank = _gather(k)
    logits = q @ k_all.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def symmetric_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float) -> Tensor:
    """``ctr(q1, k2) + ctr(q2, k1)``: each view's query against the other view's key."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


class MoCoV3(nn.Module):
    """MoCo v3 objective for a backbone returning pooled features ``(B, D)`` (a timm ViT with
    ``num_classes=0``: the normed class token).

    Args:
        backbone: the base encoder (trained in place); ``embed_dim`` is its feature width.
        dim: output width of the projector and predictor (256 in MoCo v3).
        mlp_dim: hidden width of both MLPs (4096 in MoCo v3).
        temperature: τ of the InfoNCE (0.2 in the paper).
        momentum: EMA coefficient of the momentum encoder (0.99 in the paper).
        freeze_patch_embed: keep the patch projection at its random init (MoCo v3's ViT recipe,
            ``--stop-grad-conv1``, for training stability).

    ``forward(x1, x2: normalised (B, 3, S, S)) -> loss`` (scalar). Each call first moves the
    momentum encoder towards the base encoder (MoCo v3 does it in ``forward``, so it sees the
    weights of the previous optimiser step), then computes the keys under ``no_grad``.
    """

    def __init__(self, backbone: nn.Module, *, dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.2, momentum: float = 0.99,
                 freeze_patch_embed: bool = False) -> None:
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        width = int(backbone.embed_dim)
        self.backbone = backbone
        if freeze_patch_embed:
            backbone.patch_embed.requires_grad_(False)
        self.projector = build_mlp(3, width, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """``θ_k ← m·θ_k + (1 - m)·θ_q`` for backbone and projector."""
        m = self.momentum
        for base, mom in ((self.backbone, self.momentum_backbone),
                          (self.projector, self.momentum_projector)):
            for p, pm in zip(base.parameters(), mom.parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            self.update_momentum_encoder()
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        return symmetric_loss(q1, q2, k1, k2, self.temperature)
