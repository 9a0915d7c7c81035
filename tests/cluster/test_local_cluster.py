"""`ray job submit` on a live two-node cluster (cluster/local.sh) with token authentication:
the tiny pipeline runs to SUCCEEDED with every training stage placed on the worker node.

Slow (the tiny pipeline through Ray Jobs on 2 shared cores takes minutes); `.ci/run` runs it.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_end_to_end import TINY  # noqa: E402
from tiny_pipeline import bucket_objects  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
LOCAL_SH = str(REPO / "cluster" / "local.sh")
JOB_TIMEOUT_S = 3600
# The tiny pipeline trimmed to the scratch arm (no transfer set, no distillation), without the
# reference network and ray.deterministic's Ray Data sort: on a shared 2-core machine each Train
# run costs minutes of worker start-up, and this test is about the cluster, not the method.
LEAN = ["students=[scratch]", "reference.arch=none", "ray.deterministic=false"]
TRAINING_STAGES = ["teacher_pretrain", "teacher", "student_scratch"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PLANTED_SECRET = "planted-secret-7f3a9c"  # tests/conftest.py plants it (s3 fixture)


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


@contextlib.contextmanager
def _cluster(worker_nodes: int = 1):
    """A head and ``worker_nodes`` worker nodes up for the test, down afterwards whatever
    happened (up cleans up after itself when it fails; down only touches what up started)."""
    if not RAY.is_file():
        pytest.skip(f"no ray executable next to {sys.executable}")
    state = Path(tempfile.mkdtemp(prefix="tskd-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY=str(RAY), PYTHONPATH=str(REPO / "platform"),
               TSKD_WORKER_NODES=str(worker_nodes))
    try:
        subprocess.run([LOCAL_SH, "up", str(state)], env=env, check=True, timeout=900)
        yield state
    finally:
        subprocess.run([LOCAL_SH, "down", str(state)], env=env, timeout=300)
        leftover = [p for p in Path("/proc").glob("[0-9]*")
                    if str(state) in _cmdline(p)]
        shutil.rmtree(state, ignore_errors=True)
        assert not leftover, f"processes left running: {leftover}"


@pytest.fixture
def local_cluster():
    """Two nodes: the head and one worker node."""
    with _cluster(1) as state:
        yield state


@pytest.fixture
def three_node_cluster():
    """Three nodes: the head and two worker nodes (``worker``, ``worker2``)."""
    with _cluster(2) as state:
        yield state


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _submit(env: dict[str, str], job_id: str, overrides: list[str]) -> None:
    """`ray job submit --no-wait` of jobs/run.py with ``overrides`` (the driver runs on the head)."""
    argv = ["job", "submit", "--submission-id", job_id, "--no-wait", "--working-dir", ".",
            "--runtime-env", "cluster/runtime_env.yaml", "--",
            "python", "jobs/run.py", *[a for o in overrides for a in ("--set", o)]]
    submitted = _ray(argv, env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr


def _job_info(env: dict[str, str], job_id: str) -> dict:
    """The job's entry in `ray list jobs` (its status field: the `ray job status` text says
    "succeeded")."""
    jobs = json.loads(_ray(["list", "jobs", "--address", env["RAY_API_SERVER_ADDRESS"],
                            "--format", "json"], env).stdout)
    return next(j for j in jobs if j["submission_id"] == job_id)


def _wait_for_job(env: dict[str, str], job_id: str, deadline: float) -> dict:
    """Poll rather than tail (a log stream that drops under load ends the wait early) until the
    job is terminal or ``deadline`` (time.monotonic()) passes."""
    job = _job_info(env, job_id)
    while job["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(10)
        job = _job_info(env, job_id)
    return job


def _train_workers(env: dict[str, str], job: dict) -> list[dict]:
    """Every Ray Train worker actor of ``job`` (alive or dead), from Ray's state API."""
    return json.loads(_ray(["list", "actors", "--address", env["RAY_API_SERVER_ADDRESS"],
                            "--detail", "--format", "json", "--limit", "10000",
                            "--filter", "class_name=RayTrainWorker",
                            "--filter", f"job_id={job['job_id']}"], env).stdout)


