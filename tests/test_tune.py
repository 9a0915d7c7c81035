"""``tskd tune`` on fake stages under a real local Ray: trials share store entries."""

import math
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from ray import cloudpickle

from tskd.config import ConfigError, load_config
from tskd.pipeline import Stage
from tskd.search_space import parse_space

# the planner and its stages travel to the Tune workers by value (tests/ is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _stage(ctx):
    with open(Path(ctx.cfg.output_dir) / "builds.log", "a") as f:
        f.write(f"{ctx.name} {ctx.cfg.teacher.lora.rank} {ctx.cfg.distill.w_logits}\n")
    time.sleep(0.3)
    penalty = abs(math.log2(ctx.cfg.teacher.lora.rank) - 2) / 10
    if ctx.name == "teacher":
        return {"val/dice": 0.9 - penalty}
    if ctx.name == "student_ts_kd":
        return {"val/dice": 0.5 + 0.1 * ctx.cfg.distill.w_logits - penalty}
    return {}


def fake_plan(cfg):
    return [Stage("data", _stage, (), {"seed": cfg.seed}),
            Stage("teacher", _stage, ("data",), {"rank": cfg.teacher.lora.rank}),
            Stage("student_ts_kd", _stage, ("teacher",),
                  {"w": cfg.distill.w_logits, "rank": cfg.teacher.lora.rank}),
            Stage("evaluate", _stage, ("student_ts_kd",), {})]


@pytest.mark.slow
def test_tiny_search_builds_each_shared_artifact_once(tmp_path, ray_local):
    from tskd.tune import run_tune

    cfg = load_config(None, [f"output_dir={tmp_path}", "experiment=t"])
    space = parse_space({
        "objective": {"metric": "student_ts_kd:val/dice", "mode": "max"},
        "num_samples": 6, "max_concurrent_trials": 2, "seed": 0,
        "scheduler": {"type": "fifo"},
        "params": {"teacher.lora.rank": {"choice": [2, 4, 8]},
                   "distill.w_logits": {"choice": [0.0, 0.5, 1.0]}}}, cfg)
    out = run_tune(cfg, space, planner=fake_plan)

    builds = [line.split() for line in (tmp_path / "builds.log").read_text().splitlines()]
    trials = pd.read_csv(out.dir / "trials.csv")
    assert len(trials) == 6 and set(trials["status"]) == {"done"}
    ranks = set(trials["teacher.lora.rank"])
    pairs = set(zip(trials["teacher.lora.rank"], trials["distill.w_logits"]))
    count = Counter(b[0] for b in builds)
    # one data entry for all, one teacher per distinct rank, one student per distinct pair;
    # evaluate is outside the objective's closure: it runs once, in the best config's final run
    assert count == Counter({"data": 1, "teacher": len(ranks), "student_ts_kd": len(pairs),
                             "evaluate": 1})
    assert trials["built"].sum() == len(builds) - 1
    assert set(out.final) == {"data", "teacher", "student_ts_kd", "evaluate"}
    assert (trials["built"] + trials["reused"] == 3).all()
    # the objective is the reported stage metric, recomputed here by hand
    for _, row in trials.iterrows():
        expect = 0.5 + 0.1 * row["distill.w_logits"] - abs(math.log2(row["teacher.lora.rank"])
                                                            - 2) / 10
        assert row["objective"] == pytest.approx(expect)
    best = trials.loc[trials["objective"].idxmax()]
    assert out.best_value == pytest.approx(best["objective"])
    best_cfg = load_config(out.best_config)
    assert best_cfg.teacher.lora.rank == best["teacher.lora.rank"]
    assert best_cfg.distill.w_logits == best["distill.w_logits"]
    assert best_cfg.experiment == "t-best"
    assert (out.dir / "optuna.db").is_file() and (out.dir / "trials.parquet").is_file()

    # a finished search resumes without re-running anything; a fresh one refuses to overwrite it
    again = run_tune(cfg, space, resume=True, planner=fake_plan)
    assert len(again.table) == 6 and again.best_value == pytest.approx(out.best_value)
    assert len((tmp_path / "builds.log").read_text().splitlines()) == len(builds)
    with pytest.raises(ConfigError, match="a search already exists"):
        run_tune(cfg, space, planner=fake_plan)


def _timed_stage(ctx):
    """A fake stage that logs its start and end (``builds.log``) and takes a while."""
    log = Path(ctx.cfg.output_dir) / "builds.log"
    with open(log, "a") as f:
        f.write(f"start {ctx.name} {ctx.cfg.experiment}\n")
    time.sleep(3.0 if ctx.name == "student_ts_kd" else 0.2)
    with open(log, "a") as f:
        f.write(f"done {ctx.name} {ctx.cfg.experiment}\n")
    if ctx.name == "student_ts_kd":
        return {"val/dice": 0.5 + 0.1 * ctx.cfg.distill.w_logits}
    return {"val/dice": 0.9} if ctx.name == "teacher" else {}


def timed_plan(cfg):
    """``fake_plan`` with slow stages; logs every call (one per trainable invocation)."""
    with open(Path(cfg.output_dir) / "plans.log", "a") as f:
        f.write(f"{cfg.experiment}\n")
    return [Stage("data", _timed_stage, (), {"seed": cfg.seed}),
            Stage("teacher", _timed_stage, ("data",), {"rank": cfg.teacher.lora.rank}),
            Stage("student_ts_kd", _timed_stage, ("teacher",),
                  {"w": cfg.distill.w_logits, "rank": cfg.teacher.lora.rank}),
            Stage("evaluate", _timed_stage, ("student_ts_kd",), {})]


