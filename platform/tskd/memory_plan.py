"""``tskd plan``: per-worker memory of distillation for each teacher placement, before any run.

For a config and a number of workers ``N`` it sizes, per worker and per teacher architecture
(the configured teacher, and the demo's SAM through ``vit_h``):

- **teacher**: the frozen, LoRA-merged teacher's weights — ``replicated``: all of them on every
  worker; ``sharded`` (ZeRO-3): ``1/N`` of them plus the largest encoder block gathered for its
  forward; ``cached``: none (its targets are read from disk);
- **teacher activations**: the peak of one no-grad forward at the distillation batch size — the
  widest tensors of SAM's ViT: a global-attention block's score matrix ``B·heads·s²`` (SAM's
  attention materialises it, plus its relative-position term of the same size) and the block's
  token activations ``≈ 10·B·s·D``; none when ``cached``;
- **student**: weights, gradients and AdamW state (``16`` bytes per parameter in fp32 and in
  bf16 mixed precision: weights 2 + gradients 2 + fp32 master 4 + Adam 8), gradients and
  optimiser state split ``1/N`` under ZeRO-2;
- **student activations**: measured, not modelled: the bytes autograd saves for backward in one
  training forward of the real student at batch 1 (``torch.autograd.graph.saved_tensors_hooks``),
  times the batch size;
- **cache on disk** (``cached``): fp16 teacher logits ``C·(T/4)²`` and hidden states ``256·(T/16)²``
  (``neck``; the encoder width for ``blocks``) per transfer image and view (2 views: the image
  and its horizontal flip, the two views distillation draws).

Parameter counts come from the models themselves, built on PyTorch's ``meta`` device (no memory,
no weights), so they are exact; the activation figures are estimates (see above). Core layer:
plain PyTorch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PLACEMENTS = ("replicated", "sharded", "cached")
"""``distill.teacher_placement`` values the plan sizes."""

PLAN_TEACHERS = ("sam_demo", "vit_b", "vit_l", "vit_h")
"""The teachers every plan lists besides the configured one."""

CACHE_VIEWS = 2
"""Teacher targets cached per transfer image: the image and its horizontal flip."""

BYTES_PER_STUDENT_PARAM = 16
"""Weights + gradients + AdamW (fp32; bf16 mixed keeps an fp32 master copy: the same 16)."""


@dataclass(frozen=True)
class TeacherSize:
    arch: str
    img_size: int
    params: int
    largest_block_params: int
    tokens: int
    embed_dim: int
    heads: int
    hidden_dim: int
    """Channels of the hidden-state target (256 after the neck, else the encoder width)."""
    logits_size: int


@dataclass(frozen=True)
class PlacementRow:
    """One line of the plan: bytes per worker (and on disk for ``cached``)."""

    arch: str
    img_size: int
    placement: str
    teacher_bytes: int
    teacher_activation_bytes: int
    student_bytes: int
    student_activation_bytes: int
    cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.teacher_bytes + self.teacher_activation_bytes + self.student_bytes
                + self.student_activation_bytes)


def dataset_classes(cfg: Any) -> int:
    """Classes ``C`` (background included) of an ``ExperimentConfig``'s dataset: its
    ``dataset.json``, or the built-in demo's labels."""
    from pathlib import Path

    if cfg.data.root is not None:
        from tskd.data.format import load_dataset_info

        return load_dataset_info(Path(cfg.data.root).expanduser()).num_classes
    if cfg.data.demo.kind == "vessels":
        from tskd.data.demo_vessels import VESSELS_LABELS

        return len(VESSELS_LABELS)
    from tskd.data.demo import DEMO_LABELS

    return len(DEMO_LABELS)


