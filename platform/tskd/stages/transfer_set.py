"""Stage ``transfer``: the transfer set (TS-KD step 2).

``transfer.sources`` says what it holds: ``synthetic`` (the paper's setting, the default), the
train split's real ``unlabelled`` images (those outside the label budget; their masks are never
read), or both. Without ``synthetic`` it reads only the ``data`` stage and no diffusion model is
trained (the pipeline plans no ``ddpm`` stage).

Synthetic part: samples of the ``ddpm`` stage's model (:mod:`tskd.stages.ddpm`, trained once per
label budget and ``transfer.diffusion``, whatever ``transfer.n_images``). Setup: the DDPM's
training images, read from the ddpm entry (:func:`tskd.stages.ddpm.training_images`: the
labelled training images, their crops with patch training, the augmented copies): they are the
privacy references. Then:

1. a Ray Data pipeline samples ``transfer.n_images`` images: ``range(n)`` →
   ``map_batches(_Sampler, ActorPoolStrategy)``, one model load per actor (from the ddpm
   entry: its directory, or for an object-store output its URI, which each actor downloads).
   Image ``id`` is sampled from the noise seed ``image_seed(cfg.seed, id)`` and the UNet always
   runs at batch ``sample_batch_size`` (the last batch is padded), so the images are
   bit-identical whatever the number of actors or how Ray Data cuts the batches. Each actor
   resizes its samples to ``data.image_size`` (with patch training: the patch side), averages
   their channels when ``transfer.grayscale`` says so (``auto`` = the labelled images are
   grayscale) and attaches the nearest privacy reference
   (:func:`tskd.transfer_quality.privacy_references`: the labelled training images, their
   left-right and top-bottom flips, and the DDPM's augmented training copies): ``nn_index`` (the
   training image it derives from), ``nn_kind`` (``train``/``hflip``/``vflip``/``augmented``),
   ``nn_mse``, ``nn_psnr``;
2. near-copies (``nn_psnr >= transfer.near_copy_psnr``) are dropped when
   ``transfer.drop_near_copies``; the rest is written with ``write_parquet``.

Unlabelled part: ``transfer.n_unlabelled`` (null = all) of the unlabelled train images, a seeded
subset, at ``data.image_size``, with ids after the synthetic ones (``n_images + k``),
``nn_index`` -1, ``nn_kind`` "", ``nn_mse``/``nn_psnr`` NaN.

Patch training (``data.patch_size`` < ``data.image_size``): the transfer set holds patches.
The DDPM trains on crops of the labelled images (:func:`tskd.data.patches.crop_arrays`,
:func:`~tskd.data.patches.patches_per_image` per image, ``data.fg_fraction`` centred on
foreground; they are also the privacy references, and ``quality.json``'s ``train_case_ids``
names each crop's image), its samples are resized to the patch side, and each unlabelled image
gives that many random crops (``unlabelled_case_ids`` names the image of every row).

Output directory::

    images/           parquet shards: id int64, image uint8 (H, W, 3) tensor, nn_index int64,
                      nn_mse float64, nn_psnr float64 (inf for an exact copy), nn_kind string,
                      source string ("synthetic" | "unlabelled")
    quality.json      nearest-neighbour report over all samples and over the kept ones
    transfer.json     the artifact manifest (counts per source, size, columns, shards, dropped
                      ids, ``ddpm_entry``: the ddpm entry sampled from); ``n_kept`` counts every
                      row of the set

Readers: :func:`read_transfer_set` (Ray Dataset) and :func:`load_transfer_images` (numpy).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tskd.config import ExperimentConfig
from tskd.stages.outputs import local_copy, write_parquet

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
QUALITY_FILE = "quality.json"
MANIFEST_FILE = "transfer.json"
COLUMNS = ["id", "image", "nn_index", "nn_mse", "nn_psnr", "nn_kind", "source"]


class TransferSetError(RuntimeError):
    """The transfer set cannot be built as configured (e.g. every sample is a near-copy)."""


# ---------------------------------------------------------------------------- sampling


class _Sampler:
    """Ray Data actor: loads the model once; per batch of ids samples, resizes, scores."""

    def __init__(self, model_dir: str, seed: int, num_inference_steps: int, batch_size: int,
                 sampler: str, out_size: int, grayscale: bool, references: Any,
                 ref_index: np.ndarray, ref_kind: np.ndarray, threads: int,
                 use_gpu: bool = False) -> None:
        import ray
        import torch

        from tskd.diffusion import load_diffusion

        from tskd.stages.ray_train import configure_worker_logging

        torch.set_num_threads(max(1, threads))
        configure_worker_logging()
        self.unet, self.scheduler = load_diffusion(local_copy(model_dir))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.seed, self.steps, self.batch_size = seed, num_inference_steps, batch_size
        self.sampler, self.out_size, self.grayscale = sampler, out_size, grayscale
        self.refs = ray.get(references) if isinstance(references, ray.ObjectRef) \
            else references
        self.ref_index, self.ref_kind = np.asarray(ref_index), np.asarray(ref_kind)
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tskd.diffusion import image_seed, sample_with_seeds
        from tskd.transfer_quality import nearest_neighbours, resize_uint8, to_grayscale

        start = time.time()
        ids = np.asarray(batch["id"], dtype=np.int64)
        seeds = [image_seed(self.seed, int(i)) for i in ids]
        images = sample_with_seeds(self.unet, self.scheduler, seeds,
                                   num_inference_steps=self.steps, batch_size=self.batch_size,
                                   sampler=self.sampler, pad_batches=True, device=self.device)
        images = resize_uint8(images, self.out_size)
        if self.grayscale:
            images = to_grayscale(images)
        ref, mse, psnr = nearest_neighbours(images, self.refs)
        self.done += len(ids)
        log.info("sampled %d images (ids %d..%d) in %.1f s; %d by this actor", len(ids),
                 int(ids.min()) if len(ids) else -1, int(ids.max()) if len(ids) else -1,
                 time.time() - start, self.done)
        return {"id": ids, "image": images, "nn_index": self.ref_index[ref], "nn_mse": mse,
                "nn_psnr": psnr, "nn_kind": self.ref_kind[ref].astype(str),
                "source": np.full(len(ids), "synthetic")}


def _keep_below(batch: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    keep = batch["nn_psnr"] < threshold
    return {k: v[keep] for k, v in batch.items()}


def use_grayscale(train_images: np.ndarray, cfg: ExperimentConfig) -> bool:
    """``transfer.grayscale``: ``always``/``never``, or ``auto`` = the labelled images are."""
    from tskd.transfer_quality import is_grayscale

    mode = cfg.transfer.grayscale
    return mode == "always" or (mode == "auto" and is_grayscale(train_images))


def sample_transfer_set(model_dir: Path | str, train_images: np.ndarray, cfg: ExperimentConfig,
                        augmented: np.ndarray | None = None):
    """The Ray Data pipeline: ``range(n)`` → sampler actors → a materialized dataset of
    :data:`COLUMNS` (all samples, before near-copy filtering), images at ``data.patch``
    (``data.image_size`` without patches)
    (grayscale per :func:`use_grayscale`) scored against ``train_images`` at that size, their
    flips and the ``augmented`` copies (:func:`tskd.transfer_quality.privacy_references`)."""
    import ray

    from tskd.transfer_quality import privacy_references

    t = cfg.transfer
    check_sampler_resources(cfg)
    refs, ref_index, ref_kind = privacy_references(train_images, augmented)
    refs_ref = ray.put(refs)
    ds = ray.data.range(t.n_images).map_batches(
        _Sampler,
        fn_constructor_kwargs={
            "model_dir": str(model_dir), "seed": cfg.seed,
            "num_inference_steps": t.diffusion.num_inference_steps,
            "batch_size": t.sample_batch_size, "sampler": t.diffusion.sampler,
            "out_size": cfg.data.patch, "references": refs_ref,
            "ref_index": ref_index, "ref_kind": ref_kind,
            "grayscale": use_grayscale(train_images, cfg),
            "threads": max(1, int(t.actor_cpus)), "use_gpu": cfg.ray.use_gpu},
        batch_size=t.sample_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=t.num_actors), num_cpus=actor_cpu_request(cfg),
        num_gpus=1 if cfg.ray.use_gpu else 0)
    return ds.materialize()


def check_sampler_resources(cfg: ExperimentConfig) -> None:
    """Fail when the sampler actors cannot all start (the ``ddpm`` stage calls it before the
    DDPM trains; :func:`actor_cpu_request` says how much CPU each actor can ask for).

    Raises:
        TransferSetError: naming the fields to change and the cluster's resources.
    """
    import ray

    actor_cpu_request(cfg, quiet=True)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    t = cfg.transfer
    if cfg.ray.use_gpu and t.num_actors > gpus + 1e-9:
        raise TransferSetError(
            f"transfer.num_actors={t.num_actors} sampler actors each request a GPU "
            f"(ray.use_gpu=true) but the cluster has {gpus:g}; lower transfer.num_actors")


def actor_cpu_request(cfg: ExperimentConfig, *, quiet: bool = False) -> float:
    """The CPUs each Ray Data actor of this stage (the transfer-set sampler, the teacher-target
    cache) requests: ``transfer.actor_cpus``, lowered where the cluster cannot hold
    ``transfer.num_actors`` of them plus one CPU for Ray Data's read and write tasks, which run
    beside the actors (without it the pipeline waits forever). The CPUs the calling process
    holds are not free: a ``tskd grid`` cell or ``tskd tune`` trial runs its stages from a Tune
    trial that holds ``resources_per_cell`` / ``resources_per_trial``. Only the request is
    lowered: the actors' torch threads stay ``max(1, int(actor_cpus))``, so the samples are the
    same.

    Raises:
        TransferSetError: when not even a fraction of a CPU is left for the actors.
    """
    import ray

    t = cfg.transfer
    total = float(ray.cluster_resources().get("CPU", 0.0))
    held = 0.0  # a driver holds nothing; a Ray worker (a Tune trial) what it was given
    if ray._private.worker.global_worker.mode == ray.WORKER_MODE:  # noqa: SLF001
        held = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    room = total - held - 1.0  # one CPU for the read / write tasks
    if room <= 1e-3:
        raise TransferSetError(
            f"the cluster's {total:g} CPUs leave no room for transfer.num_actors={t.num_actors} "
            f"Ray Data actors plus 1 CPU for Ray Data's read and write tasks"
            + (f" (this pipeline runs in a Tune trial that holds {held:g} CPU: lower "
               "resources_per_cell.cpu of the grid or resources_per_trial.cpu of the search "
               "space)" if held else "")
            + "; give Ray more CPUs")
    request = min(t.actor_cpus, room / t.num_actors)
    if request < t.actor_cpus - 1e-9 and not quiet:
        log.info("Ray Data actors request %.2g CPU each instead of transfer.actor_cpus=%g: the "
                 "cluster has %g CPUs, %g held by this run's Tune trial, 1 left to Ray Data's "
                 "tasks, for %d actor(s) (the samples do not change)", request, t.actor_cpus,
                 total, held, t.num_actors)
    return round(request, 4)


# ---------------------------------------------------------------------------- the stage


def run(ctx: Any) -> dict[str, Any]:
    """Build the transfer set from ``transfer.sources``; see the module docstring. Returns
    ``transfer/*`` metrics (the DDPM's ``diffusion/*`` are the ``ddpm`` stage's).

    Raises:
        TransferSetError: every sample is a near-copy (nothing left to distil on), the sampler
            actors would take every CPU, or ``unlabelled`` is asked for but the train split has
            no image outside the label budget.
    """
    from tskd.artifacts import write_json
    from tskd.stages.data_stage import load_data

    cfg: ExperimentConfig = ctx.cfg
    t = cfg.transfer
    out = Path(ctx.dir)
    info, splits = load_data(ctx.inputs["data"])
    metrics: dict[str, Any] = {}
    manifest: dict[str, Any] = {
        "sources": list(t.sources), "n_kept": 0, "n_synthetic": 0, "n_unlabelled": 0,
        "image_size": cfg.data.patch, "columns": COLUMNS, "images_dir": IMAGES_DIR,
        "seed": cfg.seed}
    from tskd.stages.ray_train import run_storage

    storage = run_storage(ctx)
    if "synthetic" in t.sources:
        metrics |= _synthetic_part(ctx, manifest, storage)
    else:
        write_json(out / QUALITY_FILE, {"sources": list(t.sources), "n_sampled": 0,
                                        "note": "no synthetic images: nothing to check"})
    if "unlabelled" in t.sources:
        first_id = t.n_images if "synthetic" in t.sources else 0
        manifest["unlabelled_case_ids"] = _unlabelled_part(cfg, info, splits, out, first_id,
                                                           storage)
        manifest["n_unlabelled"] = len(manifest["unlabelled_case_ids"])
    manifest["n_kept"] = manifest["n_synthetic"] + manifest["n_unlabelled"]
    manifest["shards"] = sorted(p.relative_to(out).as_posix()
                                for p in (out / IMAGES_DIR).glob("*.parquet"))
    write_json(out / MANIFEST_FILE, manifest)
    log.info("transfer set: %d images (%d synthetic, %d real unlabelled)", manifest["n_kept"],
             manifest["n_synthetic"], manifest["n_unlabelled"])
    return metrics | {"transfer/n_images": manifest["n_kept"],
                      "transfer/n_synthetic": manifest["n_synthetic"],
                      "transfer/n_unlabelled": manifest["n_unlabelled"]}


def _unlabelled_part(cfg: ExperimentConfig, info: Any, splits: Any, out: Path,
                     first_id: int, storage: Path | str | None = None) -> list[str]:
    """Write ``transfer.n_unlabelled`` (null = all) real unlabelled train images, a seeded
    subset, as parquet rows of :data:`COLUMNS`; return their case ids (in id order)."""
    import ray

    from tskd.data.dataset import load_arrays

    t = cfg.transfer
    pool = list(splits.unlabelled)
    if not pool:
        raise TransferSetError(
            "transfer.sources includes 'unlabelled' but the train split has no image outside "
            f"the label budget (data.n_labels={cfg.data.n_labels}); lower data.n_labels or "
            "use transfer.sources=[synthetic]")
    n = len(pool) if t.n_unlabelled is None else min(t.n_unlabelled, len(pool))
    if t.n_unlabelled is not None and t.n_unlabelled > len(pool):
        log.warning("transfer.n_unlabelled=%d but only %d unlabelled train images exist; "
                    "using all of them", t.n_unlabelled, len(pool))
    pick = np.sort(np.random.default_rng([cfg.seed, 0x0A1]).permutation(len(pool))[:n])
    case_ids = [pool[j] for j in pick]
    images, _ = load_arrays(info, case_ids, cfg.data.image_size)
    if cfg.data.patches:  # random crops (no labels to oversample), as many as training takes
        from tskd.data.patches import crop_arrays, patches_per_image

        k = patches_per_image(cfg.data.image_size, cfg.data.patch)
        images = crop_arrays(images, None, patch=cfg.data.patch, per_image=k,
                             seed=cfg.seed + 0x0A1)
        case_ids = [c for c in case_ids for _ in range(k)]
        n = len(images)
    log.info("adding %d real unlabelled train images to the transfer set", n)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    rows = {"id": ids, "image": images, "nn_index": np.full(n, -1, np.int64),
            "nn_mse": np.full(n, np.nan), "nn_psnr": np.full(n, np.nan),
            "nn_kind": np.full(n, ""), "source": np.full(n, "unlabelled")}
    write_parquet(ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(n)]),
                  out / IMAGES_DIR, storage)
    return case_ids


def _synthetic_part(ctx: Any, manifest: dict[str, Any], storage: Path | str
                    ) -> dict[str, Any]:
    """Sample the ``ddpm`` input's model, check quality and privacy, write the kept samples;
    fill the synthetic entries of ``manifest``; return ``transfer/*`` metrics."""
    from tskd.artifacts import write_json
    from tskd.stages.ddpm import model_location, training_images
    from tskd.transfer_quality import json_safe, quality_report

    cfg: ExperimentConfig = ctx.cfg
    out = Path(ctx.dir)
    check_sampler_resources(cfg)
    t = cfg.transfer
    ddpm_images = training_images(ctx.inputs["ddpm"])  # what the DDPM trained on
    train_images, augmented = ddpm_images.labelled, ddpm_images.augmented
    log.info("sampling %d images (%d inference steps, %s%s) on %d actor(s) x %g CPU",
             t.n_images, t.diffusion.num_inference_steps, t.diffusion.sampler,
             ", grayscale" if use_grayscale(train_images, cfg) else "", t.num_actors,
             t.actor_cpus)
    start = time.time()
    samples = sample_transfer_set(model_location(ctx), train_images, cfg, augmented)
    meta = samples.select_columns(["id", "nn_index", "nn_mse", "nn_psnr", "nn_kind"]).to_pandas()
    meta = meta.sort_values("id").reset_index(drop=True)
    elapsed = time.time() - start
    log.info("sampled %d images in %.0f s (%.2f images/s)", len(meta), elapsed,
             len(meta) / max(elapsed, 1e-9))
    ids = meta["id"].to_numpy(np.int64)
    idx, mse, psnr = (meta["nn_index"].to_numpy(np.int64), meta["nn_mse"].to_numpy(np.float64),
                      meta["nn_psnr"].to_numpy(np.float64))
    kinds = meta["nn_kind"].astype(str).to_numpy()
    report_all = quality_report(idx, mse, psnr, near_copy_psnr=t.near_copy_psnr)
    # ids are 0..n-1 and meta is sorted by id, so report positions ("index") are sample ids
    for entry in report_all["near_copies"]:
        entry["nearest_kind"] = str(kinds[entry["index"]])
    near = psnr >= t.near_copy_psnr
    drop = near if t.drop_near_copies else np.zeros_like(near)
    keep = ~drop
    report_kept = quality_report(idx[keep], mse[keep], psnr[keep],
                                 near_copy_psnr=t.near_copy_psnr)
    report_kept.pop("near_copies")
    n_refs = 3 * len(train_images) + max(0, len(augmented) - len(train_images))
    quality = {"all": report_all, "kept": report_kept, "n_sampled": int(len(ids)),
               "n_kept": int(keep.sum()), "n_dropped": int(drop.sum()),
               "drop_near_copies": t.drop_near_copies, "sources": list(t.sources),
               "compared_against": f"{n_refs} references at {cfg.data.patch} px: the "
                                   f"{len(train_images)} labelled training images"
                                   f"{' (crops)' if cfg.data.patches else ''}, their "
                                   f"left-right and top-bottom flips, and the "
                                   f"{max(0, len(augmented) - len(train_images))} augmented "
                                   f"copies the DDPM was trained on",
               "nearest_kind_counts": {k: int((kinds == k).sum()) for k in np.unique(kinds)},
               # nearest_train / nn_index -> case id (with patches: the crop's image)
               "train_case_ids": ddpm_images.case_ids}
    write_json(out / QUALITY_FILE, json_safe(quality))
    log.info("transfer quality: PSNR mean %s dB, MSE mean %.1f; %d near-copies (>= %g dB)%s",
             _fmt(report_all["psnr"]["mean"]), report_all["mse"]["mean"],
             report_all["n_near_copies"], t.near_copy_psnr,
             "" if not near.any() else ", dropped" if t.drop_near_copies
             else ", kept (drop_near_copies is false)")
    if not keep.any():
        raise TransferSetError(
            f"every one of the {len(ids)} synthetic images is a near-copy of a training image "
            f"(nearest-neighbour PSNR >= transfer.near_copy_psnr={t.near_copy_psnr} dB; max PSNR "
            f"{_fmt(float(np.max(psnr)))} dB, min {_fmt(float(np.min(psnr)))} dB), so the "
            "transfer set would be empty. Raise transfer.near_copy_psnr above the PSNRs in "
            f"{out / QUALITY_FILE}, or set transfer.drop_near_copies=false to keep them")

    kept = samples.map_batches(_keep_below, fn_kwargs={"threshold": t.near_copy_psnr},
                               batch_format="numpy") if drop.any() else samples
    write_parquet(kept, out / IMAGES_DIR, storage)
    manifest.update({
        "n_images": t.n_images, "n_sampled": int(len(ids)), "n_synthetic": int(keep.sum()),
        "n_dropped": int(drop.sum()), "diffusion_image_size": t.diffusion.image_size,
        "ddpm_entry": Path(ctx.inputs["ddpm"]).resolve().name,
        "near_copy_psnr": t.near_copy_psnr, "drop_near_copies": t.drop_near_copies,
        "dropped_ids": [int(i) for i in ids[drop]],
        "near_copy_ids": [int(i) for i in ids[near]],
        "sampler": t.diffusion.sampler, "grayscale": use_grayscale(train_images, cfg),
        "num_inference_steps": t.diffusion.num_inference_steps})
    kept_psnr = report_kept["psnr"]["mean"]
    return {"transfer/n_dropped": int(drop.sum()),
            "transfer/psnr_mean": float("inf") if kept_psnr is None else kept_psnr,
            "transfer/mse_mean": report_kept["mse"]["mean"],
            "transfer/sample_images_per_s": len(ids) / max(elapsed, 1e-9)}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


# ---------------------------------------------------------------------------- readers


def read_transfer_set(stage_dir: Path | str, *, columns: list[str] | None = None,
                      materialize_share: float = 0.0):
    """The kept transfer images as a ``ray.data.Dataset`` of ``columns`` (default
    :data:`COLUMNS`; ``image`` is a ``uint8 (H, W, 3)`` tensor column). Streamed, row order is
    not guaranteed (sort by ``id`` if needed); held in the object store when it fits
    ``materialize_share`` of it (:func:`tskd.stages.ray_train.read_parquet_dataset`).
    ``stage_dir`` may be an object-store entry's URI (``StageContext.input_location``)."""
    from tskd.stages.ray_train import read_parquet_dataset
    from tskd.storage import is_remote

    if is_remote(str(stage_dir)):  # every node's read tasks open it there
        return read_parquet_dataset(f"{str(stage_dir).rstrip('/')}/{IMAGES_DIR}", columns=columns)
    images = Path(stage_dir) / IMAGES_DIR
    if not images.is_dir():
        raise FileNotFoundError(f"{stage_dir}: no transfer set (missing {IMAGES_DIR}/)")
    return read_parquet_dataset(images, columns=columns, materialize_share=materialize_share)


def load_transfer_images(stage_dir: Path, *, with_ids: bool = False):
    """All kept transfer images as ``uint8 (N, H, W, 3)``, sorted by ``id`` (no Ray cluster
    needed: reads the parquet shards with pyarrow). ``with_ids=True`` returns ``(images, ids)``."""
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401  registers the tensor extension type

    stage_dir = Path(stage_dir)
    manifest_path = stage_dir / MANIFEST_FILE
    images_dir = stage_dir / IMAGES_DIR
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{stage_dir}: no transfer set (missing {IMAGES_DIR}/)")
    files = sorted(images_dir.glob("*.parquet"))
    size = json.loads(manifest_path.read_text())["image_size"] if manifest_path.is_file() else 0
    ids_parts, image_parts = [], []
    for f in files:
        table = pq.read_table(f, columns=["id", "image"])
        if table.num_rows == 0:
            continue
        ids_parts.append(table.column("id").to_numpy())
        col = table.column("image").combine_chunks()
        image_parts.append(np.asarray(col.to_numpy_ndarray()))  # Ray's tensor extension array
    if not ids_parts:
        empty = np.zeros((0, size, size, 3), np.uint8)
        return (empty, np.zeros(0, np.int64)) if with_ids else empty
    ids = np.concatenate(ids_parts).astype(np.int64)
    images = np.concatenate(image_parts).astype(np.uint8, copy=False)
    order = np.argsort(ids, kind="stable")
    return (images[order], ids[order]) if with_ids else images[order]


__all__ = ["run", "read_transfer_set", "load_transfer_images", "check_sampler_resources",
           "actor_cpu_request",
           "sample_transfer_set", "TransferSetError", "COLUMNS"]
