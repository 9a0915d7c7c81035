"""Stage artifacts: the stage context, ``manifest.json`` and what a stage fingerprint covers.

A stage's output is an entry of the shared store (:mod:`tskd.store`),
``<output_dir>/store/<stage>/<fingerprint>/``, used by every run under that output directory;
``<output_dir>/<experiment>/`` is a run's view of the entries it used (``stages.json`` plus a
``<stage>`` link per entry where the filesystem allows) and its ``results.json``.

The fingerprint (:func:`tskd.pipeline.stage_fingerprint`) covers the stage's config slice and
parameters, the seed, the fingerprints *and content hashes* of its inputs' entries, the identity
of outside files its slice names (:func:`external_inputs`), the number of Ray Train workers for
training stages, and the tskd version. The manifest is written last, by the store, so an entry
without one is an interrupted build.
"""

from __future__ import annotations

import json
import logging
import os
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
        dir: the stage's output directory, empty when ``run`` is called (a temporary store
            entry, renamed into place afterwards: record paths inside it relative to it).
        inputs: upstream stage name -> its (complete) store entry directory.
        cfg: the whole resolved experiment config.
        params: stage-specific parameters (e.g. ``{"arm": "ts_kd"}``).
        train_dir: a directory that outlives the temporary entry, one per stage fingerprint
            (``store/<stage>/.train-<fp>``): Ray Train's run storage, so a stage killed with its
            driver resumes from its last checkpoint when run again
            (:func:`tskd.stages.ray_train.run_storage`); the stage removes it when it succeeds.
            ``None`` (e.g. tests): inside ``dir``. An ``s3://``-style URI for object-store outputs.
        remote_inputs: for an object-store output, upstream stage name -> its entry's URI
            (what Ray Data tasks on any node read: :meth:`input_location`); empty otherwise.
        input_refs: for an object-store output, what a Ray Train worker on another node fetches
            into its own mirror before it reads ``inputs`` (:class:`tskd.store.InputRefs`,
            passed as ``fit_torch_trainer(..., inputs=ctx.input_refs)``); None otherwise.
    """

    name: str
    dir: Path
    inputs: dict[str, Path]
    cfg: ExperimentConfig
    params: dict[str, Any] = field(default_factory=dict)
    train_dir: Path | str | None = None
    remote_inputs: dict[str, str] = field(default_factory=dict)
    input_refs: Any = None

    def input_location(self, name: str) -> Path | str:
        """Where tasks on any node read input ``name``: its object-store URI for remote
        outputs, else its (local or shared) directory."""
        return self.remote_inputs.get(name) or self.inputs[name]


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


def stage_manifest(ctx: StageContext, *, fp: str, config_slice: Any, metrics: dict[str, Any],
                   started: float, inputs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The manifest of a stage just built in ``ctx.dir`` (the store adds ``status``,
    ``content_hash`` and ``published`` and writes it last). ``inputs``: upstream stage name ->
    ``{"fingerprint", "content_hash"}`` of the entry it read. ``config`` is the whole config of
    the run that built the entry (other runs reusing it may differ in fields outside the slice).
    """
    return {
        "stage": ctx.name,
        "fingerprint": fp,
        "upstream": {name: rec["fingerprint"] for name, rec in inputs.items()},
        "inputs": inputs,
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


def tskd_version() -> str:
    """The installed tskd version (part of every fingerprint: a new release rebuilds)."""
    try:
        return metadata.version("tskd")
    except metadata.PackageNotFoundError:
        return "unknown"


def external_inputs(config_slice: Any, path: str = "") -> dict[str, str]:
    """Identities of the files outside the store that a config slice names, by dotted key:
    every non-null ``checkpoint`` value (a file: path, size and mtime; a multi-GB checkpoint is
    never re-read) and every non-null ``root`` value (a dataset directory: every file's relative
    path, size and mtime). See :func:`tskd.store.file_identity` and
    :func:`tskd.store.tree_identity`.

    Raises:
        FileNotFoundError: a named file or directory does not exist (naming the key).
    """
    from tskd.store import file_identity, tree_identity

    out: dict[str, str] = {}
    if isinstance(config_slice, dict):
        for key, value in config_slice.items():
            dotted = f"{path}.{key}" if path else str(key)
            if key in ("checkpoint", "root") and isinstance(value, str):
                target = Path(value).expanduser()
                if not target.exists():
                    raise FileNotFoundError(f"{dotted}: {value} does not exist")
                out[dotted] = file_identity(target) if key == "checkpoint" \
                    else tree_identity(target)
            else:
                out.update(external_inputs(value, dotted))
    return out
