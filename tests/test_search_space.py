"""Search-space files of ``tskd tune``: the shipped spaces, and every error naming its entry."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from tskd.config import ConfigError, load_config, to_dict
from tskd.search_space import load_space, parse_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
BASE = load_config()


def space(**overrides):
    data = {"objective": {"metric": "teacher:val/dice", "mode": "max"},
            "params": {"teacher.lora.rank": {"choice": [2, 4]}}}
    data.update(overrides)
    return data


def error(data, stages=None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_space(data, BASE, stages)
    return str(exc.value)


def test_shipped_spaces():
    rank = load_space(SPACES / "lora_rank.yaml")
    assert rank.params["teacher.lora.rank"].args == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (rank.objective.metric, rank.objective.mode) == ("teacher:val/dice", "max")
    kd = load_space(SPACES / "kd_weights.yaml")
    assert set(kd.params) == {"distill.w_logits", "distill.w_hidden", "distill.logits_loss",
                              "distill.logits_target"}
    assert 0.0 in kd.params["distill.w_logits"].args and 0.0 in kd.params["distill.w_hidden"].args
    assert kd.objective.metric == "student_ts_kd:val/dice"
    joint = load_space(SPACES / "joint.yaml")
    assert set(joint.params) == {"teacher.lora.rank", "distill.w_logits", "distill.w_hidden"}
    assert joint.scheduler.type == "asha" and joint.max_concurrent_trials == 2


def test_settings_defaults_and_values():
    s = parse_space(space(num_samples=6, scheduler={"grace_period": 2, "max_t": 8}), BASE)
    assert s.num_samples == 6 and s.scheduler.grace_period == 2 and s.scheduler.max_t == 8
    assert s.scheduler.reduction_factor == 2 and s.seed == 0  # defaults
    assert s.objective_stage == "teacher"


def test_unknown_keys_name_the_entry():
    assert error(space(trials=3)).startswith("trials: unknown key; allowed keys:")
    assert error(space(scheduler={"grace": 1})).startswith("scheduler.grace: unknown key")
    msg = error(space(params={"teacher.lora.rnk": {"choice": [1]}}))
    assert msg.startswith("params.teacher.lora.rnk: unknown config key; keys of teacher.lora: "
                          "['rank', 'alpha', 'dropout']")
    assert "keys of the experiment config" in error(space(params={"teachr.x": {"int": [1, 2]}}))
    assert "is a value, not a section" in error(space(params={"seed.x": {"int": [1, 2]}}))
    assert error(space(params={"teacher.lora": {"choice": [1]}})).startswith(
        "params.teacher.lora: teacher.lora is a section")


@pytest.mark.parametrize("spec, fragment", [
    ([1, 2], "params.teacher.lora.rank: invalid distribution [1, 2]"),
    ({"choice": [1], "int": [1, 2]}, "invalid distribution"),
    ({"normal": [0, 1]}, "unknown distribution 'normal'"),
    ({"choice": []}, "params.teacher.lora.rank.choice: invalid value []; allowed: a non-empty"),
    ({"choice": [2, 2]}, "allowed: distinct values"),
    ({"int": [1, 2, 3]}, "allowed: 2 numbers [low, high]"),
    ({"int": [4, 2]}, "low <= high"),
    ({"int": [1.5, 4]}, "two integers"),
    ({"uniform": [1.0, 1.0]}, "low < high"),
    ({"loguniform": [0, 1]}, "0 < low < high"),
    ({"quniform": [0, 1, 0]}, "q > 0"),
    ({"uniform": ["a", 1]}, "2 numbers"),
])
def test_malformed_distributions(spec, fragment):
    assert fragment in error(space(params={"teacher.lora.rank": spec}))


def test_values_the_experiment_config_rejects():
    msg = error(space(params={"distill.w_logits": {"choice": [0.1, -1.0]}}))
    assert msg.startswith("params.distill.w_logits: choice value -1.0 is not a valid experiment "
                          "config: distill.w_logits: invalid value -1.0; allowed: a number >= 0")
    assert "int value 0" in error(space(params={"teacher.lora.rank": {"int": [0, 8]}}))
    # a float range on an integer field
    assert "uniform value 1.0" in error(space(params={"teacher.lora.rank": {"uniform": [1, 8]}}))
    assert "allowed: an integer" in error(space(params={"teacher.lora.rank": {"uniform": [1, 8]}}))


def test_settings_errors():
    assert error(space(objective={"metric": "val_dice"})).startswith(
        "objective.metric: invalid value 'val_dice'; allowed: '<stage>:<metric>'")
    assert error(space(objective={"metric": "teacher:val/dice", "mode": "up"})).startswith(
        "objective.mode: invalid value 'up'")
    assert "a metric of one of this experiment's stages" in error(
        space(objective={"metric": "nope:val/dice"}), stages=["data", "teacher"])
    assert error(space(scheduler={"grace_period": 4, "max_t": 2})).startswith(
        "scheduler.max_t: invalid value 2; allowed: an integer >= scheduler.grace_period (4)")
    assert error(space(max_concurrent_trials=0)).startswith("max_concurrent_trials: invalid")
    assert error(space(params={})).startswith("params: invalid value {}")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space(params={"distill.w_logits": {"loguniform": [0, 1]}})))
    with pytest.raises(ConfigError, match=r"s\.yaml: params\.distill\.w_logits\.loguniform"):
        load_space(path)
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml")


def test_to_tune_domains_and_overrides():
    s = parse_space(space(params={
        "teacher.lora.rank": {"int": [2, 4]},
        "distill.w_logits": {"quniform": [0.0, 1.0, 0.25]},
        "distill.lr": {"loguniform": [1e-5, 1e-3]},
        "distill.w_hidden": {"choice": [0.1, 0.5]},
    }), BASE)
    domains = s.to_tune()
    rng = np.random.default_rng(0)
    ranks = domains["teacher.lora.rank"].sample(size=400, random_state=rng)
    assert set(ranks) == {2, 3, 4}  # both bounds included
    w = np.array(domains["distill.w_logits"].sample(size=400, random_state=rng))
    assert set(np.round(w / 0.25, 9)) <= {0, 1, 2, 3, 4} and w.min() >= 0 and w.max() <= 1
    lr = np.log10(domains["distill.lr"].sample(size=2000, random_state=rng))
    assert -5 <= lr.min() and lr.max() <= -3 and abs(lr.mean() + 4) < 0.1  # uniform in log
    assert domains["distill.w_hidden"].categories == [0.1, 0.5]
    cfg = load_config(None, s.overrides({"teacher.lora.rank": 3, "distill.w_logits": 0.25,
                                         "distill.lr": 1e-4}))
    assert (cfg.teacher.lora.rank, cfg.distill.w_logits, cfg.distill.lr) == (3, 0.25, 1e-4)


def test_cli_tune_reports_space_errors_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from tskd.cli import main

    started = []  # (a session-wide Ray of other tests may be up: watch for a new start instead)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(1))

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space(params={"distill.w_logit": {"choice": [0.1]}})))
    assert main(["tune", "--space", str(path), "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: params.distill.w_logit: unknown config key; keys of distill:" in err
    assert started == []
    path.write_text(yaml.safe_dump(space(objective={"metric": "student_ta_kd:val/dice"})))
    assert main(["tune", "--space", str(path), "--set", f"output_dir={tmp_path}",
                 "--set", "students=[ts_kd]"]) == 2
    assert "a metric of one of this experiment's stages" in capsys.readouterr().err
    assert started == []


def test_trials_keep_only_the_objectives_arm():
    from tskd.search_space import trial_base

    base = to_dict(load_config())
    assert trial_base(base, "student_ts_kd")["students"] == ["ts_kd"]
    assert trial_base(base, "distill_ta_kd")["students"] == ["ta_kd"]
    assert trial_base(base, "teacher")["students"] == base["students"]
    # so a KD-weights space may sample w_hidden = 0 although the demo also runs task-agnostic KD
    space = load_space(SPACES / "kd_weights.yaml", load_config())
    assert 0.0 in space.params["distill.w_hidden"].args
