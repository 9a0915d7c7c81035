"""tskd.export and `tskd export`: ONNX/TorchScript exports give PyTorch's logits (checked with
onnxruntime against the plain ``Student.forward``), dynamic batch, metadata, int8, model card;
the teacher export is a LoRA-merged official-format SAM checkpoint (weights checked against
base + B·A computed by hand)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from tskd.cli import main
from tskd.export import export_student
from tskd.models.student import Student
from tskd.predict import ModelError, load_model


def student_of(run, arm="ts_kd"):
    cfg = json.loads((run / f"student_{arm}" / "manifest.json").read_text())["config"]["student"]
    s = Student(3, cfg["img_size"], model_name=cfg["model_name"], patch_size=cfg["patch_size"],
                decoder_dim=cfg["decoder_dim"])
    s.load_state_dict(torch.load(run / f"student_{arm}" / "student.pt", weights_only=True))
    return s.eval()


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student.onnx"
    return export_student(tiny_run, "onnx", out, int8=True)


def test_onnx_matches_pytorch_with_dynamic_batch(tiny_run, onnx_export):
    student = student_of(tiny_run)
    session = ort.InferenceSession(str(onnx_export.path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.rand(batch, 3, 64, 64) * 255
        low = session.run(None, {"images": x.numpy()})[0]
        assert low.shape == (batch, 3, 16, 16)
        up = F.interpolate(torch.from_numpy(low), size=(64, 64), mode="bilinear",
                           align_corners=False)
        with torch.no_grad():
            ref = student(x).logits
        assert (up - ref).abs().max().item() < 1e-3
        assert (up.argmax(1) == ref.argmax(1)).float().mean().item() > 0.999
    assert onnx_export.max_logit_diff < 1e-3 and onnx_export.mask_agreement > 0.999


def test_onnx_metadata_sidecar_and_model_card(tiny_run, onnx_export):
    props = {p.key: p.value for p in onnx.load(str(onnx_export.path)).metadata_props}
    meta = json.loads(props["tskd"])
    assert meta["img_size"] == 64 and meta["class_names"] == ["background", "organ", "lesion"]
    assert meta["pixel_mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255], rel=1e-6)
    assert meta["tskd_version"]
    assert json.loads(onnx_export.path.with_suffix(".json").read_text()) == meta
    card = onnx_export.path.with_suffix(".md").read_text()
    size_mb = onnx_export.path.stat().st_size / 2**20
    assert f"File size: {size_mb:.1f} MB" in card
    assert "| organ | 0.6000 | 2.00 | 0.5000 |" in card
    assert "Labelled training images (label budget): 4" in card
    assert "$" not in card  # every placeholder filled
    assert "output `logits (B, C, 16,\n  16)`" in card


def test_int8_export_reports_dice_change(onnx_export):
    assert onnx_export.int8_path.is_file()
    assert set(onnx_export.dice) == {"fp32", "int8"}
    assert 0.0 <= onnx_export.dice["int8"] <= 1.0
    assert onnx_export.int8_path.stat().st_size < 0.5 * onnx_export.path.stat().st_size
    assert load_model(onnx_export.int8_path).meta.img_size == 64


def test_torchscript_export_via_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "student.pt"
    assert main(["export", str(tiny_run), str(out), "--format", "torchscript",
                 "--student", "scratch"]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    module = torch.jit.load(str(out))
    x = torch.rand(3, 3, 64, 64) * 255
    with torch.no_grad():
        up = F.interpolate(module(x), size=(64, 64), mode="bilinear", align_corners=False)
        ref = student_of(tiny_run, "scratch")(x).logits
    assert (up - ref).abs().max().item() < 1e-3
    assert load_model(out).kind == "torchscript"


def test_export_rejects_wrong_inputs(tiny_run, onnx_export, tmp_path):
    with pytest.raises(ModelError, match="PyTorch student"):
        export_student(onnx_export.path, "onnx", tmp_path / "x.onnx")
    with pytest.raises(ModelError, match="must end in .onnx"):
        export_student(tiny_run, "onnx", tmp_path / "x.pt")
    with pytest.raises(ModelError, match="allowed: onnx, torchscript"):
        export_student(tiny_run, "tflite", tmp_path / "x.tflite")


def _teacher_run(tmp_path, arch, img_size, num_classes):
    """A run dir with a completed teacher stage: base checkpoint + trained-looking LoRA."""
    from tskd.lora import LoraSpec, apply_lora, lora_state_dict
    from tskd.models.sam import SamSegmenter, build_sam, save_sam_checkpoint

    torch.manual_seed(0)
    base = save_sam_checkpoint(build_sam(arch, num_classes=num_classes, img_size=img_size),
                               tmp_path / "base.pth")
    model = apply_lora(SamSegmenter(build_sam(arch, num_classes=num_classes, img_size=img_size,
                                              checkpoint=base)), LoraSpec(rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    stage = tmp_path / "run" / "teacher"
    stage.mkdir(parents=True)
    lora = lora_state_dict(model)
    torch.save(lora, stage / "lora.pt")
    (stage / "teacher.json").write_text(json.dumps({
        "arch": arch, "num_classes": num_classes, "img_size": img_size,
        "base_checkpoint": str(base), "lora": {"rank": 2, "alpha": None, "dropout": 0.0}}))
    return stage.parent, base, lora


def _expected_qkv(base_sd, lora, block):
    """Merged encoder qkv weight of one block, by hand: base + [B_q A_q; 0; B_v A_v] (alpha=rank)."""
    w = base_sd[f"image_encoder.blocks.{block}.attn.qkv.weight"].clone()
    d = w.shape[0] // 3
    pre = next(k for k in lora if f"blocks.{block}.attn.qkv.lora_A_q" in k).rsplit("lora_A_q", 1)[0]
    w[:d] += lora[pre + "lora_B_q.weight"] @ lora[pre + "lora_A_q.weight"]
    w[2 * d:] += lora[pre + "lora_B_v.weight"] @ lora[pre + "lora_A_v.weight"]
    return w


def test_teacher_export_is_merged_official_layout(tmp_path, capsys):
    from tskd.models.sam import build_sam

    run, base, lora = _teacher_run(tmp_path, "sam_tiny", 64, 3)
    out = tmp_path / "teacher.pth"
    assert main(["export", str(run), "--teacher", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    base_sd = torch.load(base, weights_only=True)
    assert set(sd) == set(base_sd)  # official key layout, no adapter keys
    assert torch.allclose(sd["image_encoder.blocks.1.attn.qkv.weight"],
                          _expected_qkv(base_sd, lora, 1), atol=1e-6)
    assert not torch.equal(sd["image_encoder.blocks.1.attn.qkv.weight"],
                           base_sd["image_encoder.blocks.1.attn.qkv.weight"])
    reloaded = build_sam("sam_tiny", num_classes=3, img_size=64, checkpoint=out)
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["loads_with_sam_model_registry"] is False and info["lora_merged"]


@pytest.mark.slow
def test_teacher_export_loads_with_official_registry(tmp_path):
    """vit_b at 1024 px with 3 classes: ``sam_model_registry['vit_b']`` loads it strictly."""
    from segment_anything import sam_model_registry

    run, base, lora = _teacher_run(tmp_path, "vit_b", 1024, 3)
    out = tmp_path / "teacher.pth"
    from tskd.stages.deploy import export_teacher

    assert export_teacher(run, out)["loads_with_sam_model_registry"]
    sam = sam_model_registry["vit_b"](checkpoint=str(out))
    base_sd = torch.load(base, weights_only=True)
    assert torch.allclose(sam.image_encoder.blocks[5].attn.qkv.weight,
                          _expected_qkv(base_sd, lora, 5), atol=1e-6)


def test_core_modules_do_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, tskd.predict, tskd.export; "
            "bad = [m for m in ('ray', 'deepspeed', 'tskd.stages', 'tskd.cli') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
