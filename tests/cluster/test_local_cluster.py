"""`ray job submit` on a live two-node cluster (cluster/local.sh) with token authentication:
the tiny pipeline runs to SUCCEEDED with every training stage placed on the worker node.

Slow (the tiny pipeline through Ray Jobs on 2 shared cores takes minutes); `.ci/run` runs it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_end_to_end import TINY  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
JOB_TIMEOUT_S = 3600
# The tiny pipeline trimmed to the scratch arm (no transfer set, no distillation), without the
# reference network and ray.deterministic's Ray Data sort: on a shared 2-core machine each Train
# run costs minutes of worker start-up, and this test is about the cluster, not the method.
LEAN = ["students=[scratch]", "reference.arch=none", "ray.deterministic=false"]
TRAINING_STAGES = ["teacher_pretrain", "teacher", "student_scratch"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _client_env(state: Path) -> dict[str, str]:
    """This process's environment plus what `source STATE/env` exports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for line in (state / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _ray(args: list[str], env: dict[str, str], timeout: float = 120,
         **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, cwd=REPO, text=True, capture_output=True,
                          timeout=timeout, **kwargs)


@pytest.fixture
def local_cluster():
    """Two nodes up for the test, down afterwards whatever happened (up cleans up after itself
    when it fails; down only touches what up started)."""
    if not RAY.is_file():
        pytest.skip(f"no ray executable next to {sys.executable}")
    state = Path(tempfile.mkdtemp(prefix="tskd-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY=str(RAY), PYTHONPATH=str(REPO / "platform"))
    script = str(REPO / "cluster" / "local.sh")
    try:
        subprocess.run([script, "up", str(state)], env=env, check=True, timeout=600)
        yield state
    finally:
        subprocess.run([script, "down", str(state)], env=env, timeout=300)
        leftover = [p for p in Path("/proc").glob("[0-9]*")
                    if str(state) in _cmdline(p)]
        shutil.rmtree(state, ignore_errors=True)
        assert not leftover, f"processes left running: {leftover}"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_job_submit_runs_the_tiny_pipeline_on_two_nodes(local_cluster):
    state = local_cluster
    env = _client_env(state)
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()
    api = env["RAY_API_SERVER_ADDRESS"]

    # a client without token auth is refused at once, naming the cause
    no_auth = _ray(["job", "submit", "--", "python", "-c", "print(1)"],
                   {**env, "RAY_AUTH_MODE": "disabled"})
    assert no_auth.returncode != 0
    assert "Missing authentication token" in no_auth.stdout + no_auth.stderr

    nodes = json.loads(_ray(["list", "nodes", "--address", api, "--format", "json"], env).stdout)
    by_resource = {name: [n["node_id"] for n in nodes if name in n["resources_total"]]
                   for name in ("head_node", "worker_node")}
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes)
    (head_id,), (worker_id,) = by_resource["head_node"], by_resource["worker_node"]
    assert head_id != worker_id

    out = state / "runs"  # both nodes are on this machine: a local path is shared storage
    job_id = "tskd-local-cluster-test"
    overrides = [*TINY, *LEAN, f"output_dir={out}", f"teacher.pretrain.cache_dir={out / 'cache'}",
                 "ray.resources_per_worker={worker_node: 0.01}"]
    argv = ["job", "submit", "--submission-id", job_id, "--working-dir", ".",
            "--runtime-env", "cluster/runtime_env.yaml", "--",
            "python", "jobs/run.py", *[a for o in overrides for a in ("--set", o)]]
    submitted = _ray(argv[:2] + ["--no-wait"] + argv[2:], env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # poll rather than tail (a log stream that drops under load ends the wait early); the
    # status field of `ray list jobs` (the `ray job status` text says "succeeded")
    def job_info() -> dict:
        jobs = json.loads(_ray(["list", "jobs", "--address", api, "--format", "json"],
                               env).stdout)
        return next(j for j in jobs if j["submission_id"] == job_id)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    job = job_info()
    while job["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(10)
        job = job_info()
    logs = _ray(["job", "logs", job_id], env).stdout
    (state / "job.log").write_text(logs)  # kept for a failure's message
    tail = "\n".join(logs.splitlines()[-40:])
    assert job["status"] == "SUCCEEDED", f"{job['status']}\n{tail}"

    results = json.loads((out / "tiny" / "results.json").read_text())
    assert results["experiment"] == "tiny" and results["n_test"] > 0
    assert set(results["students"]) == {"scratch"}
    for scores in [results["teacher"], results["students"]["scratch"]]:
        assert 0.0 <= scores["dice"] <= 1.0
    for stage in TRAINING_STAGES:
        manifest = json.loads((out / "tiny" / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage

    # placement, from Ray's state API: every Train worker of the job ran on the worker node
    actors = json.loads(_ray(["list", "actors", "--address", api, "--detail", "--format", "json",
                              "--limit", "10000", "--filter", "class_name=RayTrainWorker",
                              "--filter", f"job_id={job['job_id']}"], env).stdout)
    assert len(actors) >= 2 * len(TRAINING_STAGES)  # ray.num_workers=2 per Train run
    assert {a["node_id"] for a in actors} == {worker_id}
    # each asked for the custom resource (inside its placement group: worker_node_group_<pg>)
    assert all(any(k.startswith("worker_node_group") for k in a["required_resources"])
               for a in actors)

    # and from the nodes' own log files: the epoch lines were written on the worker node
    def worker_logs(node: str) -> str:
        logs = (state / node).glob("session_*/logs/worker-*")
        return "".join(p.read_text(errors="replace") for p in logs)

    on_worker, on_head = worker_logs("worker"), worker_logs("head")
    for line in ("teacher pre-training step 2/2", "student epoch 1/1"):
        assert line in on_worker and line not in on_head, line
