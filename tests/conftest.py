"""Shared fixtures: a local Ray started and stopped by the tests themselves."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session; 4 logical CPUs so Ray Data never starves a worker."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished-looking run directory for predict/export tests (no Ray): a demo dataset (8
    images, 48 px), ``data/splits.json``, two fine-tuned students (64 px ViT-Tiny, random weights
    with a sharpened head so the labels vary) with their manifests, and ``results.json`` naming
    ``ts_kd`` as the better one."""
    import json

    import torch

    from tskd.config import ExperimentConfig, to_dict
    from tskd.data.demo import DEMO_LABELS, write_demo_dataset
    from tskd.models.student import Student

    run = tmp_path_factory.mktemp("run") / "exp"
    root = write_demo_dataset(run.parent / "dataset", n_images=8, size=48, seed=3)
    ids = sorted(p.stem for p in (root / "images").iterdir())
    labels = {str(k): v for k, v in DEMO_LABELS.items()}
    (run / "data").mkdir(parents=True)
    (run / "data" / "splits.json").write_text(json.dumps({
        "root": str(root), "name": "demo", "labels": labels, "labelled": ids[:4], "val": ids[4:5],
        "test": ids[5:], "unlabelled": []}))
    cfg = ExperimentConfig()
    cfg.student.img_size = 64
    for seed, arm in enumerate(("ts_kd", "scratch")):
        torch.manual_seed(seed)
        student = Student(3, 64)
        with torch.no_grad():
            student.decoder.head[3].weight.mul_(20.0)
        stage = run / f"student_{arm}"
        stage.mkdir()
        torch.save(student.state_dict(), stage / "student.pt")
        (stage / "manifest.json").write_text(json.dumps({"stage": stage.name,
                                                         "config": to_dict(cfg)}))
    scores = {"dice": 0.5, "hd95": 3.0, "miou": 0.4,
              "per_class": {"organ": {"dice": 0.6, "hd95": 2.0, "miou": 0.5},
                            "lesion": {"dice": 0.4, "hd95": 4.0, "miou": 0.3}}}
    (run / "results.json").write_text(json.dumps({
        "experiment": "exp", "dataset": "demo", "classes": labels, "n_test": 3, "n_labelled": 4,
        "hd95_unit": "pixels", "teacher": scores,
        "students": {"ts_kd": scores, "scratch": {**scores, "dice": 0.2}}}))
    return run


PLANTED_SECRET = "planted-secret-7f3a9c"  # the tests that grep for it spell it out too
"""The S3 secret key the ``s3`` fixture puts in the environment (tests grep for it)."""


@pytest.fixture
def s3(monkeypatch):
    """A real S3 API on 127.0.0.1 (moto's server mode, stopped after the test) with one empty
    bucket; the client environment (``AWS_ENDPOINT_URL``, keys: the secret is
    :data:`PLANTED_SECRET`) is set for this test only. Yields ``s3://<bucket>``."""
    import secrets

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tskd-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        bucket = f"tskd-{secrets.token_hex(4)}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@pytest.fixture
def gcs(monkeypatch):
    """A GCS JSON API on 127.0.0.1 (``gcp-storage-emulator``, in memory, stopped after the
    test) with one empty bucket; ``STORAGE_EMULATOR_HOST`` (the variable Google's SDKs read)
    points at it for this test only. Yields ``gs://<bucket>``."""
    import secrets

    from gcp_storage_emulator.server import create_server

    port = _free_port()
    bucket = f"tskd-{secrets.token_hex(4)}"
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        _wait_for_port(port, "gcp-storage-emulator")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        yield f"gs://{bucket}"
    finally:
        server.stop()


AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
"""Azurite's fixed development account and its published key (not a secret)."""


def azurite_binary() -> str | None:
    """``azurite-blob`` on PATH, or where ``.ci/run`` installs it (``.ci/node``)."""
    import shutil
    from pathlib import Path

    local = Path(__file__).resolve().parents[1] / ".ci" / "node" / "node_modules" / ".bin"
    return shutil.which("azurite-blob") or shutil.which("azurite-blob", path=str(local))


@pytest.fixture
def azure(monkeypatch, tmp_path):
    """An Azure Blob API on 127.0.0.1 (Azurite, stopped after the test) with one empty
    container; ``AZURE_STORAGE_CONNECTION_STRING`` (the variable Azure's SDKs read) points at
    it for this test only. Yields ``abfs://<container>@devstoreaccount1.dfs.core.windows.net``.
    Skips, saying why, where Azurite is not installed (``.ci/run`` installs it with npm)."""
    import secrets
    import subprocess

    import pyarrow.fs as pafs

    binary = azurite_binary()
    if binary is None:
        pytest.skip("Azurite is not installed (npm install --prefix .ci/node azurite)")
    port = _free_port()
    log = open(tmp_path / "azurite.log", "w")
    server = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
                               "--location", str(tmp_path / "azurite"), "--silent",
                               "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, "Azurite")
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"))
        container = f"tskd-{secrets.token_hex(4)}"
        pafs.AzureFileSystem(account_name=AZURITE_ACCOUNT, account_key=AZURITE_KEY,
                             blob_storage_authority=f"127.0.0.1:{port}",
                             blob_storage_scheme="http", dfs_storage_authority=f"127.0.0.1:{port}",
                             dfs_storage_scheme="http").create_dir(container)
        yield f"abfs://{container}@{AZURITE_ACCOUNT}.dfs.core.windows.net"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
