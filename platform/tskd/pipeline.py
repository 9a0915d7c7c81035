"""The TS-KD pipeline: which stages run, in which order, reading what.

:func:`plan` turns a config into a list of :class:`Stage` (a name, the function that runs it, the
stages it reads and the config slice it depends on); :func:`run_pipeline` resolves each stage to
an entry of the shared store (:mod:`tskd.store`) by its fingerprint (:func:`stage_fingerprint`),
building only the entries that do not exist yet, and points the run's view at them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tskd.artifacts import StageContext, external_inputs, stage_manifest, tskd_version
from tskd.config import (DistillConfig, ExperimentConfig, QualityCheckFailed, fingerprint,
                         to_dict)
from tskd.stages import (data_stage, ddpm, distill, evaluate, imagenet_init, quality_check,
                         reference, student_finetune, teacher_cache, teacher_finetune,
                         teacher_pretrain, transfer_set)
from tskd.stages import pretrain as ssl_pretrain  # (plan() has a local named pretrain)
from tskd.memory_plan import dataset_classes
from tskd.storage import is_remote, remove_tree, tree_exists
from tskd.store import Entry, InputRefs, Store
from tskd.stages.errors import StageFailed, error_log_path, own_error, write_error_log

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the experiment.

    Attributes:
        name: its directory under ``<output_dir>/store/`` (and its link in the run directory).
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
    stages = [Stage("data", data_stage.run, (), {"data": cfg.data.stage_slice()})]
    base_deps: tuple[str, ...] = ()
    if cfg.teacher.checkpoint is None:
        pretrain = dict(t["pretrain"])
        pretrain.pop("cache_dir")
        stages.append(Stage("teacher_pretrain", teacher_pretrain.run, (),
                            {**teacher_base, "pretrain": pretrain}))
        base_deps = ("teacher_pretrain",)
    stages.append(Stage("teacher", teacher_finetune.run, ("data", *base_deps),
                        {**teacher_base, "decoder": t["decoder"], "lora": t["lora"],
                         "finetune": t["finetune"]}))
    checks: list[str] = []
    check = to_dict(cfg.check)
    check.pop("on_fail")  # read by run_pipeline: changing it re-uses the verdict
    if cfg.check.enabled and "ts_kd" in cfg.students:  # only TS-KD learns from the teacher
        checks.append(quality_check.TEACHER_CHECK)
        stages.append(Stage(quality_check.TEACHER_CHECK, quality_check.run, ("data", "teacher"),
                            {"check": check, "image_size": cfg.data.image_size},
                            {"model": "teacher"}))
    if any(s in TRANSFER_ARMS for s in cfg.students):
        transfer_deps: tuple[str, ...] = ("data",)
        if "synthetic" in cfg.transfer.sources:  # one DDPM for every transfer-set size
            transfer_deps = ("data", "ddpm")
            stages.append(Stage("ddpm", ddpm.run, ("data",), _ddpm_slice(cfg)))
        stages.append(Stage("transfer", transfer_set.run, transfer_deps,
                            {"transfer": to_dict(cfg.transfer),
                             "image_size": cfg.data.image_size}))
    student = to_dict(cfg.student)
    kd = to_dict(cfg.distill)
    kd.pop("preset")  # a name for the values it set: ts_kd8 and the defaults are one stage
    # rungs fine-tune copies and report; the distilled student is the same with or without
    # them (tskd.stages.rungs), so a search's best config reuses its trial's distillation
    kd.pop("rung_every")
    kd.pop("rung_epochs")
    kd.pop("cache_max_gb")  # what it decides is kd["teacher_placement"], resolved below
    kd_defaults = to_dict(DistillConfig())
    kd_arms = [a for a in cfg.students if a in ("ts_kd", "ta_kd")]
    placement = teacher_cache.placement(cfg, dataset_classes(cfg)) if kd_arms else "replicated"
    kd["teacher_placement"] = placement
    if placement != "sharded":  # how a sharded teacher is gathered changes nothing else
        kd.pop("shard_persist_below")
        kd.pop("shard_prefetch")
    for arm in cfg.students:
        deps: tuple[str, ...] = ("data",)
        finetune_params: dict[str, Any] = {"arm": arm}
        if arm in BASELINE_INIT_STAGES:  # ImageNet-MAE weights, MAE or MoCo v3 pre-training
            init = BASELINE_INIT_STAGES[arm]
            stages.append(_baseline_init_stage(cfg, arm, init, student))
            deps = ("data", init)
            finetune_params["init_stage"] = init
        elif arm != "scratch":
            # TS-KD reads the LoRA-tuned teacher; task-agnostic KD the un-tuned base SAM.
            teacher_deps = ("teacher",) if arm == "ts_kd" else base_deps
            # Task-agnostic KD: hidden-state term only, so the logits term's settings do not
            # change it (a search over them builds it once).
            logits_defaults = {k: kd_defaults[k] for k in ("logits_loss", "logits_target")}
            kd_cfg = dict(kd, w_logits=0.0, **logits_defaults) if arm == "ta_kd" else kd
            targets: tuple[str, ...] = ()
            if placement == "cached":  # the teacher runs once per transfer image, here
                targets = (f"targets_{arm}",)
                stages.append(Stage(
                    f"targets_{arm}", teacher_cache.run, ("data", *teacher_deps, "transfer"),
                    {"teacher": teacher_base, "tuned_teacher": arm == "ts_kd",
                     "features": kd_cfg["teacher_features"],
                     "logits": arm == "ts_kd" and kd_cfg["w_logits"] > 0,
                     "batch_size": kd_cfg["batch_size"]},
                    {"arm": arm}))
            stages.append(Stage(
                f"distill_{arm}", distill.run, ("data", *teacher_deps, "transfer", *targets),
                {"student": student, "distill": kd_cfg,
                 "teacher": teacher_base, "tuned_teacher": arm == "ts_kd"},
                {"arm": arm}))
            deps = ("data", f"distill_{arm}")
            if arm == "ts_kd" and cfg.check.enabled and cfg.check.student and kd["w_logits"] > 0:
                checks.append(f"check_distill_{arm}")  # the student's distilled logits
                stages.append(Stage(f"check_distill_{arm}", quality_check.run,
                                    ("data", f"distill_{arm}"),
                                    {"check": check, "image_size": cfg.data.image_size,
                                     "student": student},
                                    {"model": f"distill_{arm}"}))
        stages.append(Stage(f"student_{arm}", student_finetune.run, deps,
                            {"student": student,
                             "finetune": to_dict(cfg.student_finetune.resolved(cfg.student.arch))},
                            finetune_params))
    ref: tuple[str, ...] = ()
    if cfg.reference.arch != "none":  # the label-only reference network
        ref = ("reference",)
        ref_slice = {"reference": to_dict(cfg.reference), "image_size": cfg.data.image_size}
        if cfg.data.image_size != "auto" and cfg.data.patches:  # its size: the patch's
            ref_slice["patch_size"] = cfg.data.patch
        stages.append(Stage("reference", reference.run, ("data",), ref_slice))
    stages.append(Stage("evaluate", evaluate.run,
                        ("data", "teacher", *[f"student_{a}" for a in cfg.students], *ref,
                         *checks),
                        {"evaluate": to_dict(cfg.evaluate)}))
    return stages


TRANSFER_ARMS = ("ts_kd", "ta_kd", "mae", "mocov3")
"""Arms whose student is pre-trained on the transfer set."""
BASELINE_INIT_STAGES = {"imagenet_mae": "init_imagenet_mae", "mae": "pretrain_mae",
                        "mocov3": "pretrain_mocov3"}
"""The paper's other initialisations: arm -> the stage whose ``student.pt`` its fine-tuning
starts from (``student_finetune`` reads it as it reads ``distill_<arm>``)."""


def _ddpm_slice(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the DDPM depends on besides the data entry and the seed: ``transfer.diffusion`` and
    the size of its training images (with patch training: the crop side and the foreground
    share of the crops); not the transfer set's size, sampling actors or near-copy filter."""
    out: dict[str, Any] = {"diffusion": to_dict(cfg.transfer.diffusion),
                           "image_size": cfg.data.image_size}
    if cfg.data.image_size != "auto" and cfg.data.patches:
        out |= {"patch_size": cfg.data.patch, "fg_fraction": cfg.data.fg_fraction}
    return out


