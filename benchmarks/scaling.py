"""Teacher and worker scaling of distillation, CPU-sized (issue 9's two studies).

    python benchmarks/scaling.py [--teachers sam_tiny,sam_demo,vit_b] [--workers 1,2]
                                 [--worker-teacher sam_demo] [--global-batch 8] [--images 48]
                                 [--epochs 3] [--size 64] [--teacher-size 64] [--cores N]

``jobs/scaling_teachers.yaml`` and ``jobs/scaling_workers.yaml`` run the studies on GPUs
(``tskd grid``: ``sam_demo`` … ``vit_h``, 1 … 8 workers). This script runs their CPU-sized
versions through the real distillation path: ``tskd.stages.distill._train_loop`` on Ray Train
workers (gloo, the student under DDP) fed by Ray Data (``ray.data.from_items``, sorted and
streamed as the stage streams the transfer set), launched by
``tskd.stages.ray_train.fit_torch_trainer``, on a local Ray that the script starts and stops.
Every cell distils the same ViT-Tiny student (random init, ``--size`` px) from a random-init SAM
(weights seeded 0, ``--teacher-size`` px, 3 classes, TS-KD8 loss, the ``replicated`` placement:
every worker runs the live teacher on every batch) on the same ``--images`` random transfer images
(0..255), for ``--epochs`` epochs, checkpointing only after the last. Cells with the same teacher
and worker count run once.

- **Teacher scaling** (1 worker, ``--global-batch`` per step, ``--cores`` threads): per teacher
  of ``--teachers`` its parameters, images/s, the teacher's share of the step time
  (``perf/teacher_share``) and the slow-down against the smallest teacher (its images/s over
  this one's).
- **Worker scaling** (teacher ``--worker-teacher``): 1, 2 … workers at a FIXED global batch
  (``--global-batch`` = workers × per-worker batch, as ``global_batch`` in the grid job), so each
  cell takes the same steps over the same images. Each worker gets ``cores / workers`` torch
  threads (at least 1), so every cell uses the same cores; the speed-up is images/s over the
  1-worker cell's, the efficiency speed-up / workers.

Images/s are the stage's own metrics (:class:`tskd.stages.live_metrics.StepTimer`, reported by
rank 0) of the LAST epoch (epoch 1 carries the warm-up); a cell's images/s is rank 0's ×
workers (Ray Train splits the dataset into equal shards and DDP keeps the ranks in step).
``perf/data_stall`` (waiting for Ray Data) is printed beside them. Load average at start and end.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NUM_CLASSES = 3
CPUS_PER_WORKER = 0.5
"""Logical CPUs each Train worker claims (threads are set by ``torch_threads``): the rest of the
local Ray's CPUs stay free for Ray Data's tasks (a whole CPU per worker deadlocks on 2 cores)."""


@dataclass(frozen=True)
class Cell:
    """One configuration: the teacher, the workers, each one's batch and torch threads."""

    teacher: str
    workers: int
    batch_per_worker: int
    threads: int

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_per_worker

    @property
    def name(self) -> str:
        return f"{self.teacher}-w{self.workers}"


