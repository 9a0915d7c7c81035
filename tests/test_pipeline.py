"""Stage planning, fingerprints and resume/skip logic (no Ray: stages are faked)."""

import json
import logging
import math
import os
import sys
import threading
import uuid
from types import SimpleNamespace

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
    cfg = load_config(None, ["check.student=true"])
    assert names(cfg) == ["data", "teacher_pretrain", "teacher", "teacher_check", "ddpm",
                          "transfer", "targets_ts_kd", "distill_ts_kd", "check_distill_ts_kd",
                          "student_ts_kd", "targets_ta_kd", "distill_ta_kd", "student_ta_kd",
                          "student_scratch", "reference", "evaluate"]
    stages = {s.name: s for s in pipeline.plan(cfg)}
    # the label-only reference reads only the data, and evaluate scores it
    assert stages["reference"].deps == ("data",)
    assert stages["reference"].config["reference"]["arch"] == "basic_unet"
    assert stages["evaluate"].deps[-3:] == ("reference", "teacher_check", "check_distill_ts_kd")
    # the quality checks: the teacher, and the TS-KD student's distilled logits
    assert stages["teacher_check"].deps == ("data", "teacher")
    assert stages["check_distill_ts_kd"].deps == ("data", "distill_ts_kd")
    assert "on_fail" not in stages["teacher_check"].config["check"]  # reuse the verdict
    assert "check_distill_ts_kd" not in names(load_config(None, ["distill.w_logits=0",
                                                                  "check.student=true"]))
    assert "check_distill_ts_kd" not in names(load_config())  # off by default
    assert not {"teacher_check", "check_distill_ts_kd"} & set(
        names(load_config(None, ["check.enabled=false"])))
    # the demo's targets fit the cache: each distillation reads its arm's cached targets
    assert stages["distill_ts_kd"].deps == ("data", "teacher", "transfer", "targets_ts_kd")
    # task-agnostic KD reads the un-tuned foundation model, not the LoRA teacher
    assert stages["distill_ta_kd"].deps == ("data", "teacher_pretrain", "transfer",
                                            "targets_ta_kd")
    assert stages["distill_ta_kd"].config["distill"]["w_logits"] == 0.0
    assert stages["distill_ts_kd"].config["distill"]["w_logits"] == 0.2
    assert stages["student_scratch"].deps == ("data",)
    assert stages["student_ts_kd"].deps == ("data", "distill_ts_kd")
    # a preset is the values it sets; task-agnostic KD ignores the logits term's settings
    named = {s.name: s for s in pipeline.plan(load_config(None, ["distill.preset=ts_kd8"]))}
    assert named["distill_ts_kd"].config == stages["distill_ts_kd"].config
    ce = {s.name: s for s in pipeline.plan(load_config(None, ["distill.preset=ts_kd4"]))}
    assert ce["distill_ts_kd"].config["distill"]["logits_loss"] == "ce"
    assert ce["distill_ta_kd"].config["distill"] == dict(
        stages["distill_ta_kd"].config["distill"], w_hidden=1.0)
    # the decoder's treatment is part of what the teacher stage depends on
    assert stages["teacher"].config["decoder"] == "full"
    other = {s.name: s for s in pipeline.plan(load_config(None, ["teacher.decoder=lora"]))}
    assert other["teacher"].config["decoder"] == "lora"


def test_plan_with_official_checkpoint_and_subset(tmp_path):
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"x")
    cfg = load_config(None, ["teacher.arch=vit_b", f"teacher.checkpoint={ckpt}",
                             "students=[scratch]"])
    assert names(cfg) == ["data", "teacher", "student_scratch", "reference", "evaluate"]
    cfg = load_config(None, ["teacher.arch=vit_b", f"teacher.checkpoint={ckpt}",
                             "students=[ta_kd]"])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    assert stages["distill_ta_kd"].deps == ("data", "transfer", "targets_ta_kd")
    assert stages["targets_ta_kd"].deps == ("data", "transfer")


