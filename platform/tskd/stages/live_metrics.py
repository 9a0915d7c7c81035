"""Live metrics of training stages and searches, exported through ``ray.util.metrics``.

Ray serves them on each node's Prometheus endpoint (``ray.init(_metrics_export_port=...)`` or
``ray start --metrics-export-port``) with the prefix ``ray_``; ``dashboards/grafana_tskd.json``
plots them (import it into the Grafana that Ray's metrics integration sets up). Every name below
is what the dashboard queries (a test checks both ways).

Per training worker, at every :func:`tskd.stages.ray_train.report`:

================================  =======================================  ==========================
metric                            what                                     tags
================================  =======================================  ==========================
``tskd_loss``                     mean of each loss term over the epoch    stage, term (e.g. kd/hidden)
``tskd_epoch``                    the epoch (or step) just reported        stage, rank
``tskd_images_per_second``        images per second of this worker         stage, rank
``tskd_data_stall_share``         share of step time spent waiting for     stage, rank
                                  the next batch (Ray Data / DataLoader)
``tskd_teacher_forward_seconds``  mean teacher forward time per batch      stage, rank
                                  (distillation)
``tskd_memory_bytes``             resident memory of the worker (``cpu``)  stage, rank, device
                                  and peak CUDA memory (``cuda``)
================================  =======================================  ==========================

and, on the driver of ``tskd tune``, ``tskd_trials`` (trials by state: running, done, stopped,
error). The stage loops put the performance figures in their reported metrics under the keys of
:data:`PERF_KEYS` (measured with :class:`StepTimer`); loss terms are every reported key whose
first part is a loss family (``train/``, ``distill/``, ``kd/``, ``diffusion/``) and whose value
is a number.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator, Mapping

#: name -> (kind, description, tag keys). The single source for the code and the dashboard test.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tskd_loss": ("gauge", "Mean loss term over the last reported epoch", ("stage", "term")),
    "tskd_epoch": ("gauge", "Last reported epoch (or step) of a training stage", ("stage", "rank")),
    "tskd_images_per_second": ("gauge", "Training images per second of one worker",
                               ("stage", "rank")),
    "tskd_data_stall_share": ("gauge", "Share of step time waiting for the next batch",
                              ("stage", "rank")),
    "tskd_teacher_forward_seconds": ("gauge", "Mean teacher forward time per batch",
                                     ("stage", "rank")),
    "tskd_memory_bytes": ("gauge", "Worker memory: resident (cpu) and peak CUDA (cuda)",
                          ("stage", "rank", "device")),
    "tskd_trials": ("gauge", "Trials of a tskd tune search by state", ("state",)),
}

#: reported metric key -> live metric (one number per worker)
PERF_KEYS = {
    "perf/images_per_s": "tskd_images_per_second",
    "perf/data_stall": "tskd_data_stall_share",
    "perf/teacher_s": "tskd_teacher_forward_seconds",
}

LOSS_FAMILIES = ("train/", "distill/", "kd/", "diffusion/")

_instruments: dict[str, Any] = {}


def _instrument(name: str) -> Any:
    """The ``ray.util.metrics`` object of ``name``, made once per process."""
    if name not in _instruments:
        from ray.util.metrics import Gauge

        kind, description, tags = METRICS[name]
        assert kind == "gauge", kind
        _instruments[name] = Gauge(name, description=description, tag_keys=tags)
    return _instruments[name]


def _memory(device: str) -> float | None:
    if device == "cpu":
        import psutil

        return float(psutil.Process(os.getpid()).memory_info().rss)
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def export(stage: str, rank: int, metrics: Mapping[str, Any]) -> None:
    """Set the live metrics of one worker's report (called by ``ray_train.report``).

    Args:
        stage: the stage (Ray Train run) name, e.g. ``distill_ts_kd``.
        rank: the worker's world rank.
        metrics: what the worker reports; see the module docstring for the keys read.
    """
    tags = {"stage": stage, "rank": str(rank)}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in PERF_KEYS:
            _instrument(PERF_KEYS[key]).set(float(value), tags=tags)
        elif key.startswith(LOSS_FAMILIES) and rank == 0:
            _instrument("tskd_loss").set(float(value), tags={"stage": stage, "term": key})
    step = metrics.get("epoch", metrics.get("step"))
    if isinstance(step, (int, float)):
        _instrument("tskd_epoch").set(float(step), tags=tags)
    for device in ("cpu", "cuda"):
        value = _memory(device)
        if value is not None:
            _instrument("tskd_memory_bytes").set(value, tags=tags | {"device": device})


def export_trials(counts: Mapping[str, int]) -> None:
    """Set ``tskd_trials`` per state (the driver of ``tskd tune``)."""
    for state, n in counts.items():
        _instrument("tskd_trials").set(float(n), tags={"state": state})


class StepTimer:
    """Measures a training loop's throughput and data stall over one epoch.

    ``for batch in timer.batches(loader): ...`` times the wait for each batch (data stall) and
    the rest of each step; ``timer.teacher()`` is a context manager around the teacher's forward.
    :meth:`summary` returns the :data:`PERF_KEYS` figures and starts a new epoch.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.wait_s = self.total_s = self.teacher_s = 0.0
        self.images = self.steps = 0
        self._epoch_start = time.perf_counter()

    def batches(self, batches: Iterable[Any], size_of: Any = None) -> Iterator[Any]:
        """Yield from ``batches``, timing the wait for each; ``size_of(batch)`` counts its
        images (default: the length of the batch's first tensor or of ``batch["image"]``)."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - start
            self.images += (size_of or _batch_size)(batch)
            self.steps += 1
            yield batch

    def teacher(self) -> "_Timed":
        return _Timed(self)

    def summary(self) -> dict[str, float]:
        """``perf/images_per_s``, ``perf/data_stall`` (share of the epoch's wall time spent
        waiting for batches) and, when timed, ``perf/teacher_s`` (mean per batch) and
        ``perf/teacher_share`` (share of the epoch's wall time)."""
        total = max(time.perf_counter() - self._epoch_start, 1e-9)
        out = {"perf/images_per_s": self.images / total, "perf/data_stall": self.wait_s / total}
        if self.teacher_s > 0:
            out["perf/teacher_s"] = self.teacher_s / max(self.steps, 1)
            out["perf/teacher_share"] = self.teacher_s / total
        self._reset()
        return out


class _Timed:
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.teacher_s += time.perf_counter() - self.start


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = batch.get("image", next(iter(batch.values())))
    elif isinstance(batch, (list, tuple)):  # (images, targets, ...)
        batch = batch[0]
    return int(len(batch))