def plan_cells(teachers: list[str], workers: list[int], *, worker_teacher: str,
               global_batch: int, cores: int, images: int) -> tuple[list[Cell], list[Cell]]:
    """(teacher-scaling cells, worker-scaling cells). Teacher cells: 1 worker, the whole global
    batch and ``cores`` threads; worker cells: ``global_batch / w`` images per worker and
    ``max(1, cores // w)`` threads. Raises ``ValueError`` naming the flag when a worker count
    does not divide the global batch or the images are not whole global batches."""
    if cores < 1:
        raise ValueError(f"--cores {cores}: allowed an integer >= 1")
    if global_batch < 1:
        raise ValueError(f"--global-batch {global_batch}: allowed an integer >= 1")
    for w in workers:
        if w < 1 or global_batch % w:
            raise ValueError(f"--workers {w}: allowed integers >= 1 that divide "
                             f"--global-batch {global_batch}")
    if images < global_batch or images % global_batch:
        raise ValueError(f"--images {images}: allowed a multiple of --global-batch "
                         f"{global_batch} (every cell the same whole steps)")
    by_teacher = [Cell(t, 1, global_batch, cores) for t in teachers]
    by_workers = [Cell(worker_teacher, w, global_batch // w, max(1, cores // w))
                  for w in workers]
    return by_teacher, by_workers


def ray_cpus(max_workers: int) -> int:
    """Logical CPUs of the local Ray: the workers' claims plus 2 for Ray Data (at least 4)."""
    return max(4, math.ceil(CPUS_PER_WORKER * max_workers) + 2)


def train_config(cell: Cell, *, checkpoint: Path, size: int, teacher_size: int, images: int,
                 epochs: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """``(config, ray_cfg)`` for ``tskd.stages.distill._train_loop`` in ``cell``: what the
    ``distill_ts_kd`` stage builds (config dataclass defaults: TS-KD8, AdamW, DDP on CPU) with
    the un-tuned teacher read from ``checkpoint``, the ``replicated`` placement, the cell's batch
    per worker, workers and threads, and one checkpoint, after the last epoch."""
    from tskd.config import DistillConfig, RayConfig, StudentConfig, to_dict

    distill = to_dict(DistillConfig(epochs=epochs, batch_size=cell.batch_per_worker,
                                    teacher_placement="replicated"))
    ray_cfg = RayConfig(num_workers=cell.workers, cpus_per_worker=CPUS_PER_WORKER,
                        torch_threads=cell.threads, checkpoint_every=epochs, keep_checkpoints=1)
    config = {"teacher": {"tuned": False, "checkpoint": str(checkpoint), "arch": cell.teacher,
                          "img_size": teacher_size, "num_classes": NUM_CLASSES},
              "student": to_dict(StudentConfig(img_size=size)), "distill": distill,
              "num_classes": NUM_CLASSES, "n_transfer": images, "seed": seed,
              "ray": to_dict(ray_cfg)}
    return config, ray_cfg


def slowdowns(images_per_s: dict[str, float], params: dict[str, int]) -> dict[str, float]:
    """Per teacher: the smallest teacher's (fewest parameters) images/s over its own."""
    smallest = min(params, key=params.__getitem__)
    return {t: images_per_s[smallest] / ips for t, ips in images_per_s.items()}


def speedups(images_per_s: dict[int, float]) -> dict[int, tuple[float, float]]:
    """Per worker count: (speed-up, efficiency) against the fewest workers' images/s; the
    efficiency is speed-up / (workers / fewest workers)."""
    base = min(images_per_s)
    return {w: (ips / images_per_s[base], ips / images_per_s[base] / (w / base))
            for w, ips in images_per_s.items()}


def transfer_rows(images: int, size: int, seed: int = 5) -> list[dict[str, Any]]:
    """``images`` random transfer images, float32 (size, size, 3) in 0..255, with their ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"id": i, "image": (torch.rand(size, size, 3, generator=g) * 255).numpy()}
            for i in range(images)]


def save_teacher(arch: str, size: int, folder: Path) -> tuple[Path, int]:
    """A random-init SAM (seeded 0) saved as a base checkpoint; (path, its parameters)."""
    import torch

    from tskd.models.sam import build_sam

    torch.manual_seed(0)
    sam = build_sam(arch, num_classes=NUM_CLASSES, img_size=size)
    path = folder / f"{arch}.pt"
    torch.save(sam.state_dict(), path)
    return path, sum(p.numel() for p in sam.parameters())


def run_cell(cell: Cell, config: dict[str, Any], ray_cfg: Any, rows: list[dict[str, Any]],
             storage: Path) -> dict[str, float]:
    """Distil in ``cell``; the last epoch's figures: ``images_per_s`` (all workers),
    ``teacher_share``, ``data_stall``, and ``wall_s`` of the whole Train run."""
    import ray.data

    from tskd.stages.distill import _train_loop
    from tskd.stages.ray_train import fit_torch_trainer

    dataset = ray.data.from_items(rows, override_num_blocks=max(2, cell.workers))
    started = time.perf_counter()
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=ray_cfg,
                               name=cell.name, storage=storage, datasets={"transfer": dataset})
    m = result.metrics
    return {"images_per_s": m["perf/images_per_s"] * cell.workers,
            "teacher_share": m.get("perf/teacher_share", 0.0),
            "data_stall": m["perf/data_stall"], "wall_s": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", default="sam_tiny,sam_demo,vit_b",
                   help="teacher-scaling SAMs (tskd.models.sam.SAM_ARCHS), comma-separated")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--worker-teacher", default="sam_demo", help="the worker study's teacher")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--images", type=int, default=48, help="transfer images")
    p.add_argument("--epochs", type=int, default=3, help="the last one is measured")
    p.add_argument("--size", type=int, default=64, help="transfer images and student, px")
    p.add_argument("--teacher-size", type=int, default=64, help="teacher's img_size, px")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="cores shared by each cell's workers (threads = cores / workers)")
    args = p.parse_args()
    from tskd.models.sam import SAM_ARCHS

    teachers = [t for t in args.teachers.split(",") if t]
    for t in teachers + [args.worker_teacher]:
        if t not in SAM_ARCHS:
            p.error(f"teacher {t!r}: allowed {', '.join(sorted(SAM_ARCHS))}")
    try:
        by_teacher, by_workers = plan_cells(
            teachers, [int(w) for w in args.workers.split(",") if w],
            worker_teacher=args.worker_teacher, global_batch=args.global_batch,
            cores=args.cores, images=args.images)
    except ValueError as exc:
        p.error(str(exc))
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: allowed >= 2 (the first one carries the warm-up)")

    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_TRAIN_V2_ENABLED", "1")):
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import ray

    from tskd.stages.console import quiet_ray_process, ray_init_kwargs

    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs", flush=True)
    print(f"student ViT-Tiny at {args.size} px, teachers at {args.teacher_size} px (random init, "
          f"replicated), {args.images} random transfer images, {args.epochs} epochs (the last "
          f"measured), global batch {args.global_batch}, {args.cores} cores", flush=True)
    cells = list(dict.fromkeys(by_teacher + by_workers))  # each configuration once
    results: dict[Cell, dict[str, float]] = {}
    params: dict[str, int] = {}
    ray.init(num_cpus=ray_cpus(max(c.workers for c in cells)), include_dashboard=False,
             log_to_driver=False, configure_logging=False, **ray_init_kwargs())
    quiet_ray_process()
    try:
        with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
            folder = Path(tmp)
            rows = transfer_rows(args.images, args.size)
            checkpoints = {}
            for arch in dict.fromkeys(c.teacher for c in cells):
                checkpoints[arch], params[arch] = save_teacher(arch, args.teacher_size, folder)
            for cell in cells:
                config, ray_cfg = train_config(cell, checkpoint=checkpoints[cell.teacher],
                                               size=args.size, teacher_size=args.teacher_size,
                                               images=args.images, epochs=args.epochs)
                r = results[cell] = run_cell(cell, config, ray_cfg, rows, folder / "ray")
                print(f"  {cell.name}: {cell.workers} worker(s) x batch {cell.batch_per_worker}"
                      f" x {cell.threads} thread(s): {r['images_per_s']:.2f} img/s, teacher "
                      f"{100 * r['teacher_share']:.0f}%, data wait {100 * r['data_stall']:.0f}% "
                      f"(run {r['wall_s']:.0f} s)", flush=True)
    finally:
        ray.shutdown()

    print(f"\nteacher scaling: 1 worker, batch {args.global_batch}, {args.cores} threads")
    print(f"{'teacher':<10} {'params M':>9} {'img/s':>8} {'teacher %':>10} {'slow-down':>10}")
    ips = {c.teacher: results[c]["images_per_s"] for c in by_teacher}
    slow = slowdowns(ips, {t: params[t] for t in ips})
    for c in by_teacher:
        r = results[c]
        print(f"{c.teacher:<10} {params[c.teacher] / 1e6:9.2f} {r['images_per_s']:8.2f} "
              f"{100 * r['teacher_share']:10.1f} {slow[c.teacher]:9.2f}x")
    print(f"\nworker scaling: teacher {args.worker_teacher}, global batch {args.global_batch} "
          f"fixed; each worker torch_threads = {args.cores} cores / workers (the same cores "
          "for every cell)")
    print(f"{'workers':>7} {'batch/worker':>13} {'threads':>8} {'img/s':>8} {'speed-up':>9} "
          f"{'efficiency':>11}")
    scale = speedups({c.workers: results[c]["images_per_s"] for c in by_workers})
    for c in by_workers:
        up, eff = scale[c.workers]
        print(f"{c.workers:>7} {c.batch_per_worker:>13} {c.threads:>8} "
              f"{results[c]['images_per_s']:8.2f} {up:8.2f}x {eff:11.2f}")
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
