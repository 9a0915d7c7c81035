"""Losses: the supervised segmentation loss and the knowledge-distillation loss.

- :class:`SegLoss`: ``ce_weight · CE + dice_weight · Dice`` (MONAI ``DiceCELoss``; soft Dice over
  softmax probabilities, background included, one value per image and class, averaged).
- :class:`KDLoss`: ``w_logits · L(student logits, teacher logits) + w_hidden · MSE(P(student
  hidden), teacher hidden)`` with a learned 1×1 projection ``P``; ``L`` is MSE or soft-target
  cross-entropy, on logits matched in resolution one of three ways (:data:`LOGITS_TARGETS`) —
  the variants of the paper's Table 8 (presets in ``tskd.config.KD_PRESETS``).

Tensor contract (DEVELOPERS.md): logits ``float32 (B, C, H, W)``, masks ``int64 (B, H, W)``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

__all__ = ["KDLoss", "LOGITS_LOSSES", "LOGITS_TARGETS", "SegLoss"]

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


LOGITS_LOSSES = ("mse", "ce")
"""``mse`` on the logits, or ``ce``: soft-target cross-entropy ``-Σ_c softmax(t)_c ·
log_softmax(s)_c`` over classes (temperature 1), averaged over pixels."""
LOGITS_TARGETS = ("interpolated", "teacher", "squeezed")
"""How the teacher's low-res logits ``(B, C, h, w)`` meet the student's ``(B, C, H, W)``:

- ``interpolated``: the teacher's logits bilinearly upsampled to ``(H, W)`` (TS-KD2, 6-8);
- ``teacher``: "un-interpolated" (TS-KD3): the student's logits average-pooled to ``(h, w)``;
- ``squeezed``: tskd's reading of TS-KD1's "removing the last dimension of masks": the paper gives
  no formula. tskd removes the masks' last (width) axis by averaging over it, after pooling the
  student to ``(h, w)`` as in ``teacher``: both become per-row class profiles ``(B, C, h)``. A
  lossy target, consistent with TS-KD1 scoring lowest of the MSE variants in Table 9.
"""


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def match_logits(student: Tensor, teacher: Tensor, target: str) -> tuple[Tensor, Tensor]:
    """Bring student ``(B, C, H, W)`` and teacher ``(B, C, h, w)`` logits to one shape, as
    :data:`LOGITS_TARGETS` describes: ``(B, C, H, W)``, ``(B, C, h, w)`` or ``(B, C, h)``."""
    teacher = teacher.to(student.dtype)
    if target == "interpolated":
        return student, _resize(teacher, student.shape[-2:])
    pooled = student if student.shape[-2:] == teacher.shape[-2:] else F.adaptive_avg_pool2d(
        student, teacher.shape[-2:])
    if target == "teacher":
        return pooled, teacher
    if target == "squeezed":
        return pooled.mean(-1), teacher.mean(-1)
    raise ValueError(f"unknown logits target {target!r}; allowed: {LOGITS_TARGETS}")


def soft_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean over (B, spatial) of -Σ_c softmax(teacher)_c · log_softmax(student)_c``; the class
    axis is dim 1 of ``(B, C, ...)``."""
    return -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()


