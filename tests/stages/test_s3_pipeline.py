"""A tiny pipeline whose output_dir is on S3 (moto's server on 127.0.0.1): ``tskd run`` twice,
as two machines would (each with its own empty mirror); the second reuses every stage."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import bucket_objects, tiny_overrides

PLANTED_SECRET = "planted-secret-7f3a9c"  # tests/conftest.py plants it (s3 fixture)

REPO = Path(__file__).resolve().parents[2]
TINY = tiny_overrides(  # task-agnostic KD: a transfer set (Ray Data writes and reads), distillation
    n_images=24, num_workers=1, select=("students=[ta_kd]", "reference.arch=none"))
STAGES = {"data", "teacher_pretrain", "teacher", "ddpm", "transfer", "distill_ta_kd",
          "student_ta_kd", "evaluate"}


def _tskd_run(uri: str, mirror: Path, cache: Path, tmp: Path) -> str:
    """``tskd run`` in a fresh process (its own local Ray, Ray's files under ``tmp``); returns
    its console output."""
    sets = [*TINY, f"output_dir={uri}/runs", f"mirror_dir={mirror}",
            f"teacher.pretrain.cache_dir={cache}"]
    cmd = [sys.executable, "-m", "tskd.cli", "run"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_TMPDIR": str(tmp)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow  # two tiny runs in fresh processes: 10 min on 2 heavily shared cores
def test_tiny_pipeline_writes_and_resumes_its_run_on_s3(s3, tmp_path):
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="tskd-ray-", dir="/tmp"))  # short: Ray's sockets
    requests: list[str] = []  # what the S3 server was asked (moto logs through werkzeug)

    class _Requests(logging.Handler):
        def emit(self, record):
            requests.append(record.getMessage())

    handler = _Requests(logging.INFO)
    server_log = logging.getLogger("werkzeug")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    try:
        first = _tskd_run(s3, tmp_path / "node-a", tmp_path / "cache", ray_tmp)
    finally:
        server_log.removeHandler(handler)
    objects = bucket_objects(s3)
    view = json.loads(objects["runs/tiny/stages.json"])["stages"]
    assert set(view) >= STAGES
    for stage in view:
        assert re.search(rf"\] {stage}: built ", first), (stage, first[-3000:])
    # Ray Train kept its run state in the bucket, Ray Data wrote the transfer set through it
    assert any("PUT" in r and "/.train-" in r for r in requests)
    assert any("PUT" in r and "-write-" in r for r in requests)
    for stage, rec in view.items():
        manifest = json.loads(objects[f"runs/store/{stage}/{rec['fingerprint']}/manifest.json"])
        assert manifest["status"] == "complete" and manifest["content_hash"] == \
            rec["content_hash"]
    results = json.loads(objects["runs/tiny/results.json"])
    assert set(results["students"]) == {"ta_kd"}
    assert 0.0 <= results["students"]["ta_kd"]["dice"] <= 1.0
    # the staging and Ray Train prefixes were removed when each stage succeeded
    assert not [k for k in objects if "/.train-" in k]
    # the demo teacher's checkpoint travels in its entry (workers on any node fetch it)
    pretrain_fp = view["teacher_pretrain"]["fingerprint"]
    base = json.loads(objects[f"runs/store/teacher_pretrain/{pretrain_fp}/base.json"])
    assert base["checkpoint"] == "sam.pth"

    # another machine: an empty mirror, the same bucket: every stage is reused
    second = _tskd_run(s3, tmp_path / "node-b", tmp_path / "cache", ray_tmp)
    for stage in view:
        assert re.search(rf"\] {stage}: up to date \(", second), (stage, second[-3000:])
    assert " built " not in second
    assert json.loads(bucket_objects(s3)["runs/tiny/results.json"]) == results
    local = tmp_path / "node-b"
    assert json.loads(next(local.glob("*/tiny/results.json")).read_text()) == results

    # the planted secret is in no object, no mirror file, no console line and no Ray log
    secret = PLANTED_SECRET.encode()
    assert not [k for k, v in bucket_objects(s3).items() if secret in v]
    assert PLANTED_SECRET not in first + second
    files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink()]
    assert any(p.suffix in (".log", ".err", ".out") for p in files)  # Ray's logs were searched
    leaked = []
    for p in files:
        try:
            if secret in p.read_bytes():
                leaked.append(p)
        except OSError:
            pass
    assert not leaked


@pytest.mark.slow  # one tiny run in a fresh process: ~4 min here
def test_tiny_pipeline_runs_on_azure(azure, tmp_path):
    """The same run with ``output_dir`` on Azure Blob (Azurite, through
    ``AZURE_STORAGE_CONNECTION_STRING``): every stage is built and published to the container;
    Ray Train's run state and Ray Data's writes went through the filesystem tskd opens, and
    were removed when each stage succeeded. (GCS runs the store tests only: the GCS emulator
    stalls pyarrow's random-access reads, which Ray Train's checkpoint download uses.)"""
    import tempfile

    uri = azure
    ray_tmp = Path(tempfile.mkdtemp(prefix="tskd-ray-", dir="/tmp"))
    out = _tskd_run(uri, tmp_path / "node-a", tmp_path / "cache", ray_tmp)
    objects = bucket_objects(uri)
    view = json.loads(objects["runs/tiny/stages.json"])["stages"]
    assert set(view) >= STAGES
    for stage, rec in view.items():
        assert re.search(rf"\] {stage}: built ", out), (stage, out[-3000:])
        manifest = json.loads(objects[f"runs/store/{stage}/{rec['fingerprint']}/manifest.json"])
        assert manifest["status"] == "complete" and manifest["content_hash"] == \
            rec["content_hash"]
    # the transfer set Ray Data wrote through the bucket is in its entry
    transfer = view["transfer"]["fingerprint"]
    assert any(k.startswith(f"runs/store/transfer/{transfer}/") and k.endswith(".parquet")
               for k in objects)
    assert not [k for k in objects if "/.train-" in k]  # staging and Train state removed
    results = json.loads(objects["runs/tiny/results.json"])
    assert 0.0 <= results["students"]["ta_kd"]["dice"] <= 1.0
