"""``tskd grid``: expansion and validation; cells on Ray Tune sharing the store (fake stages)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray import cloudpickle

from tskd.config import ConfigError, fingerprint, to_dict
from tskd.grid import cells, load_grid, run_grid
from tskd.pipeline import Stage

cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _write(tmp_path: Path, grid: dict, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid))
    return path


def test_cells_are_the_product_of_the_axes(tmp_path):
    (tmp_path / "base.yaml").write_text("distill: {epochs: 2}\n")
    path = _write(tmp_path, {"base": "base.yaml", "set": {"output_dir": str(tmp_path / "runs")},
                             "axes": {"methods": ["scratch", "ts_kd5"],
                                      "transfer_sizes": [10, 20], "label_budgets": [8, 12],
                                      "seeds": [0, 1]}})
    grid = load_grid(path)
    got = cells(grid)
    assert len(got) == 2 * 2 * 2 * 2 and len({c.name for c in got}) == 16
    c = next(c for c in got if c.name == "ts_kd5-n20-l8-s1")
    cfg = c.config
    assert cfg.experiment == "g-ts_kd5-n20-l8-s1" and cfg.students == ["ts_kd"]
    assert (cfg.distill.preset, cfg.distill.logits_loss, cfg.distill.w_logits) == ("ts_kd5", "ce",
                                                                                   1.0)
    assert (cfg.transfer.n_images, cfg.data.n_labels, cfg.seed) == (20, 8, 1)
    assert cfg.distill.epochs == 2  # from the base file
    assert cfg.output_dir == str(tmp_path / "runs")
    assert next(c for c in got if c.name.startswith("scratch")).config.students == ["scratch"]


def test_students_axis_sets_the_student(tmp_path):
    path = _write(tmp_path, {"axes": {"methods": ["ts_kd"], "students": ["vit8", "basic_unet"]}})
    got = {c.name: c.config.student for c in cells(load_grid(path))}
    assert (got["ts_kd-vit8"].arch, got["ts_kd-vit8"].patch_size) == ("vit", 8)
    assert got["ts_kd-basic_unet"].arch == "basic_unet"
    with pytest.raises(ConfigError, match="axes.students: invalid value 'lstm'"):
        load_grid(_write(tmp_path, {"axes": {"methods": ["ts_kd"], "students": ["lstm"]}}))


def test_workers_axis_keeps_the_global_batch(tmp_path):
    path = _write(tmp_path, {"axes": {"methods": ["ts_kd"], "workers": [1, 2, 4]},
                             "global_batch": 8})
    got = {c.name: c.config for c in cells(load_grid(path))}
    assert {n: (c.ray.num_workers, c.distill.batch_size) for n, c in got.items()} == {
        "ts_kd-w1": (1, 8), "ts_kd-w2": (2, 4), "ts_kd-w4": (4, 2)}
    with pytest.raises(ConfigError, match="axes.workers: invalid value 3"):
        load_grid(_write(tmp_path, {"axes": {"methods": ["ts_kd"], "workers": [1, 3]},
                                    "global_batch": 8}))


@pytest.mark.parametrize("grid, fragment", [
    ({"axes": {"methods": ["ts_kd", "dino"]}}, "axes.methods: invalid value 'dino'"),
    ({"axes": {"methods": ["ts_kd"], "sizes": [1]}}, "axes.sizes: invalid value [1]"),
    ({"axes": {"transfer_sizes": [1]}}, "axes: invalid value"),
    ({"axes": {"methods": ["ts_kd", "ts_kd"]}}, "a non-empty list of distinct values"),
    ({"axes": {"methods": ["ts_kd"]}, "concurrency": 2}, "concurrency: invalid value 2"),
    ({"axes": {"methods": ["ts_kd"], "lora_ranks": [0]}},
     "cell ts_kd-r0: teacher.lora.rank: invalid value 0"),
    ({"axes": {"methods": ["ts_kd"]}, "set": {"distill": {"epoch": 3}}}, "distill.epoch"),
])
def test_grid_errors_name_the_file_and_the_key(tmp_path, grid, fragment):
    path = _write(tmp_path, grid)
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("name, n", [("grid_demo.yaml", 20), ("paper_kidneyus.yaml", 54),
                                      ("paper_autooral.yaml", 54), ("paper_chaos.yaml", 54),
                                      ("paper_ph2.yaml", 54), ("paper_drive.yaml", 54),
                                      ("scaling_teachers.yaml", 4), ("scaling_workers.yaml", 4)])
def test_shipped_grids_load_and_expand(name, n):
    grid = load_grid(JOBS / name)
    assert len(cells(grid)) == n


# --- a grid on Ray Tune with fake stages -----------------------------------------------------

def _stage(ctx):
    cfg = ctx.cfg
    with open(Path(cfg.output_dir) / "builds.log", "a") as f:
        f.write(f"{ctx.name} {cfg.data.n_labels} {cfg.students[0]}\n")
    time.sleep(0.2)
    if ctx.name == "student" and cfg.students[0] == "ta_kd" and cfg.data.n_labels == 12:
        raise RuntimeError("planted failure")
    if ctx.name == "evaluate":
        arm = cfg.students[0]
        dice = 0.5 + cfg.data.n_labels / 100 + (0.1 if arm == "ts_kd" else 0.0)
        results = {"config_fingerprint": fingerprint(to_dict(cfg)),
                   "metrics": {"convention": "tskd", "hd95_unit": "pixels"},
                   "teacher": {"dice": 0.9},
                   "reference": {"dice": 0.7},
                   "students": {arm: {"dice": dice, "hd95": 3.0, "miou": dice - 0.1,
                                      "per_class": {"organ": {"dice": dice, "hd95": 3.0,
                                                              "miou": dice - 0.1}},
                                      "model": {"size_mb": 21.0}}}}
        (cfg.run_dir / "results.json").write_text(json.dumps(results))
    return {}


def fake_plan(cfg):
    return [Stage("data", _stage, (), {"labels": cfg.data.n_labels}),
            Stage("teacher", _stage, ("data",), {}),
            Stage("student", _stage, ("teacher",), {"arm": cfg.students[0]}),
            Stage("evaluate", _stage, ("student",), {"arm": cfg.students[0]})]


def test_grid_whose_cells_hold_every_cpu_is_refused_before_a_trial_starts(tmp_path,
                                                                         monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    path = _write(tmp_path, {"set": {"output_dir": str(tmp_path / "runs")},
                             "axes": {"methods": ["scratch", "ts_kd"]},
                             "max_concurrent": 2, "resources_per_cell": {"cpu": 1}})
    with pytest.raises(ConfigError, match=rf"^{path}: max_concurrent=2 trials x "
                                          r"resources_per_cell.cpu=1 CPU hold 2 of"):
        run_grid(load_grid(path))


@pytest.mark.slow
def test_grid_runs_cells_shares_stages_records_failures_and_skips_finished(tmp_path, ray_local):
    path = _write(tmp_path, {"set": {"output_dir": str(tmp_path)}, "max_concurrent": 2,
                             "axes": {"methods": ["ts_kd", "ta_kd", "scratch"],
                                      "label_budgets": [8, 12]}})
    grid = load_grid(path)
    rows = run_grid(grid, planner=fake_plan)
    by = {r["cell"]: r for r in rows}
    assert by["ta_kd-l12"]["status"] == "failed"
    assert "planted failure" in by["ta_kd-l12"]["error"]
    assert (grid.dir / "errors" / "ta_kd-l12.txt").is_file()
    done = {c: r for c, r in by.items() if c != "ta_kd-l12"}
    assert all(r["status"] == "done" for r in done.values())
    for cell, r in done.items():  # the cell's own numbers, recomputed here
        arm, labels = cell.split("-l")
        assert r["dice"] == pytest.approx(0.5 + int(labels) / 100 + (0.1 if arm == "ts_kd" else 0))
        assert r["dice/organ"] == r["dice"] and r["reference_dice"] == 0.7
    builds = Counter(tuple(line.split()[:2])
                     for line in (tmp_path / "builds.log").read_text().splitlines())
    # one data and one teacher entry per label budget, shared by the three methods
    assert builds[("data", "8")] == 1 and builds[("teacher", "12")] == 1
    table = pd.read_csv(grid.dir / "grid.csv")
    assert len(table) == 6 and set(table["status"]) == {"done", "failed"}
    assert (grid.dir / "grid.parquet").is_file()

    # again: only the failed cell runs (it fails again); finished cells are not touched
    before = (tmp_path / "builds.log").read_text().splitlines()
    rows = run_grid(grid, planner=fake_plan)
    after = (tmp_path / "builds.log").read_text().splitlines()[len(before):]
    assert after == ["student 12 ta_kd"]
    assert [r["cell"] for r in rows if r["status"] == "failed"] == ["ta_kd-l12"]


def test_methods_axis_takes_the_baseline_arms(tmp_path):
    ckpt = tmp_path / "mae_tiny.pth"
    ckpt.write_bytes(b"x")
    path = _write(tmp_path, {"set": {"imagenet_mae": {"checkpoint": str(ckpt)}},
                             "axes": {"methods": ["imagenet_mae", "mae", "mocov3"],
                                      "transfer_sizes": [10]}})
    got = {c.name: c.config for c in cells(load_grid(path))}
    assert {n: c.students for n, c in got.items()} == {
        "imagenet_mae-n10": ["imagenet_mae"], "mae-n10": ["mae"], "mocov3-n10": ["mocov3"]}
    # the ViT-only arms with a CNN student: the cell's config error names the field
    with pytest.raises(ConfigError, match="students"):
        load_grid(_write(tmp_path, {"axes": {"methods": ["mae"], "students": ["basic_unet"]}}))
