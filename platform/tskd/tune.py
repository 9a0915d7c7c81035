"""``tskd tune``: a Ray Tune search (OptunaSearch TPE, seeded; ASHA) over an experiment config.

Each trial is a Tune *function trainable* that runs the trial's whole pipeline
(:func:`tskd.pipeline.run_pipeline`) with the sampled values set on the experiment config; every
stage builds and fits its own ``TorchTrainer`` inside the trial (Ray Train V2: a ``TorchTrainer``
cannot be handed to a ``Tuner``). All trials write under the experiment's ``output_dir``, so
they share one artifact store: trials that agree on a stage's inputs reuse its entry (one
fine-tuned teacher per LoRA rank, one DDPM and one transfer set for all), and two trials that
need the same entry at once build it once.

Output under ``<output_dir>/<experiment>-tune/``: Ray Tune's experiment directory (``tune/``,
restorable with ``--resume``), the Optuna study (``optuna.db``, SQLite; opens in
``optuna-dashboard sqlite:///…/optuna.db``), ``trials.csv`` / ``trials.parquet`` (trial,
parameters, objective, status, wall time, stages built and reused) and ``best.yaml``, a complete
config that ``tskd run`` accepts.

Afterwards the best config runs in full as ``<experiment>-best`` (its evaluate stage scores the
test split; the other stages are the best trial's store entries).

Intermediate results: with ``scheduler.rung_every`` (a student objective) each trial's
distillation reports a rung every that many epochs (:mod:`tskd.stages.rungs`: a short
fine-tune's validation Dice), forwarded to Tune as the trial's objective, so ASHA stops poor
trials inside distillation; then the trial reports its final objective. A trial that reuses
another's distillation entry replays that entry's rungs first, so every trial's
``training_iteration`` means the same. Not yet: a second objective (Pareto front).

Interrupts: on the first Ctrl-C Ray Tune stops its trials and saves its state; :func:`run_tune`
then writes the table (unfinished trials ``interrupted``) and raises :class:`SearchInterrupted`
without writing ``best.yaml``. ``resume=True`` restores the Tuner (its OptunaSearch state
included): finished trials are not run again, unfinished ones restart with their sampled values
and complete their Optuna trial, so the study holds each trial once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from tskd.config import (ConfigError, ExperimentConfig, TskdError, _merge, config_from_dict,
                         nest, to_dict)
from tskd.search_space import SearchSpace, trial_base
from tskd.stages.rungs import OBJECTIVE

log = logging.getLogger(__name__)



class SearchInterrupted(TskdError):
    """The search stopped before every trial finished (Ctrl-C); ``--resume`` continues it."""


@dataclass
class TuneOutcome:
    """What :func:`run_tune` hands back."""

    dir: Path
    best_params: dict[str, Any]
    best_value: float
    best_config: Path
    table: list[dict[str, Any]]
    final: dict[str, dict[str, Any]] | None = None
    """Stage metrics of the best config's full run (evaluate: the test split), if run."""


def trial_config(base: dict[str, Any], sample: dict[str, Any], name: str) -> ExperimentConfig:
    """The experiment config of one trial: ``base`` with the sampled dotted values set."""
    data = dict(base, experiment=name)
    for key, value in sample.items():
        data = _merge(data, nest(key, value))
    return config_from_dict(data)


def search_dir(cfg: ExperimentConfig) -> Path:
    """Where the search of ``cfg.experiment`` lives: ``<output_dir>/<experiment>-tune``."""
    return Path(cfg.output_dir).expanduser().resolve() / f"{cfg.experiment}-tune"


def check_fresh(cfg: ExperimentConfig, resume: bool) -> None:
    """A new search must not land on an old one (checked before Ray starts)."""
    if "://" in cfg.output_dir and not cfg.output_dir.startswith("file://"):
        raise ConfigError(f"output_dir: invalid value {cfg.output_dir!r}; allowed for tskd tune: "
                          "a local directory or a shared mount (object stores: tskd run only)")
    out = search_dir(cfg)
    if not resume and ((out / "tune").exists() or (out / "optuna.db").exists()):
        raise ConfigError(f"experiment: invalid value {cfg.experiment!r}; a search already "
                          f"exists in {out}: pass --resume to continue it, or choose another "
                          "experiment name")


def isolated_base(base: dict[str, Any], name: str) -> dict[str, Any]:
    """``base`` for a trial that shares nothing: its own output directory (store included) and
    its own teacher pre-training cache, under ``<output_dir>/isolated/<name>/``."""
    own = Path(base["output_dir"]) / "isolated" / name
    return _merge(base, {"output_dir": str(own),
                         "teacher": {"pretrain": {"cache_dir": str(own / "cache")}}})


