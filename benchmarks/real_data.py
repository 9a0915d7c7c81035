"""The CPU-scale TS-KD pipeline on the real datasets in ../shared/data (PH2, BUSI), when present.

    python benchmarks/real_data.py [--data-root ../shared/data] [--datasets ph2 busi]
                                   [--output-dir runs/bench] [--set key=value ...]
                                   [--transfer synthetic [synthetic+unlabelled ...]]
                                   [--no-model-selection]

Each dataset there is laid out as ``<name>/{train,test}/{images,masks}`` with binary 0/255
masks; this script links it into the tskd format (``dataset.json`` with the given train/test
split, ``images/``, ``masks/``), runs ``tskd run`` with the demo's CPU-scale settings (the same
cached ``sam_demo`` teacher, pre-trained on the procedural corpus, not on these images), and
prints a Markdown table of teacher / TS-KD / task-agnostic KD / scratch Dice, HD95 (pixels of the
original images: no spacing is given) and mIoU with each stage's wall time. Numbers are as
measured in this run, whichever way they fall. The product never depends on these files.

``n_labels`` per dataset (``BUDGETS``) is the whole label budget: with model selection (default)
``data.val_share`` of it validates, ``--no-model-selection`` trains on all of it for the fixed
schedule and keeps the last epoch (the paper's protocol). ``--transfer`` lists transfer-set
variants (``transfer.sources`` joined by ``+``): each runs in the same experiment directory, so
only the stages from ``transfer`` on re-run, and its results are kept as
``results_<variant>.json`` and printed as their own table.
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
BUDGETS = {"ph2": {"n_labels": 40}, "busi": {"n_labels": 30}}
"""Labelled images in total (training + validation), as the paper's smallest PH2 budget."""


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
    parser.add_argument("--transfer", nargs="+", default=["synthetic"],
                        metavar="SOURCES", help="transfer-set variants, e.g. synthetic "
                        "synthetic+unlabelled unlabelled (default: synthetic, the paper's)")
    parser.add_argument("--no-model-selection", action="store_true",
                        help="data.model_selection=false: no validation images, last epoch")
    args = parser.parse_args()
    for variant in args.transfer:
        if not variant or not set(variant.split("+")) <= {"synthetic", "unlabelled"}:
            parser.error(f"--transfer {variant!r}: expected sources from synthetic, "
                         f"unlabelled joined by '+'")

    rows = []
    for name in args.datasets:
        src = Path(args.data_root) / name
        if not src.is_dir():
            print(f"skipping {name}: {src} not found")
            continue
        root = link_dataset(src, Path(args.output_dir) / "datasets" / name, name)
        budget = BUDGETS.get(name, {"n_labels": 30})
        for variant in args.transfer:
            sources = "[" + ", ".join(variant.split("+")) + "]"
            cmd = [sys.executable, "-m", "tskd.cli", "run", "--set", f"experiment={name}",
                   "--set", f"output_dir={args.output_dir}", "--set", f"data.root={root}",
                   "--set", f"data.n_labels={budget['n_labels']}",
                   "--set", f"data.model_selection={str(not args.no_model_selection).lower()}",
                   "--set", f"transfer.sources={sources}"]
            for override in args.overrides:
                cmd += ["--set", override]
            start = time.time()
            subprocess.run(cmd, check=True)
            wall = time.time() - start
            run_dir = Path(args.output_dir) / name
            results = json.loads((run_dir / "results.json").read_text())
            (run_dir / f"results_{variant}.json").write_text(json.dumps(results, indent=2))
            stages = {json.loads(m.read_text())["stage"]:
                      json.loads(m.read_text())["wall_time_s"]
                      for m in run_dir.glob("*/manifest.json")}
            splits = json.loads((run_dir / "data" / "splits.json").read_text())
            rows.append((name, variant, results, stages, wall, budget, splits))

    for name, variant, results, stages, wall, budget, splits in rows:
        print(f"\n### {name}, transfer set {variant}: {budget['n_labels']} labels "
              f"({splits.get('n_labelled_train')} train + {splits.get('n_labelled_val')} "
              f"validation), {results['n_test']} test images, {wall / 60:.1f} min\n")
        print("| model | Dice | HD95 (px) | mIoU |\n|---|---|---|---|")
        models = [("teacher (LoRA sam_demo)", results["teacher"])]
        models += [(f"student {arm}", s) for arm, s in results["students"].items()]
        for label, s in models:
            print(f"| {label} | {s['dice']:.4f} | {s['hd95']:.2f} | {s['miou']:.4f} |")
        print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
