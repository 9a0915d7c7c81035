"""What reaches the user's console from Ray, and where the rest goes.

The console shows tskd's own lines (one per stage start and end, one per epoch), tskd's warnings
and Ray's warnings and errors. Ray's routine progress chatter stays out of it; it is still written
to Ray's session logs (``<session>/logs``: ``worker-*.err``, ``train/ray-train-*.log``,
``ray-data.log``), whose directory ``tskd run`` prints when it starts Ray:

- Ray Train V2 logs every ``ray.train.report`` at INFO from a logger named after its source file
  ("Reporting training result N: ..."): raised to WARNING in every Ray process. Its controller
  and workers log each worker group's start at INFO ("Requesting resources", "Setting up process
  group", "Checkpoint successfully created"): :data:`TRAIN_LOG_LEVEL` goes to
  ``RunConfig(logging_config=...)``, which filters Ray Train's console handler (its files keep
  every level).
- Train V2's ``PlacementGroupCleaner`` actor polls Ray's state API, which needs the dashboard;
  ``tskd run`` starts a local Ray without one (it costs ~0.5 GB and start-up time on a laptop),
  so each poll warns "Failed to query Ray Train Controller actor state" (679 of a first run's
  1,841 console lines). That one message is dropped; the cleaner's other messages pass. The
  cleaner finds the cluster the way a new driver would; where two Ray instances run on one
  machine (two users, a test beside a run) it died with "Found multiple active Ray instances"
  and a traceback. Every worker process therefore gets its own cluster's address as
  ``RAY_ADDRESS`` (:func:`_pin_ray_address`).
- Ray's C++ core in the Train controller logs one error per Train run that Ray's issue #53727
  documents as benign ("Actor with class name: 'PreemptionWatcher' ... has constructor arguments
  in the object store and max_restarts > 0"). Ray forwards every worker's stderr to the driver;
  on the driver those exact lines are dropped from the forwarded batches
  (:func:`filter_forwarded_lines`); they stay in the controller's ``worker-*.err``. Any other
  C++ error still reaches the console. (On the local Ray ``tskd run`` starts, the watcher is
  off altogether: no node can be drained there.)
- Ray Data logs its execution progress at INFO on the driver (``logging_progress``, "Running
  Dataset"); its console handler is raised to WARNING (its log file keeps INFO). Its progress
  bars are turned off in the ``DataContext``, which each dataset captures where it is created
  (the driver) and carries into the actors that run it: the ``SplitCoordinator`` that feeds
  Train workers drew ~3,300 console lines of bars per demo run. Ray Data then warns once per
  process that the bars are off, and Ray Train's data integration sets an option Ray has
  deprecated (a Python warning on the driver): both are dropped (:data:`DROPPED_WARNINGS`,
  :data:`IGNORED_WARNINGS`). Ray Data's actor pools (the transfer-set sampler) also make the
  driver's C++ core log Ray's issue #53727 line once, for ``MapWorker(...)``; the C++ core
  writes straight to the driver's stderr, so that line stays.
- Ray's worker processes print every library's INFO records (their root logger); the
  libraries in :data:`LIBRARY_LOGGERS` are raised to WARNING.

:func:`quiet_ray_process` is Ray's ``worker_process_setup_hook`` (set by :func:`ray_init_kwargs`)
and also runs on the driver. Imports here are lazy: importing this module has no side effects.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable

#: Ray Train's console level (``ray.train.LoggingConfig``) for every TorchTrainer tskd builds.
TRAIN_LOG_LEVEL = "WARNING"

#: Loggers whose INFO records are Ray's routine progress: raised to WARNING.
ROUTINE_LOGGERS = ("ray.train", "ray.tune")

#: Libraries whose INFO records reach the console through the root logger Ray gives its worker
#: processes: raised to WARNING. MONAI imports ``matplotlib.pyplot`` when it is imported, and on
#: a machine without matplotlib's font cache that logs "generated new fontManager" once.
LIBRARY_LOGGERS = ("matplotlib",)

#: (logger name, message prefix) of warnings that are noise on a dashboard-less local Ray.
DROPPED_WARNINGS = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
    # tskd turns Ray Data's progress bars off itself (they flooded the console); Ray Data
    # warns about it once per process
    ("ray.data._internal.progress", "Progress bars disabled"),
    ("ray.data._internal.progress", "Progress bars for operators disabled"),
)

#: Python warnings (message prefix, as a regular expression) that Ray raises from its own code
#: and no tskd user can act on: Ray Train's data integration sets the deprecated
#: ``ExecutionOptions.exclude_resources`` in Ray 2.60.
IGNORED_WARNINGS = (r"`ExecutionOptions\.exclude_resources` is deprecated",)

#: Lines forwarded from worker processes' stderr that are known noise: a line is dropped when it
#: contains every substring of one entry.
DROPPED_WORKER_LINES = (
    ("Actor with class name: 'PreemptionWatcher'",
     "has constructor arguments in the object store and max_restarts > 0"),
)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _report_logger() -> logging.Logger | None:
    """Train V2's per-report logger (named after its file, so ``ray.train`` levels miss it)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return None
    return getattr(context, "logger", None)


