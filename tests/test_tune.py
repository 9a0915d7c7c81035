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
