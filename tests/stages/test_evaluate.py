"""How evaluate reports each student's pre-training cost, read through the store's manifests."""

import json

from tskd.stages.evaluate import pretrain_cost


def _entry(store, stage, fp, manifest):
    path = store / stage / fp
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_pretrain_cost_follows_the_student_to_its_init_stage(tmp_path):
    store = tmp_path / "store"
    _entry(store, "data", "d1", {"wall_time_s": 1.0, "metrics": {}})
    _entry(store, "pretrain_mae", "p1", {"wall_time_s": 42.5,
                                         "metrics": {"pretrain/train_time_s": 30.25}})
    _entry(store, "distill_ts_kd", "k1", {"wall_time_s": 12.0, "metrics": {"distill/loss": 1}})
    mae = _entry(store, "student_mae", "s1", {"upstream": {"data": "d1", "pretrain_mae": "p1"}})
    kd = _entry(store, "student_ts_kd", "s2", {"upstream": {"data": "d1", "distill_ts_kd": "k1"}})
    scratch = _entry(store, "student_scratch", "s3", {"upstream": {"data": "d1"}})
    assert pretrain_cost(mae) == {"stage": "pretrain_mae", "wall_time_s": 42.5,
                                  "train_time_s": 30.25}
    assert pretrain_cost(kd) == {"stage": "distill_ts_kd", "wall_time_s": 12.0,
                                 "train_time_s": None}
    assert pretrain_cost(scratch) is None