def _trial(sample: dict[str, Any], *, base: dict[str, Any], metric: str, mode: str,
           planner: Callable | None, isolate: bool = False) -> None:
    """Tune function trainable: run the trial's pipeline, report the objective."""
    from ray import tune

    from tskd.pipeline import run_pipeline
    from tskd.stages.ray_train import configure_worker_logging
    from tskd.store import read_view

    configure_worker_logging()  # the trial's stage lines reach the console, as in tskd run

    trial_id = tune.get_context().get_trial_id()
    name = f"{base['experiment']}-trial-{trial_id}"
    if isolate:
        base = isolated_base(base, name)
    started = time.time()
    try:
        cfg = trial_config(base, sample, name)
    except ConfigError as exc:  # e.g. w_logits = w_hidden = 0: a valid value each, not together
        log.warning("trial %s: infeasible combination: %s", trial_id, exc)
        tune.report({OBJECTIVE: -math.inf if mode == "max" else math.inf, "infeasible": True,
                     "wall_time_s": 0.0, "built": 0, "reused": 0})
        return
    stage, key = metric.split(":", 1)
    metrics = run_pipeline(cfg, only=[stage], planner=planner)
    view = read_view(cfg.run_dir)
    built = sum(1 for rec in view.values() if _built_by(cfg, rec, name))
    for distill, rec in view.items():  # a reused distillation's rungs, as if they ran here
        history = metrics.get(distill, {}).get("rung/history") if distill.startswith(
            "distill_") else None
        if history and not _built_by(cfg, rec, name):
            for i, value in enumerate(history, 1):
                tune.report({OBJECTIVE: float(value), "rung": i, "replayed": True})
    tune.report({OBJECTIVE: float(metrics[stage][key]), "infeasible": False,
                 "wall_time_s": round(time.time() - started, 2), "built": built,
                 "reused": len(view) - built})


def _built_by(cfg: ExperimentConfig, rec: dict[str, str], name: str) -> bool:
    from tskd.store import read_json

    manifest = read_json(cfg.run_dir / rec["entry"] / "manifest.json") or {}
    return manifest.get("config", {}).get("experiment") == name


