"""What a Ray run prints: tskd's lines and Ray's warnings, not Ray's routine INFO chatter."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tskd.stages import console

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_ray_process_drops_only_the_noise():
    collect = _Collect()
    cleaner = logging.getLogger(CLEANER)
    cleaner.addHandler(collect)
    try:
        console.quiet_ray_process()
        console.quiet_ray_process()  # idempotent: one filter
        assert sum(isinstance(f, console._DropMessages) for f in cleaner.filters) == 1
        cleaner.warning("Failed to query Ray Train Controller actor state. State API may be "
                        "temporarily unavailable. Continuing to monitor.")
        cleaner.warning("Removing placement group after the controller died")
        assert collect.messages == ["Removing placement group after the controller died"]
    finally:
        cleaner.removeHandler(collect)
    assert logging.getLogger("ray.train").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("ray.train.v2.x").getEffectiveLevel() == logging.WARNING
    from ray.train.v2._internal.execution import context  # the per-report logger

    assert context.logger.getEffectiveLevel() == logging.WARNING
    kwargs = console.ray_init_kwargs()
    assert kwargs["runtime_env"]["worker_process_setup_hook"] is console.quiet_ray_process
    from ray.data import DataContext  # bars off where datasets are created (they carry it)

    assert not DataContext.get_current().enable_progress_bars
    assert not DataContext.get_current().enable_operator_progress_bars


SCRIPT = textwrap.dedent("""
    import logging, sys
    import ray, ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from tskd.stages.console import ray_init_kwargs, quiet_ray_process
    from tskd.stages.ray_train import configure_worker_logging

    def loop(cfg):
        import time
        from tskd.stages.ray_train import report
        configure_worker_logging(0)
        for epoch in range(3):
            logging.getLogger("tskd.test").info("tskd epoch %d", epoch)
            report({"epoch": epoch, "distill/loss": 0.5 / (epoch + 1), "perf/images_per_s": 40.0,
                    "perf/data_stall": 0.25})
        logging.getLogger("tskd.test").warning("a warning that matters")
        time.sleep(3)  # the metrics agent collects every 0.5 s here

    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=int(sys.argv[2]),
             _system_config={"metrics_report_interval_ms": 500}, **ray_init_kwargs())
    import ray.data
    quiet_ray_process()
    assert ray.data.range(8).map_batches(lambda b: b).count() == 8
    from tskd.stages.ray_train import fit_torch_trainer
    from tskd.config import RayConfig
    fit_torch_trainer(loop, train_config={}, ray_cfg=RayConfig(num_workers=1, cpus_per_worker=1),
                      name="distill_ts_kd", storage=sys.argv[1])
    import time, urllib.request
    for _ in range(60):  # the endpoint, parsed by the test
        text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics").read().decode()
        if "ray_tskd_epoch" in text and "ray_tskd_loss" in text:
            break
        time.sleep(0.5)
    open(sys.argv[3], "w").write(text)
    ray.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_console_and_live_metrics_of_a_ray_train_run(tmp_path: Path):
    """A real local Ray + TorchTrainer (1 worker) + Ray Data, as `tskd run` starts them: the
    console keeps tskd's lines only, and Ray's Prometheus endpoint serves the live metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = os.environ | {"PYTHONPATH": str(Path(console.__file__).parents[2])}
    scraped = tmp_path / "metrics.txt"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ray"), str(_free_port()),
                          str(scraped)], env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for epoch in range(3):
        assert f"tskd epoch {epoch}" in text
    assert "a warning that matters" in text
    for noise in ("Reporting training result", "Requesting resources",
                  "Setting up process group", "Started training worker group",
                  "Failed to query Ray Train Controller", "logging_progress",
                  "Running Dataset"):
        assert noise not in text, noise
    samples = {}
    for family in text_string_to_metric_families(scraped.read_text()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    assert [s.value for s in samples["ray_tskd_epoch"]
            if s.labels["stage"] == "distill_ts_kd" and s.labels["rank"] == "0"] == [2.0]
    (loss,) = [s for s in samples["ray_tskd_loss"] if s.labels["term"] == "distill/loss"]
    assert loss.value == pytest.approx(0.5 / 3)
    assert [s.value for s in samples["ray_tskd_images_per_second"]] == [40.0]
    assert [s.value for s in samples["ray_tskd_data_stall_share"]] == [0.25]
    cpu = [s for s in samples["ray_tskd_memory_bytes"] if s.labels["device"] == "cpu"]
    assert cpu and cpu[0].value > 50e6  # a Python process with torch loaded