def test_reference_off_and_student_arch_in_the_fingerprinted_config():
    cfg = load_config(None, ["reference.arch=none"])
    assert "reference" not in names(cfg)
    assert "reference" not in {s.name: s for s in pipeline.plan(cfg)}["evaluate"].deps
    cfg = load_config(None, ["student.arch=timm_unet", "reference.epochs=3"])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    for name in ("distill_ts_kd", "student_ts_kd", "student_scratch"):
        assert stages[name].config["student"]["arch"] == "timm_unet"
    assert stages["reference"].config["reference"]["epochs"] == 3


@pytest.mark.parametrize("student, lr, weight_decay", [
    (["student.arch=vit"], 1e-4, 0.05),             # the paper's ViT fine-tuning
    (["student.arch=timm_unet"], 1e-3, 1e-4),       # CNNs: as the reference is trained
    (["student.arch=basic_unet"], 1e-3, 1e-4),
    (["student.arch=timm_unet", "student_finetune.lr=3e-4"], 3e-4, 1e-4),  # a number wins
    (["student.arch=vit", "student_finetune.weight_decay=0"], 1e-4, 0.0),
])
def test_student_finetuning_settings_follow_the_architecture(student, lr, weight_decay):
    cfg = load_config(None, student + ["distill.rung_every=1"])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    for arm in ("ts_kd", "scratch"):
        finetune = stages[f"student_{arm}"].config["finetune"]
        assert (finetune["lr"], finetune["weight_decay"]) == (lr, weight_decay)
    # the rungs of a distillation fine-tune as the student stage does
    assert cfg.student_finetune.resolved(cfg.student.arch).lr == lr


def test_auto_finetuning_keeps_the_vit_fingerprints_of_explicit_settings():
    """``auto`` resolves before fingerprinting: a ViT student's stages keep the fingerprints
    they had with the explicit lr 1e-4 / weight decay 0.05 (existing store entries stay valid);
    a CNN student's differ from the same CNN with the ViT's numbers."""
    def fingerprints(overrides):
        cfg = load_config(None, overrides)
        stages = {s.name: s for s in pipeline.plan(cfg)}
        inputs = {"data": SimpleNamespace(fingerprint="d", content_hash="h"),
                  "distill_ts_kd": SimpleNamespace(fingerprint="k", content_hash="h")}
        return pipeline.stage_fingerprint(stages["student_ts_kd"], cfg, inputs)

    explicit = ["student_finetune.lr=0.0001", "student_finetune.weight_decay=0.05"]
    assert fingerprints([]) == fingerprints(explicit)
    cnn = ["student.arch=timm_unet"]
    assert fingerprints(cnn) != fingerprints(cnn + explicit)