def _baseline_init_stage(cfg: ExperimentConfig, arm: str, name: str,
                         student: dict[str, Any]) -> Stage:
    if arm == "imagenet_mae":  # a checkpoint file (its identity is in the fingerprint)
        return Stage(name, imagenet_init.run, ("data",),
                     {"student": student, "imagenet_mae": to_dict(cfg.imagenet_mae)})
    return Stage(name, ssl_pretrain.run, ("data", "transfer"),
                 {"student": student, arm: to_dict(getattr(cfg, arm))}, {"arm": arm})

TRAIN_PREFIX = ".train-"
"""``store/<stage>/.train-<fp>/``: Ray Train's storage for the entry being built (see
``StageContext.train_dir``)."""

RUN_FILES = ("results.json",)
"""Files at the top of an entry that the run directory gets a copy of (the evaluate stage writes
``runs/<experiment>/results.json`` when it builds; a reused entry's copy is put there too)."""

_SINGLE_PROCESS = {data_stage.run, transfer_set.run, evaluate.run, imagenet_init.run}
"""Stage functions whose result does not depend on ``ray.num_workers`` (every other stage is
assumed to train with that many Ray Train workers: data sharding and the effective batch change)."""
_ONE_WORKER = {ddpm.run}
"""Training stages that run one Ray Train worker whatever ``ray.num_workers``: their result does
not depend on it (no ``ray.num_workers`` in their fingerprint), but they train, so
:class:`StageSlots` counts them as a worker group."""


