"""Stages ``targets_<arm>``: the teacher's distillation targets, computed once per transfer image.

With ``distill.teacher_placement: cached`` (or ``auto`` when the cache fits
``distill.cache_max_gb``) distillation never builds the teacher: this stage runs it once over the
transfer set and distillation streams images and targets together, every epoch.

Setup: the frozen teacher of the arm (TS-KD: the LoRA-tuned SAM, its logits and hidden states;
task-agnostic KD: the un-tuned SAM, hidden states only — its decoder never runs) on an actor pool
(``map_batches``; ``transfer.num_actors`` actors of ``transfer.actor_cpus`` CPUs, one GPU each
with ``ray.use_gpu``). Loop: each transfer image in two views — as it is and flipped
horizontally, the two views distillation draws per sample — through the teacher at its own
resolution, exactly as the ``replicated`` placement computes them. Report: Parquet shards under
``targets/`` with ``id``, ``image`` (uint8, the transfer image) and per view ``v`` ∈ {0, 1}
``hidden{v}`` (fp16, ``(D, T/16, T/16)``) and, for TS-KD, ``logits{v}`` (fp16, ``(C, T/4, T/4)``),
plus ``targets.json`` naming the teacher entry, the transfer-set entry, the features and the
shapes.

Augmentation with a cache: tskd stores a fixed set of views (identity and horizontal flip) per
image rather than recomputing targets for arbitrary augmentations (FKD stores crop coordinates,
EdgeSAM its augmentation seed); the distillation loop picks one of the stored views per sample
with the same draw the replicated placement uses, so the two placements see the same pairs.
Targets are kept at the teacher's output resolution; the KD loss adapts them to the student as
it does for a live teacher, so one cache serves every student size. Store entries are keyed by
the stage's fingerprint (the teacher's and the transfer set's entries, the features, whether
logits are needed); distillation checks ``targets.json`` against the entries it expects and
refuses a cache built for another teacher, transfer set or features, naming the mismatch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tskd.artifacts import StageContext, write_json
from tskd.config import TskdError
from tskd.stages.outputs import write_parquet
from tskd.stages.ray_train import run_storage

log = logging.getLogger(__name__)

TARGETS_DIR = "targets"
CACHE_FILE = "targets.json"
VIEWS = 2
"""Cached views per transfer image: 0 = as it is, 1 = flipped horizontally."""


class TeacherCacheError(TskdError):
    """A target cache that does not belong to the teacher / transfer set a run expects."""


class _TeacherActor:
    """A frozen teacher that turns batches of transfer images into fp16 targets (Ray Data
    callable class: one teacher per actor)."""

    def __init__(self, config: dict[str, Any], threads: int, use_gpu: bool,
                 inputs: Any = None) -> None:
        import torch

        from tskd.stages.distill import place_teacher
        from tskd.stages.ray_train import configure_worker_logging

        torch.set_num_threads(max(1, threads))
        configure_worker_logging()
        if inputs is not None:  # object-store output: the teacher's entries on this node
            inputs.fetch()
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = place_teacher(config, self.device)
        self.done = self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        start = time.time()
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        images = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) 0..255
        out = {"id": np.asarray(batch["id"], np.int64), "image": batch["image"]}
        for view, x in enumerate((images, images.flip(-1))):
            logits, hidden = self.teacher(x)
            out[f"hidden{view}"] = hidden.half().cpu().numpy()
            if logits is not None:
                out[f"logits{view}"] = logits.half().cpu().numpy()
        self.done += len(out["id"])
        self.calls += 1
        if self.calls % 10 == 1:  # progress without a line per batch
            log.info("teacher targets for %d images in %.1f s; %d by this actor", len(out["id"]),
                     time.time() - start, self.done)
        return out


def run(ctx: StageContext) -> dict[str, Any]:
    """Compute and store the arm's targets; see the module docstring."""
    import json

    import ray.data

    from tskd.stages.distill import teacher_config
    from tskd.stages.transfer_set import actor_cpu_request, read_transfer_set

    cfg, arm = ctx.cfg, ctx.params["arm"]
    started = time.time()
    transfer_dir = Path(ctx.inputs["transfer"])
    n = json.loads((transfer_dir / "transfer.json").read_text())["n_kept"]
    teacher, distill = teacher_config(ctx, arm)
    t = cfg.transfer
    dataset = read_transfer_set(ctx.input_location("transfer"), columns=["id", "image"])
    log.info("teacher targets (%s): %d transfer images x %d views on %d actor(s)", arm, n,
             VIEWS, t.num_actors)
    targets = dataset.map_batches(
        _TeacherActor,
        fn_constructor_kwargs={"config": {"teacher": teacher, "distill": distill},
                               "threads": max(1, int(t.actor_cpus)), "use_gpu": cfg.ray.use_gpu,
                               "inputs": ctx.input_refs},
        batch_size=cfg.distill.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=t.num_actors), num_cpus=actor_cpu_request(cfg),
        num_gpus=1 if cfg.ray.use_gpu else 0)
    write_parquet(targets, Path(ctx.dir) / TARGETS_DIR, run_storage(ctx))
    shapes = _row_shapes(Path(ctx.dir) / TARGETS_DIR)
    size = sum(p.stat().st_size for p in (Path(ctx.dir) / TARGETS_DIR).glob("*.parquet"))
    write_json(Path(ctx.dir) / CACHE_FILE, expected_cache(ctx, arm) | {
        "n_images": n, "views": VIEWS, "dtype": "float16", "shapes": shapes})
    return {"targets/n_images": n, "targets/mb": round(size / 2**20, 2),
            "targets/seconds": round(time.time() - started, 1)}


