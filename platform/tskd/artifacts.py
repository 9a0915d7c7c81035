"""Stage artifacts: run directories, ``manifest.json`` and config fingerprints.

Every stage writes into ``runs/<experiment>/<stage>/``. Its ``manifest.json`` is written last,
so a directory without one is an interrupted stage. A stage is *complete* when its manifest's
fingerprint equals the fingerprint of the current config slice plus the fingerprints of the
stages it reads: re-running an experiment skips complete stages (resume after a crash), and a
changed value re-runs exactly the stages that depend on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tskd.config import ExperimentConfig, to_dict

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PACKAGES = ("tskd", "torch", "torchvision", "ray", "timm", "segment-anything", "peft",
             "diffusers", "deepspeed", "monai", "optuna", "numpy")


@dataclass
class StageContext:
    """What a stage's ``run`` receives.

    Attributes:
        name: the stage name (its directory name).
        dir: the stage's output directory, empty when ``run`` is called.
        inputs: upstream stage name -> its (complete) directory.
        cfg: the whole resolved experiment config.
        params: stage-specific parameters (e.g. ``{"arm": "ts_kd"}``).
    """

    name: str
    dir: Path
    inputs: dict[str, Path]
    cfg: ExperimentConfig
    params: dict[str, Any] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the source checkout tskd runs from, if it is one."""
    here = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable manifest %s", path)
        return None


def is_complete(stage_dir: Path, fp: str) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest) and manifest.get("fingerprint") == fp and manifest.get(
        "status") == "complete"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def prepare_stage_dir(stage_dir: Path) -> None:
    """Empty ``stage_dir`` (an interrupted or outdated stage) and create it."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)


def write_manifest(ctx: StageContext, *, fp: str, config_slice: Any, metrics: dict[str, Any],
                   started: float, upstream: dict[str, str]) -> dict[str, Any]:
    manifest = {
        "stage": ctx.name,
        "status": "complete",
        "fingerprint": fp,
        "upstream": upstream,
        "seed": ctx.cfg.seed,
        "params": ctx.params,
        "stage_config": config_slice,
        "config": to_dict(ctx.cfg),
        "versions": package_versions(),
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_time_s": round(time.time() - started, 3),
        "metrics": metrics,
    }
    write_json(ctx.dir / MANIFEST, manifest)
    return manifest
