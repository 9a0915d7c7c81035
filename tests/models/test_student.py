"""Student: shapes, parameter count, hidden = timm's final normed tokens, gradients, loading."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from tskd.models import student as student_mod
from tskd.models.student import Student, StudentOutput

# SAM's pixel mean/std (= ImageNet's, scaled to 0..255), written out independently of the code
SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded; one intra-op thread (the 2 shared cores are oversubscribed otherwise)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("img_size,patch", [(128, 16), (256, 16), (128, 8), (256, 8)])
def test_output_shapes(img_size: int, patch: int) -> None:
    m = Student(4, img_size, patch_size=patch).eval()
    x = torch.rand(1, 3, img_size, img_size) * 255
    with torch.no_grad():
        out = m(x)
    assert isinstance(out, StudentOutput)
    g = img_size // patch
    assert out.logits.shape == (1, 4, img_size, img_size)
    assert out.hidden.shape == (1, 192, g, g)
    assert m.hidden_dim == 192 and m.grid_size == (g, g)
    assert torch.isfinite(out.logits).all()


def test_param_count_at_256() -> None:
    m = Student(4, 256)
    n = sum(p.numel() for p in m.parameters())
    assert 5_000_000 <= n <= 7_000_000, n


def test_logits_at_input_resolution_when_resized() -> None:
    m = Student(3, 128).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 100, 120) * 255)
    assert out.logits.shape == (2, 3, 100, 120)
    assert out.hidden.shape == (2, 192, 8, 8)


def test_hidden_is_final_normed_tokens() -> None:
    m = Student(3, 64).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        out = m(x)
        tokens = m.backbone.forward_features((x - SAM_MEAN) / SAM_STD)  # (B, prefix + N, D)
    npre = m.backbone.num_prefix_tokens
    assert npre == 1
    ref = tokens[:, npre:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.hidden, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [3, -4, 0])
def test_hidden_block_is_that_blocks_normed_tokens(block: int) -> None:
    """``hidden_block=k``: the hidden map is block k's output tokens through the final norm,
    computed by hand block by block; the logits are the same as the default student's."""
    m = Student(3, 64, hidden_block=block).eval()
    default = Student(3, 64).eval()
    default.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 64, 64) * 255
    bb = m.backbone
    with torch.no_grad():
        out = m(x)
        t = bb.norm_pre(bb._pos_embed(bb.patch_embed((x - SAM_MEAN) / SAM_STD)))
        for i, blk in enumerate(bb.blocks):
            t = blk(t)
            if i == block % len(bb.blocks):
                kept = bb.norm(t)
        ref = kept[:, 1:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(out.hidden, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, default(x).logits)
    assert not torch.allclose(out.hidden, default(x).hidden)


@pytest.mark.parametrize("head_stride", [8, 16])
def test_head_stride_sets_the_logits_grid(head_stride: int) -> None:
    """The head makes its logits at ``head_stride`` (pyramid levels from there to 2p) and the
    output is that map upsampled bilinearly to the input size."""
    m = Student(3, 64, head_stride=head_stride, decoder_dim=32).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        low, hidden = m.features(m.preprocess(x))
        out = m(x)
    assert m.decoder.finest_stride == head_stride
    assert low.shape == (2, 3, 64 // head_stride, 64 // head_stride)
    # levels at strides head_stride .. 16 (x2 each), plus the max-pooled 32
    assert len(m.decoder.stages) == {8: 3, 16: 2}[head_stride]
    torch.testing.assert_close(out.logits, F.interpolate(low, size=(64, 64), mode="bilinear",
                                                         align_corners=False))
    default = Student(3, 64, decoder_dim=32)
    n = sum(p.numel() for p in m.decoder.parameters())
    assert n < sum(p.numel() for p in default.decoder.parameters())


def test_hidden_block_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"hidden_block 12 is outside the 12 blocks.*-12 \.\. 11"):
        Student(3, 64, hidden_block=12)


def test_gradient_flows_to_all_parameters() -> None:
    m = Student(3, 64)
    out = m(torch.rand(2, 3, 64, 64) * 255)
    (out.logits.square().mean() + out.hidden.square().mean()).backward()
    # the cls token is dropped from the outputs but reaches the spatial tokens through attention
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.decoder.head[-1].weight.grad.abs().sum() > 0


def test_load_backbone_state_dict_roundtrip_and_errors() -> None:
    src, dst = Student(3, 64).eval(), Student(3, 64).eval()
    sd = src.backbone.state_dict()
    dst.load_backbone_state_dict(sd)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(dst(x).hidden, src(x).hidden)
    broken = dict(sd)
    del broken["pos_embed"]
    with pytest.raises(ValueError, match="pos_embed"):
        dst.load_backbone_state_dict(broken)
    with pytest.raises(ValueError, match="extra.weight"):
        dst.load_backbone_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cls_token"):
        dst.load_backbone_state_dict({**sd, "cls_token": torch.zeros(1, 1, 7)})


def test_pretrained_goes_through_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real = timm.create_model

    def spy(name: str, **kwargs):
        calls.append({"name": name, **kwargs})
        return real(name, **{**kwargs, "pretrained": False})  # nothing can be downloaded here

    monkeypatch.setattr(student_mod.timm, "create_model", spy)
    Student(3, 64, pretrained=True)
    assert calls == [{"name": "vit_tiny_patch16_224", "pretrained": True, "img_size": 64, "patch_size": 16,
                      "num_classes": 0}]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Student(1, 64)
    with pytest.raises(ValueError):
        Student(3, 60, patch_size=16)


def test_inference_path_equals_forward_with_resize_outside():
    """StudentInference on the image resized to img_size (antialiased bilinear, 0..255), then one
    bilinear upsampling of the low-res logits = Student.forward's logits on the original image."""
    from tskd.models.student import StudentInference

    torch.manual_seed(0)
    student = Student(3, 64).eval()
    images = torch.rand(2, 3, 50, 90) * 255
    with torch.no_grad():
        ref = student(images).logits
        small = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False,
                              antialias=True)
        for channels_last in (False, True):
            low = StudentInference(student, channels_last=channels_last)(small)
            assert low.shape == (2, 3, 16, 16)
            up = F.interpolate(low, size=(50, 90), mode="bilinear", align_corners=False)
            assert (up - ref).abs().max().item() < 1e-4
