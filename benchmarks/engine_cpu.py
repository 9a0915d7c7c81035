"""CPU cost of the training engines: one tiny distillation epoch, torch vs DeepSpeed ZeRO-0/2.

    python benchmarks/engine_cpu.py [--images 32] [--batch 8] [--size 64] [--reps 3]

One process, one gloo rank (as a one-worker Ray Train run), ``--threads`` intra-op threads
(default 2). The distillation module of the stage (ViT-Tiny student + FPN head + KD loss with
its projection) trains on fixed random teacher targets; each engine runs ``--reps`` epochs of
``--images / --batch`` steps, interleaved (torch, zero0, zero2, torch, ...) so a machine's load
drifts over all of them alike. Prints the median epoch wall time and CPU time (this process's
user + system time over all threads: less sensitive to other load on a shared machine) per
engine and their ratios to torch; engine set-up (``deepspeed.initialize``) is timed apart.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    from tskd.config import EngineConfig, StudentConfig, to_dict
    from tskd.losses import KDLoss
    from tskd.models.students import build_student
    from tskd.stages.distill import Distillation
    from tskd.stages.engine import build_engine

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    student = build_student(to_dict(StudentConfig(img_size=args.size)), 3)
    model = Distillation(student, KDLoss(student.hidden_dim, 256))
    steps = max(1, args.images // args.batch)
    g = torch.Generator().manual_seed(1)
    s4, s16 = args.size // 4, args.size // 16
    batches = [(torch.rand(args.batch, 3, args.size, args.size, generator=g) * 255,
                (torch.randn(args.batch, 3, s4, s4, generator=g),
                 torch.randn(args.batch, 256, s16, s16, generator=g))) for _ in range(steps)]
    engines = {"torch": {"kind": "torch"}, "zero0": {"kind": "deepspeed", "zero_stage": 0},
               "zero2": {"kind": "deepspeed", "zero_stage": 2}}
    built, setup = {}, {}
    for name, kw in engines.items():
        t = time.perf_counter()
        built[name] = build_engine(copy.deepcopy(model), to_dict(EngineConfig(**kw)), lr=1e-4,
                                   weight_decay=0.05, batch_size=args.batch,
                                   steps_per_epoch=steps, epochs=args.reps + 1,
                                   device=torch.device("cpu"))
        setup[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {n: [] for n in engines}
    cpu: dict[str, list[float]] = {n: [] for n in engines}
    for rep in range(args.reps + 1):  # the first epoch warms up (not counted)
        for name, engine in built.items():
            t, c = time.perf_counter(), time.process_time()
            for images, target in batches:
                loss, _ = engine(images, target)
                engine.step(loss)
            if rep:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    base, base_cpu = statistics.median(times["torch"]), statistics.median(cpu["torch"])
    print(f"tiny distillation epoch: {steps} steps of batch {args.batch} at {args.size} px, "
          f"{args.threads} threads, median of {args.reps}")
    for name in engines:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"  {name:6s} wall {med:7.2f} s/epoch ({med / base:4.2f}x torch)  "
              f"CPU {med_cpu:7.2f} s/epoch ({med_cpu / base_cpu:4.2f}x torch)  "
              f"set-up {setup[name]:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
