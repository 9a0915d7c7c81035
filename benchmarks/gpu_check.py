"""The GPU check (issue 7): tskd's distillation, target cache and SAM timing on one CUDA GPU.

    python benchmarks/gpu_check.py --device cuda          # the check (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths, tiny, on CPU

Without Ray (a GPU machine may lack it): one process is the one worker of a Ray Train run — a
single-rank ``torch.distributed`` group (NCCL on CUDA, gloo on CPU; RANK=0, WORLD_SIZE=1, a free
MASTER_PORT) — and runs the pieces the stages run, with the experiment config's defaults
(:func:`tskd.config.load_config`) and these overrides: the demo's teacher (``sam_demo``;
``--quick``: ``sam_tiny``) un-tuned, from a random checkpoint, with logits and hidden states;
the default student; ``--images`` random transfer images; ``distill.engine`` = DeepSpeed ZeRO-2
with bf16 autocast on CUDA (fp32 on CPU: ``EngineConfig`` refuses bf16 without GPUs).

Parts (one line each, ``[PASS]``/``[FAIL]``; the exit status is 1 when any part fails):

1. ``group``: the process group's backend (``nccl`` required on CUDA), NCCL's version.
2. ``cache``: the ``targets_<arm>`` stage's per-batch computation
   (:class:`tskd.stages.teacher_cache._TeacherActor`, called in-process; on the GPU with
   ``--device cuda``) over the transfer images, 2 views each, fp16; then the distillation
   loop's draw of one view per sample (:class:`tskd.stages.distill.CachedTargets`) against a
   separately placed live teacher (:func:`tskd.stages.distill.place_teacher`, the
   ``replicated`` placement) on the same view. Tolerance (fp16 storage, relative rounding
   2^-11): ``|cached - live| <= 2e-3 + 2e-3 * |live|`` everywhere.
3. ``distill replicated`` / ``distill sharded`` / ``distill cached``: ``distill.epochs``
   epochs of the stage's loop body (:class:`~tskd.stages.distill.Distillation` of the student and
   :class:`tskd.losses.KDLoss`, ``freeze_unreached``, the warm-up + cosine schedule, stepped
   through :func:`tskd.stages.engine.build_engine`) with the live teacher, the live teacher
   partitioned with ZeRO-3 over the one rank (``sharded``: DeepSpeed's gather hooks on CUDA),
   then with the cached targets; checks: DeepSpeed engine, ZeRO stage 2, autocast dtype seen in the
   student's layers (bf16 on CUDA), finite losses. Both start from the same seed and draw the
   same batches and flips.
4. ``placements agree``: the first epoch's mean loss, sharded and cached against replicated,
   within 1%
   (fp32) / 5% (bf16).
5. ``timing``: SAM ``vit_b`` (random init, :func:`tskd.models.sam.build_sam`) at 1024 px against
   the default student at 256 and 512 px, batch 1, median of ``--repeats`` forwards after
   ``--warmup`` (``demo_speed.time_forward``), fp32 and bf16 autocast on CUDA.

A summary of the ratios follows. What it does not cover: Ray Data (the Parquet cache, the
streaming into workers), Ray Train (worker groups, checkpoints), more than one GPU, and the
LoRA-tuned teacher (the un-tuned one runs the same forward).

How to run the GPU check: on a machine with a CUDA GPU and ``python3`` with torch, timm, peft,
numpy (no internet needed), from the repository root::

    benchmarks/gpu_wheels.sh     # where pip reaches a registry: .whl/ (git-ignored, ~15 MiB)
    # copy the repository and .whl/ to the GPU machine, then there:
    OUT=/some/dir bash benchmarks/gpu_check.sh    # installs .whl/, runs this

``gpu_check.sh`` installs the wheels into ``/tmp/site``, runs ``--device cuda`` and tees the
log to ``$OUT/gpu_check.log`` when ``OUT`` is set; it must stay within 8 minutes on one GPU.
Record its output in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_speed.py beside this file

TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}
"""Cached (fp16) against live (fp32) teacher targets: fp16 rounds to 2^-11 relative."""
AGREE = {"fp32": 0.01, "bf16": 0.05}
"""First-epoch mean loss, cached against replicated placement (relative)."""

log = logging.getLogger("gpu_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a CPU test: sam_tiny teacher at 32 px, student at "
                         "64 px, 8 images at 32 px, batch 4, SAM timed as sam_tiny at 64 px")
    ap.add_argument("--images", type=int, help="transfer images (default 48; quick 8)")
    ap.add_argument("--image-size", type=int,
                    help="transfer image side (default data.image_size, or the student's size "
                         "when it is auto; quick 32)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, help="distill.batch_size (default 8; quick 4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides (as tskd run --set)")
    ap.add_argument("--sam-arch", help="timed SAM (default vit_b; quick sam_tiny)")
    ap.add_argument("--sam-size", type=int, help="its input side (default 1024; quick 64)")
    ap.add_argument("--student-sizes", type=int, nargs="+",
                    help="timed student sizes (default 256 512; quick 64)")
    ap.add_argument("--repeats", type=int, help="timed forwards (default 20; quick 2)")
    ap.add_argument("--warmup", type=int, help="forwards before timing (default 3; quick 1)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    defaults = ({"images": 8, "image_size": 32, "batch": 4, "sam_arch": "sam_tiny",
                 "sam_size": 64, "student_sizes": [64], "repeats": 2, "warmup": 1}
                if args.quick else
                {"images": 48, "batch": 8, "sam_arch": "vit_b",
                 "sam_size": 1024, "student_sizes": [256, 512], "repeats": 20, "warmup": 3})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def experiment_config(args: argparse.Namespace, cuda: bool) -> Any:
    """The experiment config the check runs: defaults, the check's sizes, ``--set``."""
    from tskd.config import load_config

    sizes = ["teacher.arch=sam_tiny", "teacher.img_size=32", "student.img_size=64"] \
        if args.quick else []
    overrides = sizes + [
        f"distill.epochs={args.epochs}", f"distill.batch_size={args.batch}",
        "distill.engine.kind=deepspeed", "distill.engine.zero_stage=2",
        f"distill.engine.precision={'bf16' if cuda else 'fp32'}",
        f"ray.use_gpu={'true' if cuda else 'false'}", f"seed={args.seed}"] + args.set
    return load_config(None, overrides)


