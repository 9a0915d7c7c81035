"""benchmarks/grid_demo.py's analysis, without Ray: the store entries a grid's cells used (from
their run views) and what sharing them saved, on a grid whose run views and manifests the test
writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "grid_demo.py"


def _module():
    return load_script("grid_demo")


def _entry(out: Path, stage: str, fp: str, wall: float) -> dict[str, str]:
    entry = out / "store" / stage / fp
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "manifest.json").write_text(json.dumps(
        {"stage": stage, "fingerprint": fp, "wall_time_s": wall, "status": "complete"}))
    return {"fingerprint": fp, "entry": f"../store/{stage}/{fp}"}


def _grid(tmp_path: Path) -> Path:
    """Four cells (2 methods x 2 transfer sizes) whose run views share a data entry, share a
    transfer set per size, and each own a student."""
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\naxes:\n  methods: [scratch, ts_kd]\n  transfer_sizes: [10, 20]\n")
    out = tmp_path / "runs"
    data = _entry(out, "data", "d0", 3.0)
    transfer = {10: _entry(out, "transfer", "t10", 50.0), 20: _entry(out, "transfer", "t20", 70.0)}
    for method in ("scratch", "ts_kd"):
        for n in (10, 20):
            run = out / f"g-{method}-n{n}"
            run.mkdir(parents=True)
            view = {"data": data, "transfer": transfer[n],
                    f"student_{method}": _entry(out, f"student_{method}", f"{method}{n}", 40.0)}
            (run / "stages.json").write_text(json.dumps({"stages": view}))
    return grid


def test_builds_and_time_the_store_saved(tmp_path):
    g = _module()
    grid = _grid(tmp_path)
    manifests, users, cells = g.stage_use(grid, tmp_path / "runs", [])
    assert len(cells) == 4
    s = g.savings(manifests, users)
    # data: 1 build, 4 uses; transfer: 2 builds, 2 uses each; students: 4 builds, 1 use each
    assert s.per_stage["data"] == {"built": 1, "uses": 4, "build_s": 3.0}
    assert s.per_stage["transfer"] == {"built": 2, "uses": 4, "build_s": 120.0}
    assert s.per_stage["student_ts_kd"] == {"built": 2, "uses": 2, "build_s": 80.0}
    assert (s.uses, s.builds, s.build_s) == (12, 7, 283.0)
    assert s.saved_s == 3.0 * 3 + 50.0 + 70.0  # every use after an entry's first


def test_analyse_prints_the_table(tmp_path):
    grid = _grid(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPT), "--analyse", "--grid", str(grid),
                          "--out", str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO / "platform"),
                                           "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "stage uses 12, builds 7, builds saved by the store 5 (42%)" in out.stdout
    assert "build time saved (each reuse at its entry's build time): 129 s" in out.stdout
    assert "no grid.csv under" in out.stdout
