"""What a Ray Train stage costs besides its training: start-up, reports, checkpoints, shutdown.

    PYTHONPATH=platform python benchmarks/train_overhead.py [--epochs 20] [--epoch-s 1.5]
        [--repeats 2] [--intervals 2.0 0.25]

One local Ray (2 CPUs, started and stopped here), one Train worker running tskd's own
``fit_torch_trainer`` and ``checkpoint`` (a DDP engine over the demo's ViT-Tiny student: a
~70 MB checkpoint per epoch, as the demo's student stages write). Each "epoch" sleeps
``--epoch-s`` instead of training, so the load of the machine barely moves the numbers.

Measured per Ray Train controller poll interval (``ray.train_poll_s``: Train V2's
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by Ray's default): the wall time of ``fit()``, its
overhead over the epochs' sleep, and the time each ``checkpoint`` call blocked the loop (Train V2
hands a report over when the controller polls: its queue holds one). Ratios are against the first
interval, measured in this run; runs interleave the intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    """One worker: ``epochs`` sleeps, each followed by a full checkpoint of the student."""
    import time

    import torch

    from tskd.models.students import build_student
    from tskd.stages.engine import build_engine
    from tskd.stages.ray_train import checkpoint, worker_setup

    device = worker_setup(config["ray"], seed=0)
    model = build_student(config["student"], 3)
    engine = build_engine(model, config["engine"], lr=1e-3, weight_decay=0.0, batch_size=2,
                          steps_per_epoch=1, epochs=config["epochs"], device=device)
    loss = engine.module(torch.randn(2, 3, 128, 128))[0].mean()
    engine.step(loss)  # optimiser state exists: the checkpoint is the real size
    blocked = 0.0
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"])
        t = time.perf_counter()
        checkpoint({"epoch": epoch}, engine=engine, epoch=epoch)
        blocked += time.perf_counter() - t
    Path(config["blocked_file"]).write_text(str(blocked))  # one node: the driver reads it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--epoch-s", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--intervals", type=float, nargs="+", default=[2.0, 0.25])
    args = p.parse_args()

    import ray

    from tskd.config import DistillConfig, RayConfig, StudentConfig, to_dict
    from tskd.stages.console import ray_init_kwargs
    from tskd.stages.ray_train import fit_torch_trainer

    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **ray_init_kwargs())
    ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1, torch_threads=1)
    engine = to_dict(DistillConfig())["engine"] | {"kind": "torch", "zero_stage": 0}
    config = {"ray": to_dict(ray_cfg), "student": to_dict(StudentConfig()), "engine": engine,
              "epochs": args.epochs, "epoch_s": args.epoch_s}
    rows: dict[float, list[tuple[float, float]]] = {i: [] for i in args.intervals}
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        for r in range(args.repeats):
            for interval in args.intervals:
                poll = dataclasses.replace(ray_cfg, train_poll_s=interval)
                blocked_file = Path(tmp) / f"blocked-{r}-{interval}"
                t = time.perf_counter()
                fit_torch_trainer(loop, train_config=config | {"blocked_file": str(blocked_file)},
                                  ray_cfg=poll, name=f"r{r}-{interval}", storage=tmp)
                wall = time.perf_counter() - t
                blocked = float(blocked_file.read_text())
                rows[interval].append((wall, blocked))
                print(f"repeat {r} interval {interval:g} s: fit {wall:.1f} s, checkpoint calls "
                      f"blocked {blocked:.1f} s", flush=True)
    ray.shutdown()
    sleep = args.epochs * args.epoch_s
    base = min(w for w, _ in rows[args.intervals[0]])
    print(f"\n{args.epochs} epochs of {args.epoch_s:g} s sleep ({sleep:.0f} s), best of "
          f"{args.repeats}:")
    print("| poll interval | fit wall | overhead over the sleep | checkpoint calls blocked | "
          "wall vs first |")
    print("|---|---|---|---|---|")
    for interval, runs in rows.items():
        wall, blocked = min(runs)
        print(f"| {interval:g} s | {wall:.1f} s | {wall - sleep:.1f} s | {blocked:.1f} s | "
              f"{wall / base:.2f}x |")


if __name__ == "__main__":
    main()