class Check:
    """Runs parts, prints one line each, remembers failures."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def part(self, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        start = time.perf_counter()
        try:
            ok, message = fn()
        except Exception as exc:  # a broken part must not hide the others
            traceback.print_exc()
            ok, message = False, f"{type(exc).__name__}: {exc}"
        took = time.perf_counter() - start
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {message} ({took:.1f} s)", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok


def init_group(cuda: bool) -> str:
    """A one-rank process group as Ray Train's one worker has it; returns the backend."""
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    return dist.get_backend()


def group_part(cuda: bool) -> tuple[bool, str]:
    import torch
    import torch.distributed as dist

    backend = init_group(cuda)
    x = torch.ones(2, device="cuda" if cuda else "cpu")
    dist.all_reduce(x)  # the backend really runs a collective on this device
    ok = backend == ("nccl" if cuda else "gloo") and x.tolist() == [1.0, 1.0]
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a"
    return ok, (f"backend={backend} world_size={dist.get_world_size()} nccl={nccl} "
                f"all_reduce={'ok' if x.tolist() == [1.0, 1.0] else x.tolist()}")


def transfer_images(n: int, size: int, seed: int):
    """``n`` random uint8 transfer images (N, H, W, 3), as the transfer stage stores them."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def teacher_worker_config(cfg: Any, checkpoint: Path) -> dict[str, Any]:
    """``{"teacher", "distill"}`` as :func:`tskd.stages.distill.teacher_config` gives them,
    for the un-tuned base SAM in ``checkpoint`` with the logits term on."""
    from tskd.config import to_dict

    teacher = {"tuned": False, "checkpoint": str(checkpoint), "arch": cfg.teacher.arch,
               "img_size": cfg.teacher.img_size, "num_classes": NUM_CLASSES}
    return {"teacher": teacher, "distill": to_dict(cfg.distill)}


NUM_CLASSES = 3


def batches(arrays: dict[str, Any], batch_size: int, epoch: int, seed: int, device: Any):
    """Shuffled batches of ``arrays`` (numpy, first axis = images) as ``iter_torch_batches``
    yields them: float32 tensors on ``device`` (``id`` int64)."""
    import torch

    n = len(arrays["id"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        yield {k: torch.from_numpy(v[rows]).to(device,
                                               torch.int64 if k == "id" else torch.float32)
               for k, v in arrays.items()}


def cache_part(state: dict[str, Any], cfg: Any, args: argparse.Namespace,
               device: Any) -> tuple[bool, str]:
    import numpy as np
    import torch

    from tskd.stages.distill import CachedTargets, flip_per_sample, place_teacher
    from tskd.stages.teacher_cache import VIEWS, _TeacherActor

    worker = state["teacher_config"]
    start = time.perf_counter()
    actor = _TeacherActor(worker, threads=args.threads or torch.get_num_threads(),
                          use_gpu=device.type == "cuda")
    images = state["images"]
    parts = [actor({"id": np.arange(i, min(i + args.batch, len(images))),
                    "image": images[i:i + args.batch]})
             for i in range(0, len(images), args.batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cache = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state["cache"] = cache
    shapes = {k: list(v.shape[1:]) for k, v in cache.items() if k.startswith(("hidden", "logits"))}
    state["shapes"] = shapes
    on = next(actor.teacher.parameters()).device.type
    fp16 = all(cache[k].dtype == np.float16 for k in shapes)

    live = place_teacher(worker, device)  # the replicated placement: its own teacher
    targets = CachedTargets(shapes)
    worst = {"logits": 0.0, "hidden": 0.0}
    excess, same_views = 0.0, True
    for epoch, batch in enumerate(batches(cache, args.batch, 0, args.seed, device)):
        torch.manual_seed(args.seed + epoch)
        views, (logits, hidden) = targets(batch)
        torch.manual_seed(args.seed + epoch)  # the replicated placement's draw
        drawn = flip_per_sample(batch["image"].permute(0, 3, 1, 2))
        same_views &= torch.equal(views, drawn)
        want_logits, want_hidden = live(drawn)
        for key, got, want in (("logits", logits, want_logits), ("hidden", hidden, want_hidden)):
            diff = (got - want.float()).abs()
            worst[key] = max(worst[key], float(diff.max()))
            bound = TOLERANCE["atol"] + TOLERANCE["rtol"] * want.float().abs()
            excess = max(excess, float((diff - bound).max()))
    ok = on == device.type and fp16 and same_views and excess <= 0 and all(
        math.isfinite(v) for v in worst.values())
    return ok, (f"{len(images)} images x {VIEWS} views on {on} in {seconds:.2f} s, fp16={fp16}, "
                f"shapes logits={shapes.get('logits0')} hidden={shapes.get('hidden0')}; "
                f"max_diff_logits={worst['logits']:.2e} max_diff_hidden={worst['hidden']:.2e} "
                f"(tolerance {TOLERANCE['atol']:g} + {TOLERANCE['rtol']:g}*|live|: "
                f"{'within' if excess <= 0 else f'exceeded by {excess:.2e}'}); "
                f"same_views={same_views}")


def distill_part(state: dict[str, Any], placement: str, cfg: Any, args: argparse.Namespace,
                 device: Any) -> tuple[bool, str]:
    """The distillation stage's loop body (``tskd.stages.distill._train_loop``) without Ray."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.config import to_dict
    from tskd.losses import KDLoss
    from tskd.models.students import build_student
    from tskd.stages.distill import (CachedTargets, Distillation, batch_pairs,
                                     freeze_unreached, place_teacher)
    from tskd.stages.engine import build_engine

    d = to_dict(cfg.distill)
    cached = placement == "cached"
    if cached:
        teacher = CachedTargets(state["shapes"])
    else:  # replicated, or sharded with ZeRO-3 over this one rank (the gather hooks run)
        config = dict(state["teacher_config"])
        config["distill"] = dict(config["distill"], teacher_placement=placement)
        teacher = place_teacher(config, device)
    torch.manual_seed(args.seed)  # after the teacher: both placements draw the same from here
    student = build_student(to_dict(cfg.student), NUM_CLASSES, hidden_block=d["student_block"])
    kd = KDLoss(student.hidden_dim, teacher.hidden_dim, w_logits=d["w_logits"],
                w_hidden=d["w_hidden"], logits_loss=d["logits_loss"],
                logits_target=d["logits_target"], normalize=d["normalize"])
    data = state["cache"] if cached else {"id": state["cache"]["id"],
                                          "image": state["images"]}
    steps = max(1, math.ceil(len(data["id"]) / d["batch_size"]))
    bundle = Distillation(student, kd).to(device)
    size = cfg.student.img_size
    freeze_unreached(bundle, teacher.probe if cached else teacher, size)
    engine = build_engine(
        bundle, d["engine"], lr=d["lr"], weight_decay=d["weight_decay"],
        batch_size=d["batch_size"], steps_per_epoch=steps, epochs=d["epochs"], device=device,
        schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
            opt, int(d["warmup_epochs"] * per_epoch), total))
    seen: set[str] = set()  # the dtypes the student's Linear layers compute in
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(str(out.dtype)))
             for m in engine.module.student.modules() if isinstance(m, torch.nn.Linear)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, seconds = [], []
    for epoch in range(1, d["epochs"] + 1):
        engine.train()
        sync()
        start, total, n = time.perf_counter(), 0.0, 0
        for batch in batches(data, d["batch_size"], epoch, args.seed, device):
            images, target = batch_pairs(batch, teacher, cached=cached, size=size)
            loss, _ = engine(images, target)
            engine.step(loss)
            total += loss.item()
            n += 1
        sync()
        seconds.append(time.perf_counter() - start)
        losses.append(total / n)
    for hook in hooks:
        hook.remove()
    state[f"{placement}_losses"], state[f"{placement}_seconds"] = losses, seconds
    import torch.distributed as dist

    inner = getattr(engine, "engine", None)
    zero = inner.zero_optimization_stage() if inner is not None else None
    want = "torch.bfloat16" if cfg.distill.engine.precision == "bf16" else "torch.float32"
    finite = all(math.isfinite(v) for v in losses)
    on = next(engine.module.parameters()).device.type
    ok = (engine.kind == "deepspeed" and zero == 2 and want in seen and finite
          and on == device.type and dist.get_backend() == ("nccl" if on == "cuda" else "gloo"))
    rate = len(data["id"]) / seconds[-1]
    return ok, (f"engine={engine.kind} zero={zero} precision={cfg.distill.engine.precision} "
                f"linear_dtypes={sorted(seen)} backend={dist.get_backend()} device={on}; "
                f"{d['epochs']} epochs x {steps} steps of {d['batch_size']}; "
                f"losses={','.join(f'{v:.5f}' for v in losses)} finite={finite}; "
                f"last epoch {seconds[-1]:.2f} s ({rate:.1f} img/s)")