def test_baseline_arms_plan_their_init_stages(tmp_path):
    ckpt = tmp_path / "mae_tiny.pth"
    ckpt.write_bytes(b"x")
    cfg = load_config(None, ["students=[scratch, imagenet_mae, mae, mocov3]",
                             f"imagenet_mae.checkpoint={ckpt}", "mae.epochs=2"])
    assert names(cfg) == ["data", "teacher_pretrain", "teacher", "ddpm", "transfer",
                          "student_scratch", "init_imagenet_mae", "student_imagenet_mae",
                          "pretrain_mae", "student_mae", "pretrain_mocov3", "student_mocov3",
                          "reference", "evaluate"]
    stages = {s.name: s for s in pipeline.plan(cfg)}
    # ImageNet-MAE reads only the data (for the classes) and its checkpoint file
    assert stages["init_imagenet_mae"].deps == ("data",)
    assert stages["init_imagenet_mae"].config["imagenet_mae"]["checkpoint"] == str(ckpt)
    # MAE and MoCo v3 pre-train on the transfer set; no teacher
    assert stages["pretrain_mae"].deps == ("data", "transfer")
    assert stages["pretrain_mocov3"].deps == ("data", "transfer")
    assert stages["pretrain_mae"].config["mae"]["epochs"] == 2
    assert "mocov3" not in stages["pretrain_mae"].config
    assert stages["pretrain_mocov3"].params == {"arm": "mocov3"}
    # each fine-tuning reads its init stage, as student_ts_kd reads distill_ts_kd
    for arm, init in [("imagenet_mae", "init_imagenet_mae"), ("mae", "pretrain_mae"),
                      ("mocov3", "pretrain_mocov3")]:
        assert stages[f"student_{arm}"].deps == ("data", init)
        assert stages[f"student_{arm}"].params == {"arm": arm, "init_stage": init}
        assert stages[f"student_{arm}"].config == stages["student_scratch"].config
    assert stages["evaluate"].deps[2:6] == ("student_scratch", "student_imagenet_mae",
                                            "student_mae", "student_mocov3")
    # the checkpoint's identity is in the init stage's fingerprint; num_workers is not
    ext = pipeline.external_inputs(stages["init_imagenet_mae"].config)
    assert list(ext) == ["imagenet_mae.checkpoint"]
    fp = pipeline.stage_fingerprint(stages["init_imagenet_mae"], cfg, {})
    more = load_config(None, ["students=[scratch, imagenet_mae]", f"imagenet_mae.checkpoint={ckpt}",
                              "ray.num_workers=2"])
    assert pipeline.stage_fingerprint({s.name: s for s in pipeline.plan(more)}[
        "init_imagenet_mae"], more, {}) == fp
    # no transfer set (and no DDPM) without an arm that learns from it
    assert not {"ddpm", "transfer"} & set(names(load_config(
        None, ["students=[scratch, imagenet_mae]", f"imagenet_mae.checkpoint={ckpt}"])))


def _ddpm_and_transfer(*overrides):
    """The fingerprints of the ``ddpm`` and ``transfer`` stages of a config (the data entry
    faked: one fingerprint and content hash for every config here)."""
    from tskd.store import Entry

    cfg = load_config(None, ["data.image_size=64", *overrides])
    stages = {s.name: s for s in pipeline.plan(cfg)}
    data = Entry("data", "data-fp", None, {"content_hash": "data-hash"})
    ddpm_fp = pipeline.stage_fingerprint(stages["ddpm"], cfg, {"data": data})
    ddpm = Entry("ddpm", ddpm_fp, None, {"content_hash": f"hash-of-{ddpm_fp}"})
    return ddpm_fp, pipeline.stage_fingerprint(stages["transfer"], cfg,
                                               {"data": data, "ddpm": ddpm})


def test_one_ddpm_for_every_transfer_set_size():
    stages = {s.name: s for s in pipeline.plan(load_config(None, ["data.image_size=64"]))}
    assert stages["ddpm"].deps == ("data",)
    assert stages["transfer"].deps == ("data", "ddpm")
    assert set(stages["ddpm"].config) == {"diffusion", "image_size"}  # whole images
    ddpm, transfer = _ddpm_and_transfer()
    # the transfer set's size, its sampling and its near-copy filter: the same DDPM
    for other in (["transfer.n_images=50"], ["transfer.num_actors=2"],
                  ["transfer.sample_batch_size=4", "transfer.near_copy_psnr=25"],
                  ["ray.num_workers=3"]):  # the DDPM trains on one worker
        d2, t2 = _ddpm_and_transfer(*other)
        assert d2 == ddpm, other
        assert (t2 != transfer) == (other != ["ray.num_workers=3"]), other
    # the DDPM's own settings and what it trains on: another DDPM, hence another transfer set
    for other in (["transfer.diffusion.train_steps=10"], ["transfer.diffusion.n_augmented=50"],
                  ["data.image_size=32"], ["seed=1"]):
        d2, t2 = _ddpm_and_transfer(*other)
        assert d2 != ddpm and t2 != transfer, other
    # patch training: the crops' side and foreground share are the DDPM's too
    patched = {s.name: s for s in pipeline.plan(load_config(
        None, ["data.image_size=64", "data.patch_size=32", "data.fg_fraction=0.5"]))}
    assert patched["ddpm"].config["patch_size"] == 32
    assert patched["ddpm"].config["fg_fraction"] == 0.5
    # real unlabelled images only: no DDPM at all
    unl = {s.name: s for s in pipeline.plan(load_config(None, ["transfer.sources=[unlabelled]"]))}
    assert "ddpm" not in unl and unl["transfer"].deps == ("data",)
    both = {s.name: s for s in pipeline.plan(load_config(
        None, ["transfer.sources=[unlabelled, synthetic]"]))}
    assert both["transfer"].deps == ("data", "ddpm")


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


