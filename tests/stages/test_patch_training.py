"""Patch training in the fine-tuning loop and sliding-window evaluation at full resolution:
the student learns on 48-px crops of 96-px images and is scored on the whole 96-px test images
(prediction shape = image shape; Dice against MONAI's sliding window and a numpy Dice)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tskd.stages.supervised as supervised
from tskd.config import to_dict



def _data(tmp_path):
    from tskd.data.demo import write_demo_dataset
    from tskd.data.format import make_splits, validate_dataset

    root = write_demo_dataset(tmp_path / "d", n_images=8, size=96, seed=0)
    info = validate_dataset(root, n_labels=4, n_val=1, seed=0)
    return info, make_splits(info, n_labels=4, n_val=1, seed=0)


def _student(num_classes):
    """A small network in the student contract (MONAI BasicUNet, features 16..128, at 32 px:
    :func:`tskd.quality.tiny_unet`): the loop is the students', the model kept fast."""
    from tskd.quality import tiny_unet

    torch.manual_seed(0)
    return tiny_unet(num_classes, 32)


def test_student_trains_on_patches_and_is_scored_at_full_resolution(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from tskd.config import EngineConfig
    from tskd.data.format import read_case
    from tskd.data.patches import PatchDataset
    from tskd.stages.engine import build_engine
    from tskd.stages.evaluate import score_on_originals

    info, splits = _data(tmp_path)
    config = {"info": info, "labelled": list(splits.labelled), "val": list(splits.val),
              "image_size": 96, "patch": 48, "fg_fraction": 1 / 3, "augment": False,
              "seed": 0}
    train_set, val_set = supervised.labelled_sets(config)
    assert isinstance(train_set, PatchDataset) and len(train_set) == 4 * len(splits.labelled)
    shapes = {tuple(train_set[i]["image"].shape) for i in range(len(train_set))}
    assert shapes == {(3, 48, 48)} and val_set[0]["image"].shape == (3, 96, 96)

    calls: list[dict] = []
    monkeypatch.setattr(supervised, "report", calls.append)
    monkeypatch.setattr(supervised, "checkpoint",
                        lambda m, *, engine, epoch, loop, output: calls.append(m))
    monkeypatch.setattr(supervised, "resume", lambda engine, tag: (1, {}, None))
    monkeypatch.setattr(supervised, "is_rank_zero", lambda: True)
    student = _student(info.num_classes)
    loader = DataLoader(train_set, batch_size=6, shuffle=True)
    engine = build_engine(student, to_dict(EngineConfig()), lr=1e-3, weight_decay=0.0,
                          batch_size=6, steps_per_epoch=len(loader), epochs=1,
                          device=torch.device("cpu"))
    supervised.fit_supervised(engine, loader, val_set, info=info, epochs=1,
                              device=torch.device("cpu"), seed=0, checkpoint_every=1,
                              state_fn=lambda m: {}, tag="student", window=48)
    assert len(calls) == 1 and 0.0 <= calls[0]["val/dice"] <= 1.0
    student.eval()

    test = list(splits.test)[:1]
    scores = score_on_originals(student, info, test, 96, 2, window=48)
    # independent reference: MONAI's sliding window over the student's upsampled logits, and
    # the Dice per image and class by numpy on the full-resolution prediction
    from monai.inferers import sliding_window_inference

    def predictor(x):
        out = student(x).logits
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    per_class: dict[int, list[float]] = {c: [] for c in range(1, info.num_classes)}
    for case in test:
        image, mask = read_case(info, case)
        x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None]
        with torch.no_grad():
            logits = sliding_window_inference(x, roi_size=(48, 48), sw_batch_size=4,
                                              predictor=predictor, overlap=0.25,
                                              mode="gaussian")
        pred = logits.argmax(1)[0].numpy()
        assert pred.shape == mask.shape == (96, 96)
        for c in per_class:
            p, g = pred == c, mask == c
            if p.any() or g.any():  # tskd convention: both empty = not counted
                per_class[c].append(2 * (p & g).sum() / (p.sum() + g.sum()))
    means = [np.mean(v) for v in per_class.values() if v]
    assert scores["dice"] == pytest.approx(float(np.mean(means)), abs=1e-6)
    assert scores["n_images"] == 1


@pytest.mark.slow
def test_student_stage_on_patches_through_ray(tmp_path, ray_local):
    """student_finetune.run under Ray Train with data.patch_size < data.image_size: the worker
    trains on crops (4 per image and epoch) and validates by sliding window."""
    from tskd.artifacts import StageContext
    from tskd.config import load_config
    from tskd.data.fingerprint import resolve_image_size
    from tskd.stages import data_stage, student_finetune

    cfg = resolve_image_size(load_config(None, [
        f"output_dir={tmp_path}", "data.demo.n_images=20", "data.demo.size=64",
        "data.image_size=64", "data.patch_size=32", "data.n_labels=6",
        "student.img_size=32", "student.patch_size=8", "student.decoder_dim=16",
        "student_finetune.epochs=1", "student_finetune.batch_size=4",
        "ray.cpus_per_worker=0.5", "ray.torch_threads=1"]))
    assert cfg.data.patches and cfg.data.patch == 32
    data_dir, out = tmp_path / "data", tmp_path / "student_scratch"
    data_dir.mkdir()
    out.mkdir()
    metrics = data_stage.run(StageContext("data", data_dir, {}, cfg))
    assert metrics["data/patch_size"] == 32
    result = student_finetune.run(StageContext("student_scratch", out, {"data": data_dir}, cfg,
                                               params={"arm": "scratch"}))
    assert result["student/best_epoch"] == 1 and 0.0 <= result["val/dice"] <= 1.0