def agree_part(state: dict[str, Any], cfg: Any) -> tuple[bool, str]:
    ref = state["replicated_losses"][0]
    tol = AGREE[cfg.distill.engine.precision]
    ok, parts = True, []
    for placement in ("sharded", "cached"):
        got = state[f"{placement}_losses"][0]
        rel = abs(got - ref) / abs(ref)
        ok = ok and rel <= tol
        parts.append(f"{placement} {got:.5f} vs replicated {ref:.5f}: relative difference "
                     f"{rel:.2e}")
    return ok, f"first-epoch loss {'; '.join(parts)} (tolerance {tol:g})"


def timing_part(state: dict[str, Any], cfg: Any, args: argparse.Namespace,
                device: Any) -> tuple[bool, str]:
    import torch

    from demo_speed import time_forward
    from tskd.config import to_dict
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.models.students import build_student

    precisions = {"fp32": None} | ({"bf16": torch.bfloat16} if device.type == "cuda" else {})
    torch.manual_seed(args.seed)
    sam = SamSegmenter(build_sam(args.sam_arch, num_classes=NUM_CLASSES,
                                 img_size=args.sam_size)).eval().to(device)
    t_sam = {p: time_forward(sam, args.sam_size, args.repeats, device=device,
                             warmup=args.warmup, dtype=dt) for p, dt in precisions.items()}
    del sam
    t_student: dict[tuple[str, int], float] = {}
    for size in args.student_sizes:
        student_cfg = to_dict(cfg.student) | {"img_size": size}
        student = build_student(student_cfg, NUM_CLASSES).eval().to(device)
        for p, dt in precisions.items():
            t_student[p, size] = time_forward(student, size, args.repeats, device=device,
                                              warmup=args.warmup, dtype=dt)
        del student
    state["timing"] = (t_sam, t_student)
    parts = [f"SAM {args.sam_arch} {args.sam_size} px {p} {t * 1e3:.2f} ms"
             for p, t in t_sam.items()]
    parts += [f"student {s} px {p} {t * 1e3:.2f} ms" for (p, s), t in t_student.items()]
    ok = all(math.isfinite(t) and t > 0 for t in [*t_sam.values(), *t_student.values()])
    return ok, f"batch 1, median of {args.repeats} after {args.warmup} warm-up: " + \
        "; ".join(parts)


