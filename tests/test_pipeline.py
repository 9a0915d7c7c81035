"""Stage planning, fingerprints and resume/skip logic (no Ray: stages are faked)."""

import json

import pytest

import tskd.pipeline as pipeline
from tskd.artifacts import MANIFEST
from tskd.config import load_config

CALLS: list[str] = []


def fake_stage(ctx):
    CALLS.append(ctx.name)
    assert not any(ctx.dir.iterdir()), "a stage starts with an empty directory"
    for dep, path in ctx.inputs.items():
        assert (path / MANIFEST).is_file(), f"{ctx.name} ran before its input {dep}"
    (ctx.dir / "out.txt").write_text(ctx.name)
    if ctx.name == "boom" and ctx.params.get("fail"):
        raise RuntimeError("stage failed")
    return {"value": len(CALLS)}


def names(cfg):
    return [s.name for s in pipeline.plan(cfg)]


def test_demo_plan_order_and_inputs():
    cfg = load_config()
    assert names(cfg) == ["data", "teacher_pretrain", "teacher", "transfer", "distill_ts_kd",
                          "student_ts_kd", "distill_ta_kd", "student_ta_kd", "student_scratch",
                          "reference", "evaluate"]
    stages = {s.name: s for s in pipeline.plan(cfg)}
    # the label-only reference reads only the data, and evaluate scores it
    assert stages["reference"].deps == ("data",)
    assert stages["reference"].config["reference"]["arch"] == "basic_unet"
    assert stages["evaluate"].deps[-1] == "reference"
    assert stages["distill_ts_kd"].deps == ("data", "teacher", "transfer")
    # task-agnostic KD reads the un-tuned foundation model, not the LoRA teacher
    assert stages["distill_ta_kd"].deps == ("data", "teacher_pretrain", "transfer")
    assert stages["distill_ta_kd"].config["distill"]["w_logits"] == 0.0
    assert stages["distill_ts_kd"].config["distill"]["w_logits"] == 0.2
    assert stages["student_scratch"].deps == ("data",)
    assert stages["student_ts_kd"].deps == ("data", "distill_ts_kd")


def test_plan_with_official_checkpoint_and_subset(tmp_path):
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"x")
    cfg = load_config(None, ["teacher.arch=vit_b", f"teacher.checkpoint={ckpt}",
                             "students=[scratch]"])
    assert names(cfg) == ["data", "teacher", "student_scratch", "reference", "evaluate"]
    cfg = load_config(None, ["teacher.arch=vit_b", f"teacher.checkpoint={ckpt}",
                             "students=[ta_kd]"])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    assert stages["distill_ta_kd"].deps == ("data", "transfer")


def test_reference_off_and_student_arch_in_the_fingerprinted_config():
    cfg = load_config(None, ["reference.arch=none"])
    assert "reference" not in names(cfg)
    assert "reference" not in {s.name: s for s in pipeline.plan(cfg)}["evaluate"].deps
    cfg = load_config(None, ["student.arch=timm_unet", "reference.epochs=3"])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    for name in ("distill_ts_kd", "student_ts_kd", "student_scratch"):
        assert stages[name].config["student"]["arch"] == "timm_unet"
    assert stages["reference"].config["reference"]["epochs"] == 3


def _fake_plan(monkeypatch, fail=False):
    def plan(cfg):
        return [
            pipeline.Stage("a", fake_stage, (), {"x": cfg.distill.epochs}),
            pipeline.Stage("b", fake_stage, ("a",), {"y": cfg.student.img_size}),
            pipeline.Stage("boom", fake_stage, ("b",), {}, {"fail": fail}),
        ]
    monkeypatch.setattr(pipeline, "plan", plan)


def test_resume_skips_complete_stages_and_reruns_changed(tmp_path, monkeypatch):
    CALLS.clear()
    _fake_plan(monkeypatch)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg)
    assert CALLS == ["a", "b", "boom"]
    manifest = json.loads((cfg.run_dir / "b" / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["metrics"] == {"value": 2}
    assert manifest["config"]["student"]["img_size"] == cfg.student.img_size
    assert "torch" in manifest["versions"] and manifest["wall_time_s"] >= 0
    assert manifest["upstream"] == {"a": json.loads((cfg.run_dir / "a" / MANIFEST).read_text())[
        "fingerprint"]}

    CALLS.clear()
    assert pipeline.run_pipeline(cfg)["b"] == {"value": 2}  # metrics come from the manifest
    assert CALLS == []
    # a value only stage b depends on re-runs b and what reads b, not a
    cfg2 = load_config(None, [f"output_dir={tmp_path}", "student.img_size=256"])
    pipeline.run_pipeline(cfg2)
    assert CALLS == ["b", "boom"]
    CALLS.clear()
    pipeline.run_pipeline(cfg2, force=True)
    assert CALLS == ["a", "b", "boom"]


def test_failed_stage_leaves_no_manifest_and_reruns(tmp_path, monkeypatch):
    CALLS.clear()
    _fake_plan(monkeypatch, fail=True)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(RuntimeError, match="stage failed"):
        pipeline.run_pipeline(cfg)
    assert not (cfg.run_dir / "boom" / MANIFEST).exists()
    assert (cfg.run_dir / "a" / MANIFEST).exists()
    CALLS.clear()
    _fake_plan(monkeypatch, fail=False)
    pipeline.run_pipeline(cfg)
    assert CALLS == ["boom"]  # resume: only the interrupted stage runs again


def test_only_runs_the_closure(tmp_path, monkeypatch):
    CALLS.clear()
    _fake_plan(monkeypatch)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg, only=["b"])
    assert CALLS == ["a", "b"]
    with pytest.raises(ValueError, match="unknown stage 'zzz'"):
        pipeline.run_pipeline(cfg, only=["zzz"])
