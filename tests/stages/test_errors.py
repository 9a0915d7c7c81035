"""tskd's own errors raised inside a Ray Train worker reach the user as one line and exit 2."""

from __future__ import annotations

import pytest

from tskd.config import RayConfig
from tskd.data.format import DatasetError
from tskd.stages.errors import StageFailed, own_error


def _worker_fns():
    """Train functions defined in a function, so that cloudpickle ships them by value (Ray
    workers cannot import this test module)."""

    def _raise_dataset_error(config):
        raise DatasetError(f"masks/{config['case']}.png: undeclared label value 7")

    return _raise_dataset_error


def _fit(fn, tmp_path):
    from tskd.stages.ray_train import fit_torch_trainer

    return fit_torch_trainer(fn, train_config={"case": "case_042"},
                             ray_cfg=RayConfig(cpus_per_worker=0.5), name="boom",
                             storage=tmp_path / "ray", num_workers=1)


def test_worker_dataset_error_is_found_in_rays_wrappers(tmp_path, ray_local):
    _raise_dataset_error = _worker_fns()
    with pytest.raises(RuntimeError) as info:
        _fit(_raise_dataset_error, tmp_path)
    found = own_error(info.value)
    assert type(found) is DatasetError
    assert str(found) == "masks/case_042.png: undeclared label value 7"
    assert "DatasetError: masks/case_042.png" in str(info.value)  # short message, first line
    assert len(str(info.value).splitlines()) == 1


def test_cli_reports_worker_dataset_error_like_a_driver_one(tmp_path, ray_local, capsys,
                                                             monkeypatch):
    import ray

    from tskd import cli, pipeline
    from tskd.pipeline import Stage

    def boom(ctx):
        _fit(_worker_fns(), tmp_path)

    monkeypatch.setattr(pipeline, "plan", lambda cfg: [Stage("boom", boom)])
    monkeypatch.setattr(cli, "_init_ray", lambda cfg: None)  # the fixture's Ray is running
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    code = cli.main(["run", "--set", f"output_dir={tmp_path / 'runs'}", "--set",
                     "experiment=e"])
    err = capsys.readouterr().err
    log_path = tmp_path / "runs" / "e" / "boom.error.log"
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("tskd: dataset error: masks/case_042.png: undeclared label value 7")
    assert str(log_path) in err
    text = log_path.read_text()
    assert "_raise_dataset_error" in text  # the worker's traceback
    assert "Traceback" in text


def test_stage_failed_names_stage_and_log(tmp_path):
    exc = StageFailed("teacher", DatasetError("bad mask"), tmp_path / "error.log")
    assert str(exc) == f"bad mask (stage teacher; traceback: {tmp_path / 'error.log'})"
    assert own_error(RuntimeError("x")) is None
    bug = RuntimeError("Ray Train run failed")
    bug.__cause__ = KeyError("a bug, not bad input")
    assert own_error(bug) is None  # a bug stays a bug (full traceback, exit 1)
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = DatasetError("inner")
    assert str(own_error(wrapped)) == "inner"


def test_fit_error_message_names_the_workers_error():
    from ray.train import WorkerGroupError

    from tskd.stages.ray_train import _first_line

    bug = WorkerGroupError("rank 0:\nTraceback ...\nKeyError: 'x'", {0: KeyError("x")})
    assert _first_line(bug) == "KeyError: 'x'"
    bad = WorkerGroupError("...", {1: DatasetError("mask 1"), 0: DatasetError("mask 0")})
    assert _first_line(bad) == "DatasetError: mask 0"
    assert _first_line(RuntimeError("line 1\nline 2")) == "RuntimeError: line 1"
