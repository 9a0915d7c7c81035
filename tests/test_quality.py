"""Quality gates (core): floors, verdicts, likely causes, the tiny scratch baseline."""

from __future__ import annotations

import math

import torch

from tskd.quality import (BackgroundOnly, check_against_floor, failure_message, likely_causes,
                          train_baseline)


def test_verdict_needs_dice_strictly_above_every_floor():
    v = check_against_floor("teacher", 0.30, {"all-background": 0.0, "tiny scratch U-Net": 0.31,
                                              "check.min_dice": 0.0},
                            n_images=5, split="validation")
    assert not v["passed"] and v["floor"] == 0.31
    assert check_against_floor("teacher", 0.32, v["floors"], n_images=5,
                               split="validation")["passed"]
    # equal to the floor is not above it: an all-background teacher fails
    assert not check_against_floor("teacher", 0.0, {"all-background": 0.0}, n_images=5,
                                   split="validation")["passed"]
    # nothing to measure (no foreground in the split): passes
    assert check_against_floor("teacher", math.nan, {"all-background": math.nan}, n_images=5,
                               split="validation")["passed"]


def test_message_names_numbers_and_causes_from_the_fingerprint():
    v = check_against_floor("teacher", 0.0, {"all-background": 0.0, "tiny scratch U-Net": 0.184},
                            n_images=3, split="validation")
    fingerprint = {"classes": {"vessel": {"pixel_share": 0.087}, "tip": {"pixel_share": 0.004}}}
    warnings = ["class 'vessel': its structures are 2.0 px wide ... 0.45 px"]
    causes = likely_causes(v, fingerprint, warnings, n_train_labels=8)
    text = failure_message(v, causes)
    for fragment in ("Dice 0.0000", "floor 0.1840", "tiny scratch U-Net 0.1840",
                     "predicts no foreground", "resolution: class 'vessel'", "'tip' covers 0.40%",
                     "only 8 labelled", "check.on_fail=continue"):
        assert fragment in text, fragment
    assert "'vessel' covers" not in text  # 8.7% is not rare


def test_background_only_and_baseline_shapes():
    images = torch.rand(2, 3, 32, 32) * 255
    logits = BackgroundOnly(3)(images).logits
    assert logits.shape == (2, 3, 32, 32) and (logits.argmax(1) == 0).all()
    data = [{"image": torch.rand(3, 32, 32) * 255, "mask": (torch.rand(32, 32) > 0.5).long()}
            for _ in range(4)]
    model = train_baseline(data, num_classes=2, img_size=32, epochs=1, batch_size=2)
    assert not model.training and model(images).logits.shape == (2, 2, 32, 32)