def stage_fingerprint(stage: Stage, cfg: ExperimentConfig, inputs: dict[str, Entry]) -> str:
    """What determines a stage's output: see :mod:`tskd.artifacts`."""
    return fingerprint(
        stage.name, stage.config, stage.params, cfg.seed,
        {d: [e.fingerprint, e.content_hash] for d, e in sorted(inputs.items())},
        external_inputs(stage.config),
        None if stage.run in _SINGLE_PROCESS | _ONE_WORKER
        else {"ray.num_workers": cfg.ray.num_workers},
        tskd_version())


def run_pipeline(cfg: ExperimentConfig, *, force: bool = False,
                 only: list[str] | None = None,
                 store: Store | None = None,
                 planner: Callable[[ExperimentConfig], list[Stage]] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Resolve every stage of ``plan(cfg)`` to a store entry (reuse or build); return each
    stage's metrics, in plan order.

    Args:
        force: re-build the entries this run needs even when they exist (unless another run
            re-built one while this one waited for it), and repoint the view.
        only: stop after these stages (and what they need) have run.
        store: the store (default: ``<output_dir>/store``).
        planner: the stages of ``cfg`` (default: :func:`plan`; tests and ``tskd tune`` pass
            their own).
    """
    from tskd.data.fingerprint import resolve_image_size

    cfg = resolve_image_size(cfg)  # data.image_size: auto -> the dataset plan's size
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    store = store or Store.for_output_dir(cfg.output_dir, cfg.mirror_dir)
    store.pull_run(run_dir)  # an object-store output: the run's view so far
    stages = (planner or plan)(cfg)
    if only:
        stages = _closure(stages, only)
    run_started = time.time()
    entries: dict[str, Entry] = {}
    metrics: dict[str, dict[str, Any]] = {}

    fps: dict[str, str] = {}

    def fingerprint_of(stage: Stage) -> str:  # once per stage (it walks dataset roots)
        if stage.name not in fps:
            fps[stage.name] = stage_fingerprint(stage, cfg, {d: entries[d] for d in stage.deps})
        return fps[stage.name]

    def resolve(stage: Stage) -> tuple[Entry, bool]:  # reuse or build; may run in a thread
        inputs = {d: entries[d] for d in stage.deps}
        fp = fingerprint_of(stage)
        train_dir = store.train_dir(stage.name, fp, TRAIN_PREFIX)
        return store.resolve(stage.name, fp, _builder(stage, cfg, fp, inputs, train_dir, force),
                             force=force, rebuilt_after=run_started)

    def finish(stage: Stage, entry: Entry, built: bool) -> None:  # on this thread, in turn
        i = stages.index(stage) + 1
        if built:
            log.info("[%d/%d] %s: built %s in %.1f s", i, len(stages), stage.name,
                     entry.fingerprint, entry.manifest["wall_time_s"])
        else:
            log.info("[%d/%d] %s: up to date (%s), reused", i, len(stages), stage.name,
                     entry.fingerprint)
        store.record_run(run_dir, stage.name, entry)
        for name in RUN_FILES:
            if (entry.path / name).is_file():
                _copy_atomic(entry.path / name, run_dir / name)
                store.push_run_file(run_dir, name)
        entries[stage.name] = entry
        metrics[stage.name] = entry.manifest["metrics"]
        _stop_on_failed_check(cfg, stage.name, metrics[stage.name])

    if cfg.ray.concurrent_stages == 1:
        for stage in stages:
            finish(stage, *resolve(stage))
        return metrics

    def reused(stage: Stage) -> bool:  # its entry exists: resolving it runs nothing
        return not force and store.has(stage.name, fingerprint_of(stage))

    _run_concurrently(stages, resolve, finish, reused,
                      StageSlots(cfg.ray.concurrent_stages, _cluster_capacity(),
                                 _worker_demand(cfg)))
    return {s.name: metrics[s.name] for s in stages}  # plan order, whatever finished first


# ----------------------------------------------------------------------------------------------
# independent stages at the same time (ray.concurrent_stages)
# ----------------------------------------------------------------------------------------------

_RAY_DATA = {transfer_set.run, teacher_cache.run, distill.run, ssl_pretrain.run}
"""Stage functions that feed Ray Data to their workers or run actor pools sized from the free
CPUs: they run alone (:class:`StageSlots`)."""


@dataclass
class StageSlots:
    """Which ready stage may start beside the running ones.

    At most ``width`` stages at once; a stage of :data:`_RAY_DATA` only when nothing else runs
    (and nothing starts beside it); a training stage only while the running training stages'
    workers plus its own (``demand``: ``{"CPU": .., "GPU": ..}`` for one stage's worker group)
    fit the cluster's ``capacity`` (``None``: no Ray cluster to ask, e.g. stages that do not
    train; then only ``width`` limits).
    """

    width: int
    capacity: dict[str, float] | None
    demand: dict[str, float]

    def fits(self, stage: Stage, running: list[Stage],
             reused: frozenset[str] | set[str] = frozenset()) -> bool:
        """Whether ``stage`` may start beside ``running``; stages named in ``reused`` have a
        complete entry already (nothing to run): they always start and take no room."""
        busy = [s for s in running if s.name not in reused]
        if stage.name in reused or not busy:
            return True
        if len(busy) >= self.width or _alone(stage) or any(_alone(s) for s in busy):
            return False
        if self.capacity is None or stage.run in _SINGLE_PROCESS:
            return True
        trainers = 1 + sum(s.run not in _SINGLE_PROCESS for s in busy)
        return all(trainers * amount <= self.capacity.get(key, 0.0) + 1e-9
                   for key, amount in self.demand.items())


def _alone(stage: Stage) -> bool:
    return stage.run in _RAY_DATA


def _worker_demand(cfg: ExperimentConfig) -> dict[str, float]:
    """What one training stage's worker group occupies: its GPUs and the CPUs it asks Ray for,
    or, on CPU workers, the cores its torch threads keep busy (``ray.torch_threads``; 0 = every
    core of the worker's node, so ``inf``: a CPU stage with default threads never shares)."""
    r = cfg.ray
    n = r.num_workers
    cpus = r.cpus_per_worker
    if not r.use_gpu:
        cpus = max(cpus, r.torch_threads) if r.torch_threads else math.inf
    demand = {"CPU": n * cpus, **{k: n * v for k, v in r.resources_per_worker.items()}}
    if r.use_gpu:
        demand["GPU"] = float(n)
    return demand


def _cluster_capacity() -> dict[str, float] | None:
    """The Ray cluster's total resources (``None`` when this process is not connected)."""
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else None


def _run_concurrently(stages: list[Stage], resolve: Callable[[Stage], tuple[Entry, bool]],
                      finish: Callable[[Stage, Entry, bool], None],
                      reused: Callable[[Stage], bool], slots: StageSlots) -> None:
    """Start each stage once the stages it reads are finished and ``slots`` lets it in,
    ``resolve`` it in a daemon thread, ``finish`` it here. Of the ready stages, those that can
    run beside others start first (in plan order), a stage that must run alone when nothing else
    is left to start: the stages that can share the cluster pair up as often as the plan allows.
    A stage whose entry exists (``reused``, asked once it is ready) starts at once, whatever runs.
    After a failure (or a failed check) nothing new starts; the running stages finish and
    publish their entries, then the first error is raised."""
    pending = list(stages)
    running: dict[Future, Stage] = {}
    done: set[str] = set()
    error: BaseException | None = None
    exists: dict[str, bool] = {}  # ready stage -> its entry exists (asked once)
    while pending or running:
        if error is None:
            ready = [s for s in pending if all(d in done for d in s.deps)]
            for stage in ready:
                if stage.name not in exists:
                    exists[stage.name] = reused(stage)
            cached = {name for name, yes in exists.items() if yes}
            # existing entries first, then the stages that can share the cluster
            for stage in sorted(ready, key=lambda s: (s.name not in cached, _alone(s))):
                if slots.fits(stage, list(running.values()), cached):
                    pending.remove(stage)
                    running[_in_thread(resolve, stage)] = stage
        if not running:
            break  # a failure with nothing left running
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in [f for f in running if f in finished]:  # in start order
            stage = running.pop(future)
            try:
                finish(stage, *future.result())
                done.add(stage.name)
            except BaseException as exc:  # noqa: BLE001 - re-raised once the others finish
                if error is None:
                    error = exc
                    if running:
                        log.warning("%s failed; waiting for %s to finish before stopping",
                                    stage.name, ", ".join(s.name for s in running.values()))
    if error is not None:
        raise error


def _in_thread(fn: Callable[[Stage], Any], stage: Stage) -> Future:
    """``fn(stage)`` in a daemon thread (Ctrl-C ends the driver without waiting for it)."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(stage))
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler
            future.set_exception(exc)

    threading.Thread(target=target, name=f"stage-{stage.name}", daemon=True).start()
    return future


def _stop_on_failed_check(cfg: ExperimentConfig, name: str, result: dict[str, Any]) -> None:
    """A check stage's verdict (recorded in its manifest): stop unless ``check.on_fail`` says
    to continue."""
    if result.get("check/passed", True):
        return
    if cfg.check.on_fail == "stop":
        raise QualityCheckFailed(f"{result['check/message']} (stage {name})")
    log.warning("%s: continuing past a failed check (check.on_fail=continue)", name)


def _builder(stage: Stage, cfg: ExperimentConfig, fp: str, inputs: dict[str, Entry],
             train_dir: Path | str, force: bool):
    """The store's build callback: run the stage in the temporary entry, return its manifest.
    Training state left in ``train_dir`` by an interrupted build is resumed from (``--force``
    discards it)."""
    def build(tmp: Path) -> dict[str, Any]:
        if force:
            remove_tree(train_dir)
        if tree_exists(train_dir):
            log.info("%s: resuming the interrupted build's training state (%s)", stage.name,
                     train_dir)
        log.info("%s: running (%s)", stage.name, fp)
        started = time.time()
        ctx = StageContext(stage.name, tmp, {d: e.path for d, e in inputs.items()}, cfg,
                           dict(stage.params), train_dir=train_dir)
        if is_remote(cfg.output_dir):  # workers on other nodes fetch what they read
            refs = InputRefs(cfg.output_dir, str(Path(cfg.mirror_dir).expanduser().resolve()),
                             tuple((d, e.fingerprint) for d, e in inputs.items()))
            ctx.input_refs = refs
            ctx.remote_inputs = {d: refs.uri(d, e.fingerprint) for d, e in inputs.items()}
        result = _run_stage(stage, ctx)
        return stage_manifest(ctx, fp=fp, config_slice=stage.config, metrics=result,
                              started=started,
                              inputs={d: {"fingerprint": e.fingerprint,
                                          "content_hash": e.content_hash}
                                      for d, e in inputs.items()})
    return build


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _run_stage(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """``stage.run(ctx)``; on failure the traceback goes to ``runs/<experiment>/<stage>.error.log``
    (the stage's own directory is a temporary store entry, removed on failure), and a tskd error
    raised inside a Ray worker comes back as a :class:`StageFailed` naming that file."""
    try:
        return stage.run(ctx)
    except Exception as exc:
        log_path = write_error_log(error_log_path(ctx.cfg.run_dir, stage.name), exc)
        own = own_error(exc)
        if own is None or own is exc:  # a bug (full traceback), or raised here on the driver
            log.error("stage %s failed; traceback in %s", stage.name, log_path)
            raise
        raise StageFailed(stage.name, own, log_path) from exc


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
    """The run's view of a stage's entry (a link into the store where links work)."""
    return cfg.run_dir / name