# ---------------------------------------------------------------- stale downstream artifacts

def token_stage(ctx):
    """``a`` writes a fresh random token (a non-deterministic build); ``b`` copies a's token."""
    CALLS.append(ctx.name)
    if ctx.name == "a":
        (ctx.dir / "out.txt").write_text(uuid.uuid4().hex)
        if CRASH_A:
            raise RuntimeError("a crashed")
    else:
        (ctx.dir / "copy.txt").write_text((ctx.inputs["a"] / "out.txt").read_text())
    return {}


CRASH_A = False  # outside the stage's config: a crash must not change its fingerprint


def _token_plan(monkeypatch, crash=False):
    monkeypatch.setattr(sys.modules[__name__], "CRASH_A", crash)
    monkeypatch.setattr(pipeline, "plan", lambda cfg: [
        pipeline.Stage("a", token_stage, (), {"x": 1}),
        pipeline.Stage("b", token_stage, ("a",), {"y": 2})])


def _consistent(cfg) -> bool:
    return ((cfg.run_dir / "b" / "copy.txt").read_text()
            == (cfg.run_dir / "a" / "out.txt").read_text())


def test_forced_upstream_rebuild_invalidates_downstream(tmp_path, monkeypatch):
    """``--force --only a`` re-builds a with new content: b must not be reused afterwards."""
    _token_plan(monkeypatch)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg)
    assert _consistent(cfg)
    pipeline.run_pipeline(cfg, force=True, only=["a"])
    CALLS.clear()
    pipeline.run_pipeline(cfg)
    assert CALLS == ["b"]
    assert _consistent(cfg)


def test_crashed_upstream_rerun_never_mixes_with_stale_downstream(tmp_path, monkeypatch):
    """A forced re-build of a (same fingerprint) that crashes half-way, then a normal run: a and
    b stay consistent (the old code had wiped a, re-ran it and kept the stale b)."""
    _token_plan(monkeypatch)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg)
    _token_plan(monkeypatch, crash=True)
    with pytest.raises(RuntimeError, match="a crashed"):
        pipeline.run_pipeline(cfg, force=True)
    _token_plan(monkeypatch)
    pipeline.run_pipeline(cfg)
    assert _consistent(cfg)


# ---------------------------------------------------------------- the shared store

