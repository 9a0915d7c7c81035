"""Rungs: a short fine-tune of a copy of the student; forwarded to Tune so ASHA stops early."""

from __future__ import annotations

import sys

import pytest
import torch
from ray import cloudpickle

from tskd.config import ConfigError, load_config, to_dict
from tskd.stages.rungs import OBJECTIVE, RUNG_KEY, rung_dice

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def rung_config(tmp_path_factory):
    from tskd.data.demo import write_demo_dataset
    from tskd.data.format import load_dataset_info

    root = write_demo_dataset(tmp_path_factory.mktemp("rungs") / "d", n_images=8, size=32,
                              seed=1)
    info = load_dataset_info(root)
    ids = sorted(p.stem for p in (root / "images").iterdir())
    cfg = load_config(None, ["student.img_size=32", "student.patch_size=8",
                             "student.decoder_dim=16"])
    return {"student": to_dict(cfg.student), "num_classes": info.num_classes,
            "rungs": {"info": info, "labelled": ids[:4], "val": ids[4:6], "image_size": 32,
                      "augment": True, "epochs": 1, "batch_size": 2, "lr": 1e-3,
                      "weight_decay": 0.05, "seed": 0}}


def _student(config):
    from tskd.models.students import build_student

    torch.manual_seed(5)
    return build_student(config["student"], config["num_classes"])


def test_zero_epochs_is_the_students_own_validation_dice(rung_config):
    from tskd.data.dataset import SegmentationDataset
    from tskd.evaluation import score_model

    student = _student(rung_config)
    r = rung_config["rungs"]
    config = dict(rung_config, rungs=dict(r, epochs=0))
    expect = score_model(student, SegmentationDataset(r["info"], r["val"], 32),
                         num_classes=r["info"].num_classes)["dice"]
    assert rung_dice(student.state_dict(), config, torch.device("cpu")) == pytest.approx(expect)


def test_a_rung_leaves_the_student_and_the_rng_alone(rung_config):
    student = _student(rung_config)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dice = rung_dice(student.state_dict(), rung_config, torch.device("cpu"))
    assert 0.0 <= dice <= 1.0
    assert torch.equal(torch.get_rng_state(), before)
    for k, v in student.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the same rung twice: the same number (seeded copy, seeded loader)
    assert rung_dice(state, rung_config, torch.device("cpu")) == dice


def test_rungs_need_validation_images_and_a_student_objective():
    from tskd.search_space import parse_space, trial_base

    with pytest.raises(ConfigError, match="distill.rung_every: invalid value 1"):
        load_config(None, ["distill.rung_every=1", "data.model_selection=false"])
    cfg = load_config(None)
    with pytest.raises(ConfigError, match="scheduler.rung_every"):
        parse_space({"objective": {"metric": "teacher:val/dice"},
                     "scheduler": {"rung_every": 1},
                     "params": {"teacher.lora.rank": {"choice": [2, 4]}}}, cfg)
    base = trial_base(to_dict(cfg), "student_ts_kd", rung_every=2)
    assert base["distill"]["rung_every"] == 2 and base["students"] == ["ts_kd"]


def test_rung_settings_do_not_change_the_distillation_fingerprint():
    from tskd.pipeline import plan

    def fp(cfg):
        return next(s.config for s in plan(cfg) if s.name == "distill_ts_kd")

    assert fp(load_config(None)) == fp(load_config(None, ["distill.rung_every=1",
                                                          "distill.rung_epochs=3"]))


def _trial(params):
    """A Tune trial whose Ray Train run reports a rung per epoch (value = params['q'])."""
    from pathlib import Path

    from ray import tune

    from tskd.config import RayConfig
    from tskd.stages.ray_train import fit_torch_trainer
    from tskd.stages.rungs import tune_callback

    def loop(cfg):
        import ray.train

        for epoch in range(1, 5):
            ray.train.report({"epoch": epoch, "distill/loss": 1.0 / epoch,
                              RUNG_KEY: cfg["q"] * epoch / 4})

    fit_torch_trainer(loop, train_config={"q": params["q"]},
                      ray_cfg=RayConfig(num_workers=1, cpus_per_worker=0.5),
                      name="distill_ts_kd", storage=Path(tune.get_context().get_trial_dir()),
                      callbacks=[tune_callback()])
    tune.report({OBJECTIVE: params["q"], "final": True})


@pytest.mark.slow
def test_asha_stops_trials_at_rungs_inside_distillation(tmp_path, ray_local):
    """Four trials, one at a time, rungs worth q·epoch/4: ASHA (grace 1, factor 2) stops the
    trials whose first rung is below the median of those before them, after 1 or 2 results of
    the 5 a finished trial reports (4 rungs + the final objective)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 0.5}),
        param_space={"q": tune.grid_search([0.8, 0.6, 0.2, 0.1])},
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", max_concurrent_trials=1,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=5, grace_period=1,
                                    reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0))
    results = tuner.fit()
    iters = {r.config["q"]: r.metrics["training_iteration"] for r in results}
    rungs = {r.config["q"]: r.metrics.get("rung") for r in results}
    assert iters[0.8] == 5 and results[0].metrics.get("final") is True
    assert iters[0.1] < 5 and rungs[0.1] is not None  # stopped at a rung, inside the Train run
    assert sum(1 for i in iters.values() if i < 5) >= 1
