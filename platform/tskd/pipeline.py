"""The TS-KD pipeline: which stages run, in which order, reading what.

:func:`plan` turns a config into a list of :class:`Stage` (a name, the function that runs it, the
stages it reads and the config slice it depends on); :func:`run_pipeline` runs them in order,
skipping every stage whose manifest matches (see :mod:`tskd.artifacts`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tskd.artifacts import (StageContext, is_complete, prepare_stage_dir, read_manifest,
                            write_manifest)
from tskd.config import ExperimentConfig, fingerprint, to_dict
from tskd.stages import (data_stage, distill, evaluate, reference, student_finetune,
                         teacher_finetune, teacher_pretrain, transfer_set)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the experiment.

    Attributes:
        name: directory name under ``runs/<experiment>/``.
        run: the stage function: takes a :class:`StageContext`, returns metrics.
        deps: names of the stages it reads.
        config: the config values it depends on (part of its fingerprint).
        params: stage-specific parameters passed through the context.
    """

    name: str
    run: Callable[[StageContext], dict[str, Any]]
    deps: tuple[str, ...] = ()
    config: Any = None
    params: dict[str, Any] = field(default_factory=dict)


def plan(cfg: ExperimentConfig) -> list[Stage]:
    """The stages of a TS-KD experiment, in execution order."""
    t = to_dict(cfg.teacher)
    teacher_base = {"arch": t["arch"], "img_size": t["img_size"], "checkpoint": t["checkpoint"]}
    stages = [Stage("data", data_stage.run, (), {"data": to_dict(cfg.data)})]
    base_deps: tuple[str, ...] = ()
    if cfg.teacher.checkpoint is None:
        pretrain = dict(t["pretrain"])
        pretrain.pop("cache_dir")
        stages.append(Stage("teacher_pretrain", teacher_pretrain.run, (),
                            {**teacher_base, "pretrain": pretrain}))
        base_deps = ("teacher_pretrain",)
    stages.append(Stage("teacher", teacher_finetune.run, ("data", *base_deps),
                        {**teacher_base, "lora": t["lora"], "finetune": t["finetune"]}))
    kd_arms = [s for s in cfg.students if s != "scratch"]
    if kd_arms:
        stages.append(Stage("transfer", transfer_set.run, ("data",),
                            {"transfer": to_dict(cfg.transfer),
                             "image_size": cfg.data.image_size}))
    student = to_dict(cfg.student)
    kd = to_dict(cfg.distill)
    for arm in cfg.students:
        deps: tuple[str, ...] = ("data",)
        if arm != "scratch":
            # TS-KD reads the LoRA-tuned teacher; task-agnostic KD the un-tuned base SAM.
            teacher_deps = ("teacher",) if arm == "ts_kd" else base_deps
            # Task-agnostic KD: hidden-state term only.
            kd_cfg = dict(kd, w_logits=0.0) if arm == "ta_kd" else kd
            stages.append(Stage(
                f"distill_{arm}", distill.run, ("data", *teacher_deps, "transfer"),
                {"student": student, "distill": kd_cfg,
                 "teacher": teacher_base, "tuned_teacher": arm == "ts_kd"},
                {"arm": arm}))
            deps = ("data", f"distill_{arm}")
        stages.append(Stage(f"student_{arm}", student_finetune.run, deps,
                            {"student": student, "finetune": to_dict(cfg.student_finetune)},
                            {"arm": arm}))
    ref: tuple[str, ...] = ()
    if cfg.reference.arch != "none":  # the label-only reference network
        ref = ("reference",)
        stages.append(Stage("reference", reference.run, ("data",),
                            {"reference": to_dict(cfg.reference),
                             "image_size": cfg.data.image_size}))
    stages.append(Stage("evaluate", evaluate.run,
                        ("data", "teacher", *[f"student_{a}" for a in cfg.students], *ref),
                        {"evaluate": to_dict(cfg.evaluate)}))
    return stages


def run_pipeline(cfg: ExperimentConfig, *, force: bool = False,
                 only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run (or skip) every stage of ``plan(cfg)``; return each stage's metrics.

    Args:
        force: re-run every stage even when its manifest matches.
        only: stop after these stages (and what they need) have run.
    """
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg)
    if only:
        stages = _closure(stages, only)
    fps: dict[str, str] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for i, stage in enumerate(stages, 1):
        upstream = {d: fps[d] for d in stage.deps}
        fp = fingerprint(stage.name, stage.config, stage.params, cfg.seed, upstream)
        fps[stage.name] = fp
        stage_dir = run_dir / stage.name
        if not force and is_complete(stage_dir, fp):
            log.info("[%d/%d] %s: up to date, skipped", i, len(stages), stage.name)
            metrics[stage.name] = read_manifest(stage_dir)["metrics"]
            continue
        log.info("[%d/%d] %s: running", i, len(stages), stage.name)
        started = time.time()
        prepare_stage_dir(stage_dir)
        ctx = StageContext(stage.name, stage_dir, {d: run_dir / d for d in stage.deps}, cfg,
                           dict(stage.params))
        result = stage.run(ctx)
        write_manifest(ctx, fp=fp, config_slice=stage.config, metrics=result, started=started,
                       upstream=upstream)
        log.info("[%d/%d] %s: done in %.1f s", i, len(stages), stage.name, time.time() - started)
        metrics[stage.name] = result
    return metrics


def _closure(stages: list[Stage], names: list[str]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages of this experiment: "
                         f"{list(by_name)}")
    keep: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].deps)
    return [s for s in stages if s.name in keep]


def stage_dir(cfg: ExperimentConfig, name: str) -> Path:
    return cfg.run_dir / name
