"""Predict and export for every student arch (``vit`` is covered by tests/test_predict.py and
tests/test_export.py) and for the label-only reference stage: random-weight 32 px students in
fake stage directories; masks against ``build_student`` + argmax of the full-size logits,
onnxruntime logits against the PyTorch forward."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tskd.cli import main
from tskd.config import ExperimentConfig, StudentConfig, to_dict
from tskd.export import export_student
from tskd.models.students import CLASS_WEIGHT_KEYS, build_student
from tskd.predict import ModelError, load_model

SIZE = 32
ARCHS = [("timm_unet", "resnet18"), ("basic_unet", None), ("segresnet", None)]


def student_cfg(arch, encoder):
    return to_dict(StudentConfig(arch=arch, encoder=encoder or "resnet18", img_size=SIZE))


def make_stage(root, arch, encoder, *, reference=False, seed=0):
    """A ``student_<arch>`` (or ``reference``) stage directory: manifest + random weights with
    a sharpened last conv so the labels vary; returns (stage dir, model)."""
    cfg = ExperimentConfig()
    cfg.data.image_size = SIZE
    if reference:
        cfg.reference.arch, cfg.reference.img_size = arch, None  # img_size from the data
        if encoder:
            cfg.reference.encoder = encoder
    else:
        cfg.student.arch, cfg.student.img_size = arch, SIZE
        if encoder:
            cfg.student.encoder = encoder
    torch.manual_seed(seed)
    model = build_student(student_cfg(arch, encoder), 3).eval()
    with torch.no_grad():
        model.state_dict()[CLASS_WEIGHT_KEYS[arch]].mul_(20.0)
    stage = root / ("reference" if reference else f"student_{arch}")
    stage.mkdir(parents=True)
    torch.save(model.state_dict(), stage / "student.pt")
    (stage / "manifest.json").write_text(json.dumps({"stage": stage.name, "config": to_dict(cfg)}))
    return stage, model


def write_images(folder):
    rng = np.random.default_rng(1)
    folder.mkdir()
    images = {"a": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)}
    for name, im in images.items():
        Image.fromarray(im).save(folder / f"{name}.png")
    return images


def reference_labels(model, image):
    """Independent reference: the module's own full forward (normalise, resize to img_size,
    logits resized back to the image), argmax."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return model(x).logits[0].argmax(0).numpy()


@pytest.mark.parametrize("arch,encoder,reference", [a + (False,) for a in ARCHS]
                         + [("basic_unet", None, True)])
def test_predict_and_onnx_export_of_each_arch(tmp_path, arch, encoder, reference):
    stage, model = make_stage(tmp_path / "run", arch, encoder, reference=reference)
    images = write_images(tmp_path / "in")
    assert main(["predict", str(stage), str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    for name, im in images.items():
        got = np.array(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
        want = reference_labels(model, im)
        assert got.shape == im.shape[:2]
        assert len(np.unique(want)) > 1
        assert (got == want).mean() > 0.99  # resize-then-normalise vs normalise-then-resize

    meta = load_model(stage).meta
    assert meta.logits_stride == 1 and meta.img_size == SIZE and meta.num_classes == 3
    assert meta.student["arch"] == arch
    report = export_student(stage, "onnx", tmp_path / "exp" / "m.onnx", int8=True)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        ref = model(x).logits.numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (2, 3, SIZE, SIZE)
    assert np.abs(got - ref).max() < 1e-3
    card = report.path.with_suffix(".md").read_text()
    assert ("BasicUNet" if arch == "basic_unet" else "SegResNet" if arch == "segresnet"
            else encoder) in card
    if reference:
        assert "none (trained from random initialisation" in card


def test_weights_of_another_arch_are_rejected_naming_the_keys(tmp_path):
    stage, _ = make_stage(tmp_path / "run", "segresnet", None)
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["config"]["student"]["arch"] = "basic_unet"
    (stage / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"student_segresnet/student.pt.*'basic_unet'.*"
                                         r"missing keys \['net\.conv_0"):
        load_model(stage)


@pytest.mark.parametrize("arch,encoder", [("segresnet", None), ("timm_unet", "convnext_atto")])
def test_torchscript_export_and_low_res_logits(tmp_path, arch, encoder):
    """TorchScript traces the hooked MONAI student too; a timm_unet whose finest encoder map is
    at stride 4 gives logits at stride 2 (upsampled by predict, as the module does itself)."""
    stage, model = make_stage(tmp_path / "run", arch, encoder)
    report = export_student(stage, "torchscript", tmp_path / "exp" / "m.pt")
    scripted = load_model(report.path)
    stride = 2 if encoder == "convnext_atto" else 1
    assert scripted.meta.logits_stride == stride
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    got = torch.from_numpy(scripted.logits(x.numpy()))
    assert got.shape == (2, 3, SIZE // stride, SIZE // stride)
    up = torch.nn.functional.interpolate(got, size=(SIZE, SIZE), mode="bilinear",
                                         align_corners=False)
    with torch.no_grad():
        ref = model(x).logits
    assert (up - ref).abs().max().item() < 1e-3