def is_noise_line(line: str) -> bool:
    """Whether a line forwarded from a worker's stderr is one of :data:`DROPPED_WORKER_LINES`."""
    return any(all(part in line for part in parts) for parts in DROPPED_WORKER_LINES)


def filter_forwarded_lines(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    """Wrap a handler of Ray's forwarded log batches (``{"lines": [...], "pid": ..., ...}``) so
    that it never sees :func:`is_noise_line` lines; a batch left empty is not passed on."""
    if getattr(handler, "tskd_filtered", False):
        return handler

    def filtered(batch: dict) -> None:
        lines = [line for line in batch.get("lines", ()) if not is_noise_line(line)]
        if lines:
            handler({**batch, "lines": lines})

    filtered.tskd_filtered = True  # type: ignore[attr-defined]
    return filtered


def _filter_driver_console() -> None:
    """On a driver that prints its workers' output (``log_to_driver``), filter what it prints."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray version: nothing to filter
        return
    with dispatcher._lock:  # noqa: SLF001 - Ray has no public hook for forwarded lines
        dispatcher.handlers = [(name, filter_forwarded_lines(h) if name == "ray_print_logs" else h)
                               for name, h in dispatcher.handlers]


def _pin_ray_address() -> None:
    """In a Ray worker process: ``RAY_ADDRESS`` = this cluster's GCS address, so that Ray's own
    helpers that look the cluster up (Train's ``PlacementGroupCleaner``) find this one."""
    try:
        import ray

        worker = ray._private.worker.global_worker  # noqa: SLF001 - the process's mode
        if worker.mode != ray.WORKER_MODE or "RAY_ADDRESS" in os.environ:
            return
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a convenience; the worker runs without it
        return


def quiet_ray_process() -> None:
    """Keep Ray's routine INFO logging of this process off the console (see the module doc).

    Idempotent. Runs in every Ray worker process (``worker_process_setup_hook``) and on the
    driver.
    """
    _pin_ray_address()
    _filter_driver_console()
    for name in (*ROUTINE_LOGGERS, *LIBRARY_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    report = _report_logger()
    if report is not None:
        report.setLevel(logging.WARNING)
    prefixes: dict[str, tuple[str, ...]] = {}
    for name, prefix in DROPPED_WARNINGS:
        prefixes[name] = (*prefixes.get(name, ()), prefix)
    for name, dropped in prefixes.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(dropped))
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    try:
        from ray.data import DataContext
    except ImportError:  # Ray Data not installed: nothing of it to quiet
        DataContext = None
    if DataContext is not None:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)  # the console; ray-data.log keeps INFO


def ray_init_kwargs() -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` that apply :func:`quiet_ray_process` to every Ray
    worker process the job starts (tasks, actors, Ray Train workers and controller)."""
    return {"runtime_env": {"worker_process_setup_hook": quiet_ray_process}}


def session_log_dir() -> str | None:
    """Ray's log directory of the current session (``<session>/logs``), or ``None``."""
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 - no public accessor
        return str(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - only used to print a path
        return None