def cache_bytes(t: "TeacherSize", num_classes: int, n_images: int) -> int:
    """Bytes on disk of one arm's target cache: fp16 logits ``C·(T/4)²`` and hidden states
    ``D·(T/16)²`` per image and view, :data:`CACHE_VIEWS` views."""
    per_view = 2 * (num_classes * t.logits_size ** 2 + t.hidden_dim * t.tokens)
    return per_view * CACHE_VIEWS * n_images


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def teacher_size(arch: str, img_size: int, num_classes: int, *,
                 teacher_features: str = "neck") -> TeacherSize:
    """Sizes of SAM ``arch`` at ``img_size`` for ``num_classes``, from a ``meta``-device build."""
    from tskd.models.sam import SAM_ARCHS, build_sam

    spec = SAM_ARCHS[arch]
    with torch.device("meta"):
        sam = build_sam(arch, num_classes=num_classes, img_size=img_size)
    blocks = sam.image_encoder.blocks
    grid = img_size // 16
    return TeacherSize(
        arch=arch, img_size=img_size, params=count_params(sam),
        largest_block_params=max(count_params(b) for b in blocks),
        tokens=grid * grid, embed_dim=spec.encoder_embed_dim, heads=spec.encoder_num_heads,
        hidden_dim=256 if teacher_features == "neck" else spec.encoder_embed_dim,
        logits_size=img_size // 4)


def teacher_activation_bytes(t: TeacherSize, batch: int, dtype_bytes: int) -> int:
    """Peak of one no-grad teacher forward (see the module docstring)."""
    attention = 2 * batch * t.heads * t.tokens * t.tokens * dtype_bytes  # scores + rel-pos term
    tokens = 10 * batch * t.tokens * t.embed_dim * dtype_bytes
    return attention + tokens


def student_activation_bytes(student: nn.Module, img_size: int) -> int:
    """Bytes autograd saves for backward in one training forward at batch 1 (measured; the
    parameters it saves are counted with the weights, not here)."""
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    student.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(torch.rand(1, 3, img_size, img_size) * 255)
    del out
    return sum(seen.values())


def plan(cfg: Any, workers: int | None = None, *, zero_stage: int = 0,
         teachers: tuple[str, ...] = PLAN_TEACHERS, num_classes: int = 2) -> list[PlacementRow]:
    """The plan of an ``ExperimentConfig`` ``cfg`` with ``workers`` (default ``ray.num_workers``).

    Args:
        zero_stage: the student's ZeRO stage (2: gradients and optimiser state split ``1/N``).
        teachers: architectures listed besides the configured teacher (official ones at 1024 px,
            the small ones at the configured size).
        num_classes: ``C`` (the dataset's classes, background included).
    """
    from tskd.config import to_dict
    from tskd.models.sam import OFFICIAL_IMG_SIZE, SAM_ARCHS
    from tskd.models.students import build_student

    n = workers or cfg.ray.num_workers
    dtype_bytes = 2 if cfg.ray.use_gpu else 4  # bf16 on GPUs, fp32 on CPU
    batch = cfg.distill.batch_size
    student = build_student(to_dict(cfg.student), num_classes)
    p_s = count_params(student)
    shard = n if zero_stage >= 2 else 1
    student_bytes = p_s * 4 + p_s * (BYTES_PER_STUDENT_PARAM - 4) // shard
    act_s = student_activation_bytes(student, cfg.student.img_size) * batch
    archs = [(cfg.teacher.arch, cfg.teacher.img_size)]
    for arch in teachers:
        size = OFFICIAL_IMG_SIZE if arch in ("vit_b", "vit_l", "vit_h") else cfg.teacher.img_size
        if (arch, size) not in archs and arch in SAM_ARCHS:
            archs.append((arch, size))
    rows = []
    for arch, size in archs:
        t = teacher_size(arch, size, num_classes, teacher_features=cfg.distill.teacher_features)
        weights = t.params * dtype_bytes
        act_t = teacher_activation_bytes(t, batch, dtype_bytes)
        cache = cache_bytes(t, num_classes, cfg.transfer.n_images)
        for placement in PLACEMENTS:
            teacher = {"replicated": weights,
                       "sharded": -(-weights // n) + t.largest_block_params * dtype_bytes,
                       "cached": 0}[placement]
            rows.append(PlacementRow(arch, size, placement, teacher,
                                     0 if placement == "cached" else act_t, student_bytes,
                                     act_s, cache if placement == "cached" else 0))
    return rows


def format_plan(rows: list[PlacementRow], workers: int) -> str:
    """The plan as a fixed-width table (MiB per worker; the cache in MiB on disk)."""
    mib = 2 ** 20
    head = (f"{'teacher':<9} {'px':>5} {'placement':<11} {'teacher':>9} {'t-act':>9} "
            f"{'student':>9} {'s-act':>9} {'total':>9} {'cache':>10}")
    lines = [f"per-worker memory with {workers} worker(s), MiB (cache: on disk)", head]
    for r in rows:
        lines.append(f"{r.arch:<9} {r.img_size:>5} {r.placement:<11} "
                     f"{r.teacher_bytes / mib:>9.1f} {r.teacher_activation_bytes / mib:>9.1f} "
                     f"{r.student_bytes / mib:>9.1f} {r.student_activation_bytes / mib:>9.1f} "
                     f"{r.total_bytes / mib:>9.1f} "
                     f"{(r.cache_bytes / mib if r.placement == 'cached' else 0):>10.1f}")
    return "\n".join(lines)