def test_runs_share_store_entries_and_keep_a_view(tmp_path, monkeypatch):
    """A second experiment with the same stage configs builds nothing; each run's directory
    has stages.json, links into the store and its own results.json."""
    def stage(ctx):
        CALLS.append(ctx.name)
        if ctx.name == "evaluate":
            (ctx.dir / "results.json").write_text('{"dice": 0.5}')
            (ctx.cfg.run_dir / "results.json").write_text('{"dice": 0.5}')
        return {"n": 1}

    monkeypatch.setattr(pipeline, "plan", lambda cfg: [
        pipeline.Stage("a", stage, (), {"x": 1}),
        pipeline.Stage("evaluate", stage, ("a",), {"y": 1})])
    CALLS.clear()
    cfg1 = load_config(None, [f"output_dir={tmp_path}", "experiment=one"])
    cfg2 = load_config(None, [f"output_dir={tmp_path}", "experiment=two"])
    pipeline.run_pipeline(cfg1)
    assert CALLS == ["a", "evaluate"]
    CALLS.clear()
    assert pipeline.run_pipeline(cfg2) == {"a": {"n": 1}, "evaluate": {"n": 1}}
    assert CALLS == []
    assert json.loads((cfg2.run_dir / "results.json").read_text()) == {"dice": 0.5}
    view = json.loads((cfg2.run_dir / "stages.json").read_text())["stages"]
    view1 = json.loads((cfg1.run_dir / "stages.json").read_text())["stages"]
    assert {s: r["fingerprint"] for s, r in view.items()} == \
        {s: r["fingerprint"] for s, r in view1.items()}
    for name in ("a", "evaluate"):
        entry = tmp_path / "store" / name / view[name]["fingerprint"]
        assert (entry / MANIFEST).is_file()
        assert (cfg2.run_dir / name).resolve() == entry.resolve()
        assert view[name]["entry"] == f"../store/{name}/{view[name]['fingerprint']}"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a", "evaluate"]


def test_stage_fingerprint_covers_outside_files_workers_and_input_content(tmp_path):
    from tskd.store import Entry

    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text("{}")
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"weights")
    cfg = load_config(None, [f"data.root={root}", "teacher.arch=vit_b",
                             f"teacher.checkpoint={ckpt}", "students=[scratch]"])
    stages = {s.name: s for s in pipeline.plan(cfg)}

    def entry(fp, content):
        return Entry("data", fp, tmp_path, {"content_hash": content})

    data_in = {"data": entry("f" * 16, "c1")}

    def fps(c):
        return (pipeline.stage_fingerprint(stages["data"], c, {}),
                pipeline.stage_fingerprint(stages["teacher"], c, data_in))

    data_fp, teacher_fp = fps(cfg)
    assert fps(cfg) == (data_fp, teacher_fp)  # stable
    os.utime(root / "dataset.json", ns=(1, 10**18))  # the dataset changed on disk
    assert fps(cfg)[0] != data_fp
    data_fp = fps(cfg)[0]
    os.utime(ckpt, ns=(1, 10**18))  # the checkpoint was replaced
    assert fps(cfg) == (data_fp, fps(cfg)[1]) and fps(cfg)[1] != teacher_fp
    teacher_fp = fps(cfg)[1]
    cfg4 = load_config(None, [f"data.root={root}", "teacher.arch=vit_b",
                              f"teacher.checkpoint={ckpt}", "students=[scratch]",
                              "ray.num_workers=4"])
    assert fps(cfg4)[0] == data_fp and fps(cfg4)[1] != teacher_fp  # workers: training only
    # same upstream fingerprint, different upstream content: a different teacher
    other = pipeline.stage_fingerprint(stages["teacher"], cfg, {"data": entry("f" * 16, "c2")})
    assert other != teacher_fp


def test_gc_finds_the_entries_a_changed_config_left_behind(tmp_path, monkeypatch):
    from tskd.store import Store, garbage

    _fake_plan(monkeypatch)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg)
    before = json.loads((cfg.run_dir / "stages.json").read_text())["stages"]
    pipeline.run_pipeline(load_config(None, [f"output_dir={tmp_path}", "student.img_size=256"]))
    stale = {(e.stage, e.fingerprint) for e in garbage(Store(tmp_path / "store"), tmp_path)}
    assert stale == {("b", before["b"]["fingerprint"]), ("boom", before["boom"]["fingerprint"])}


TRAIN_DIRS: list = []
FAIL = {"now": False}


def training_stage(ctx):
    """Fakes a training stage: its 'checkpoints' live in ctx.train_dir until it succeeds."""
    TRAIN_DIRS.append(ctx.train_dir)
    ctx.train_dir.mkdir(parents=True, exist_ok=True)
    progress = ctx.train_dir / "epochs.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    progress.write_text(str(done + 1))  # one epoch more than the last attempt
    if FAIL["now"]:
        raise RuntimeError("driver killed")
    import shutil

    shutil.rmtree(ctx.train_dir)
    return {"epochs_before": done}


