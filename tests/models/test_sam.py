"""Tests for tskd.models.sam against segment_anything's own modules and hand computations."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from tskd.models.sam import SAM_ARCHS, SamSegmenter, build_sam, save_sam_checkpoint

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 255.0


def _reference_logits(sam: Sam, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image forward through the official modules: encoder, prompt encoder, MaskDecoder.forward."""
    x = (images - MEAN) / STD
    logits, hidden = [], []
    for i in range(x.shape[0]):
        emb = sam.image_encoder(x[i : i + 1])
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = sam.mask_decoder(
            image_embeddings=emb,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        logits.append(masks)
        hidden.append(emb)
    return torch.cat(logits), torch.cat(hidden)


def _randomise_positional(sam: Sam, seed: int = 0) -> None:
    """pos_embed and rel_pos are zero-initialised: fill them so resizing is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc = sam.image_encoder
        enc.pos_embed.copy_(torch.randn(enc.pos_embed.shape, generator=g) * 0.05)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.1)
            blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.1)


def test_unknown_arch_lists_allowed() -> None:
    with pytest.raises(ValueError) as e:
        build_sam("vit_x", num_classes=3, img_size=64)
    for name in ("vit_b", "vit_l", "vit_h", "sam_tiny", "sam_demo"):
        assert name in str(e.value)


def test_shapes_and_properties() -> None:
    torch.manual_seed(0)
    sam = build_sam("sam_tiny", num_classes=5, img_size=128)
    # segment_anything's own decoder: multimask_output=True drops token 0 -> exactly C masks.
    emb = torch.randn(1, 256, 8, 8)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    masks, iou = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
    assert masks.shape == (1, 5, 32, 32) and iou.shape == (1, 5)

    seg = SamSegmenter(sam)
    assert (seg.num_classes, seg.img_size, seg.hidden_dim) == (5, 128, 256)
    with torch.no_grad():
        out = seg(_images(3, 128))
    assert out.logits.shape == (3, 5, 32, 32) and out.hidden.shape == (3, 256, 8, 8)
    assert out.logits.dtype == torch.float32
    pred = seg.predict(_images(2, 100))  # resized to 128 inside, upsampled back to 100
    assert pred.shape == (2, 5, 100, 100)


def test_batched_forward_equals_official_per_image() -> None:
    torch.manual_seed(1)
    sam = build_sam("sam_tiny", num_classes=4, img_size=128)
    _randomise_positional(sam)
    seg = SamSegmenter(sam).eval()
    x = _images(3, 128, seed=1)
    with torch.no_grad():
        out = seg(x)
        ref_logits, ref_hidden = _reference_logits(sam, x)
    torch.testing.assert_close(out.hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)

    # Inputs of another size are resized bilinearly to img_size first.
    x2 = _images(2, 96, seed=2)
    with torch.no_grad():
        out2 = seg(x2)
        ref2, _ = _reference_logits(sam, F.interpolate(x2, size=(128, 128), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out2.logits, ref2, rtol=1e-5, atol=1e-5)


def test_demo_preset_size() -> None:
    spec = SAM_ARCHS["sam_demo"]
    assert (spec.encoder_embed_dim, spec.encoder_depth, spec.encoder_num_heads) == (384, 8, 6)
    sam = build_sam("sam_demo", num_classes=3, img_size=128)
    n = sum(p.numel() for p in sam.parameters())
    assert 3 * 5.5e6 < n < 25e6


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An official vit_b state dict (random weights, non-zero positional tables) written with torch.save."""
    torch.manual_seed(2)
    ref = sam_model_registry["vit_b"](checkpoint=None)
    _randomise_positional(ref)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b.pth"
    sd = ref.state_dict()
    torch.save(sd, path)
    return path, sd


def test_official_vit_b_loads_exactly(vit_b_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ref_sd = vit_b_file
    sam = build_sam("vit_b", num_classes=3, img_size=1024, checkpoint=path)
    sd = sam.state_dict()
    assert list(sd) == list(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k


def test_official_vit_b_at_192_matches_resized_reference(
    vit_b_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, ref_sd = vit_b_file
    # 192 px: 12x12 tokens fit in one 14x14 window (256 px would pad to 28x28 and cost 3x more).
    sam = build_sam("vit_b", num_classes=3, img_size=192, checkpoint=path)
    blocks = sam.image_encoder.blocks
    for i, blk in enumerate(blocks):
        expected = 23 if i in (2, 5, 8, 11) else 27  # global: 2*12-1; windowed: 2*14-1
        assert blk.attn.rel_pos_h.shape == (expected, 64), i
        if i not in (2, 5, 8, 11):
            assert torch.equal(blk.attn.rel_pos_h, ref_sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"])

    # Reference: the official model, pos_embed resized here by hand; its global-attention blocks
    # keep the 127-long tables, which segment_anything's get_rel_pos interpolates at run time.
    ref = sam_model_registry["vit_b"](checkpoint=None)
    ref.load_state_dict(ref_sd)
    pos = ref_sd["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    ref.image_encoder.pos_embed = torch.nn.Parameter(pos)
    ref.prompt_encoder.image_embedding_size = (12, 12)

    x = _images(1, 192, seed=3)  # one image: batching is tested on sam_tiny
    with torch.no_grad():
        out = SamSegmenter(sam)(x)
        ref_logits, ref_hidden = _reference_logits(ref, x)
    assert out.logits.shape == (1, 3, 48, 48) and out.hidden.shape == (1, 256, 12, 12)
    torch.testing.assert_close(out.hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_wrong_arch_into_vit_b(tmp_path: Path) -> None:
    tiny = build_sam("sam_tiny", num_classes=3, img_size=64)
    path = save_sam_checkpoint(tiny, tmp_path / "tiny.pth")
    with pytest.raises(ValueError) as e:
        build_sam("vit_b", num_classes=3, img_size=64, checkpoint=path)
    msg = str(e.value)
    assert "vit_b" in msg and "sam_tiny" in msg and str(path) in msg
    assert "image_encoder.patch_embed.proj.weight" in msg  # a mismatching key with shapes
    assert "(64, 3, 16, 16)" in msg and "(768, 3, 16, 16)" in msg


def test_fake_vit_l_dict_is_named(tmp_path: Path) -> None:
    # Only the shapes that identify vit_l: width 1024, 24 blocks, head dim 64.
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    for i in range(24):
        sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = torch.zeros(27, 64)
    path = tmp_path / "fake_vit_l.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as e:
        build_sam("sam_tiny", num_classes=3, img_size=64, checkpoint=path)
    msg = str(e.value)
    assert "vit_l" in msg and "sam_tiny" in msg and "fake_vit_l.pth" in msg


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="junk.pth"):
        build_sam("sam_tiny", num_classes=3, img_size=64, checkpoint=path)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_wrapped_checkpoints(tmp_path: Path, wrapper: str | None) -> None:
    torch.manual_seed(3)
    src = build_sam("sam_tiny", num_classes=3, img_size=64)
    sd = src.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 1}, path)
    loaded = build_sam("sam_tiny", num_classes=3, img_size=64, checkpoint=path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_save_sam_checkpoint_is_plain_official_format(
    tmp_path: Path, vit_b_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    sam = build_sam("sam_tiny", num_classes=3, img_size=64)
    path = save_sam_checkpoint(sam, tmp_path / "sub" / "t.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert type(raw) is dict and list(raw) == list(sam.state_dict())
    # The keys of segment_anything's own vit_b, restricted to sam_tiny's two encoder blocks.
    _, official = vit_b_file
    official_keys = [
        k for k in official
        if not k.startswith("image_encoder.blocks.") or int(k.split(".")[2]) < 2
    ]
    assert list(raw) == official_keys


@pytest.mark.parametrize("num_classes", [2, 5])
def test_class_count_mismatch_copies_fitting_rows(
    tmp_path: Path, num_classes: int, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(4)
    src = build_sam("sam_tiny", num_classes=3, img_size=64)  # 4 mask tokens, like official SAM
    path = save_sam_checkpoint(src, tmp_path / "three.pth")
    src_sd = src.state_dict()

    torch.manual_seed(5)
    fresh = build_sam("sam_tiny", num_classes=num_classes, img_size=64).state_dict()
    torch.manual_seed(5)  # same seed: the rows the checkpoint cannot fill keep this fresh init
    with caplog.at_level(logging.INFO, logger="tskd.models.sam"):
        sam = build_sam("sam_tiny", num_classes=num_classes, img_size=64, checkpoint=path)
    sd = sam.state_dict()
    n_tok, n = num_classes + 1, min(num_classes, 3) + 1
    assert "mask_decoder.mask_tokens.weight" in caplog.text

    tok = sd["mask_decoder.mask_tokens.weight"]
    assert tok.shape == (n_tok, 256)
    assert torch.equal(tok[:n], src_sd["mask_decoder.mask_tokens.weight"][:n])
    assert torch.equal(tok[n:], fresh["mask_decoder.mask_tokens.weight"][n:])
    for name in ("weight", "bias"):
        key = f"mask_decoder.iou_prediction_head.layers.2.{name}"
        assert sd[key].shape[0] == n_tok
        assert torch.equal(sd[key][:n], src_sd[key][:n])
        assert torch.equal(sd[key][n:], fresh[key][n:])
    for i in range(n_tok):
        key = f"mask_decoder.output_hypernetworks_mlps.{i}.layers.0.weight"
        assert torch.equal(sd[key], (src_sd if i < n else fresh)[key]), i
    # Everything not class-specific comes from the checkpoint.
    for k, v in src_sd.items():
        if "mask_tokens" in k or "iou_prediction_head.layers.2" in k or "hypernetworks" in k:
            continue
        assert torch.equal(sd[k], v), k
    # Logits have the new class count.
    with torch.no_grad():
        assert SamSegmenter(sam)(_images(1, 64)).logits.shape == (1, num_classes, 16, 16)
