"""The CPU-scale demo grid end to end: its wall time, the time per stage, and the builds the
shared artifact store saved.

    python benchmarks/grid_demo.py [--grid jobs/grid_demo.yaml] [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/grid_demo.py --analyse --out DIR     # a grid that already ran under DIR

Runs ``tskd grid GRID --set output_dir=OUT`` as a user would (its own local Ray, in a
subprocess whose console goes to ``OUT/grid-console.log``), timed from command to exit, with
``OUT`` empty at the start (the teacher pre-training cache, ``~/.cache/tskd``, is used as
``tskd run`` uses it). Then it reads every cell's run view (``<run>/stages.json``) and the
manifests of the store entries those point to, and prints:

- per stage: the entries built, the cells that used them, and their build wall time summed;
- the stage uses summed over the cells, the builds, the builds saved (uses − builds), and the
  build time saved: for every use of an entry after its first, that entry's build time. That
  is what cells building their own artifacts would have spent again, computed from this run's
  build times, not measured;
- the grid's wall time against the ≤ 45 min goal of the CPU-scale grid, and each cell's
  status and mean Dice (``grid.csv``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_MIN = 45.0


def with_stand_in(grid: Path, out: Path) -> Path:
    """A copy of ``grid`` under ``out`` whose methods include ``imagenet_mae``, started from a
    *stand-in* checkpoint: timm's ViT-Tiny/16 at random init (seed 0), saved in timm layout. No
    ImageNet weights can be downloaded here; the stand-in costs what the real file would (the
    init stage loads and resamples it, the fine-tuning is the same), so the grid's time is the
    six-method grid's. Its Dice means nothing."""
    import timm
    import torch
    import yaml

    data = yaml.safe_load(grid.read_text())
    checkpoint = out / "vit_tiny_stand_in.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(),
               checkpoint)
    if data.get("base") is not None:
        data["base"] = str((grid.parent / str(data["base"])).resolve())
    if "imagenet_mae" not in data["axes"]["methods"]:
        data["axes"]["methods"] = [*data["axes"]["methods"], "imagenet_mae"]
    data.setdefault("set", {}).setdefault("imagenet_mae", {})["checkpoint"] = str(checkpoint)
    path = out / grid.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_grid(grid: Path, out: Path, overrides: list[str]) -> tuple[float, int]:
    """``tskd grid`` in a subprocess; returns (wall time s, exit status)."""
    cmd = [sys.executable, "-m", "tskd.cli", "grid", str(grid), "--set", f"output_dir={out}"]
    for text in overrides:
        cmd += ["--set", text]
    log = out / "grid-console.log"
    print(f"running: {' '.join(cmd)}\nconsole: {log}", flush=True)
    started = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return time.perf_counter() - started, rc


def stage_use(grid: Path, out: Path, overrides: list[str]) -> tuple[dict, dict, list]:
    """(entry -> manifest, entry -> cells using it, the grid's cells) from the run views."""
    from tskd.grid import cells, load_grid
    from tskd.store import read_json, read_view

    g = load_grid(grid, [*overrides, f"output_dir={out}"])
    manifests: dict[Path, dict] = {}
    users: dict[Path, list[str]] = defaultdict(list)
    all_cells = cells(g)
    for cell in all_cells:
        run_dir = cell.config.run_dir
        for rec in read_view(run_dir).values():
            entry = (run_dir / rec["entry"]).resolve()
            manifests.setdefault(entry, read_json(entry / "manifest.json") or {})
            users[entry].append(cell.name)
    return manifests, users, all_cells


@dataclass
class Savings:
    """What the store saved a grid: per stage ``{"built", "uses", "build_s"}``, and totals."""

    per_stage: dict[str, dict[str, Any]]
    uses: int
    builds: int
    build_s: float
    saved_s: float


