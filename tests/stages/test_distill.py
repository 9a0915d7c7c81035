"""The distillation stage's teacher targets and per-sample augmentation (no Ray)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tskd.models.sam import SamSegmenter, build_sam
from tskd.stages.distill import TeacherTargets, flip_per_sample


def _teacher(img_size: int = 64) -> SamSegmenter:
    torch.manual_seed(0)
    return SamSegmenter(build_sam("sam_tiny", num_classes=3, img_size=img_size)).eval()


def _images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


def test_teacher_sees_its_own_resolution():
    seg = _teacher(64)
    x = _images(size=32)  # e.g. the transfer set at the student's working size
    logits, hidden = TeacherTargets(seg, need_logits=True)(x)
    up = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    ref = seg(up)
    torch.testing.assert_close(hidden, ref.hidden)
    torch.testing.assert_close(logits, ref.logits)
    assert logits.shape == (2, 3, 16, 16) and hidden.shape == (2, 256, 4, 4)


def test_task_agnostic_teacher_never_runs_its_decoder():
    seg = _teacher()
    calls = []
    seg.sam.mask_decoder.transformer.register_forward_hook(lambda *a: calls.append(1))
    logits, hidden = TeacherTargets(seg, need_logits=False)(_images())
    assert logits is None and calls == []
    torch.testing.assert_close(hidden, seg.encode(_images()))
    TeacherTargets(seg, need_logits=True)(_images())
    assert calls == [1]


def test_blocks_features_are_the_last_block_tokens_before_the_neck():
    seg = _teacher()
    targets = TeacherTargets(seg, need_logits=False, features="blocks")
    assert targets.hidden_dim == seg.sam.image_encoder.neck[0].in_channels == 64
    _, hidden = targets(_images())
    # reference: run the encoder by hand, stopping before the neck
    enc = seg.sam.image_encoder
    x = F.interpolate(_images(), size=(64, 64), mode="bilinear", align_corners=False)
    x = enc.patch_embed((x - seg.sam.pixel_mean) / seg.sam.pixel_std) + enc.pos_embed
    for blk in enc.blocks:
        x = blk(x)
    torch.testing.assert_close(hidden, x.permute(0, 3, 1, 2))


def test_flips_are_drawn_per_sample():
    x = _images(b=64, size=8)
    g = torch.Generator().manual_seed(3)
    out = flip_per_sample(x, g)
    draws = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    for i in range(64):
        torch.testing.assert_close(out[i], x[i].flip(-1) if draws[i] else x[i], rtol=0, atol=0)
    assert 0 < int(draws.sum()) < 64  # both kinds in one batch


def test_unreached_parameters_are_frozen_for_task_agnostic_kd():
    from tskd.losses import KDLoss
    from tskd.models.students import build_student
    from tskd.stages.distill import Distillation, freeze_unreached

    teacher = TeacherTargets(_teacher(32), need_logits=False)
    torch.manual_seed(0)
    student = build_student({"arch": "vit", "model_name": "vit_tiny_patch16_224", "img_size": 32,
                             "patch_size": 16, "decoder_dim": 16, "encoder": "resnet18"}, 3)
    kd = KDLoss(student.hidden_dim, teacher.hidden_dim, w_logits=0.0, w_hidden=1.0,
                normalize=True)
    bundle = Distillation(student, kd)
    state = torch.get_rng_state()
    frozen = set(freeze_unreached(bundle, teacher, 32))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.isnan(kd.var_hidden)  # the probe left the running variance unset
    # reference: what the hidden term cannot reach is the FPN decoder (logits only)
    decoder = {f"student.{n}" for n, _ in student.named_parameters() if n.startswith("decoder.")}
    assert frozen == decoder and decoder
    assert all(not p.requires_grad for n, p in bundle.named_parameters() if n in frozen)
    assert all(p.grad is None for p in bundle.parameters())
