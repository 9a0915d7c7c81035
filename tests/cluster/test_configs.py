"""The cluster configs parse, agree with each other and with pyproject.toml, and pin the Ray
version the code is tested with (the installed one)."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ray = pytest.importorskip("ray")
from ray.runtime_env import RuntimeEnv  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TESTED_RAY = ray.__version__
BASE_IMAGE = f"rayproject/ray:{TESTED_RAY}-py311-gpu"
TSKD_IMAGE = f"tskd:{PYPROJECT['project']['version']}-ray{TESTED_RAY}-py311-gpu"
IMAGE_DIR = "/home/ray/tskd"  # where cluster/Dockerfile puts the repository


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _pins() -> dict[str, Requirement]:
    lines = (CLUSTER / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def _ray_pods(cluster_spec: dict) -> list[tuple[dict, dict]]:
    """(pod spec, rayStartParams) of the head and every worker group."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [(g["template"]["spec"], g["rayStartParams"]) for g in groups]


def _check_token_env(container: dict) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "tskd-ray-auth", "key": "auth_token"}, container["name"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == TESTED_RAY
    pods = _ray_pods(spec)
    assert len(pods) >= 2
    for pod, params in pods:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
        (container,) = pod["containers"]
        assert container["image"] == TSKD_IMAGE
        _check_token_env(container)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"shared": "tskd-shared"} and mounts["shared"] == "/mnt/tskd"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                      "nvidia.com/gpu")]
    assert gpu_groups and sum(g["replicas"] for g in gpu_groups) == 2  # the paper's 2 x L40


def test_constraints_pin_every_dependency_inside_pyproject_range():
    pins = _pins()
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        assert req.name.lower() in pins, f"{req.name} is not pinned in cluster/constraints.txt"
        pin = pins[req.name.lower()]
        version = _pinned_version(pin)
        assert req.specifier.contains(version), f"{pin} is outside pyproject's {req}"
        assert pin.extras == req.extras, req.name
    assert _pinned_version(pins["ray"]) == TESTED_RAY


def test_dockerfile_builds_on_the_tested_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [BASE_IMAGE]
    assert f"-t {TSKD_IMAGE} ." in text  # the build command names the tag the manifests use
    assert "pip install --no-cache-dir -r cluster/constraints.txt" in text
    assert f"ray.__version__ == '{TESTED_RAY}'" in text
    assert re.search(rf"^WORKDIR {IMAGE_DIR}$", text, flags=re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_runtime_env_is_valid_and_points_at_the_package():
    env = _yaml("runtime_env.yaml")
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)  # Ray's own validation of types
    assert env["working_dir"] == "."
    for module in env["py_modules"]:
        assert (REPO / module / "__init__.py").is_file()
    hook_module, _, hook = env["worker_process_setup_hook"].rpartition(".")
    path = REPO / "platform" / (hook_module.replace(".", "/") + ".py")
    assert re.search(rf"^def {hook}\(", path.read_text(), flags=re.M)


def test_launcher_config():
    cfg = _yaml("ray-cluster.yaml")
    assert cfg["docker"]["image"] == BASE_IMAGE
    assert "--volume /mnt/tskd:/mnt/tskd" in cfg["docker"]["run_options"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) == cfg["max_workers"] == 2
    # the repository and the token reach every node; the stack is the pinned one
    assert cfg["file_mounts"][IMAGE_DIR] == "."
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert f"pip install --quiet -r {IMAGE_DIR}/cluster/constraints.txt" in cfg["setup_commands"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("/mnt/tskd" in c and "mount -t nfs4" in c for c in cfg["initialization_commands"])


def test_kuberay_cluster_and_storage():
    (pvc,) = _docs("kuberay-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "tskd-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (cluster,) = _docs("kuberay-cluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"])


def test_kuberay_job():
    (job,) = _docs("kuberay-job.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["image"] == TSKD_IMAGE
    _check_token_env(submitter)
    # the runtime env is cluster/runtime_env.yaml with the image's copy of the repository
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    local = _yaml("runtime_env.yaml")
    # Ray checks local paths exist: the image's /home/ray/tskd is a copy of this repository
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"].replace(IMAGE_DIR, str(REPO))))
    assert env == {**local, "working_dir": IMAGE_DIR,
                   "py_modules": [f"{IMAGE_DIR}/{m}" for m in local["py_modules"]]}
    # the entrypoint runs jobs/run.py on a config that exists, output_dir on the shared volume
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/run.py"] and (REPO / argv[1]).is_file()
    assert (REPO / argv[2]).is_file()
    sets = dict(a.split("=", 1) for a in argv[3:] if a != "--set")
    assert sets["output_dir"].startswith("/mnt/tskd/")
    from tskd.config import load_config

    cfg = load_config(REPO / argv[2], [f"{k}={v}" for k, v in sets.items()])
    assert cfg.ray.use_gpu and cfg.ray.num_workers == 2


def test_documented_commands_name_files_that_exist():
    """Every `python jobs/...` entrypoint and `cluster/...` file the configs and READMEs name."""
    texts = [p.read_text() for p in [*CLUSTER.glob("*.yaml"), CLUSTER / "README.md",
                                     REPO / "README.md", CLUSTER / "Dockerfile"]]
    named = set()
    for text in texts:
        named |= set(re.findall(r"(?<![\w/.-])((?:jobs|cluster)/[\w.-]+\.(?:py|yaml|sh|txt|md))\b", text))
    assert "jobs/run.py" in named and "cluster/runtime_env.yaml" in named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"named but missing: {missing}"


def test_submit_commands_handle_token_auth():
    """README and cluster/README: every `ray job submit` is preceded by the token settings."""
    for path in (REPO / "README.md", CLUSTER / "README.md"):
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            if "ray job submit" in block:
                before = block[:block.index("ray job submit")]
                assert "RAY_AUTH_MODE=token" in before or "source " in before, (path, block)