def test_a_rerun_stage_gets_the_same_training_dir(tmp_path, monkeypatch):
    TRAIN_DIRS.clear()
    cfg = load_config(None, [f"output_dir={tmp_path}"])

    def plan(fail):  # the same stage (fingerprint) both times; only FAIL differs
        FAIL["now"] = fail
        return lambda c: [pipeline.Stage("t", training_stage, (), {"x": 1})]

    with pytest.raises(RuntimeError, match="driver killed"):
        pipeline.run_pipeline(cfg, planner=plan(True))
    metrics = pipeline.run_pipeline(cfg, planner=plan(False))
    assert metrics["t"] == {"epochs_before": 1}  # it saw the first attempt's progress
    first, second = TRAIN_DIRS
    assert first == second and first.parent == tmp_path / "store" / "t"
    assert first.name.startswith(pipeline.TRAIN_PREFIX) and not first.exists()
    # --force starts from scratch even when an interrupted attempt left state
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(cfg, planner=plan(True), force=True)
    assert pipeline.run_pipeline(cfg, planner=plan(False), force=True)["t"] == \
        {"epochs_before": 0}


# ---------------------------------------------------------------- independent stages at once

INTERVALS: dict[str, tuple[float, float]] = {}
EVENTS: dict[str, threading.Event] = {}


def timed_stage(ctx):
    """Records when it ran; waits at ``ctx.params["barrier"]`` (all parties must be running at
    once) or sleeps ``ctx.params["sleep"]``; fails when told to."""
    import time

    start = time.monotonic()
    CALLS.append(ctx.name)
    if "barrier" in ctx.params:
        BARRIERS[ctx.params["barrier"]].wait()  # BrokenBarrierError unless the others run too
    if "wait_for" in ctx.params:  # another stage's event, or a minute
        EVENTS[ctx.params["wait_for"]].wait(timeout=60)
    time.sleep(ctx.params.get("sleep", 0.0))
    INTERVALS[ctx.name] = (start, time.monotonic())
    if ctx.params.get("fail"):
        raise RuntimeError(f"{ctx.name} failed")
    (ctx.dir / "out.txt").write_text(ctx.name)
    return {}


BARRIERS: dict[str, threading.Barrier] = {}


def _diamond(monkeypatch, params_b, params_c, params_d=None):
    """a -> (b, c) -> d, all timed_stage."""
    def plan(cfg):
        return [pipeline.Stage("a", timed_stage),
                pipeline.Stage("b", timed_stage, ("a",), {}, params_b),
                pipeline.Stage("c", timed_stage, ("a",), {}, params_c),
                pipeline.Stage("d", timed_stage, ("b", "c"), {}, params_d or {})]
    monkeypatch.setattr(pipeline, "plan", plan)
    # fake stages train nothing: no cluster to count (another test may have left Ray running)
    monkeypatch.setattr(pipeline, "_cluster_capacity", lambda: None)
    CALLS.clear()
    INTERVALS.clear()


def test_independent_stages_run_at_the_same_time(tmp_path, monkeypatch):


    BARRIERS["bc"] = threading.Barrier(2, timeout=20)
    _diamond(monkeypatch, {"barrier": "bc"}, {"barrier": "bc"})
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.ray.concurrent_stages == 2  # the default
    assert list(pipeline.run_pipeline(cfg)) == ["a", "b", "c", "d"]  # plan order
    assert CALLS[0] == "a" and sorted(CALLS[1:3]) == ["b", "c"] and CALLS[3] == "d"
    (b0, b1), (c0, c1) = INTERVALS["b"], INTERVALS["c"]
    assert max(b0, c0) < min(b1, c1)  # overlapped
    assert INTERVALS["d"][0] >= max(b1, c1)  # d read both
    assert all((cfg.run_dir / s / MANIFEST).is_file() for s in "abcd")
    # one at a time: the same barrier breaks (b waits for a c that never comes)
    BARRIERS["bc"] = threading.Barrier(2, timeout=0.5)
    _diamond(monkeypatch, {"barrier": "bc"}, {"barrier": "bc"})
    one = load_config(None, [f"output_dir={tmp_path / 'one'}", "ray.concurrent_stages=1"])
    with pytest.raises(threading.BrokenBarrierError):
        pipeline.run_pipeline(one)
    assert CALLS == ["a", "b"]