def expected_cache(ctx: StageContext, arm: str) -> dict[str, Any]:
    """What a cache for this arm must have been built from: the store entries (fingerprints)
    of its teacher and its transfer set, the teacher features and whether logits are in it."""
    teacher_stage = "teacher" if arm == "ts_kd" else "teacher_pretrain"
    teacher_entry = ctx.inputs.get(teacher_stage)
    return {"arm": arm,
            "teacher_entry": Path(teacher_entry).resolve().name if teacher_entry else
            str(ctx.cfg.teacher.checkpoint),
            "transfer_entry": Path(ctx.inputs["transfer"]).resolve().name,
            "features": ctx.cfg.distill.teacher_features,
            "logits": arm == "ts_kd" and ctx.cfg.distill.w_logits > 0}


def check_cache(targets_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """``targets.json`` of ``targets_dir`` against ``expected`` (:func:`expected_cache`).

    Returns:
        The cache's description (shapes, views, image count).

    Raises:
        TeacherCacheError: naming each field that differs, the cache's value and the expected.
    """
    path = Path(targets_dir) / CACHE_FILE
    try:
        import json

        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TeacherCacheError(f"{path}: not a teacher-target cache ({exc})") from None
    wrong = [f"{k} is {found.get(k)!r}, expected {v!r}" for k, v in expected.items()
             if found.get(k) != v]
    if wrong:
        raise TeacherCacheError(f"{path}: the cached teacher targets belong to another run: "
                                + "; ".join(wrong) + " (they are recomputed by the "
                                "targets stage of this run's teacher and transfer set)")
    return found


def _row_shapes(targets_dir: Path) -> dict[str, list[int]]:
    """Per-image shapes of the ``hidden*``/``logits*`` columns, from the first non-empty shard
    (read here with pyarrow: the shards are on this node, whichever node a Ray task would
    run on)."""
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401  registers the tensor extension type

    for path in sorted(targets_dir.glob("*.parquet")):
        table = pq.read_table(path)
        if table.num_rows:
            return {name: list(np.asarray(table.column(name).slice(0, 1).combine_chunks()
                                          .to_numpy_ndarray())[0].shape)
                    for name in table.column_names if name.startswith(("hidden", "logits"))}
    return {}


def read_targets(stage_dir: Path | str, *, check: bool = True,
                 expected: dict[str, Any] | None = None, materialize_share: float = 0.0):
    """The cache as a ``ray.data.Dataset`` (columns as in the module docstring), after
    :func:`check_cache` against ``expected`` when given; held in the object store when it fits
    ``materialize_share`` of it (:func:`tskd.stages.ray_train.read_parquet_dataset`)."""
    from tskd.stages.ray_train import read_parquet_dataset
    from tskd.storage import is_remote

    if check and expected is not None:
        check_cache(Path(stage_dir), expected)
    return read_parquet_dataset(f"{str(stage_dir).rstrip('/')}/{TARGETS_DIR}"
                                if is_remote(str(stage_dir)) else Path(stage_dir) / TARGETS_DIR,
                                materialize_share=materialize_share)


def placement(cfg: Any, num_classes: int) -> str:
    """``distill.teacher_placement`` resolved: ``auto`` is ``cached`` when the cache of one
    arm (2 views, fp16) fits ``distill.cache_max_gb``, else ``replicated``."""
    p = cfg.distill.teacher_placement
    if p != "auto":
        return p
    from tskd.memory_plan import cache_bytes, teacher_size

    t = teacher_size(cfg.teacher.arch, cfg.teacher.img_size, num_classes,
                     teacher_features=cfg.distill.teacher_features)
    sources = cfg.transfer.sources
    n = (cfg.transfer.n_images if "synthetic" in sources else 0) + (
        (cfg.transfer.n_unlabelled or cfg.transfer.n_images) if "unlabelled" in sources else 0)
    return "cached" if cache_bytes(t, num_classes, n) <= cfg.distill.cache_max_gb * 2**30 \
        else "replicated"


__all__ = ["CACHE_FILE", "TARGETS_DIR", "TeacherCacheError", "check_cache", "expected_cache",
           "placement", "read_targets", "run"]
