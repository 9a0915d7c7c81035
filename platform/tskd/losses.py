"""Losses: the supervised segmentation loss and the knowledge-distillation loss.

- :class:`SegLoss`: ``ce_weight · CE + dice_weight · Dice`` (MONAI ``DiceCELoss``; soft Dice over
  softmax probabilities, background included, one value per image and class, averaged).
- :class:`KDLoss`: ``w_logits · MSE(student logits, upsampled teacher logits)
  + w_hidden · MSE(P(student hidden), teacher hidden)`` with a learned 1×1 projection ``P``.

Tensor contract (DEVELOPERS.md): logits ``float32 (B, C, H, W)``, masks ``int64 (B, H, W)``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

__all__ = ["KDLoss", "SegLoss"]

logger = logging.getLogger(__name__)


class SegLoss(nn.Module):
    """``ce_weight · CrossEntropy + dice_weight · (1 - soft Dice)`` via MONAI ``DiceCELoss``.

    The Dice term is MONAI's default: softmax probabilities, one-hot target, background
    included, per (image, class) ``1 - (2·Σ p·g + 1e-5) / (Σ p + Σ g + 1e-5)``, mean over images
    and classes (``batch=False``). The CE term is the mean over pixels.

    ``forward(logits: (B, C, h, w), target: int64 (B, H, W)) -> scalar``; logits at another
    resolution than the target are bilinearly upsampled to ``(H, W)`` first.
    """

    def __init__(self, ce_weight: float = 0.2, dice_weight: float = 0.8) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(
                f"ce_weight and dice_weight must be >= 0 and not both 0, got {ce_weight=}, {dice_weight=}"
            )
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.loss = DiceCELoss(
            include_background=True,
            to_onehot_y=True,
            softmax=True,
            lambda_ce=ce_weight,
            lambda_dice=dice_weight,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Scalar loss for ``logits (B, C, h, w)`` and ``target int64 (B, H, W)`` in ``0..C-1``."""
        if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"expected logits (B, C, h, w) and target (B, H, W), got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        if logits.shape[1] < 2:
            raise ValueError(f"SegLoss needs >= 2 classes (softmax), got {logits.shape[1]}")
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        # MONAI wants the label map as (B, 1, H, W); it one-hots it for Dice and squeezes it for CE.
        return self.loss(logits, target.long().unsqueeze(1))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class KDLoss(nn.Module):
    """Logit + hidden-state MSE distillation loss; holds the learned projection ``P``.

    ``P`` is a 1×1 convolution ``student_dim -> teacher_dim``. The student's hidden grid is
    resized to the teacher's grid by bilinear interpolation (``align_corners=False``). A 1×1
    conv and bilinear interpolation are both linear and the interpolation weights sum to 1, so
    the two commute exactly (bias included); the code applies ``P`` on whichever grid is
    smaller (fewer FLOPs) — the result equals ``resize(P(hidden))`` up to float rounding.

    Args:
        student_dim: channels ``Ds`` of the student hidden map.
        teacher_dim: channels ``Dt`` of the teacher hidden map.
        w_logits: weight of the logit MSE (0 = task-agnostic KD: the term is not computed).
        w_hidden: weight of the hidden-state MSE (0: the term and ``P`` are not used).

    ``forward(student, teacher) -> (total, parts)``:

    - ``student``: ``(logits (B, C, H, W), hidden (B, Ds, Hs, Ws))`` (e.g. a ``StudentOutput``),
    - ``teacher``: ``(logits (B, C, h, w), hidden (B, Dt, Ht, Wt))`` (e.g. a ``TeacherOutput``),
      detached here;
    - ``total``: scalar ``w_logits · mean((s_logits - up(t_logits))²) + w_hidden ·
      mean((resize(P(s_hidden)) - t_hidden)²)``, ``up`` = bilinear to ``(H, W)``;
    - ``parts``: the **unweighted, detached** MSE terms under ``"kd/logits"`` and ``"kd/hidden"``;
      a term whose weight is 0 is not computed, its key is absent and its tensors are not read
      (they may be ``None``).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, w_logits: float = 0.2, w_hidden: float = 0.1) -> None:
        super().__init__()
        if w_logits < 0 or w_hidden < 0 or (w_logits == 0 and w_hidden == 0):
            raise ValueError(f"KD weights must be >= 0 and not both 0, got w_logits={w_logits}, w_hidden={w_hidden}")
        self.w_logits = float(w_logits)
        self.w_hidden = float(w_hidden)
        self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)

    def project(self, hidden: Tensor, size: Sequence[int]) -> Tensor:
        """``P`` + bilinear resize: ``(B, Ds, Hs, Ws) -> (B, Dt, *size)``."""
        if hidden.shape[-2] * hidden.shape[-1] <= size[0] * size[1]:
            return _resize(self.proj(hidden), size)
        return self.proj(_resize(hidden, size))

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """See the class docstring."""
        s_logits, s_hidden = student[0], student[1]
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.w_logits > 0:
            t_logits = teacher[0].detach()
            if s_logits.shape[:2] != t_logits.shape[:2]:
                raise ValueError(f"student/teacher logits disagree in (B, C): "
                                 f"{tuple(s_logits.shape)} vs {tuple(t_logits.shape)}")
            mse = F.mse_loss(s_logits, _resize(t_logits.to(s_logits.dtype), s_logits.shape[-2:]))
            parts["kd/logits"] = mse.detach()
            total = self.w_logits * mse
        if self.w_hidden > 0:
            t_hidden = teacher[1].detach()
            if s_hidden.shape[0] != t_hidden.shape[0] or t_hidden.shape[1] != self.proj.out_channels:
                raise ValueError(f"hidden shapes do not fit the projection {self.proj.in_channels}->"
                                 f"{self.proj.out_channels}: student {tuple(s_hidden.shape)}, "
                                 f"teacher {tuple(t_hidden.shape)}")
            mse = F.mse_loss(self.project(s_hidden, t_hidden.shape[-2:]), t_hidden.to(s_hidden.dtype))
            parts["kd/hidden"] = mse.detach()
            total = self.w_hidden * mse if total is None else total + self.w_hidden * mse
        assert total is not None  # guaranteed by the weight check
        return total, parts
