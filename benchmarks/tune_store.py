"""What the shared artifact store saves a search: a KD-weights search with vs without it.

    python benchmarks/tune_store.py [--trials 12] [--out DIR] [--cpus 4]

Runs the same search twice in this one process, on one local Ray (``--cpus`` logical CPUs):
first on the shared store (``tskd tune``'s normal mode: one data entry, one teacher, one
transfer set and one teacher-target cache for every trial), then with every trial building all
of its own artifacts (``run_tune(isolate=True)``: its own output directory, store and teacher
pre-training cache). Prints the wall time of each, their ratio, and the stage entries each
built (the trials' ``built`` column, from their run views).

The search: ``search_spaces/kd_weights.yaml``'s parameters and seed (w_logits, w_hidden, logits
loss and target; TPE seeded 0), ``--trials`` trials, 2 concurrent, FIFO (no ASHA and no rungs,
so both runs do the same trials' work and the difference is the store alone), objective the
TS-KD student's validation Dice, ``students=[ts_kd]``, no final best-config run. The
experiment: the built-in demo (ultrasound-like) at 64 px, 40 images, 8 labels (2 of them
validation), the demo SAM teacher (``sam_tiny`` at 64 px, 2 pre-training steps, LoRA 1 epoch),
16 DDPM transfer images (32 px DDPM, 2 training steps, 2 sampling steps), ViT-Tiny student at
64 px (patch 8), 1 epoch of distillation and 1 of fine-tuning, 1 Ray Train worker per stage
(0.5 CPU, 1 torch thread).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEMO = [
    "students=[ts_kd]",
    "data.demo.n_images=40", "data.demo.size=64", "data.image_size=64",
    "data.n_labels=8", "data.val_share=0.25",
    "teacher.arch=sam_tiny", "teacher.img_size=64",
    "teacher.pretrain.steps=2", "teacher.pretrain.batch_size=2",
    "teacher.finetune.epochs=1", "teacher.finetune.batch_size=4",
    "transfer.n_images=16", "transfer.diffusion.image_size=32",
    "transfer.diffusion.n_augmented=8", "transfer.diffusion.train_steps=2",
    "transfer.diffusion.batch_size=4", "transfer.diffusion.num_inference_steps=2",
    "transfer.diffusion.block_out_channels=[32,32]", "transfer.sample_batch_size=4",
    "transfer.actor_cpus=0.5", "transfer.near_copy_psnr=99",
    "student.img_size=64", "student.patch_size=8", "student.decoder_dim=16",
    "distill.epochs=1", "distill.batch_size=4",
    "student_finetune.epochs=1", "student_finetune.batch_size=4",
    "check.baseline_epochs=1", "check.on_fail=continue",
    "ray.num_workers=1", "ray.cpus_per_worker=0.5", "ray.torch_threads=1",
]


def search(out: Path, trials: int, isolate: bool) -> tuple[float, int, int]:
    """One search under ``out``; returns (wall time s, entries built, trials done)."""
    import yaml

    from tskd.config import load_config
    from tskd.pipeline import plan
    from tskd.search_space import parse_space
    from tskd.tune import run_tune

    cfg = load_config(None, DEMO + [f"output_dir={out}", "experiment=bench",
                                    f"teacher.pretrain.cache_dir={out / 'cache'}"])
    data = yaml.safe_load((ROOT / "search_spaces" / "kd_weights.yaml").read_text())
    data.update(num_samples=trials, max_concurrent_trials=2, scheduler={"type": "fifo"})
    space = parse_space(data, cfg, stages=[s.name for s in plan(cfg)], source="kd_weights.yaml")
    started = time.perf_counter()
    outcome = run_tune(cfg, space, final=False, isolate=isolate)
    wall = time.perf_counter() - started
    built = sum(int(r["built"] or 0) for r in outcome.table)
    done = sum(r["status"] in ("done", "infeasible") for r in outcome.table)
    return wall, built, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None,
                    help="working directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tskd.tune").setLevel(logging.INFO)  # one line per finished trial
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="tune_store-") as tmp:
        out = (args.out or Path(tmp)).resolve()
        rows = {}
        try:
            for label, isolate in (("shared store", False), ("own artifacts", True)):
                print(f"{label}: {args.trials} trials ...", flush=True)
                rows[label] = search(out / label.replace(" ", "_"), args.trials, isolate)
        finally:
            ray.shutdown()
    print(f"\n{'search':<15} {'wall s':>8} {'entries built':>14} {'trials done':>12}")
    for label, (wall, built, done) in rows.items():
        print(f"{label:<15} {wall:8.1f} {built:14d} {done:12d}")
    shared, own = rows["shared store"][0], rows["own artifacts"][0]
    print(f"\nwall time, own artifacts / shared store: {own / shared:.2f}x "
          f"({args.trials} trials)")


if __name__ == "__main__":
    main()
