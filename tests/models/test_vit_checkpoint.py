"""Loading a ViT (MAE) checkpoint into the student's backbone: both layouts, interpolated and
skipped embeddings, the report, and mismatches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tskd.models.vit_checkpoint import CheckpointMismatch, load_vit_checkpoint


def _vit(img_size: int, patch: int, dim: int = 32, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=dim, depth=2,
                             num_heads=2, num_classes=0)


def _source(img_size: int = 64, patch: int = 16) -> dict[str, torch.Tensor]:
    sd = _vit(img_size, patch, seed=1).state_dict()
    return {k: v + 0.0 for k, v in sd.items()}


def _write(tmp_path, sd, layout: str):
    """A checkpoint as timm (plain dict + a classifier head) or MAE-lite (``model`` holding
    ``module.model.``-prefixed keys and the MAE decoder) save it."""
    if layout == "timm":
        data = dict(sd, **{"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    else:
        data = {"model": {f"module.model.{k}": v for k, v in sd.items()}
                | {"module.model.mask_token": torch.zeros(1, 1, 16),
                   "module.model.decoder_embed.weight": torch.zeros(16, 32),
                   "module.model.decoder_pred.weight": torch.zeros(768, 16)},
                "epoch": 400}
    path = tmp_path / f"{layout}.pth"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("layout", ["timm", "mae_lite"])
def test_both_layouts_load_with_the_grid_interpolated(tmp_path, layout):
    src = _source(img_size=64, patch=16)  # a 4×4 grid
    path = _write(tmp_path, src, layout)
    student = _vit(32, 16)  # the student's input size: a 2×2 grid
    report = load_vit_checkpoint(student, path, mismatch="interpolate")
    got = student.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight",
                "patch_embed.proj.weight", "cls_token"):
        torch.testing.assert_close(got[key], src[key], rtol=0, atol=0)
    # reference: the class token's position kept, the 4×4 grid resized bicubically to 2×2
    grid = src["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([src["pos_embed"][:, :1], small.permute(0, 2, 3, 1).reshape(1, 4, 32)],
                         dim=1)
    torch.testing.assert_close(got["pos_embed"], expected, rtol=1e-5, atol=1e-6)
    assert report.interpolated == {"pos_embed": "(1, 17, 32) -> (1, 5, 32)"}
    assert report.skipped == {}
    assert len(report.loaded) == len(got) - 1
    dropped = {"timm": ["head.bias", "head.weight"],
               "mae_lite": ["decoder_embed.weight", "decoder_pred.weight", "mask_token"]}[layout]
    assert report.dropped == dropped


def test_skip_leaves_the_first_layer_of_tokens_at_init(tmp_path):
    src = _source(img_size=64, patch=16)
    path = _write(tmp_path, src, "mae_lite")
    student = _vit(32, 8)  # other patch size: a 4×4 grid again, but 8×8 patches
    init = {k: v.clone() for k, v in student.state_dict().items()}
    report = load_vit_checkpoint(student, path, mismatch="skip")
    got = student.state_dict()
    assert set(report.skipped) == {"patch_embed.proj.weight"}
    torch.testing.assert_close(got["patch_embed.proj.weight"], init["patch_embed.proj.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(got["pos_embed"], src["pos_embed"], rtol=0, atol=0)  # fits
    torch.testing.assert_close(got["blocks.1.attn.proj.weight"], src["blocks.1.attn.proj.weight"],
                               rtol=0, atol=0)
    # interpolate instead: the 16×16 kernels resampled to 8×8 (FlexiViT), reported as such
    student = _vit(32, 8)
    report = load_vit_checkpoint(student, path, mismatch="interpolate")
    assert report.interpolated == {"patch_embed.proj.weight": "(32, 3, 16, 16) -> (32, 3, 8, 8)"}
    assert report.skipped == {}
    # FlexiViT's aim: a smooth patch resized to 8×8 gives (nearly) the token the 16×16 patch
    # gave with the original kernel
    w16, w8 = src["patch_embed.proj.weight"], student.state_dict()["patch_embed.proj.weight"]
    g = torch.Generator().manual_seed(0)
    x16 = F.interpolate(torch.randn(50, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    x8 = F.interpolate(x16, size=(8, 8), mode="bilinear", antialias=True)
    r16 = torch.einsum("nchw,dchw->nd", x16, w16).flatten()
    r8 = torch.einsum("nchw,dchw->nd", x8, w8).flatten()
    assert torch.corrcoef(torch.stack([r16, r8]))[0, 1] > 0.95


def test_other_widths_and_missing_keys_are_errors(tmp_path):
    wide = _vit(64, 16, dim=48).state_dict()
    path = tmp_path / "wide.pth"
    torch.save(wide, path)
    with pytest.raises(CheckpointMismatch,
                       match=r"cls_token has shape \(1, 1, 48\).*\(1, 1, 32\)"):
        load_vit_checkpoint(_vit(64, 16), path)
    partial = {k: v for k, v in _source().items() if not k.startswith("blocks.1.")}
    torch.save({"model": partial}, path)
    with pytest.raises(CheckpointMismatch, match=r"lacks.*blocks\.1\."):
        load_vit_checkpoint(_vit(64, 16), path)
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointMismatch, match="not a ViT state dict"):
        load_vit_checkpoint(_vit(64, 16), path)