def test_ray_data_stages_run_alone(tmp_path, monkeypatch):
    """c feeds Ray Data to its workers (as distillation does): nothing runs beside it, even
    with room for three stages."""
    _diamond(monkeypatch, {"sleep": 0.4}, {"sleep": 0.4})
    plan = pipeline.plan

    def with_e(cfg):  # e: a third stage beside b and c
        return plan(cfg)[:3] + [pipeline.Stage("e", timed_stage, ("a",), {}, {"sleep": 0.4}),
                                plan(cfg)[3]]
    monkeypatch.setattr(pipeline, "plan", with_e)

    def data_stage(ctx):
        return timed_stage(ctx)
    monkeypatch.setattr(pipeline, "_RAY_DATA", {data_stage})
    stages = with_e(None)
    stages[2] = pipeline.Stage("c", data_stage, ("a",), {}, {"sleep": 0.4})
    monkeypatch.setattr(pipeline, "plan", lambda cfg: stages)
    cfg = load_config(None, [f"output_dir={tmp_path}", "ray.concurrent_stages=3"])
    # finished a, b, e, c, d; returned in plan order
    assert list(pipeline.run_pipeline(cfg)) == ["a", "b", "c", "e", "d"]
    c0, c1 = INTERVALS["c"]
    for other in "abde":
        o0, o1 = INTERVALS[other]
        assert o1 <= c0 or o0 >= c1, f"{other} ran beside c"
    # the stages that can share the cluster went first, side by side; c ran when they were done
    assert CALLS.index("c") > max(CALLS.index("b"), CALLS.index("e"))
    (b0, b1), (e0, e1) = INTERVALS["b"], INTERVALS["e"]
    assert max(b0, e0) < min(b1, e1)


def test_a_failure_lets_the_running_stages_finish_then_raises(tmp_path, monkeypatch):
    _diamond(monkeypatch, {"fail": True}, {"sleep": 0.5})
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(RuntimeError, match="b failed"):
        pipeline.run_pipeline(cfg)
    assert sorted(CALLS) == ["a", "b", "c"]  # d never started
    assert (cfg.run_dir / "c" / MANIFEST).is_file()  # c's work is kept
    assert not (cfg.run_dir / "b" / MANIFEST).exists()
    _diamond(monkeypatch, {}, {"sleep": 0.5})
    pipeline.run_pipeline(cfg)
    assert sorted(CALLS) == ["b", "d"]  # the re-run reuses a and c


