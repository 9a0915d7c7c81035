"""benchmarks/scaling.py's pure parts, without Ray: the cells it plans (global batch fixed,
threads per worker), the config each cell's Train run gets, and the ratio arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scaling.py"


def _module():
    return load_script("scaling")


def test_cells_fix_the_global_batch_and_split_the_cores():
    s = _module()
    by_teacher, by_workers = s.plan_cells(["sam_tiny", "sam_demo"], [1, 2, 4],
                                          worker_teacher="sam_demo", global_batch=8, cores=4,
                                          images=48)
    assert [(c.teacher, c.workers, c.batch_per_worker, c.threads) for c in by_teacher] == [
        ("sam_tiny", 1, 8, 4), ("sam_demo", 1, 8, 4)]
    assert [(c.workers, c.batch_per_worker, c.threads) for c in by_workers] == [
        (1, 8, 4), (2, 4, 2), (4, 2, 1)]
    assert {c.global_batch for c in by_teacher + by_workers} == {8}
    # the 1-worker cell of the worker study is the sam_demo cell of the teacher study: run once
    assert len(dict.fromkeys(by_teacher + by_workers)) == 4
    _, two_cores = s.plan_cells([], [1, 2, 4], worker_teacher="sam_tiny", global_batch=8,
                                cores=2, images=8)
    assert [c.threads for c in two_cores] == [2, 1, 1]  # never 0 threads


@pytest.mark.parametrize("kwargs, flag", [
    ({"workers": [3]}, "--workers 3"),
    ({"workers": [0]}, "--workers 0"),
    ({"images": 20}, "--images 20"),
    ({"images": 4}, "--images 4"),
    ({"cores": 0}, "--cores 0"),
])
def test_bad_cells_name_the_flag(kwargs, flag):
    s = _module()
    args = {"workers": [1, 2], "images": 48, "cores": 2} | kwargs
    with pytest.raises(ValueError, match=flag):
        s.plan_cells(["sam_tiny"], args["workers"], worker_teacher="sam_tiny", global_batch=8,
                     cores=args["cores"], images=args["images"])


def test_train_config_of_a_cell_without_ray(tmp_path):
    """In a fresh interpreter (no test has imported Ray there): the module and the config it
    builds for a 2-worker cell import no Ray."""
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_scaling", {str(SCRIPT)!r})
s = sys.modules["bench_scaling"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(s)
cell = s.Cell("sam_demo", 2, 4, 1)
config, ray_cfg = s.train_config(cell, checkpoint="/ckpt/sam_demo.pt", size=64,
                                 teacher_size=96, images=48, epochs=3)
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray imported"
print(json.dumps([config, ray_cfg.num_workers, ray_cfg.torch_threads, ray_cfg.cpus_per_worker,
                  ray_cfg.checkpoint_every]))
"""
    import json

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(REPO / "platform")})
    assert out.returncode == 0, out.stderr
    config, workers, threads, cpus, every = json.loads(out.stdout)
    assert (workers, threads, every) == (2, 1, 3)  # one checkpoint, after the last epoch
    assert 0 < cpus < 1
    assert config["ray"]["num_workers"] == 2 and config["ray"]["torch_threads"] == 1
    d = config["distill"]
    assert d["batch_size"] * workers == 8 and d["epochs"] == 3
    assert d["teacher_placement"] == "replicated"
    assert (d["w_logits"], d["w_hidden"]) == (0.2, 0.1)  # TS-KD8, the stage's default
    assert config["teacher"] == {"tuned": False, "checkpoint": "/ckpt/sam_demo.pt",
                                 "arch": "sam_demo", "img_size": 96, "num_classes": 3}
    assert config["student"]["img_size"] == 64 and config["n_transfer"] == 48
    assert config["num_classes"] == 3


def test_speedup_efficiency_and_slowdown_arithmetic():
    s = _module()
    scale = s.speedups({1: 10.0, 2: 15.0, 4: 30.0})
    assert scale[1] == pytest.approx((1.0, 1.0))
    assert scale[2] == pytest.approx((1.5, 0.75))
    assert scale[4] == pytest.approx((3.0, 0.75))
    assert s.speedups({2: 8.0, 4: 12.0})[4] == pytest.approx((1.5, 0.75))  # base: 2 workers
    slow = s.slowdowns({"big": 5.0, "tiny": 20.0, "mid": 10.0},
                       {"big": 90_000_000, "tiny": 3_000_000, "mid": 19_000_000})
    assert slow == pytest.approx({"big": 4.0, "tiny": 1.0, "mid": 2.0})
    assert s.ray_cpus(2) == 4 and s.ray_cpus(8) == 6


def test_transfer_rows_are_the_same_random_images_every_call():
    s = _module()
    a, b = s.transfer_rows(3, 16), s.transfer_rows(3, 16)
    assert [r["id"] for r in a] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert ra["image"].shape == (16, 16, 3) and ra["image"].dtype.name == "float32"
        assert (ra["image"] == rb["image"]).all()
        assert 0.0 <= ra["image"].min() and ra["image"].max() < 255.0
    assert not (a[0]["image"] == a[1]["image"]).all()