def summary(state: dict[str, Any], args: argparse.Namespace) -> None:
    """The ratios, one line each."""
    if "replicated_seconds" in state and "cached_seconds" in state:
        rep, cac = state["replicated_seconds"][-1], state["cached_seconds"][-1]
        print(f"summary: distillation epoch time replicated / cached = {rep / cac:.2f}x "
              f"({rep:.2f} s / {cac:.2f} s, last epoch)")
    if "replicated_seconds" in state and "sharded_seconds" in state:
        rep, sh = state["replicated_seconds"][-1], state["sharded_seconds"][-1]
        print(f"summary: distillation epoch time sharded (ZeRO-3, 1 rank) / replicated = "
              f"{sh / rep:.2f}x ({sh:.2f} s / {rep:.2f} s, last epoch)")
    if "timing" in state:
        t_sam, t_student = state["timing"]
        for (p, size), t in t_student.items():
            print(f"summary: SAM {args.sam_arch} at {args.sam_size} px / student at {size} px, "
                  f"batch 1, {p}: {t_sam[p] / t:.1f}x ({1 / t_sam[p]:.1f} vs {1 / t:.1f} img/s)")
        if "bf16" in t_sam:
            print(f"summary: SAM {args.sam_arch} fp32 / bf16 = "
                  f"{t_sam['fp32'] / t_sam['bf16']:.2f}x")


