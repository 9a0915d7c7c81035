"""What a Ray run prints: tskd's lines and Ray's warnings, not Ray's routine INFO chatter."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
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
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() == logging.WARNING
    kwargs = console.ray_init_kwargs()
    assert kwargs["runtime_env"]["worker_process_setup_hook"] is console.quiet_ray_process


def test_ray_datas_notices_about_tskds_own_settings_are_dropped():
    """Ray Data's "progress bars disabled" warnings (tskd turns the bars off) and the deprecation
    Ray Train's data integration triggers in Ray 2.60 are dropped; other warnings pass."""
    import warnings

    collect = _Collect()
    progress = logging.getLogger("ray.data._internal.progress")
    progress.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            console.quiet_ray_process()
            progress.warning("Progress bars disabled. To enable, set "
                             "`ray.data.DataContext.get_current().enable_progress_bars = True`.")
            progress.warning("Progress bars for operators disabled. To enable, set ...")
            progress.warning("Progress bar width could not be read")
            warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be "
                          "removed after January 2027.", DeprecationWarning)
            warnings.warn("`ExecutionOptions.other` is deprecated", DeprecationWarning)
    finally:
        progress.removeHandler(collect)
    assert collect.messages == ["Progress bar width could not be read"]
    assert [str(w.message) for w in caught] == ["`ExecutionOptions.other` is deprecated"]
    from ray.data import DataContext  # bars off where datasets are created (they carry it)

    assert not DataContext.get_current().enable_progress_bars
    assert not DataContext.get_current().enable_operator_progress_bars



@pytest.mark.parametrize("quiet", [False, True])
def test_a_fresh_matplotlib_font_cache_stays_off_the_console(tmp_path, quiet):
    """A Ray worker's root logger prints INFO; importing MONAI on a machine without
    matplotlib's font cache logs "generated new fontManager" there unless quieted."""
    code = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # as Ray's workers
        if {quiet}:
            from tskd.stages.console import quiet_ray_process
            quiet_ray_process()
        import monai.losses  # imports matplotlib.pyplot
    """)
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}  # no font cache yet
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert ("generated new fontManager" in out.stderr) is not quiet, out.stderr


PREEMPTION_LINE = (
    "[2026-11-28 17:54:37,690 E 25727 25757] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'a843d519ae729cac9e7759a901000000' has constructor arguments "
    "in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.")


def test_forwarded_worker_lines_lose_only_the_known_noise():
    seen: list[dict] = []
    handler = console.filter_forwarded_lines(seen.append)
    assert console.filter_forwarded_lines(handler) is handler  # wrapped once
    other_error = ("[2026-11-28 17:54:37,690 E 25727 25757] core_worker.cc:900: Actor with class "
                   "name: 'Trainer' has constructor arguments in the object store and "
                   "max_restarts > 0.")
    handler({"pid": 7, "is_err": True, "lines": [PREEMPTION_LINE, "epoch 1", other_error]})
    handler({"pid": 8, "is_err": True, "lines": [PREEMPTION_LINE]})  # nothing left: not passed
    assert seen == [{"pid": 7, "is_err": True, "lines": ["epoch 1", other_error]}]


SCRIPT = textwrap.dedent("""
    import logging, sys
    import ray, ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from tskd.stages.console import ray_init_kwargs, quiet_ray_process
    from tskd.stages.ray_train import configure_worker_logging

    def loop(cfg):
        import os, time
        from tskd.stages.ray_train import report
        configure_worker_logging(0)
        assert os.environ["RAY_ADDRESS"] == ray.get_runtime_context().gcs_address
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"  # ray.train_poll_s
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


@pytest.fixture
def other_ray_instance():
    """A second, unrelated Ray on this machine (``ray start --head --block``, its files under a
    short temporary directory: Ray's socket paths are limited), stopped after the test by
    stopping that process and anything still running from its directory (``ray stop`` would stop
    every Ray on the machine)."""
    import shutil
    import tempfile

    import psutil

    temp = tempfile.mkdtemp(prefix="tskd-other-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
             "--num-cpus=0", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):  # its GCS is up once it has written its port
            if list(Path(temp).glob("session_*/gcs_server_port_*")) or head.poll() is not None:
                break
            time.sleep(0.5)
        assert head.poll() is None, "ray start --head failed"
        yield
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_console_and_live_metrics_of_a_ray_train_run(tmp_path: Path, other_ray_instance):
    """A real local Ray + TorchTrainer (1 worker) + Ray Data, as `tskd run` starts them, with
    another Ray running on the machine: the console keeps tskd's lines only, Train's helpers find
    their own cluster, and Ray's Prometheus endpoint serves the live metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = os.environ | {"PYTHONPATH": str(Path(console.__file__).parents[2])}
    env.pop("RAY_ADDRESS", None)
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
                  "Running Dataset", "PreemptionWatcher", "multiple active Ray instances",
                  "Traceback"):
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
