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
    apply_lora(seg, LoraSpec(rank=4))
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
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=r))) == enc + dec
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=r, decoder=False))) == enc
    assert count_trainable(apply_lora(_tiny(), LoraSpec(rank=8, encoder=False))) == 2 * dec


def test_vit_b_encoder_count_matches_stack_notes() -> None:
    seg = SamSegmenter(build_sam("vit_b", num_classes=3, img_size=64))
    apply_lora(seg, LoraSpec(rank=4, decoder=False))
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


def test_merge_gives_identical_outputs_and_plain_linears() -> None:
    seg = _tiny()
    reference_keys = list(seg.state_dict())
    k_rows = [b.attn.qkv.weight[64:128].detach().clone() for b in seg.sam.image_encoder.blocks]
    apply_lora(seg, LoraSpec(rank=4))
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
    torch.testing.assert_close(merged.logits, adapted.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.hidden, adapted.hidden, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path: Path) -> None:
    spec = LoraSpec(rank=4, alpha=4.0)
    seg = apply_lora(_tiny(seed=0), spec)
    _perturb_adapters(seg)
    x = _images()
    with torch.no_grad():
        expected = seg(x).logits
    path = save_lora(seg, tmp_path / "lora.pt")

    full = tmp_path / "full.pth"
    torch.save(_tiny(seed=0).state_dict(), full)
    assert path.stat().st_size < full.stat().st_size / 20
    assert set(lora_state_dict(seg)) == {n for n, p in seg.named_parameters() if p.requires_grad}

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
