"""The teacher check stops a run whose teacher predicts only background, and continues when
``check.on_fail`` says so (no Ray: a planner of driver-side stages)."""

from __future__ import annotations

import json

import pytest

from tskd.config import QualityCheckFailed, load_config
from tskd.pipeline import Stage, run_pipeline
from tskd.quality import BackgroundOnly
from tskd.stages import data_stage, quality_check

ARGS = ["data.demo.n_images=20", "data.demo.size=32", "data.image_size=32", "data.n_labels=8",
        "check.baseline_epochs=1"]


def _planner(ran: list[str]):
    def after(ctx):
        ran.append(ctx.name)
        return {}

    def plan(cfg):
        return [Stage("data", data_stage.run, (), {"data": cfg.data.demo.size}),
                Stage("teacher", lambda ctx: {}, ("data",), {}),
                Stage("teacher_check", quality_check.run, ("data", "teacher"),
                      {"check": "c"}, {"model": "teacher"}),
                Stage("distill_ts_kd", after, ("teacher_check",), {})]
    return plan


@pytest.fixture
def broken_teacher(monkeypatch):
    # a deliberately broken teacher: background everywhere
    monkeypatch.setattr(quality_check, "load_checked_model",
                        lambda ctx, num_classes: BackgroundOnly(num_classes))


def test_broken_teacher_stops_the_run(tmp_path, broken_teacher):
    ran: list[str] = []
    cfg = load_config(None, [*ARGS, f"output_dir={tmp_path}"])
    with pytest.raises(QualityCheckFailed) as err:
        run_pipeline(cfg, planner=_planner(ran))
    text = str(err.value)
    assert "teacher check failed: Dice 0.0000" in text and "all-background 0.0000" in text
    assert "tiny scratch U-Net" in text and "predicts no foreground" in text
    assert "(stage teacher_check)" in text and ran == []
    # the verdict is recorded in the check's manifest
    manifest = json.loads((cfg.run_dir / "teacher_check" / "manifest.json").read_text())
    assert manifest["metrics"]["check/passed"] is False


def test_broken_teacher_continues_when_told(tmp_path, broken_teacher):
    ran: list[str] = []
    cfg = load_config(None, [*ARGS, f"output_dir={tmp_path}", "check.on_fail=continue"])
    metrics = run_pipeline(cfg, planner=_planner(ran))
    assert ran == ["distill_ts_kd"]
    assert metrics["teacher_check"]["check/passed"] is False
    assert metrics["teacher_check"]["check/dice"] == 0.0
    results = quality_check.check_results({"teacher_check": cfg.run_dir / "teacher_check"})
    assert results["teacher_check"]["passed"] is False


def test_table_says_the_run_continued_past_a_failed_check():
    from tskd.cli import format_table

    scores = {"dice": 0.1, "hd95": 5.0, "miou": 0.1, "per_class": {"vessel": {"dice": 0.1}}}
    results = {"teacher": scores, "students": {"scratch": scores},
               "checks": {"teacher_check": {"model": "teacher", "dice": 0.0, "floor": 0.18,
                                            "passed": False}},
               "continued_past_failed_checks": ["teacher_check"]}
    table = format_table(results)
    assert "continued past a failed check (teacher_check)" in table
    assert "Dice 0.0000 <= floor 0.1800" in table