def _node_logs(state: Path, node: str) -> str:
    """What the Ray worker processes of one node wrote (its session logs, worker-*; not twice
    through the session_latest link)."""
    logs = (state / node).glob("session_2*/logs/worker-*")
    return "".join(p.read_text(errors="replace") for p in logs)


def test_job_submit_runs_the_tiny_pipeline_on_two_nodes(s3, local_cluster):
    """``s3`` comes first: the nodes start with its endpoint and keys in their environment, as
    a cloud cluster's nodes get theirs from their instance role, never from tskd's config."""
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

    job_id = "tskd-local-cluster-test"
    overrides = [*TINY, *LEAN, f"output_dir={s3}/runs", f"mirror_dir={state / 'mirror'}",
                 f"teacher.pretrain.cache_dir={state / 'cache'}",
                 "ray.resources_per_worker={worker_node: 0.01}"]
    _submit(env, job_id, overrides)
    job = _wait_for_job(env, job_id, time.monotonic() + JOB_TIMEOUT_S)
    logs = _ray(["job", "logs", job_id], env).stdout
    (state / "job.log").write_text(logs)  # kept for a failure's message
    tail = "\n".join(logs.splitlines()[-40:])
    assert job["status"] == "SUCCEEDED", f"{job['status']}\n{tail}"

    # the run lives in the bucket: results, and a complete store entry per training stage
    objects = bucket_objects(s3)
    results = json.loads(objects["runs/tiny/results.json"])
    assert results["experiment"] == "tiny" and results["n_test"] > 0
    assert set(results["students"]) == {"scratch"}
    for scores in [results["teacher"], results["students"]["scratch"]]:
        assert 0.0 <= scores["dice"] <= 1.0
    view = json.loads(objects["runs/tiny/stages.json"])["stages"]
    for stage in TRAINING_STAGES:
        manifest = json.loads(
            objects[f"runs/store/{stage}/{view[stage]['fingerprint']}/manifest.json"])
        assert manifest["status"] == "complete", stage
    # the keys were in every node's environment, yet in no object, job log or Ray log file
    secret = PLANTED_SECRET.encode()
    assert not [k for k, v in objects.items() if secret in v]
    assert PLANTED_SECRET not in logs
    logged = [p for p in state.rglob("*") if p.is_file() and not p.is_symlink()
              and p.suffix in (".log", ".err", ".out")]
    assert logged
    assert not [p for p in logged if secret in p.read_bytes()]

    # placement, from Ray's state API: every Train worker of the job ran on the worker node
    actors = _train_workers(env, job)
    assert len(actors) >= 2 * len(TRAINING_STAGES)  # ray.num_workers=2 per Train run
    assert {a["node_id"] for a in actors} == {worker_id}
    # each asked for the custom resource (inside its placement group: worker_node_group_<pg>)
    assert all(any(k.startswith("worker_node_group") for k in a["required_resources"])
               for a in actors)

    # and from the nodes' own log files: the epoch lines were written on the worker node
    on_worker, on_head = _node_logs(state, "worker"), _node_logs(state, "head")
    for line in ("teacher pre-training step 2/2", "student epoch 1/1"):
        assert line in on_worker and line not in on_head, line


# Long enough to kill mid-way: each epoch (2 workers, 6 labelled images) reports a checkpoint;
# on the loaded 2-core machine one epoch takes about a second.
NODE_LOSS_EPOCHS = 150
RESUMED = re.compile(r"student resumed from epoch (\d+)")


