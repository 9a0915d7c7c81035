"""`tskd plan`: parameter figures against the built models, the per-placement arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tskd.config import load_config, to_dict
from tskd.memory_plan import plan, student_activation_bytes, teacher_size

TINY = ["teacher.arch=sam_tiny", "teacher.img_size=32", "student.img_size=32",
        "student.patch_size=8", "student.decoder_dim=16", "distill.batch_size=4",
        "transfer.n_images=10", "ray.num_workers=2"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_teacher_params_match_the_official_build():
    """vit_b at 1024 px for 3 classes = segment_anything's own vit_b (3 multimask outputs)."""
    from segment_anything import sam_model_registry

    official = sam_model_registry["vit_b"](checkpoint=None)
    t = teacher_size("vit_b", 1024, 3)
    assert t.params == _params(official)
    assert t.largest_block_params == max(_params(b) for b in official.image_encoder.blocks)
    assert (t.tokens, t.embed_dim, t.heads, t.logits_size) == (64 * 64, 768, 12, 256)


def test_student_activation_bytes_of_a_known_net():
    """Conv saves its input (1·3·8·8 fp32 = 768 B; its weight is a parameter: not counted),
    ReLU its output (1·4·8·8 fp32 = 1024 B)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    assert student_activation_bytes(net, 8) == 768 + 1024


def test_plan_arithmetic_per_placement():
    from tskd.models.sam import build_sam
    from tskd.models.students import build_student

    cfg = load_config(None, TINY)
    rows = {(r.arch, r.placement): r for r in plan(cfg, 2, teachers=("sam_tiny",),
                                                    num_classes=3)}
    assert {a for a, _ in rows} == {"sam_tiny"}
    sam = build_sam("sam_tiny", num_classes=3, img_size=32)
    student = build_student(to_dict(cfg.student), 3)
    weights = _params(sam) * 4  # fp32 on CPU
    largest = max(_params(b) for b in sam.image_encoder.blocks) * 4
    assert rows["sam_tiny", "replicated"].teacher_bytes == weights
    assert rows["sam_tiny", "sharded"].teacher_bytes == -(-weights // 2) + largest
    assert rows["sam_tiny", "cached"].teacher_bytes == 0
    assert rows["sam_tiny", "cached"].teacher_activation_bytes == 0
    # fp16 logits (3 × 8 × 8) + neck hidden (256 × 2 × 2) per view, 2 views, 10 images
    assert rows["sam_tiny", "cached"].cache_bytes == 2 * (3 * 64 + 256 * 4) * 2 * 10
    assert rows["sam_tiny", "replicated"].cache_bytes == 0
    for r in rows.values():
        assert r.student_bytes == 16 * _params(student)
        assert r.student_activation_bytes > 0
    zero2 = plan(cfg, 2, zero_stage=2, teachers=(), num_classes=3)[0]
    p = _params(student)
    assert zero2.student_bytes == 4 * p + 12 * p // 2


def test_cli_plan_lists_every_placement(capsys):
    from tskd.cli import main

    assert main(["plan", "--workers", "4", *[a for kv in TINY for a in ("--set", kv)]]) == 0
    out = capsys.readouterr().out
    assert "with 4 worker(s)" in out
    for arch in ("sam_tiny", "sam_demo", "vit_b", "vit_l", "vit_h"):
        rows = [line for line in out.splitlines() if line.startswith(arch + " ")]
        assert [line.split()[2] for line in rows] == ["replicated", "sharded", "cached"], arch
    assert main(["plan", "--workers", "0"]) == 2