def savings(manifests: dict[Path, dict], users: dict[Path, list[str]]) -> Savings:
    """From the store entries the cells used (entry -> its manifest, entry -> the cells using
    it): the builds per stage, the stage uses, and the build time saved (each use of an entry
    after its first, at that entry's ``wall_time_s``)."""
    per_stage: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"built": 0, "uses": 0, "build_s": 0.0})
    saved_s = 0.0
    for entry, m in manifests.items():
        t = float(m.get("wall_time_s") or 0.0)
        row = per_stage[m.get("stage", entry.parent.name)]
        row["built"] += 1
        row["uses"] += len(users[entry])
        row["build_s"] += t
        saved_s += t * (len(users[entry]) - 1)
    return Savings(dict(per_stage), uses=sum(len(u) for u in users.values()),
                   builds=len(manifests), build_s=sum(r["build_s"] for r in per_stage.values()),
                   saved_s=saved_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=ROOT / "jobs" / "grid_demo.yaml")
    ap.add_argument("--out", type=Path, default=None,
                    help="output_dir of the grid (default: a new directory under /tmp)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a config value for every cell (tskd grid --set)")
    ap.add_argument("--imagenet-stand-in", action="store_true",
                    help="add the imagenet_mae method, started from a random-init stand-in "
                         "checkpoint (times the six-method grid; its Dice means nothing)")
    ap.add_argument("--analyse", action="store_true",
                    help="do not run: analyse the grid already under --out")
    args = ap.parse_args()
    grid = args.grid.resolve()
    if args.analyse:
        if args.out is None:
            ap.error("--analyse needs --out, the grid's output_dir")
        out, wall, rc = args.out.resolve(), None, None
        if args.imagenet_stand_in:
            grid = out / grid.name  # the copy the run wrote
    else:
        out = (args.out or Path(f"/tmp/grid_demo-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
        if out.exists() and any(out.iterdir()):
            ap.error(f"--out {out} is not empty: the benchmark times a grid from an empty store "
                     "(--analyse reads one that ran)")
        out.mkdir(parents=True, exist_ok=True)
        if args.imagenet_stand_in:
            grid = with_stand_in(grid, out)
        print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
        wall, rc = run_grid(grid, out, args.overrides)
        print(f"tskd grid exited with {rc} after {wall:.1f} s = {wall / 60:.1f} min", flush=True)

    manifests, users, all_cells = stage_use(grid, out, args.overrides)
    s = savings(manifests, users)
    print(f"\n{'stage':<22} {'built':>6} {'uses':>6} {'build s':>9}")
    for stage, row in sorted(s.per_stage.items(), key=lambda kv: -kv[1]["build_s"]):
        print(f"{stage:<22} {row['built']:>6} {row['uses']:>6} {row['build_s']:>9.1f}")
    print(f"{'all stages':<22} {s.builds:>6} {s.uses:>6} {s.build_s:>9.1f}")
    print(f"\ncells: {len(all_cells)}; stage uses {s.uses}, builds {s.builds}, builds saved by "
          f"the store {s.uses - s.builds} ({(s.uses - s.builds) / max(s.uses, 1):.0%})")
    print(f"build time saved (each reuse at its entry's build time): {s.saved_s:.0f} s = "
          f"{s.saved_s / 60:.1f} min; without the store the stages would sum to about "
          f"{(s.build_s + s.saved_s) / 60:.1f} min against {s.build_s / 60:.1f} min")
    if wall is not None:
        verdict = "met" if wall / 60 <= GOAL_MIN else "not met"
        print(f"grid wall time {wall / 60:.1f} min against the <= {GOAL_MIN:.0f} min goal: "
              f"{verdict}")
    csv = next(out.glob("*-grid/grid.csv"), None)
    if csv is not None:
        import pandas as pd

        df = pd.read_csv(csv)
        cols = [c for c in ("cell", "status", "dice", "hd95", "teacher_dice", "reference_dice",
                            "pretrain_s", "finetune_s") if c in df]
        print(f"\n{csv}:\n{df[cols].to_string(index=False)}")
    else:
        print(f"\nno grid.csv under {out}")
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
