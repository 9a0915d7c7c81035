"""The CPU-scale TS-KD pipeline on the real datasets in ../shared/data (PH2, BUSI), when present.

    python benchmarks/real_data.py [--data-root ../shared/data] [--datasets ph2 busi]
                                   [--output-dir runs/bench] [--set key=value ...]

Each dataset there is laid out as ``<name>/{train,test}/{images,masks}`` with binary 0/255
masks; this script links it into the tskd format (``dataset.json`` with the given train/test
split, ``images/``, ``masks/``), runs ``tskd run`` with the demo's CPU-scale settings (the same
cached ``sam_demo`` teacher, pre-trained on the procedural corpus, not on these images), and
prints a Markdown table of teacher / TS-KD / task-agnostic KD / scratch Dice, HD95 (pixels of the
original images: no spacing is given) and mIoU with each stage's wall time. Numbers are as
measured in this run, whichever way they fall. The product never depends on these files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {"ph2": {"n_labels": 40, "n_val": 10}, "busi": {"n_labels": 30, "n_val": 10}}


def link_dataset(src: Path, dst: Path, name: str) -> Path:
    """A tskd-format view of ``src/{train,test}/{images,masks}`` (symlinks + dataset.json)."""
    if (dst / "dataset.json").is_file():
        return dst
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    for split in ("train", "test"):
        ids = []
        for image in sorted((src / split / "images").iterdir()):
            # masks are named <id>.png, <id>_lesion.png (PH2) or <id>_mask.png (BUSI)
            masks = [m for m in (src / split / "masks").glob(image.stem + "*")
                     if m.stem in (image.stem, image.stem + "_lesion", image.stem + "_mask")]
            if len(masks) != 1:
                sys.exit(f"{image}: expected one mask in {src / split / 'masks'}")
            os.symlink(image.resolve(), dst / "images" / image.name)
            os.symlink(masks[0].resolve(), dst / "masks" / (image.stem + masks[0].suffix))
            ids.append(image.stem)
        splits[split] = ids
    (dst / "dataset.json").write_text(json.dumps({
        "name": name, "modality": "dermoscopy" if name == "ph2" else "US",
        "labels": {"0": "background", "1": "lesion"}, "splits": splits}, indent=2))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["ph2", "busi"])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    rows = []
    for name in args.datasets:
        src = Path(args.data_root) / name
        if not src.is_dir():
            print(f"skipping {name}: {src} not found")
            continue
        root = link_dataset(src, Path(args.output_dir) / "datasets" / name, name)
        budget = BUDGETS.get(name, {"n_labels": 30, "n_val": 10})
        cmd = [sys.executable, "-m", "tskd.cli", "run", "--set", f"experiment={name}",
               "--set", f"output_dir={args.output_dir}", "--set", f"data.root={root}",
               "--set", f"data.n_labels={budget['n_labels']}",
               "--set", f"data.n_val={budget['n_val']}"]
        for override in args.overrides:
            cmd += ["--set", override]
        start = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - start
        run_dir = Path(args.output_dir) / name
        results = json.loads((run_dir / "results.json").read_text())
        stages = {json.loads(m.read_text())["stage"]: json.loads(m.read_text())["wall_time_s"]
                  for m in run_dir.glob("*/manifest.json")}
        rows.append((name, results, stages, wall, budget))

    for name, results, stages, wall, budget in rows:
        print(f"\n### {name}: {budget['n_labels']} labels, {results['n_test']} test images, "
              f"{wall / 60:.1f} min end to end\n")
        print("| model | Dice | HD95 (px) | mIoU |\n|---|---|---|---|")
        models = [("teacher (LoRA sam_demo)", results["teacher"])]
        models += [(f"student {arm}", s) for arm, s in results["students"].items()]
        for label, s in models:
            print(f"| {label} | {s['dice']:.4f} | {s['hd95']:.2f} | {s['miou']:.4f} |")
        print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
