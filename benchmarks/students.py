"""Which student wins: scratch and TS-KD Dice per student architecture, beside the label-only
reference and the teacher, with each student's size and CPU latency.

    python benchmarks/students.py [--datasets demo ph2 busi] [--seeds 0 1]
                                  [--students vit16 vit8 resnet18 basic_unet]
                                  [--output-dir runs/bench_students] [--set key=value ...]
                                  [--smoke]

For each dataset and seed, the first student runs the whole pipeline (``tskd run`` with
``students=[ts_kd,scratch]`` and the reference); every further student reuses that run's data,
teacher and transfer-set stages through the artifact store under ``--output-dir`` (same
fingerprints) and trains only its own distillation and fine-tuning. Pointing ``--output-dir`` at
the directory of a ``real_data.py`` or ``tskd run`` with the same settings reuses its stages too
(the ViT-Tiny/16 arms then cost nothing but the evaluation). ``ph2`` / ``busi`` are read from
``../shared/data`` as in ``real_data.py``. ``--smoke`` shrinks everything to a tiny run (32 px,
a few images, one epoch) that only checks the script works; its numbers mean nothing. Prints a
Markdown table per dataset; numbers are as measured, whichever way they fall.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from real_data import BUDGETS, link_dataset

REPO = Path(__file__).resolve().parents[1]

STUDENTS = {
    "vit16": ["student.arch=vit", "student.patch_size=16"],
    "vit8": ["student.arch=vit", "student.patch_size=8"],
    "resnet18": ["student.arch=timm_unet", "student.encoder=resnet18"],
    "efficientnet_b0": ["student.arch=timm_unet", "student.encoder=efficientnet_b0"],
    "repvit_m0_9": ["student.arch=timm_unet", "student.encoder=repvit_m0_9"],
    "mobilevit_xxs": ["student.arch=timm_unet", "student.encoder=mobilevit_xxs"],
    "basic_unet": ["student.arch=basic_unet"],
    "segresnet": ["student.arch=segresnet"],
}

SMOKE = [
    "data.demo.n_images=40", "data.demo.size=32", "data.image_size=32", "data.n_labels=8",
    "data.val_share=0.25", "teacher.arch=sam_tiny", "teacher.img_size=32",
    "teacher.pretrain.steps=2",
    "teacher.pretrain.batch_size=2", "teacher.finetune.epochs=1", "teacher.finetune.batch_size=4",
    "transfer.n_images=8", "transfer.diffusion.image_size=16", "transfer.diffusion.n_augmented=8",
    "transfer.diffusion.train_steps=2", "transfer.diffusion.batch_size=4",
    "transfer.diffusion.num_inference_steps=2", "transfer.diffusion.block_out_channels=[32,32]",
    "transfer.sample_batch_size=4", "transfer.actor_cpus=0.5", "transfer.near_copy_psnr=99",
    "student.img_size=64", "student.decoder_dim=16", "distill.epochs=1", "distill.batch_size=4",
    "student_finetune.epochs=1", "student_finetune.batch_size=4", "reference.epochs=1",
    "reference.batch_size=4",
]


def run_student(name: str, dataset_overrides: list[str], extra: list[str], out: Path,
                experiment: str, first: str | None) -> tuple[dict, dict, float]:
    """One ``tskd run`` of student ``name``; returns (results.json, stage wall times, wall).
    Stages already in the store under ``out`` (same fingerprint) are reused, not rebuilt."""
    run_dir = out / experiment
    cmd = [sys.executable, "-m", "tskd.cli", "run", "--set", f"experiment={experiment}",
           "--set", f"output_dir={out}", "--set", "students=[ts_kd,scratch]"]
    reference = [] if first is None else ["reference.arch=none"]  # once per dataset and seed
    for override in dataset_overrides + extra + STUDENTS[name] + reference:
        cmd += ["--set", override]
    start = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - start
    results = json.loads((run_dir / "results.json").read_text())
    stages = {}
    for manifest in run_dir.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        stages[m["stage"]] = m["wall_time_s"]
    return results, stages, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["demo"])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--students", nargs="+", default=["vit16", "vit8", "resnet18",
                                                          "basic_unet"], choices=list(STUDENTS))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "bench_students"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    extra = (SMOKE + [f"teacher.pretrain.cache_dir={out / 'cache'}"] if args.smoke else []) \
        + args.overrides

    for dataset in args.datasets:
        dataset_overrides: list[str] = []
        if dataset != "demo":
            src = Path(args.data_root) / dataset
            if not src.is_dir():
                print(f"skipping {dataset}: {src} not found")
                continue
            root = link_dataset(src, out / "datasets" / dataset, dataset)
            budget = BUDGETS.get(dataset, {"n_labels": 30})
            dataset_overrides = [f"data.root={root}", f"data.n_labels={budget['n_labels']}"]
        rows = []
        for seed in args.seeds:
            first = None
            for name in args.students:
                experiment = f"{dataset}_s{seed}_{name}"
                results, stages, wall = run_student(name, dataset_overrides + [f"seed={seed}"],
                                                    extra, out, experiment, first)
                if first is None:
                    first, reference, teacher = experiment, results.get("reference"), \
                        results["teacher"]
                rows.append((seed, name, results, stages, wall, reference, teacher))
        print(f"\n### {dataset}\n")
        print("| seed | student | params (M) | size (MB) | CPU ms/image | scratch Dice | "
              "TS-KD Dice | teacher Dice | reference Dice | distill + fine-tune (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for seed, name, results, stages, wall, reference, teacher in rows:
            s = results["students"]
            model = s["ts_kd"].get("model", {})
            train_s = sum(v for k, v in stages.items()
                          if k.startswith(("distill_", "student_")))
            ref = "n/a" if reference is None else f"{reference['dice']:.4f} ({reference['arch']})"
            print(f"| {seed} | {name} | {(model.get('params') or 0) / 1e6:.2f} | "
                  f"{model.get('size_mb') or 0:.1f} | {model.get('latency_ms') or 0:.1f} | "
                  f"{s['scratch']['dice']:.4f} | {s['ts_kd']['dice']:.4f} | "
                  f"{teacher['dice']:.4f} | {ref} | {train_s:.0f} |")


if __name__ == "__main__":
    main()