def test_stage_slots_count_the_clusters_cpus_and_gpus():
    from tskd.stages import teacher_finetune

    def trainer(name):
        return pipeline.Stage(name, teacher_finetune.run)

    def single(name):
        return pipeline.Stage(name, pipeline.evaluate.run)

    alone = pipeline.Stage("distill_ts_kd", pipeline.distill.run)
    # CPU workers with default threads use every core of their node: they never share
    default = load_config(None, [])
    assert pipeline._worker_demand(default) == {"CPU": math.inf}
    slots = pipeline.StageSlots(2, {"CPU": 64.0}, pipeline._worker_demand(default))
    assert slots.fits(trainer("x"), []) and not slots.fits(trainer("y"), [trainer("x")])
    assert slots.fits(single("e"), [trainer("x")])
    cpu = load_config(None, ["ray.torch_threads=1"])  # 1 worker x 1 CPU x 1 thread
    assert pipeline._worker_demand(cpu) == {"CPU": 1.0}
    assert pipeline._worker_demand(load_config(None, ["ray.torch_threads=4", "ray.num_workers=2"])
                                   ) == {"CPU": 8.0}
    slots = pipeline.StageSlots(3, {"CPU": 2.0, "memory": 1e9}, pipeline._worker_demand(cpu))
    assert slots.fits(trainer("x"), [])
    assert slots.fits(trainer("y"), [trainer("x")])  # 2 x 1 CPU on 2 CPUs
    assert not slots.fits(trainer("z"), [trainer("x"), trainer("y")])  # a third: no CPU left
    assert slots.fits(single("e"), [trainer("x"), trainer("y")])  # runs on the driver
    assert not slots.fits(trainer("z"), [trainer("x"), trainer("y"), single("e")])  # width 3
    assert slots.fits(alone, []) and not slots.fits(alone, [single("e")])
    assert not slots.fits(single("e"), [alone])
    gpu = load_config(None, ["ray.use_gpu=true", "ray.num_workers=4", "ray.cpus_per_worker=2"])
    assert pipeline._worker_demand(gpu) == {"CPU": 8.0, "GPU": 4.0}
    slots = pipeline.StageSlots(2, {"CPU": 64.0, "GPU": 4.0}, pipeline._worker_demand(gpu))
    assert not slots.fits(trainer("y"), [trainer("x")])  # the GPUs hold one stage's workers
    slots = pipeline.StageSlots(2, {"CPU": 64.0, "GPU": 8.0}, pipeline._worker_demand(gpu))
    assert slots.fits(trainer("y"), [trainer("x")])
    assert pipeline.StageSlots(2, None, {"CPU": 1.0}).fits(trainer("y"), [trainer("x")])


def test_concurrent_stages_is_checked():
    with pytest.raises(ValueError, match=r"ray\.concurrent_stages.*0.*>= 1"):
        load_config(None, ["ray.concurrent_stages=0"])


def test_a_stage_with_an_existing_entry_does_not_wait_for_the_cluster(tmp_path, monkeypatch,
                                                                      caplog):
    """c must run alone when it builds; when its entry exists it is reused at once, while b
    (changed) builds, instead of waiting for b. The changed b builds until c's reuse is logged
    (or a minute: then c waited for b, and the order below is wrong)."""
    def data_stage(ctx):
        return timed_stage(ctx)

    def stages(b_params):
        return [pipeline.Stage("a", timed_stage),
                pipeline.Stage("b", timed_stage, ("a",), {"v": bool(b_params)}, b_params),
                pipeline.Stage("c", data_stage, ("a",)),
                pipeline.Stage("d", timed_stage, ("b", "c"))]

    class ReuseOfC(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("[3/4] c: up to date"):
                EVENTS["c_reused"].set()

    monkeypatch.setattr(pipeline, "_RAY_DATA", {data_stage})
    monkeypatch.setattr(pipeline, "_cluster_capacity", lambda: None)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    monkeypatch.setattr(pipeline, "plan", lambda cfg: stages({}))
    pipeline.run_pipeline(cfg)
    CALLS.clear()
    EVENTS["c_reused"] = threading.Event()
    monkeypatch.setattr(pipeline, "plan", lambda cfg: stages({"wait_for": "c_reused"}))
    handler = ReuseOfC()
    logging.getLogger("tskd.pipeline").addHandler(handler)
    try:
        with caplog.at_level("INFO", logger="tskd.pipeline"):
            pipeline.run_pipeline(cfg)
    finally:
        logging.getLogger("tskd.pipeline").removeHandler(handler)
    assert CALLS == ["b", "d"]
    order = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert order[1].startswith("[3/4] c: up to date") and order[2].startswith("[2/4] b: built")