RESUME_SPACE = {"objective": {"metric": "student_ts_kd:val/dice", "mode": "max"},
                "num_samples": 6, "max_concurrent_trials": 2, "seed": 0,
                "scheduler": {"type": "fifo"},
                "params": {"teacher.lora.rank": {"choice": [2, 4]},
                           "distill.w_logits": {"uniform": [0.0, 1.0]}}}

# the interrupted driver: a separate process on the test's Ray cluster
_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import logging
import ray
import test_tune
logging.basicConfig(filename={progress!r}, level=logging.INFO)
from tskd.config import load_config
from tskd.search_space import parse_space
from tskd.tune import run_tune
ray.init(address={address!r}, log_to_driver=False, configure_logging=False)
cfg = load_config(None, ["output_dir={out}", "experiment=t"])
run_tune(cfg, parse_space(test_tune.RESUME_SPACE, cfg), planner=test_tune.timed_plan)
"""


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_local):
    import os
    import signal
    import subprocess

    import optuna

    from tskd.tune import SearchInterrupted, run_tune

    log = tmp_path / "builds.log"
    progress = tmp_path / "progress.log"  # the driver's log: one line per finished trial
    script = _DRIVER.format(tests=str(Path(__file__).parent), out=tmp_path, progress=str(progress),
                            address=ray_local.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # Ctrl-C once Tune has seen two trials finish and another trial is inside its student stage
    cut: set[str] = set()
    while time.time() < deadline and driver.poll() is None and not cut:
        lines = progress.read_text().splitlines() if progress.exists() else []
        if sum(" done, " in line for line in lines) >= 2:
            stages = log.read_text().splitlines()
            cut = ({line.split()[2] for line in stages if line.startswith("start student")}
                   - {line.split()[2] for line in stages if line.startswith("done student")})
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()[0][-3000:]
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0]
    (tmp_path / "driver.log").write_text(output)
    assert driver.returncode != 0, output[-3000:]
    assert "interrupted" in output, output[-3000:]

    out = tmp_path / "t-tune"
    before = pd.read_csv(out / "trials.csv")
    finished = set(before.loc[before["status"] == "done", "trial"])
    assert 1 <= len(finished) < 6, before
    assert not (out / "best.yaml").exists()
    planned_before = Counter((tmp_path / "plans.log").read_text().split())

    cfg = load_config(None, [f"output_dir={tmp_path}", "experiment=t"])
    result = run_tune(cfg, parse_space(RESUME_SPACE, cfg), resume=True, planner=timed_plan,
                      final=False)

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and set(trials["status"]) == {"done"}, trials
    assert set(trials["trial"]) >= finished
    planned = Counter((tmp_path / "plans.log").read_text().split())
    for trial in finished:  # a finished trial's pipeline ran once, before the interrupt
        assert planned[f"t-trial-{trial}"] == planned_before[f"t-trial-{trial}"] == 1
    assert set(planned) == {f"t-trial-{t}" for t in trials["trial"]}
    for name in cut:  # a trial cut inside its student stage ran again; its entry built once
        text = log.read_text()  # (the cut build either finished before its worker stopped,
        assert planned[name] == 2  # and the re-run reused it, or the re-run built it again)
        assert text.count(f"start student_ts_kd {name}\n") in (1, 2)
        assert text.count(f"done student_ts_kd {name}\n") == 1
    done = Counter(tuple(line.split()[1:2]) for line in log.read_text().splitlines()
                   if line.startswith("done"))
    # every entry completed once: a build cut by the interrupt left nothing that looked complete
    assert done == Counter({("data",): 1, ("teacher",): len(set(trials["teacher.lora.rank"])),
                            ("student_ts_kd",): 6})
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(0.5 + 0.1 * trials["distill.w_logits"]))
    assert result.best_value == pytest.approx(max(t.value for t in study.trials))
    assert (out / "best.yaml").is_file()


def test_trial_status_from_tune_status_and_final_report():
    from types import SimpleNamespace as NS

    from tskd.tune import _status

    final = {"objective": 0.5, "infeasible": False}
    assert _status("TERMINATED", NS(metrics=final, error=None)) == "done"
    assert _status("TERMINATED", NS(metrics={**final, "infeasible": True}, error=None)) \
        == "infeasible"
    assert _status("TERMINATED", NS(metrics={"objective": 0.4, "rung": 1}, error=None)) \
        == "stopped"  # ASHA stopped it at a rung: no final report
    assert _status("PENDING", NS(metrics=final, error=None)) == "interrupted"
    assert _status("PENDING", NS(metrics=None, error=None)) == "interrupted"
    assert _status("ERROR", NS(metrics={}, error=RuntimeError())) == "error"


def test_isolated_trial_gets_its_own_output_dir_and_teacher_cache(tmp_path):
    from tskd.config import to_dict
    from tskd.tune import isolated_base, trial_config

    base = to_dict(load_config(None, [f"output_dir={tmp_path}"]))
    cfg = trial_config(isolated_base(base, "x-trial-1"), {"distill.w_logits": 0.5}, "x-trial-1")
    assert Path(cfg.output_dir) == tmp_path / "isolated" / "x-trial-1"
    assert Path(cfg.teacher.pretrain.cache_dir) == tmp_path / "isolated" / "x-trial-1" / "cache"
    assert cfg.distill.w_logits == 0.5 and base["output_dir"] == str(tmp_path)