def test_losing_a_worker_node_mid_training_resumes_on_the_other(three_node_cluster):
    """A machine loss (SIGKILL of a worker node's process group) while the scratch student
    trains there: Ray Train restarts the worker group (ray.max_failures) on the other worker
    node, the loop resumes from the last checkpoint, and the job SUCCEEDS."""
    state = three_node_cluster
    env = _client_env(state)
    api = env["RAY_API_SERVER_ADDRESS"]
    nodes = json.loads(_ray(["list", "nodes", "--address", api, "--format", "json"], env).stdout)
    ids = {n["labels"]["tskd-node"]: n["node_id"] for n in nodes}
    assert set(ids) == {"head", "worker", "worker2"}
    assert all(n["state"] == "ALIVE" for n in nodes)
    names = {node_id: name for name, node_id in ids.items()}

    out = state / "runs"
    job_id = "tskd-node-loss-test"
    overrides = [*TINY, *LEAN, f"output_dir={out}", f"teacher.pretrain.cache_dir={out / 'cache'}",
                 f"student_finetune.epochs={NODE_LOSS_EPOCHS}", "ray.checkpoint_every=1",
                 "ray.max_failures=2", "ray.concurrent_stages=1",  # one Train run at a time
                 "ray.resources_per_worker={worker_node: 0.01}"]
    started = time.monotonic()
    _submit(env, job_id, overrides)
    deadline = started + JOB_TIMEOUT_S

    # the scratch student's first checkpoint in its stage's Ray Train storage
    train_dirs = out / "store" / "student_scratch"
    polls = 0
    while not any(train_dirs.glob(".train-*/**/checkpoint_*")):
        polls += 1
        if polls % 30 == 0:
            job = _job_info(env, job_id)
            assert job["status"] not in TERMINAL, _ray(["job", "logs", job_id], env).stdout[-4000:]
        assert time.monotonic() < deadline, "no student checkpoint before the job's deadline"
        time.sleep(1)
    job = _job_info(env, job_id)
    alive = [a for a in _train_workers(env, job) if a["state"] == "ALIVE"]
    assert len(alive) == 2, alive  # ray.num_workers=2, one Train run at a time
    victim = names[alive[0]["node_id"]]
    assert victim in ("worker", "worker2"), victim  # training is pinned to the worker nodes
    survivor = "worker2" if victim == "worker" else "worker"
    before = {a["actor_id"] for a in _train_workers(env, job)}
    assert not (out / "tiny" / "student_scratch").exists(), "the stage ended before the kill"

    killed = subprocess.run([LOCAL_SH, "stop-node", str(state), victim], text=True,
                            capture_output=True, timeout=120,
                            env={**os.environ, "RAY": str(RAY)})
    assert killed.returncode == 0, killed.stdout + killed.stderr
    killed_at = time.monotonic()
    print(f"\n[node loss] {victim} killed {killed_at - started:.0f} s after submission")

    job = _wait_for_job(env, job_id, deadline)
    print(f"[node loss] job {job['status']} {time.monotonic() - killed_at:.0f} s after the kill")
    logs = _ray(["job", "logs", job_id], env).stdout
    (state / "job.log").write_text(logs)
    tail = "\n".join(logs.splitlines()[-40:])
    assert job["status"] == "SUCCEEDED", f"{job['status']}\n{tail}"

    # the stage resumed from a checkpoint (not from scratch), on the surviving worker node
    resumed = [int(e) for e in RESUMED.findall(_node_logs(state, survivor))]
    assert resumed and min(resumed) >= 1, resumed
    assert not RESUMED.search(_node_logs(state, victim))
    print(f"[node loss] resumed from epoch {resumed} of {NODE_LOSS_EPOCHS}")
    manifest = json.loads((out / "tiny" / "student_scratch" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    results = json.loads((out / "tiny" / "results.json").read_text())
    assert 0.0 <= results["students"]["scratch"]["dice"] <= 1.0

    # Ray's view: the node is dead, its Train workers died with it, the new ones ran elsewhere
    nodes = json.loads(_ray(["list", "nodes", "--address", api, "--format", "json"], env).stdout)
    assert {n["node_id"]: n["state"] for n in nodes}[ids[victim]] == "DEAD"
    actors = _train_workers(env, job)
    assert all(a["state"] == "DEAD" for a in actors if a["node_id"] == ids[victim])
    restarted = [a for a in actors if a["actor_id"] not in before]
    assert len(restarted) >= 2, restarted
    assert {a["node_id"] for a in restarted} == {ids[survivor]}
