"""Distillation epoch time per teacher placement, against the floor (a student-only epoch).

    python benchmarks/placements.py [--teacher sam_demo] [--teacher-size 128] [--student-size 128]
                                    [--images 96] [--batch 8] [--threads 2] [--run-dir RUN]

One process, one thread budget, the same transfer images (random, 0..255) and batch for every
row, measured in this run:

- ``floor``: the student's training step against fixed targets — what distillation costs when
  the teacher costs nothing;
- ``cached``: the student's step against targets read from an in-memory fp16 cache of two views
  per image (the ``targets_<arm>`` stage's layout), picked per sample as the loop does; the
  cache's one-off build time is printed beside it;
- ``replicated``: the teacher's forward on every batch, then the student's step.

Ratios are epoch time / floor epoch time; the issue's goal is ``cached`` ≤ 1.15×.

Then two workers (``--ranks 2``, gloo, ``threads / 2`` threads each, each rank half the batches,
the student under DDP as distillation runs it on CPU): an epoch with the ``replicated`` teacher
(each rank a whole copy) and with the ``sharded`` one (ZeRO-3 over the 2 ranks,
``tskd.stages.engine.ShardedModule``, DeepSpeed's defaults: parameters under 1e5 elements kept
whole, no prefetch), and the teacher's parameter memory per worker for both — held between
batches and the peak inside its forward — for the benchmark's teacher and for
``--memory-teacher`` (default ``vit_b``, one forward at ``--memory-size`` px: parameter memory
does not depend on the batch). Goal: sharded peak ≤ 0.6× replicated.

Then the memory of *building* the teacher on each of the workers (``--build-teacher``, default
``vit_b`` at ``--memory-size`` px, from a checkpoint at SAM's 1024 px plus a teacher stage's
``lora.pt``, all written by this script): ``tskd.stages.distill.place_teacher`` with each
placement in fresh processes, the peak of each worker's anonymous resident memory (``RssAnon``,
sampled every 2 ms, above what the process held before) while it builds and loads the teacher.
``replicated`` loads the whole merged teacher on every worker; ``sharded`` builds it
partitioned under ``deepspeed.zero.Init`` and writes it one sub-module at a time from the
memory-mapped checkpoint (file pages, which the kernel can drop, are printed apart).

``--run-dir`` also prints the data-stall share (time the loop waited for Ray Data) that each
``distill_*`` stage of a finished ``tskd run`` reported (goal for ``cached``: ≤ 5%). Numbers are
as measured, whichever way they fall.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="sam_demo")
    p.add_argument("--teacher-size", type=int, default=128)
    p.add_argument("--student-size", type=int, default=128)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up)")
    p.add_argument("--run-dir", help="a finished tskd run: print its distill stages' data stall")
    p.add_argument("--ranks", type=int, default=2, help="workers of the sharded comparison "
                   "(0: skip it)")
    p.add_argument("--memory-teacher", default="vit_b")
    p.add_argument("--memory-size", type=int, default=256)
    p.add_argument("--build-teacher", default="vit_b", help="teacher whose build memory per "
                   "worker is measured ('none': skip)")
    p.add_argument("--only-build", action="store_true", help="only the build memory")
    args = p.parse_args()
    if args.only_build:
        build_memory(args)
        return

    from tskd.config import load_config, to_dict
    from tskd.losses import KDLoss
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.models.students import build_student
    from tskd.stages.distill import CachedTargets, Distillation, TeacherTargets, flip_per_sample

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"student.img_size={args.student_size}"])
    teacher = TeacherTargets(SamSegmenter(build_sam(args.teacher, num_classes=3,
                                                    img_size=args.teacher_size)),
                             need_logits=True).eval()
    images = torch.randint(0, 256, (args.images, 3, args.teacher_size, args.teacher_size)).float()
    batches = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]

    start = time.perf_counter()
    with torch.no_grad():  # the targets stage: two views per image, fp16
        views = [teacher(images), teacher(images.flip(-1))]
    cache_s = time.perf_counter() - start
    cache = {f"{k}{v}": t.half() for v, (lg, hd) in enumerate(views)
             for k, t in (("logits", lg), ("hidden", hd))}
    shapes = {k: list(t.shape[1:]) for k, t in cache.items()}
    cached = CachedTargets(shapes)
    fixed = (views[0][0][: args.batch], views[0][1][: args.batch])

    def new_bundle() -> tuple[Distillation, torch.optim.Optimizer]:
        torch.manual_seed(0)
        student = build_student(to_dict(cfg.student), 3)
        kd = KDLoss(student.hidden_dim, teacher.hidden_dim)
        bundle = Distillation(student, kd)
        return bundle, torch.optim.AdamW(bundle.parameters(), lr=1e-4)

    def resize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == args.student_size:
            return x
        return torch.nn.functional.interpolate(x, size=(args.student_size,) * 2,
                                               mode="bilinear", align_corners=False)

    def epoch(kind: str, bundle: Distillation, opt: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        for i, x in enumerate(batches):
            if kind == "floor":
                target = (fixed[0][: len(x)], fixed[1][: len(x)])
            elif kind == "cached":
                j = slice(i * args.batch, i * args.batch + len(x))
                row = {"image": x.permute(0, 2, 3, 1)} | {k: t[j].float() for k, t in cache.items()}
                x, target = cached(row)
            else:
                x = flip_per_sample(x)
                with torch.no_grad():
                    target = teacher(x)
            loss, _ = bundle(resize(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")
    print(f"teacher {args.teacher} at {args.teacher_size} px, student ViT-Tiny at "
          f"{args.student_size} px, {args.images} images, batch {args.batch}, "
          f"{args.threads} threads")
    times = {}
    for kind in ("floor", "cached", "replicated"):
        bundle, opt = new_bundle()
        epoch(kind, bundle, opt)  # warm-up
        times[kind] = min(epoch(kind, bundle, opt) for _ in range(args.epochs))
    for kind, t in times.items():
        print(f"  {kind:<11} {t:7.2f} s/epoch  {t / times['floor']:5.2f}x floor")
    print(f"  cache build (2 views, once): {cache_s:.2f} s = {cache_s / times['replicated']:.2f} "
          "replicated epochs; goal cached <= 1.15x floor: "
          f"{'met' if times['cached'] <= 1.15 * times['floor'] else 'NOT met'}")
    if args.ranks > 1:
        two_workers(args)
        if args.build_teacher != "none":
            build_memory(args)
    print(f"load average at the end: {os.getloadavg()}")
    if args.run_dir:
        for manifest in sorted(Path(args.run_dir).glob("distill_*/manifest.json")):
            m = json.loads(manifest.read_text())
            placement = m["config"]["distill"].get("teacher_placement")
            stall = m["metrics"].get("perf/data_stall")
            print(f"  {m['stage']}: placement {placement}, data stall "
                  f"{'n/a' if stall is None else f'{100 * stall:.1f}%'} of the last epoch "
                  f"(goal for cached: <= 5%)")


def two_workers(args: argparse.Namespace) -> None:
    """The replicated and sharded placements on ``args.ranks`` gloo processes: epoch time and
    teacher parameter memory per worker (rank 0's; every rank holds the same share)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(args, port, out), nprocs=args.ranks)
        rows = json.loads((Path(out) / "rows.json").read_text())
    mb = 2**20
    print(f"{args.ranks} workers, {max(1, args.threads // args.ranks)} thread(s) each, "
          f"{args.images // args.ranks} images per worker per epoch:")
    for name, row in rows.items():
        t = row.get("epoch_s")
        print(f"  {name:<30} {'' if t is None else f'{t:7.2f} s/epoch'}  teacher parameters "
              f"per worker {row['held'] / mb:8.1f} MB held, {row['peak'] / mb:8.1f} MB peak")
    for teacher in (args.teacher, args.memory_teacher):
        rep, sh = rows[f"replicated {teacher}"], rows[f"sharded {teacher}"]
        ratio = sh["peak"] / rep["peak"]
        print(f"  {teacher}: sharded / replicated peak teacher parameter memory {ratio:.2f}x "
              f"(held {sh['held'] / rep['held']:.2f}x); goal <= 0.6x: "
              f"{'met' if ratio <= 0.6 else 'NOT met'}")
    t_rep, t_sh = (rows[f"{k} {args.teacher}"]["epoch_s"] for k in ("replicated", "sharded"))
    print(f"  sharded / replicated epoch time ({args.teacher}): {t_sh / t_rep:.2f}x")


def _rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    import torch.distributed as dist

    from tskd.config import EngineConfig, load_config, to_dict
    from tskd.losses import KDLoss
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.models.students import build_student
    from tskd.stages.distill import Distillation, TeacherTargets, flip_per_sample
    from tskd.stages.engine import (ShardedModule, build_engine, held_param_bytes,
                                    peak_param_bytes)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks),
                      LOCAL_WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, args.threads // args.ranks))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    cpu = torch.device("cpu")
    cfg = load_config(None, [f"student.img_size={args.student_size}"])
    per_rank = args.images // args.ranks
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (per_rank, 3, args.teacher_size, args.teacher_size),
                           generator=g).float()
    batches = [images[i:i + args.batch] for i in range(0, per_rank, args.batch)]
    rows = {}

    def teacher(arch: str, size: int, sharded: bool):
        torch.manual_seed(0)  # every rank the same weights
        t = TeacherTargets(SamSegmenter(build_sam(arch, num_classes=3, img_size=size)),
                           need_logits=True).eval()
        t.requires_grad_(False)
        return ShardedModule(t, batch_size=args.batch, device=cpu) if sharded else t

    for placement in ("replicated", "sharded"):
        for arch, size in ((args.teacher, args.teacher_size),
                           (args.memory_teacher, args.memory_size)):
            t = teacher(arch, size, placement == "sharded")
            module = getattr(t, "module", t)
            held = held_param_bytes(module)
            x = torch.randint(0, 256, (1, 3, size, size)).float()
            with peak_param_bytes(module) as peak, torch.no_grad():
                t(x)
            row = {"held": held, "peak": peak[0]}
            if arch == args.teacher:  # distillation epochs with this teacher
                torch.manual_seed(0)
                student = build_student(to_dict(cfg.student), 3)
                bundle = Distillation(student, KDLoss(student.hidden_dim, t.hidden_dim))
                engine = build_engine(bundle, to_dict(EngineConfig()),  # DDP, as on CPU
                                      lr=1e-4, weight_decay=0.05, batch_size=args.batch,
                                      steps_per_epoch=len(batches), epochs=args.epochs + 1,
                                      device=cpu)

                def epoch() -> float:
                    dist.barrier()
                    start = time.perf_counter()
                    for xb in batches:
                        xb = flip_per_sample(xb)
                        target = t(xb)
                        if xb.shape[-1] != args.student_size:
                            xb = torch.nn.functional.interpolate(
                                xb, size=(args.student_size,) * 2, mode="bilinear",
                                align_corners=False)
                        loss, _ = engine(xb, target)
                        engine.step(loss)
                    dist.barrier()
                    return time.perf_counter() - start

                epoch()  # warm-up
                row["epoch_s"] = min(epoch() for _ in range(args.epochs))
            rows[f"{placement} {arch}"] = row
            del t, module
    if rank == 0:
        (Path(out) / "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def build_memory(args: argparse.Namespace) -> None:
    """Peak anonymous memory per worker while ``place_teacher`` builds the teacher, for the
    replicated and the sharded placement (fresh processes each)."""
    import socket
    import tempfile
    from dataclasses import asdict

    import torch.multiprocessing as mp

    from tskd.lora import LoraSpec, apply_lora, lora_state_dict
    from tskd.models.sam import SamSegmenter, build_sam

    arch, size = args.build_teacher, args.memory_size
    with tempfile.TemporaryDirectory() as out:
        root = Path(out)
        torch.manual_seed(0)
        base = root / "base.pth"
        torch.save(build_sam(arch, num_classes=3, img_size=1024).state_dict(), base)
        spec = LoraSpec(rank=4, decoder="full")
        seg = apply_lora(SamSegmenter(build_sam(arch, num_classes=3, img_size=size,
                                                checkpoint=base)), spec)
        (root / "teacher").mkdir()
        torch.save(lora_state_dict(seg), root / "teacher" / "lora.pt")
        (root / "teacher" / "teacher.json").write_text(json.dumps({
            "arch": arch, "num_classes": 3, "img_size": size, "base_checkpoint": str(base),
            "lora": asdict(spec)}))
        whole = sum(p.numel() * p.element_size() for p in seg.parameters())
        del seg
        mb = 2**20
        print(f"building the {arch} teacher at {size} px on {args.ranks} workers (its merged "
              f"parameters: {whole / mb:.1f} MB; checkpoint {base.stat().st_size / mb:.1f} MB):")
        peaks = {}
        for placement in ("replicated", "sharded"):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.spawn(_build_rank, args=(args, port, out, placement), nprocs=args.ranks)
            rows = [json.loads((root / f"build{r}.json").read_text()) for r in range(args.ranks)]
            peaks[placement] = max(r["anon"] for r in rows)
            for r, row in enumerate(rows):
                print(f"  {placement:<10} worker {r}: peak anonymous memory "
                      f"+{row['anon'] / mb:7.1f} MB (+{row['end'] / mb:.1f} MB once built), "
                      f"file pages +{row['file'] / mb:7.1f} MB, {row['s']:.1f} s")
        print(f"  sharded / replicated peak anonymous memory per worker while building: "
              f"{peaks['sharded'] / peaks['replicated']:.2f}x")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _build_rank(rank: int, args: argparse.Namespace, port: int, out: str, placement: str) -> None:
    import threading

    import deepspeed.runtime.zero  # noqa: F401  (code is imported before the baseline)
    import torch.distributed as dist

    import tskd.lora  # noqa: F401
    from tskd.stages.distill import place_teacher

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks),
                      LOCAL_WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, args.threads // args.ranks))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    config = {"teacher": {"tuned": True, "stage_dir": str(Path(out) / "teacher")},
              "distill": {"w_logits": 0.2, "teacher_features": "neck", "batch_size": args.batch,
                          "teacher_placement": placement, "shard_persist_below": 100_000,
                          "shard_prefetch": 0}}
    base = {f: _status_bytes(f) for f in ("RssAnon", "RssFile")}
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            for f in peak:
                peak[f] = max(peak[f], _status_bytes(f))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    teacher = place_teacher(config, torch.device("cpu"))
    dist.barrier()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    (Path(out) / f"build{rank}.json").write_text(json.dumps({
        "anon": peak["RssAnon"] - base["RssAnon"], "file": peak["RssFile"] - base["RssFile"],
        "end": _status_bytes("RssAnon") - base["RssAnon"], "s": seconds}))
    del teacher
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