def run_tune(cfg: ExperimentConfig, space: SearchSpace, *, resume: bool = False,
             planner: Callable | None = None, final: bool = True,
             isolate: bool = False) -> TuneOutcome:
    """Run the search (Ray must be initialised); see the module docstring.

    Args:
        isolate: every trial builds all of its own artifacts (:func:`isolated_base`) instead of
            sharing the store; for measuring what the store saves
            (``benchmarks/tune_store.py``), not for real searches.
        final: afterwards run the best config's whole pipeline as experiment
            ``<experiment>-best`` (its evaluate stage scores the test split; every other stage
            is reused from the best trial).
        planner: the stages of a config (default: :func:`tskd.pipeline.plan`); must be
            importable (or pickled by value) in Ray workers.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tskd.stages.ray_train import check_trial_room

    check_fresh(cfg, resume)
    out = search_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    base = to_dict(cfg)
    # trials run in their own working directories: make every path absolute
    base["output_dir"] = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.root is not None:
        base["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.teacher.checkpoint is not None:
        base["teacher"]["checkpoint"] = str(Path(cfg.teacher.checkpoint).expanduser().resolve())
    mode = space.objective.mode
    check_trial_room(cfg.ray, trials=min(space.max_concurrent_trials, space.num_samples),
                     cpu_per_trial=space.resources_per_trial.cpu,
                     fields=(f"{space.source}: max_concurrent_trials", "resources_per_trial.cpu"))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=trial_base(base, space.objective_stage,
                                                     space.scheduler.rung_every),
                             metric=space.objective.metric, mode=mode,
                             planner=planner, isolate=isolate),
        {"cpu": space.resources_per_trial.cpu, "gpu": space.resources_per_trial.gpu})
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    searcher = OptunaSearch(metric=OBJECTIVE, mode=mode, seed=space.seed, storage=storage,
                            study_name=cfg.experiment)
    sch = space.scheduler
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sch.max_t,
                              grace_period=sch.grace_period,
                              reduction_factor=sch.reduction_factor) \
        if sch.type == "asha" else FIFOScheduler()
    tune_dir = out / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        log.info("resuming the search in %s", tune_dir)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.to_tune(),
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=mode, search_alg=searcher,
                                        scheduler=scheduler, num_samples=space.num_samples,
                                        max_concurrent_trials=space.max_concurrent_trials),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                      callbacks=[_progress(mode, space.num_samples)]))
    results = tuner.fit()
    table = _table(results, list(space.params), _statuses(tune_dir))
    _write_table(table, out)
    finished = sum(row["status"] != "interrupted" for row in table)
    if finished < space.num_samples:  # Ctrl-C: Tune saved its state and returned early
        raise SearchInterrupted(
            f"the search {cfg.experiment} was interrupted after {finished} of "
            f"{space.num_samples} trials (their table: {out / 'trials.csv'}); continue it with "
            "`tskd tune ... --resume` (the same config, space and --set)")
    best = results.get_best_result(metric=OBJECTIVE, mode=mode)
    best_params = {k: best.config[k] for k in space.params}
    try:  # the best values with every arm of the experiment
        best_cfg = trial_config(base, best_params, f"{cfg.experiment}-best")
    except ConfigError as exc:  # e.g. w_hidden = 0 leaves task-agnostic KD with no loss
        log.warning("the best values do not fit every arm of %s (%s); the best config keeps "
                    "the objective's arm only", cfg.experiment, exc)
        best_cfg = trial_config(trial_base(base, space.objective_stage), best_params,
                                f"{cfg.experiment}-best")
    best_path = out / "best.yaml"
    best_path.write_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
    outcome = TuneOutcome(out, best_params, float(best.metrics[OBJECTIVE]), best_path, table)
    if final:
        from tskd.pipeline import run_pipeline

        log.info("running the best config %s in full as %s", best_params, best_cfg.experiment)
        outcome.final = run_pipeline(best_cfg, planner=planner)
    return outcome


def _progress(mode: str, total: int) -> Any:
    """A Tune callback logging one line per finished trial instead of Ray's status table."""
    from ray import tune

    from tskd.stages.live_metrics import export_trials

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.best: float | None = None

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            value = (trial.last_result or {}).get(OBJECTIVE)
            if value is not None and not math.isinf(value) and (
                    self.best is None or (value > self.best if mode == "max"
                                          else value < self.best)):
                self.best = value
            status = Counter(t.status for t in trials if t is not trial)
            # ``trial`` is not marked TERMINATED yet; counted from the trials, so that a
            # resumed search counts the trials finished before the interrupt too
            done = status["TERMINATED"] + status["ERROR"] + 1
            log.info("trial %s: %s = %s | best %s | %d/%d done, %d running, %d errored",
                     trial.trial_id, OBJECTIVE, "n/a" if value is None else f"{value:.4f}",
                     "n/a" if self.best is None else f"{self.best:.4f}",
                     done, total, status["RUNNING"], status["ERROR"])
            export_trials({"done": done, "running": status["RUNNING"],
                           "pending": status["PENDING"], "error": status["ERROR"]})

    return Progress()


def _statuses(tune_dir: Path) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Trial directory -> (trial id, Tune status: ``TERMINATED``, ``ERROR``, ``PENDING``...,
    sampled values), from the saved experiment state."""
    from ray.tune import ExperimentAnalysis

    return {t.path: (t.trial_id, t.status, t.config)
            for t in ExperimentAnalysis(str(tune_dir)).trials}


def _status(tune_status: str | None, result: Any) -> str:
    """``done``, ``infeasible``, ``stopped`` (by ASHA: no final report), ``error`` or
    ``interrupted`` (not finished when the search stopped)."""
    m = result.metrics or {}
    if tune_status == "ERROR" or result.error:
        return "error"
    if tune_status != "TERMINATED":
        return "interrupted"
    if "infeasible" not in m:  # the final report carries it; ASHA stopped the trial before
        return "stopped"
    return "infeasible" if m["infeasible"] else "done"


def _table(results: Any, params: list[str],
           statuses: dict[str, tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics or {}
        trial, tune_status, config = statuses.get(r.path, (m.get("trial_id"), None, {}))
        config = r.config or config or {}  # a trial that never started has no result config
        rows.append({"trial": trial,
                     **{p: config.get(p) for p in params},
                     OBJECTIVE: m.get(OBJECTIVE),
                     "status": _status(tune_status, r),
                     "iterations": m.get("training_iteration"),
                     "wall_time_s": m.get("wall_time_s"),
                     "built": m.get("built"), "reused": m.get("reused")})
    return rows


def _write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "trials.csv", index=False)
    df.to_parquet(out / "trials.parquet", index=False)


def format_trials(rows: list[dict[str, Any]], params: list[str], mode: str) -> str:
    """A short table of the trials, best first."""
    def key(r: dict[str, Any]) -> float:
        v = r.get(OBJECTIVE)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.inf
        return -v if mode == "max" else v

    head = ["trial", *params, OBJECTIVE, "status", "built", "reused"]
    lines = [head] + [[str(r.get(c)) if not isinstance(r.get(c), float) else f"{r[c]:.4g}"
                       for c in head] for r in sorted(rows, key=key)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)