class KDLoss(nn.Module):
    """Logit + hidden-state distillation loss; holds the learned projection ``P``.

    ``P`` is a 1×1 convolution ``student_dim -> teacher_dim``. The student's hidden grid is
    resized to the teacher's grid by bilinear interpolation (``align_corners=False``). A 1×1
    conv and bilinear interpolation are both linear and the interpolation weights sum to 1, so
    the two commute exactly (bias included); the code applies ``P`` on whichever grid is
    smaller (fewer FLOPs) — the result equals ``resize(P(hidden))`` up to float rounding.

    Args:
        student_dim: channels ``Ds`` of the student hidden map.
        teacher_dim: channels ``Dt`` of the teacher hidden map.
        w_logits: weight of the logits term (0 = task-agnostic KD: the term is not computed).
        w_hidden: weight of the hidden-state MSE (0: the term and ``P`` are not used).
        logits_loss: ``mse`` or ``ce`` (:data:`LOGITS_LOSSES`).
        logits_target: how the resolutions meet (:data:`LOGITS_TARGETS`).
        normalize: divide each MSE term by a running estimate of its target's variance (an EMA
            with ``momentum``, started at the first batch's value), so that the weights mean the
            same across teachers and datasets. The CE term is a cross-entropy over
            probabilities and is not normalised.

    ``forward(student, teacher) -> (total, parts)``:

    - ``student``: ``(logits (B, C, H, W), hidden (B, Ds, Hs, Ws))`` (e.g. a ``StudentOutput``),
    - ``teacher``: ``(logits (B, C, h, w), hidden (B, Dt, Ht, Wt))`` (e.g. a ``TeacherOutput``),
      detached here;
    - ``total``: scalar ``w_logits · L(match(s_logits, t_logits)) / v_logits + w_hidden ·
      mean((resize(P(s_hidden)) - t_hidden)²) / v_hidden`` with ``v = 1`` unless ``normalize``;
    - ``parts``: the **unweighted, un-normalised, detached** terms under ``"kd/logits"`` and
      ``"kd/hidden"``; a term whose weight is 0 is not computed, its key is absent and its
      tensors are not read (they may be ``None``).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, w_logits: float = 0.2,
                 w_hidden: float = 0.1, logits_loss: str = "mse",
                 logits_target: str = "interpolated", normalize: bool = False,
                 momentum: float = 0.99) -> None:
        super().__init__()
        if w_logits < 0 or w_hidden < 0 or (w_logits == 0 and w_hidden == 0):
            raise ValueError(f"KD weights must be >= 0 and not both 0, got w_logits={w_logits}, w_hidden={w_hidden}")
        if logits_loss not in LOGITS_LOSSES:
            raise ValueError(f"unknown logits loss {logits_loss!r}; allowed: {LOGITS_LOSSES}")
        if logits_target not in LOGITS_TARGETS:
            raise ValueError(f"unknown logits target {logits_target!r}; allowed: {LOGITS_TARGETS}")
        self.w_logits = float(w_logits)
        self.w_hidden = float(w_hidden)
        self.logits_loss = logits_loss
        self.logits_target = logits_target
        self.normalize = normalize
        self.momentum = momentum
        self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)
        # running variances of the targets (NaN until the first batch); buffers, so DDP keeps
        # them equal across ranks and they are saved with the state
        self.register_buffer("var_logits", torch.tensor(float("nan")))
        self.register_buffer("var_hidden", torch.tensor(float("nan")))

    def project(self, hidden: Tensor, size: Sequence[int]) -> Tensor:
        """``P`` + bilinear resize: ``(B, Ds, Hs, Ws) -> (B, Dt, *size)``."""
        if hidden.shape[-2] * hidden.shape[-1] <= size[0] * size[1]:
            return _resize(self.proj(hidden), size)
        return self.proj(_resize(hidden, size))

    @torch.no_grad()
    def _running_var(self, name: str, target: Tensor) -> Tensor:
        """Update and return the EMA of ``target``'s variance held in buffer ``name``."""
        var = target.float().var()
        buf = getattr(self, name)
        if self.training or torch.isnan(buf):
            buf.copy_(var if torch.isnan(buf) else self.momentum * buf + (1 - self.momentum) * var)
        return buf.clamp_min(1e-12)

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
            s, t = match_logits(s_logits, t_logits, self.logits_target)
            if self.logits_loss == "ce":
                term = soft_cross_entropy(s, t)
            else:
                term = F.mse_loss(s, t)
            parts["kd/logits"] = term.detach()
            if self.normalize and self.logits_loss == "mse":
                term = term / self._running_var("var_logits", t)
            total = self.w_logits * term
        if self.w_hidden > 0:
            t_hidden = teacher[1].detach()
            if s_hidden.shape[0] != t_hidden.shape[0] or t_hidden.shape[1] != self.proj.out_channels:
                raise ValueError(f"hidden shapes do not fit the projection {self.proj.in_channels}->"
                                 f"{self.proj.out_channels}: student {tuple(s_hidden.shape)}, "
                                 f"teacher {tuple(t_hidden.shape)}")
            t_hidden = t_hidden.to(s_hidden.dtype)
            term = F.mse_loss(self.project(s_hidden, t_hidden.shape[-2:]), t_hidden)
            parts["kd/hidden"] = term.detach()
            if self.normalize:
                term = term / self._running_var("var_hidden", t_hidden)
            total = self.w_hidden * term if total is None else total + self.w_hidden * term
        assert total is not None  # guaranteed by the weight check
        return total, parts