def versions() -> str:
    """The versions of the other packages the check imports (carried wheels or the machine's)."""
    from importlib import metadata

    out = []
    for name in ("timm", "peft", "monai", "diffusers", "segment-anything", "pydantic"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")  # before DeepSpeed
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        print("[FAIL] device: --device cuda but torch sees no CUDA device", flush=True)
        return 1
    import deepspeed

    name = torch.cuda.get_device_name(0) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"gpu_check: device {args.device} ({name}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
          f"python {sys.version.split()[0]}; {versions()}", flush=True)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    started = time.perf_counter()
    check, state = Check(), {}
    cfg = experiment_config(args, cuda)
    if args.image_size is None:  # the transfer set is at the data's working size
        size = cfg.data.image_size
        args.image_size = size if isinstance(size, int) else cfg.student.img_size
    with tempfile.TemporaryDirectory() as tmp:
        from tskd.models.sam import build_sam

        torch.manual_seed(args.seed)
        checkpoint = Path(tmp) / "teacher.pth"  # the foundation weights: random init
        torch.save(build_sam(cfg.teacher.arch, num_classes=NUM_CLASSES,
                             img_size=cfg.teacher.img_size).state_dict(), checkpoint)
        state["teacher_config"] = teacher_worker_config(cfg, checkpoint)
        state["images"] = transfer_images(args.images, args.image_size, args.seed)
        print(f"gpu_check: teacher {cfg.teacher.arch} at {cfg.teacher.img_size} px, student "
              f"{cfg.student.model_name} at {cfg.student.img_size} px, {args.images} transfer "
              f"images at {args.image_size} px", flush=True)
        if check.part("group", lambda: group_part(cuda)):
            if check.part("cache", lambda: cache_part(state, cfg, args, device)):
                ok = [check.part(f"distill {p}", lambda p=p: distill_part(state, p, cfg, args,
                                                                           device))
                      for p in ("replicated", "sharded", "cached")]
                if all(ok):
                    check.part("placements agree", lambda: agree_part(state, cfg))
    if not args.skip_timing:
        check.part("timing", lambda: timing_part(state, cfg, args, device))
    if cuda:
        print(f"gpu_check: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
              flush=True)
    summary(state, args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    verdict = "FAIL: " + ", ".join(check.failed) if check.failed else "PASS"
    print(f"gpu_check: {verdict} ({check.passed} parts passed, {len(check.failed)} failed) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
