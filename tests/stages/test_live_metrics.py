"""Live metrics: the dashboard queries what the code emits; the step timer; the report mapping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch  # noqa: F401 - a worker has torch loaded when it reports (memory figures)

from tskd.stages import live_metrics
from tskd.stages.live_metrics import METRICS, StepTimer, export

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana_tskd.json"


def test_dashboard_queries_exactly_the_emitted_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bray_(tskd_\w+)", e)}
    assert queried == set(METRICS)
    # every tag a panel groups or labels by is one the metric carries
    for panel in dash["panels"]:
        for target in panel["targets"]:
            (name,) = set(re.findall(r"\bray_(tskd_\w+)", target["expr"]))
            by = re.findall(r"by \(([^)]*)\)", target["expr"])
            used = {t.strip() for group in by for t in group.split(",")}
            used |= set(re.findall(r"{{(\w+)}}", target["legendFormat"]))
            assert used <= set(METRICS[name][2]), (panel["title"], used)


class _FakeGauge:
    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] = value


@pytest.fixture
def gauges(monkeypatch):
    made: dict[str, _FakeGauge] = {}
    monkeypatch.setattr(live_metrics, "_instrument", lambda n: made.setdefault(n, _FakeGauge()))
    return made


def test_export_maps_reported_keys(gauges):
    export("distill_ts_kd", 0, {"distill/loss": 0.3, "kd/hidden": 0.1, "epoch": 4,
                                "perf/images_per_s": 12.5, "perf/data_stall": 0.02,
                                "perf/teacher_s": 0.4, "val/dice": 0.8, "note": "x"})
    export("distill_ts_kd", 1, {"distill/loss": 0.9, "epoch": 4, "perf/images_per_s": 11.0})
    assert gauges["tskd_loss"].values == {
        (("stage", "distill_ts_kd"), ("term", "distill/loss")): 0.3,  # rank 0's, not rank 1's
        (("stage", "distill_ts_kd"), ("term", "kd/hidden")): 0.1}
    r0 = (("rank", "0"), ("stage", "distill_ts_kd"))
    r1 = (("rank", "1"), ("stage", "distill_ts_kd"))
    assert gauges["tskd_images_per_second"].values == {r0: 12.5, r1: 11.0}
    assert gauges["tskd_data_stall_share"].values == {r0: 0.02}
    assert gauges["tskd_teacher_forward_seconds"].values == {r0: 0.4}
    assert gauges["tskd_epoch"].values == {r0: 4.0, r1: 4.0}
    cpu = gauges["tskd_memory_bytes"].values[(("device", "cpu"),) + r0]
    import psutil

    assert cpu == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)
    live_metrics.export_trials({"running": 2, "done": 3})
    assert gauges["tskd_trials"].values == {(("state", "running"),): 2.0,
                                            (("state", "done"),): 3.0}


def test_step_timer_on_a_fake_clock(monkeypatch):
    """Fetching a batch takes 1 s, the teacher 2 s, the rest of the step 1 s: 4 s per step of
    8 images, so 2 images/s, a data stall of 1/4 and a teacher share of 1/2."""
    clock = [100.0]
    monkeypatch.setattr(live_metrics.time, "perf_counter", lambda: clock[0])

    def loader():
        for _ in range(5):
            clock[0] += 1.0
            yield {"image": [0] * 8}

    timer = StepTimer()
    for batch in timer.batches(loader()):
        with timer.teacher():
            clock[0] += 2.0
        clock[0] += 1.0
    assert timer.summary() == {"perf/images_per_s": 2.0, "perf/data_stall": 0.25,
                               "perf/teacher_s": 2.0, "perf/teacher_share": 0.5}
    clock[0] += 10.0  # a new epoch starts at summary()
    assert timer.summary() == {"perf/images_per_s": 0.0, "perf/data_stall": 0.0}
