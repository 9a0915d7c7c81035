"""Tests for tskd.lora: q/v-only adapters, freezing, parameter counts, merge, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention
from torch import nn

from tskd.lora import (
    LoraSpec,
    load_lora_state_dict,
    QVLoRALinear,
    apply_lora,
    count_trainable,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
    state_dict_mb,
)
from tskd.models.sam import SamSegmenter, build_sam, save_sam_checkpoint

IMG = 64


def _tiny(seed: int = 0, num_classes: int = 3) -> SamSegmenter:
    torch.manual_seed(seed)
    return SamSegmenter(build_sam("sam_tiny", num_classes=num_classes, img_size=IMG)).eval()


def _images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)) * 255.0


def _perturb_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _decoder_attention_names(seg: SamSegmenter) -> list[str]:
    return [
        f"sam.mask_decoder.{n}" for n, m in seg.sam.mask_decoder.named_modules() if isinstance(m, Attention)
    ]


def test_only_adapter_params_trainable() -> None:
    seg = _tiny()
    attn_names = _decoder_attention_names(seg)
    depth = len(seg.sam.image_encoder.blocks)
    apply_lora(seg, LoraSpec(rank=4, decoder="lora"))
    expected = {
        f"sam.image_encoder.blocks.{i}.attn.qkv.lora_{ab}_{qv}.weight"
        for i in range(depth)
        for ab in "AB"
        for qv in "qv"
    } | {
        f"{a}.{proj}.lora_{ab}.default.weight"
        for a in attn_names
        for proj in ("q_proj", "v_proj")
        for ab in "AB"
    } | {"sam.mask_decoder.mask_tokens.weight"} | {
        # one hypernetwork MLP per class; token 0 (SAM's single-mask output) is never used
        f"sam.mask_decoder.output_hypernetworks_mlps.{t}.layers.{i}.{w}"
        for t in (1, 2, 3)
        for i in range(3)
        for w in ("weight", "bias")
    }
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert len(attn_names) == 2 * 3 + 1  # 2 two-way blocks x 3 attentions + final attention
    assert all(isinstance(b.attn.qkv, QVLoRALinear) for b in seg.sam.image_encoder.blocks)


def test_trainable_count_by_hand_sam_tiny() -> None:
    r = 4
    # Encoder: width 64, 2 blocks; q and v each get A (r x 64) and B (64 x r).
    enc = 2 * (2 * r * (64 + 64))
    # Decoder (width 256): self-attn q/v 256->256; the three cross-attentions use 256->128.
    dec = 2 * (2 * r * (256 + 256) + 2 * 2 * r * (256 + 128)) + 2 * r * (256 + 128)
    assert dec == 23_552
    # decoder="lora" also trains the 4 mask tokens (256-d) and the hypernetwork MLPs of the 3
    # classes (256->256->256->32, with biases).
    classes = 4 * 256 + 3 * ((256 * 256 + 256) * 2 + 256 * 32 + 32)
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=r, decoder="lora"))) == enc + dec + classes
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=r, decoder="frozen"))) == enc
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=8, encoder=False, decoder="lora"))) \
        == 2 * dec + classes
    # decoder="full" trains every decoder weight except the IoU head and token 0's MLP, plus the
    # prompt encoder's no-mask embedding.
    seg = _tiny()
    dec_all = sum(p.numel() for p in seg.sam.mask_decoder.parameters())
    unused = sum(p.numel() for p in seg.sam.mask_decoder.iou_prediction_head.parameters()) + sum(
        p.numel() for p in seg.sam.mask_decoder.output_hypernetworks_mlps[0].parameters())
    assert count_trainable(apply_lora(seg, LoraSpec(rank=r))) == enc + dec_all - unused + 256


def test_vit_b_encoder_count_matches_stack_notes() -> None:
    seg = SamSegmenter(build_sam("vit_b", num_classes=3, img_size=64))
    apply_lora(seg, LoraSpec(rank=4, decoder="frozen"))
    assert count_trainable(seg) == 3_072 * 4 * 12 == 147_456


def test_fresh_adapter_changes_nothing() -> None:
    seg = _tiny()
    x = _images()
    with torch.no_grad():
        before = seg(x)
        apply_lora(seg, LoraSpec(rank=4, alpha=8.0))
        after = seg(x)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.hidden, after.hidden)


def test_k_slice_untouched_q_v_changed() -> None:
    seg = _tiny()
    originals = {
        i: (b.attn.qkv.weight.detach().clone(), b.attn.qkv.bias.detach().clone())
        for i, b in enumerate(seg.sam.image_encoder.blocks)
    }
    spec = LoraSpec(rank=2, alpha=3.0)
    apply_lora(seg, spec)
    _perturb_adapters(seg)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        b.attn.qkv.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0], out)))
        for i, b in enumerate(seg.sam.image_encoder.blocks)
    ]
    with torch.no_grad():
        seg(_images())
    for h in hooks:
        h.remove()
    assert set(seen) == set(originals)
    for i, (x, out) in seen.items():
        w, bias = originals[i]
        plain = F.linear(x, w, bias)  # the original qkv Linear on the same input
        d = w.shape[0] // 3
        torch.testing.assert_close(out[..., d : 2 * d], plain[..., d : 2 * d], rtol=0, atol=0)
        qkv = seg.sam.image_encoder.blocks[i].attn.qkv
        dq = x @ (qkv.lora_B_q.weight @ qkv.lora_A_q.weight).T * (3.0 / 2)
        dv = x @ (qkv.lora_B_v.weight @ qkv.lora_A_v.weight).T * (3.0 / 2)
        assert dq.abs().max() > 1e-3 and dv.abs().max() > 1e-3
        torch.testing.assert_close(out[..., :d], plain[..., :d] + dq, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out[..., 2 * d :], plain[..., 2 * d :] + dv, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("decoder", ["full", "lora", "frozen"])
def test_merge_gives_identical_outputs_and_plain_linears(decoder: str) -> None:
    seg = _tiny()
    reference_keys = list(seg.state_dict())
    k_rows = [b.attn.qkv.weight[64:128].detach().clone() for b in seg.sam.image_encoder.blocks]
    apply_lora(seg, LoraSpec(rank=4, decoder=decoder))
    _perturb_adapters(seg)
    x = _images()
    with torch.no_grad():
        adapted = seg(x)
        merged_model = merge_lora(seg)
        merged = merged_model(x)
    assert not any(isinstance(m, QVLoRALinear) for m in merged_model.modules())
    assert all(
        type(m.q_proj) is nn.Linear and type(m.v_proj) is nn.Linear
        for m in merged_model.sam.mask_decoder.modules()
        if isinstance(m, Attention)
    )
    assert list(merged_model.state_dict()) == reference_keys
    for b, k in zip(merged_model.sam.image_encoder.blocks, k_rows):
        assert torch.equal(b.attn.qkv.weight[64:128], k)
    # float rounding only: the tolerance scales with the logits (trained decoder weights are
    # perturbed too, which makes them larger)
    scale = max(1.0, float(adapted.logits.abs().max()))
    torch.testing.assert_close(merged.logits, adapted.logits, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(merged.hidden, adapted.hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", ["full", "lora", "frozen"])
def test_save_load_round_trip(tmp_path: Path, decoder: str) -> None:
    spec = LoraSpec(rank=4, alpha=4.0, decoder=decoder)
    seg = apply_lora(_tiny(seed=0), spec)
    _perturb_adapters(seg)
    x = _images()
    with torch.no_grad():
        expected = seg(x).logits
    path = save_lora(seg, tmp_path / "lora.pt")

    full = tmp_path / "full.pth"
    torch.save(_tiny(seed=0).state_dict(), full)
    if decoder == "frozen":  # adapters alone: a small file
        assert path.stat().st_size < full.stat().st_size / 20
    # the file holds exactly what was trained, and its size is what state_dict_mb reports
    sd = lora_state_dict(seg)
    assert set(sd) == {n for n, p in seg.named_parameters() if p.requires_grad}
    assert state_dict_mb(sd) == pytest.approx(
        4 * sum(p.numel() for p in seg.parameters() if p.requires_grad) / 2**20)

    torch.manual_seed(123)  # different adapter init, same base weights (seed 0)
    fresh = apply_lora(_tiny(seed=0), spec)
    load_lora(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, expected, rtol=0, atol=0)

    # A model without adapters gets them from the file's spec.
    bare = load_lora(_tiny(seed=0), path)
    with torch.no_grad():
        torch.testing.assert_close(bare(x).logits, expected, rtol=0, atol=0)


def test_load_mismatch_names_file(tmp_path: Path) -> None:
    seg = apply_lora(_tiny(), LoraSpec(rank=4))
    path = save_lora(seg, tmp_path / "r4.pt")
    with pytest.raises(ValueError, match="r4.pt"):
        load_lora(apply_lora(_tiny(), LoraSpec(rank=8)), path)
    with pytest.raises(ValueError, match="r4.pt"):
        load_lora(_tiny(num_classes=4), path)


def test_save_sam_checkpoint_after_merge(tmp_path: Path) -> None:
    seg = apply_lora(_tiny(), LoraSpec(rank=2))
    _perturb_adapters(seg)
    with pytest.raises(ValueError, match="merge"):
        save_sam_checkpoint(seg.sam, tmp_path / "x.pth")
    merge_lora(seg)
    path = save_sam_checkpoint(seg.sam, tmp_path / "x.pth")
    reloaded = build_sam("sam_tiny", num_classes=3, img_size=IMG, checkpoint=path).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in seg.sam.state_dict().items())


def test_apply_twice_rejected() -> None:
    seg = apply_lora(_tiny(), LoraSpec())
    with pytest.raises(ValueError):
        apply_lora(seg, LoraSpec())


def test_state_dict_through_a_wrapper_and_strict_keys() -> None:
    seg = apply_lora(_tiny(), LoraSpec(rank=2))
    _perturb_adapters(seg)

    class Wrapper(nn.Module):  # stands in for DDP / a DeepSpeed engine
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    sd = lora_state_dict(Wrapper(seg))
    assert sd.keys() == lora_state_dict(seg).keys() and not any(k.startswith("module.") for k in sd)
    other = apply_lora(_tiny(), LoraSpec(rank=2))
    load_lora_state_dict(other, sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(other, {f"module.{k}": v for k, v in sd.items()})


@pytest.mark.parametrize("decoder", ["full", "lora"])
def test_every_class_decoder_path_gets_gradients_with_five_classes(decoder: str) -> None:
    """CHAOS has 5 classes (4 organs + background): more than official SAM's 3 multimask
    tokens, so tokens 4-5 and their hypernetwork MLPs start from a random init. Each class's
    path must train: its mask token row and its hypernetwork MLP receive non-zero gradients."""
    c = 5
    seg = apply_lora(_tiny(num_classes=c), LoraSpec(rank=2, decoder=decoder)).train()
    _perturb_adapters(seg)  # non-zero B so that every adapter's A gets a gradient too
    target = torch.randint(0, c, (2, IMG // 4, IMG // 4), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(seg(_images()).logits, target).backward()
    dec = seg.sam.mask_decoder
    tokens = dec.mask_tokens.weight.grad
    assert tokens is not None and tokens.shape[0] == c + 1
    for k in range(c):  # class k is mask token k + 1 (token 0 is SAM's single-mask output)
        assert tokens[k + 1].abs().sum() > 0, f"class {k}: mask token has no gradient"
        for p in dec.output_hypernetworks_mlps[k + 1].parameters():
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"class {k}"
    # every trained weight gets a gradient: nothing DDP would call unused
    no_grad = [n for n, p in seg.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []


def test_frozen_decoder_trains_only_encoder_adapters() -> None:
    seg = apply_lora(_tiny(num_classes=5), LoraSpec(rank=2, decoder="frozen")).train()
    _perturb_adapters(seg)
    seg(_images()).logits.square().mean().backward()
    assert all(p.grad is None for p in seg.sam.mask_decoder.parameters())
    trained = {n for n, p in seg.named_parameters() if p.grad is not None}
    assert trained and all(".attn.qkv.lora_" in n for n in trained)


def test_bad_decoder_mode_rejected() -> None:
    with pytest.raises(ValueError, match="decoder mode"):
        apply_lora(_tiny(), LoraSpec(decoder="half"))


@pytest.mark.parametrize("decoder", ["full", "lora", "frozen"])
def test_merged_plan_gives_merge_loras_weights_without_building_adapters(
        tmp_path: Path, decoder: str) -> None:
    """The key-by-key plan (what a ZeRO-3-partitioned teacher is filled from) equals the
    reference: build the SAM from its checkpoint, apply, load and merge the adapters. The
    checkpoint is at another input size and class count, so positions are resized and class
    rows adapted on the way."""
    from tskd.lora import plan_merged_lora
    from tskd.models.sam import plan_sam_state_dict

    torch.manual_seed(5)
    ckpt = tmp_path / "base.pth"
    torch.save(build_sam("sam_tiny", num_classes=2, img_size=32).state_dict(), ckpt)
    spec = LoraSpec(rank=2, alpha=3.0, decoder=decoder)
    torch.manual_seed(0)
    seg = apply_lora(SamSegmenter(build_sam("sam_tiny", num_classes=4, img_size=IMG,
                                            checkpoint=ckpt)), spec)
    _perturb_adapters(seg)
    adapters = lora_state_dict(seg)
    want = merge_lora(seg).state_dict()

    torch.manual_seed(0)  # the same fresh rows for the classes the checkpoint lacks
    skeleton = SamSegmenter(build_sam("sam_tiny", num_classes=4, img_size=IMG))
    base, adapted = plan_sam_state_dict(skeleton.sam, torch.load(ckpt), source=str(ckpt))
    assert any("pos_embed" in a for a in adapted) and any("first 3 rows" in a for a in adapted)
    plan = plan_merged_lora({f"sam.{k}": v for k, v in base.items()}, adapters, spec)
    current = skeleton.state_dict()
    assert set(plan) == set(want)
    for key, value in want.items():
        assert torch.equal(plan[key](current[key]), value), key

    with pytest.raises(ValueError, match="lora.pt"):
        plan_merged_lora(base, adapters, spec, source="lora.pt")  # keys without "sam."
