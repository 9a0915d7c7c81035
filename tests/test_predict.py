"""tskd.predict and `tskd predict`: model loading, masks at input size, overlays, scores, bad
inputs, Ray Data batch inference. References: the plain ``Student.forward`` on the original image,
hand-computed blends, ``SegmentationMetrics`` on the reference labels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tskd.cli import main
from tskd.data.format import load_dataset_info, read_case
from tskd.metrics import SegmentationMetrics
from tskd.models.student import Student
from tskd.predict import (
    PALETTE,
    ModelError,
    find_inputs,
    load_model,
    load_student_artifact,
    overlay_image,
    predict_items,
)


def reference_labels(run, arm, image: np.ndarray) -> np.ndarray:
    """Labels of the full training-time forward on the original-size image."""
    cfg = json.loads((run / f"student_{arm}" / "manifest.json").read_text())["config"]["student"]
    student = Student(3, cfg["img_size"], model_name=cfg["model_name"],
                      patch_size=cfg["patch_size"], decoder_dim=cfg["decoder_dim"])
    student.load_state_dict(torch.load(run / f"student_{arm}" / "student.pt", weights_only=True))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return student.eval()(x).logits.argmax(1)[0].numpy()


def test_run_dir_picks_best_student_or_named_arm(tiny_run):
    assert load_model(tiny_run).source == tiny_run / "student_ts_kd" / "student.pt"
    assert load_model(tiny_run, student="scratch").source.parent.name == "student_scratch"
    with pytest.raises(ModelError, match="student_nope"):
        load_model(tiny_run, student="nope")


def test_masks_match_training_forward_at_each_input_size(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = [(40, 56), (64, 64), (97, 33)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img{i}.png")
    items, info = find_inputs(folder)
    assert info is None and [it.id for it in items] == ["img0", "img1", "img2"]
    results = predict_items(load_model(tiny_run), items, tmp_path / "out", batch_size=2)
    assert all(r.error is None for r in results)
    for i, im in enumerate(images):
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"img{i}.png"))
        assert mask.shape == im.shape[:2]
        ref = reference_labels(tiny_run, "ts_kd", im)
        assert len(np.unique(ref)) > 1  # the check is not trivial
        assert (mask == ref).mean() > 0.999


def test_overlay_blends_foreground_only():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    out = overlay_image(image, labels, alpha=0.5)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [round(50 + c / 2) for c in PALETTE[1].tolist()]
    assert out[1, 0].tolist() == [round(50 + c / 2) for c in PALETTE[2].tolist()]


def test_cli_dataset_prints_scores_of_reference_labels(tiny_run, tmp_path, capsys):
    root = json.loads((tiny_run / "data" / "splits.json").read_text())["root"]
    rc = main(["predict", str(tiny_run), root, str(tmp_path / "out"), "--overlay",
               "--progress-every", "3"])
    assert rc == 0
    info = load_dataset_info(root)
    ref = SegmentationMetrics(3, class_names=info.class_names, spacing=info.spacing)
    for case in info.case_ids:
        image, mask = read_case(info, case)
        ref.update(torch.from_numpy(reference_labels(tiny_run, "ts_kd", image))[None],
                   torch.from_numpy(mask)[None])
        assert (tmp_path / "out" / "overlays" / f"{case}.png").is_file()
    out = capsys.readouterr().out
    assert f"Dice {ref.aggregate()['dice']:.4f}" in out
    assert "wrote 8 masks" in out
    test_ids = json.loads((tiny_run / "data" / "splits.json").read_text())["test"]
    assert main(["predict", str(tiny_run), root, str(tmp_path / "test"), "--split", "test"]) == 0
    assert sorted(p.stem for p in (tmp_path / "test" / "masks").iterdir()) == sorted(test_ids)
    assert f"({len(test_ids)} images)" in capsys.readouterr().out


def test_unreadable_image_is_reported_and_skipped(tiny_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(folder / "c.jpg")
    rc = main(["predict", str(tiny_run), str(folder), str(tmp_path / "out"), "--batch-size", "3"])
    assert rc == 1
    assert "broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "c.png"]


def test_wrong_model_kinds_are_rejected_with_what_is_expected(tiny_run, tmp_path, capsys):
    from tskd.models.sam import build_sam, save_sam_checkpoint

    sam = save_sam_checkpoint(build_sam("sam_tiny", num_classes=3, img_size=32), tmp_path / "sam.pth")
    (tmp_path / "manifest.json").write_text((tiny_run / "student_ts_kd" / "manifest.json").read_text())
    with pytest.raises(ModelError, match="not a tskd student state dict"):
        load_student_artifact(sam)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="expected a run directory"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "fake.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="ONNX"):
        load_model(tmp_path / "fake.onnx")
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save({"a": torch.zeros(1)}, lone / "student.pt")
    with pytest.raises(ModelError, match="manifest.json"):
        load_model(lone / "student.pt")
    rc = main(["predict", str(tmp_path / "notes.txt"), str(tmp_path), str(tmp_path / "o")])
    assert rc == 2 and "expected a run directory" in capsys.readouterr().err
    with pytest.raises(ModelError, match="allowed: cpu, cuda"):
        load_model(tiny_run, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model(tiny_run, device="cuda")
    # weights that do not fit the manifest's arch: the file, the arch and the missing keys
    unet = tmp_path / "unet"
    unet.mkdir()
    manifest = json.loads((tiny_run / "student_ts_kd" / "manifest.json").read_text())
    manifest["config"]["student"]["arch"] = "basic_unet"
    (unet / "manifest.json").write_text(json.dumps(manifest))
    torch.save({"a": torch.zeros(1)}, unet / "student.pt")
    with pytest.raises(ModelError, match=r"unet/student.pt.*student.arch='basic_unet'.*"
                                         r"missing keys \['net\.conv_0"):
        load_model(unet / "student.pt")


def test_ray_batch_inference_writes_the_same_masks(tiny_run, tmp_path, ray_local):
    from tskd.stages.deploy import predict_with_ray

    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, s in enumerate([(30, 40), (48, 48), (50, 20), (64, 32)]):
        Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)).save(folder / f"x{i}.png")
    (folder / "bad.png").write_bytes(b"nope")
    items, _ = find_inputs(folder)
    results = predict_with_ray(tiny_run, items, tmp_path / "ray", batch_size=2, num_actors=2,
                               cpus_per_actor=0.5, threads=1)
    assert [r.id for r in results] == [it.id for it in items]
    assert [r.id for r in results if r.error] == ["bad"]
    predict_items(load_model(tiny_run), items, tmp_path / "local")
    for i in range(4):
        a = np.asarray(Image.open(tmp_path / "ray" / "masks" / f"x{i}.png"))
        b = np.asarray(Image.open(tmp_path / "local" / "masks" / f"x{i}.png"))
        assert np.array_equal(a, b)


def test_a_patch_trained_student_is_predicted_by_sliding_window(tmp_path):
    """A student whose stage config trained on 32-px patches of 64-px images: predict resizes
    each image to 64 px and slides 32-px windows (reference: the stages' own torch path,
    tskd.evaluation.sliding_window_logits on Student.forward); a whole-image student keeps
    the plain path (no window in its metadata)."""
    import torch.nn.functional as F

    from tskd.config import ExperimentConfig, to_dict
    from tskd.evaluation import sliding_window_logits

    cfg = ExperimentConfig()
    cfg.data.image_size, cfg.data.patch_size = 64, 32
    cfg.student.img_size, cfg.student.patch_size, cfg.student.decoder_dim = 32, 8, 16
    torch.manual_seed(0)
    student = Student(3, 32, patch_size=8, decoder_dim=16)
    with torch.no_grad():
        student.decoder.head[3].weight.mul_(20.0)  # labels that vary
    stage = tmp_path / "run" / "student_scratch"
    stage.mkdir(parents=True)
    torch.save(student.state_dict(), stage / "student.pt")
    (stage / "manifest.json").write_text(json.dumps({"config": to_dict(cfg)}))
    model = load_model(stage)
    assert (model.meta.working_size, model.meta.window) == (64, 32)

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    items, _ = find_inputs(tmp_path / "a.png")
    predict_items(model, items, tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png"))
    x = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(64, 64),
                      mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        logits = sliding_window_logits(student.eval(), x, 32)
    ref = F.interpolate(logits, size=(80, 72), mode="bilinear", align_corners=False).argmax(1)
    assert mask.shape == (80, 72) and len(np.unique(ref)) > 1  # not trivial
    assert (mask == ref[0].numpy()).mean() > 0.999  # float rounding (channels_last inference)

    cfg.data.patch_size = "auto"  # 64-px whole images: no window
    (stage / "manifest.json").write_text(json.dumps({"config": to_dict(cfg)}))
    assert load_model(stage).meta.window is None
