"""The one place that launches Ray Train jobs, and the worker-side helpers every stage shares.

Driver side: :func:`fit_torch_trainer` builds a ``TorchTrainer`` (Train V2) from a ``RayConfig``;
the same code runs CPU workers with gloo here and GPU workers with NCCL on a cluster.
Worker side: :func:`worker_setup` (threads, seeds, deterministic algorithms, device), :func:`report` (metrics every rank,
checkpoint on rank 0), :func:`is_rank_zero`. Driver again: :func:`load_result_state`.

Checkpoints and lost workers: a training loop calls :func:`resume` once (the epoch to start
from, restored from ``ray.train.get_checkpoint()`` after a worker-group restart or a re-run on
the same storage) and :func:`checkpoint` every ``ray.checkpoint_every`` epochs: the engine's
full state (model, optimiser, scheduler), every rank's RNG states, the epoch and the loop's own
state, and the stage's output (``state.pt``, what :func:`load_result_state` reads). The launcher
keeps the last ``ray.keep_checkpoints`` and restarts a failed worker group up to
``ray.max_failures`` times. :func:`run_storage` is the stage's storage path, stable across
re-runs of the same stage fingerprint, so a re-run ``tskd run`` resumes too.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tskd.config import ConfigError, RayConfig
from tskd.stages.console import TRAIN_LOG_LEVEL

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LOOP_FILE = "loop.pt"
RNG_FILE = "rng-rank{rank}.pt"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train V2's controller poll interval (``ray.train_poll_s``), read by its controller."""


def resolve_backend(ray_cfg: RayConfig) -> str:
    """``auto`` → NCCL with GPUs, gloo on CPU."""
    if ray_cfg.backend != "auto":
        return ray_cfg.backend
    return "nccl" if ray_cfg.use_gpu else "gloo"


