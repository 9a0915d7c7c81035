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
(the ViT-Tiny/16 arms then cost nothing but the evaluation). Quality checks that fail are
recorded, not a stop (``check.on_fail=continue``): the student column names them. ``ph2`` / ``busi`` are read from
``../shared/data`` as in ``real_data.py``. ``--smoke`` shrinks everything to a tiny run (32 px,
a few images, one epoch) that only checks the script works; its numbers mean nothing. Prints a
Markdown table per dataset; numbers are as measured, whichever way they fall.

Each run's ``results.json`` times only its own students, at the moment its evaluation ran, so
latencies from different rows do not compare. ``--latency`` (alone, or after the runs) times
every listed student and the reference in one process, in turns
(:func:`tskd.models.footprint.compare_latency`, batch 1, ``--threads``), at the working size
(``data.image_size``, 128 px unless ``--set`` gives it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from real_data import BUDGETS, link_dataset

from tskd.config import STUDENT_PRESETS

REPO = Path(__file__).resolve().parents[1]

STUDENTS = {name: [f"student.{k}={v}" for k, v in fields.items()]
            for name, fields in STUDENT_PRESETS.items()}

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
           "--set", f"output_dir={out}", "--set", "students=[ts_kd,scratch]",
           # evidence whichever way it falls: a failed quality check is recorded, not a stop
           "--set", "check.on_fail=continue"]
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
    parser.add_argument("--latency", action="store_true",
                        help="time the students and the reference in one process, in turns")
    parser.add_argument("--latency-only", action="store_true", help="only --latency")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    extra = (SMOKE + [f"teacher.pretrain.cache_dir={out / 'cache'}"] if args.smoke else []) \
        + args.overrides

    if args.latency_only:
        compare_students(args.students, extra, args.threads)
        return
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
            failed = results.get("continued_past_failed_checks")
            name = f"{name} (failed checks: {', '.join(failed)})" if failed else name
            print(f"| {seed} | {name} | {(model.get('params') or 0) / 1e6:.2f} | "
                  f"{model.get('size_mb') or 0:.1f} | {model.get('latency_ms') or 0:.1f} | "
                  f"{s['scratch']['dice']:.4f} | {s['ts_kd']['dice']:.4f} | "
                  f"{teacher['dice']:.4f} | {ref} | {train_s:.0f} |")
    if args.latency:
        compare_students(args.students, extra, args.threads)


def compare_students(names: list[str], overrides: list[str], threads: int) -> None:
    """Batch-1 CPU latency of each student and the reference, measured in one process in turns,
    at the configured working size (random weights: speed only)."""
    from tskd.config import load_config, to_dict
    from tskd.models.footprint import compare_latency
    from tskd.models.students import build_student
    from tskd.stages.reference import reference_student

    if not any(o.startswith("data.image_size=") for o in overrides):
        overrides = overrides + ["data.image_size=128"]  # the demo's working size
    models = {}
    for name in names:
        cfg = load_config(None, overrides + STUDENTS[name])
        models[name] = (build_student(to_dict(cfg.student), 3), cfg.student.img_size)
    cfg = load_config(None, overrides)
    reference = reference_student(cfg)
    models[f"reference {cfg.reference.arch}"] = (build_student(reference, 3),
                                                 reference["img_size"])
    ms = compare_latency(models, threads=threads, rounds=20)
    print(f"\n### CPU latency, batch 1, {threads} threads, one process, in turns (ms/image)\n")
    print("| model | px | ms |\n|---|---|---|")
    for name, (_, size) in models.items():
        print(f"| {name} | {size} | {ms[name]:.1f} |")


if __name__ == "__main__":
    main()