def fit_torch_trainer(train_fn: Callable[[dict[str, Any]], None], *, train_config: dict[str, Any],
                      ray_cfg: RayConfig, name: str, storage: Path | str,
                      datasets: dict[str, Any] | None = None,
                      num_workers: int | None = None,
                      callbacks: list[Any] | None = None,
                      inputs: Any = None) -> Any:
    """Run ``train_fn`` on Ray Train workers and return the ``ray.train.Result``.

    Args:
        train_fn: the ``train_loop_per_worker``; it receives ``train_config`` (which must carry
            everything it needs, including ``train_config["ray"]`` for :func:`worker_setup`).
        ray_cfg: workers, GPUs, CPUs and custom resources per worker, backend.
        name: the run name (a folder under ``storage``).
        storage: directory for Ray's run state and checkpoints (:func:`run_storage`): a run
            started again with the same ``storage`` and ``name`` resumes from its latest
            checkpoint (Ray Train V2 restores its checkpoint manager from there). An
            object-store URI (``s3://...``) is handed to Ray as it is: Ray opens it with
            pyarrow from each node's environment (credentials never travel in the config).
        datasets: Ray Data datasets, sharded across workers (``get_dataset_shard``).
        num_workers: overrides ``ray_cfg.num_workers`` (e.g. 1 for a small job).
        callbacks: Ray Train ``UserCallback``s (e.g. :func:`tskd.stages.rungs.tune_callback`).
        inputs: ``StageContext.input_refs`` (object-store outputs): each worker first fetches
            the stage's input entries into its node's mirror, so the driver's paths in
            ``train_config`` are valid on every node.

    Raises:
        RuntimeError: the training run failed; Ray's error (which holds the worker's) is chained,
            and :func:`tskd.stages.errors.own_error` finds a tskd error (dataset, config,
            checkpoint) in it.
    """
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, LoggingConfig,
                           RunConfig, ScalingConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = num_workers or ray_cfg.num_workers
    if inputs is not None:
        train_fn = functools.partial(fetch_then_train, train_fn, inputs)
    data_config = DataConfig()
    if datasets:
        datasets, data_config = prepare_datasets(datasets, ray_cfg)
    resources = {**ray_cfg.resources_per_worker, "CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.use_gpu:
        resources["GPU"] = 1
    # Train V2 hands this variable from the driver to the run's controller (and its workers).
    os.environ[TRAIN_POLL_ENV] = repr(float(ray_cfg.train_poll_s))
    trainer = TorchTrainer(
        train_loop_per_worker=train_fn,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=resolve_backend(ray_cfg)),
        run_config=RunConfig(
            name=name, **train_storage(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
            callbacks=callbacks or None),
        datasets=datasets,
        dataset_config=data_config,
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Train V2: TrainingFailedError (WorkerGroupError/ControllerError)
        raise RuntimeError(f"Ray Train run {name!r} failed: {_first_line(exc)}") from exc
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"Ray Train run {name!r} failed: {_first_line(result.error)}") \
            from result.error
    return result


def check_trial_room(cfg: RayConfig, *, trials: int, cpu_per_trial: float,
                     fields: tuple[str, str]) -> None:
    """On the driver of ``tskd grid`` / ``tskd tune``, before any trial starts: the trials'
    own reservations (``trials`` at once x ``cpu_per_trial``) must leave the cluster room for
    one stage: a Ray Train worker group (``ray.num_workers`` x ``ray.cpus_per_worker``) and
    more than one CPU (Ray Data's actors beside their read / write tasks). Otherwise every
    trial waits forever for its first stage.

    Args:
        fields: the names of the two settings, e.g. ``("max_concurrent",
            "resources_per_cell.cpu")``, for the message.

    Raises:
        ConfigError: naming the settings, the CPUs they hold and the cluster's.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    held = trials * cpu_per_trial
    train = cfg.num_workers * cfg.cpus_per_worker
    if total - held <= 1.0 or total - held < train:
        raise ConfigError(
            f"{fields[0]}={trials} trials x {fields[1]}={cpu_per_trial:g} CPU hold "
            f"{held:g} of the cluster's {total:g} CPUs, leaving {max(total - held, 0):g}: a "
            f"stage needs more than 1 (Ray Data's actors beside their tasks) and at least "
            f"{train:g} for its Ray Train workers (ray.num_workers x ray.cpus_per_worker); "
            f"the trials only coordinate their stages, so lower {fields[1]} (fractions are "
            f"fine) or {fields[0]}")


def fetch_then_train(train_fn: Callable[[dict[str, Any]], None], inputs: Any,
                     config: dict[str, Any]) -> None:
    """A worker's loop on an object-store output: the stage's inputs into this node's mirror
    (:meth:`tskd.store.InputRefs.fetch`; nothing is downloaded twice), then ``train_fn``."""
    inputs.fetch()
    train_fn(config)


def read_parquet_dataset(folder: Path | str, *, columns: list[str] | None = None,
                         materialize_share: float = 0.0) -> Any:
    """The Parquet files under ``folder`` as a ``ray.data.Dataset`` of ``columns`` (all: None).
    An object-store URI always streams (every node's read tasks open it there).

    When their uncompressed size (from the Parquet metadata) is at most ``materialize_share``
    of the cluster's object store, they are read once with pyarrow, sorted by ``id`` where there
    is one, and put into the object store as one block: a Train run iterating them every epoch
    then re-reads nothing. Otherwise (and with ``materialize_share`` 0) the dataset is a lazy
    ``read_parquet`` that streams from storage on every pass (rows in no guaranteed order)."""
    import pyarrow.parquet as pq
    import ray
    import ray.data
    import ray.data.extensions  # noqa: F401 - registers the tensor extension type for pyarrow

    from tskd.storage import is_remote

    if is_remote(str(folder)):
        from tskd.storage import open_output

        fs, root = open_output(str(folder))
        return ray.data.read_parquet(root, filesystem=fs, columns=columns)
    folder = Path(folder)
    if materialize_share > 0:
        files = sorted(folder.rglob("*.parquet"))
        size = 0
        for f in files:
            meta = pq.read_metadata(f)
            names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                size += sum(group.column(i).total_uncompressed_size
                            for i in range(group.num_columns)
                            if columns is None or names[i] in columns)
        store = ray.cluster_resources().get("object_store_memory", 0.0)
        if files and size <= materialize_share * store:
            started = time.time()
            table = pq.read_table(folder, columns=columns)
            if "id" in table.column_names:
                table = table.sort_by("id")
            ds = ray.data.from_arrow(table)
            log.info("%s: %d rows held in the object store for all epochs (%.0f MB, read in "
                     "%.1f s)", folder.name, table.num_rows, size / 2**20, time.time() - started)
            return ds
        log.info("%s: streamed from storage every epoch (%.2f GB > %.2f × the object store's "
                 "%.1f GB: ray.materialize_share)", folder.name, size / 2**30, materialize_share,
                 store / 2**30)
    return ray.data.read_parquet(str(folder), columns=columns)


def prepare_datasets(datasets: dict[str, Any], ray_cfg: RayConfig) -> tuple[dict[str, Any], Any]:
    """The datasets a Train run iterates once per epoch, and the ``DataConfig`` to feed them.

    With ``ray_cfg.deterministic`` each dataset with an ``id`` column is sorted by it: blocks
    written by Ray Data (the transfer set's and the targets' Parquet) hold rows in the order
    tasks finished, which changes from run to run; ``preserve_order`` then makes the streaming
    split hand blocks to the workers in sorted order (Ray ignores locality hints), so each
    worker gets the same rows in the same order and the seeded local shuffles the same batches.

    A dataset already in the object store (:func:`read_parquet_dataset` under
    ``ray.materialize_share``, ``from_items``...) is checked and, if need be, sorted on the
    driver, once; it stays in memory for all epochs. A lazy one re-runs its plan, Ray Data's
    sort included, every epoch: that sort (sampling, map and reduce tasks over 200 partitions
    when it cannot estimate the block count) took ~38 s per epoch for the demo's 300-row
    targets on 2 cores, ~20 % of distillation's wall time.
    """
    from ray.data.dataset import MaterializedDataset
    from ray.train import DataConfig

    out = {}
    for name, ds in datasets.items():
        if ray_cfg.deterministic and "id" in (ds.columns() or []):
            ds = _sorted_in_memory(ds) if isinstance(ds, MaterializedDataset) else ds.sort("id")
        out[name] = ds
    if not ray_cfg.deterministic:
        return out, DataConfig()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return out, DataConfig(execution_options=options)


def _sorted_in_memory(ds: Any) -> Any:
    """A materialised dataset sorted by ``id``: itself when its blocks already hold the ids in
    order, else its rows sorted on the driver as one new block (no Ray Data tasks: the blocks
    are fetched from the object store)."""
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    tables = ray.get(ds.to_arrow_refs())
    ids = np.concatenate([t.column("id").to_numpy() for t in tables]) if tables else []
    if len(ids) < 2 or bool(np.all(np.diff(ids) >= 0)):
        return ds
    return ray.data.from_arrow(pa.concat_tables(tables).sort_by("id"))


def _first_line(exc: BaseException) -> str:
    """The worker's own error when Ray wrapped one (``WorkerGroupError``), else the first line
    of ``exc``: the whole text (worker tracebacks) stays in the chained exception."""
    from tskd.stages.errors import own_error

    inner = own_error(exc) or exc
    failures = getattr(exc, "worker_failures", None)
    if inner is exc and isinstance(failures, dict) and failures:
        first = failures[min(failures)]  # the exception itself (Train V2) or a wrapper of it
        inner = getattr(first, "_base_exc", first)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


def run_storage(ctx: Any) -> Path | str:
    """Where a stage's Ray Train runs keep their state: ``ctx.train_dir`` (stable per stage
    fingerprint, so a re-run resumes; an ``s3://``-style URI for object-store outputs), else a
    folder of the temporary entry. Remove it with :func:`tskd.storage.remove_tree`."""
    from tskd.storage import is_remote

    train_dir = getattr(ctx, "train_dir", None)
    if not train_dir:
        return Path(ctx.dir) / "ray"
    return str(train_dir) if is_remote(str(train_dir)) else Path(train_dir)


def train_storage(storage: Path | str) -> dict[str, Any]:
    """``RunConfig`` storage arguments: an absolute local path, or for an object-store URI the
    path inside it with tskd's filesystem for it (:func:`tskd.storage.open_output`), so Ray
    reaches the bucket exactly as tskd does."""
    from tskd.storage import is_remote, open_output

    if not is_remote(str(storage)):
        return {"storage_path": str(Path(storage).resolve())}
    fs, root = open_output(str(storage))
    return {"storage_path": root, "storage_filesystem": fs}


def load_result_state(result: Any) -> dict[str, Any]:
    """The ``state`` dict saved by the last :func:`report` that carried one."""
    if result.checkpoint is None:
        raise RuntimeError("the Ray Train run reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------- worker side


def worker_setup(ray_cfg: dict[str, Any], seed: int) -> torch.device:
    """Seed every RNG (offset by rank), set intra-op threads, return the worker's device."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    configure_worker_logging(rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    if ray_cfg.get("deterministic"):
        if ray_cfg.get("use_gpu"):  # cuBLAS needs it for deterministic matmuls (before init)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ray_cfg.get("use_gpu"):
        return ray.train.torch.get_device()
    threads = int(ray_cfg.get("torch_threads") or 0)
    if threads == 0:
        local = max(1, ctx.get_local_world_size())
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return torch.device("cpu")


def configure_worker_logging(rank: int = 0) -> None:
    """In a Ray worker or actor process: rank 0 logs tskd progress at INFO (Ray forwards it to
    the driver); other ranks warn only."""
    logger = logging.getLogger("tskd")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def is_rank_zero() -> bool:
    import ray.train

    return ray.train.get_context().get_world_rank() == 0


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches ``state`` as a checkpoint. The same
    numbers go to the live metrics (:mod:`tskd.stages.live_metrics`)."""
    import ray.train
    from ray.train import Checkpoint

    from tskd.stages.live_metrics import export

    ctx = ray.train.get_context()
    export(ctx.get_experiment_name(), ctx.get_world_rank(), metrics)

    if state is not None and is_rank_zero():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Checkpoint after ``epoch``: every ``every`` epochs and after the last."""
    return epoch == epochs or epoch % max(1, every) == 0


def checkpoint(metrics: dict[str, Any], *, engine: Any, epoch: int,
               loop: dict[str, Any] | None = None, output: dict[str, Any] | None = None) -> None:
    """Report ``metrics`` with a full-state checkpoint (collective: every rank calls it).

    Every rank writes its part into its own temporary directory (Ray Train puts the ranks'
    files into one checkpoint): the engine's state (:meth:`Engine.save`), its RNG states; rank 0
    also ``loop.pt`` (``epoch`` and ``loop``, the loop's own state) and ``state.pt``
    (``output``: what the stage keeps, read by :func:`load_result_state`).
    """
    import ray.train
    from ray.train import Checkpoint

    from tskd.stages.live_metrics import export

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    export(ctx.get_experiment_name(), rank, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(Path(tmp))
        torch.save(rng_state(), Path(tmp) / RNG_FILE.format(rank=rank))
        if rank == 0:
            torch.save({"epoch": epoch, "loop": loop or {}}, Path(tmp) / LOOP_FILE)
            if output is not None:
                torch.save(output, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def resume(engine: Any, tag: str) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """``(first epoch, loop state, output)`` of this run: ``(1, {}, None)`` on a fresh start;
    after a restart, the engine's and this rank's RNG states are restored from
    ``ray.train.get_checkpoint()`` and training goes on after the checkpointed epoch."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 1, {}, None
    rank = ray.train.get_context().get_world_rank()
    with ckpt.as_directory() as d:
        d = Path(d)
        engine.load(d)
        saved = torch.load(d / LOOP_FILE, map_location="cpu", weights_only=False)
        rng = d / RNG_FILE.format(rank=rank)
        if rng.is_file():
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        output = (torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
                  if (d / STATE_FILE).is_file() else None)
    if rank == 0:
        log.info("%s resumed from epoch %d", tag, saved["epoch"])
    return int(saved["epoch"]) + 1, saved["loop"], output


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fail_point(config: dict[str, Any], epoch: int) -> None:
    """Test hook: ``config["fail_once"] = {"rank", "epoch", "marker"}`` makes that rank's
    process exit at the start of that epoch, once (the marker file records that it did)."""
    spec = config.get("fail_once")
    if not spec or epoch != spec["epoch"]:
        return
    import ray.train

    marker = Path(spec["marker"])
    if ray.train.get_context().get_world_rank() == spec["rank"] and not marker.exists():
        marker.write_text(str(os.getpid()))
        _wait_until_reports_are_delivered()
        log.warning("fail_once: rank %d exits at epoch %d", spec["rank"], epoch)
        os._exit(1)


def _wait_until_reports_are_delivered(timeout_s: float = 60.0) -> None:
    """Let the controller receive this worker's earlier ``ray.train.report`` calls before the
    test hook kills the process, so that a test's "last checkpoint" does not depend on timing.

    Ray Train V2 hands a report over when the controller's health-check poll takes it off the
    worker's queue (size 1), but the poll's reply travels after that: a process that exits at
    once (a fast epoch) can take its last two reports, checkpoints included, with it, and the
    run restarts from scratch (seen in CI). A real crash has no such grace; this hook only
    pins the point a test fails at. Ray's internals are read defensively: without them the
    hook just waits two poll intervals (at least 4 s, for a loaded machine).
    """
    interval = float(os.environ.get(TRAIN_POLL_ENV, "2"))
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - an internal API; the sleep below still applies
        queue = None
    deadline = time.monotonic() + timeout_s
    while queue is not None and queue.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(2 * interval, 4.0))  # the poll that took the last report has replied
