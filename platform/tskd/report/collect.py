"""Read run directories into report rows (core: json and the filesystem only).

A *run* is a directory written by ``tskd run`` (or one cell of a grid): ``results.json`` (the
evaluate stage's scores), ``stages.json`` (the store entries it used, each with a
``manifest.json``: wall time, metrics, config slice, upstream fingerprints) and, when a stage
failed, ``<stage>.error.log``. :func:`find_runs` finds the runs under a directory (the directory
itself, or its sub-directories: seeds, grid cells); :func:`read_run` turns one into a
:class:`Run` with one :class:`Row` per scored model (teacher, each student, the reference).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
VIEW_FILE = "stages.json"  # tskd.store.VIEW_FILE (not imported: the store module is stage glue)
GRID_FILE = "grid.yaml"  # written by `tskd grid` into <output_dir>/<name>-grid/
ERROR_SUFFIX = ".error.log"
SKIP_DIRS = {"store"}
"""Directory names never searched for runs (the shared store lives beside the runs)."""
SHARED_STAGES = {"data", "ddpm", "transfer", "teacher", "teacher_pretrain"}
"""Stages a student reads but that are not its own pre-training (their time is shared)."""


@dataclass
class Row:
    """One model scored in one run: a line of the paper's tables.

    Attributes:
        run: the run's name (its path relative to the report's root; its directory name when
            the root is the run).
        method: ``teacher``, ``reference`` or the student arm (``ts_kd`` shows its Table 8
            preset, e.g. ``ts_kd5``, when its distillation settings are not TS-KD8's).
        kind: ``teacher`` | ``student`` | ``reference``.
        arch: the model's architecture (``vit``, ``basic_unet``, the SAM arch, ...).
        labels: the label budget (``data.n_labels``; else the labelled images used).
        transfer_size: transfer-set images the method distilled on (None when it reads none).
        rank: the teacher's LoRA rank (None when the model does not depend on the tuned teacher).
        teacher: the teacher's arch (None when the model depends on no teacher).
        seed: the run's seed.
        workers: ``ray.num_workers`` the model's stage was built with (a scaling study's axis).
        scores: ``dice``, ``hd95``, ``miou``, ``per_class``, ``n_images`` (None: failed).
        pretrain_s: wall time of the model's own pre-training stage(s) (distillation, ...).
        finetune_s: wall time of its fine-tuning stage (the teacher's LoRA stage for the teacher).
        params, size_mb, latency_ms: the model's footprint (students and reference).
        adapter_mb: the teacher's adapter file (``teacher/adapter_mb``, Table 7).
        base_mb: the teacher's base checkpoint file size, when it can be found.
        stage_dir: the model's stage directory (``student_<arm>``, ``reference``, ``teacher``).
        fingerprint: that stage's fingerprint (rows with equal ones are the same model).
        data_fp: the data stage's fingerprint (the test split the scores are on).
        error: why the model has no scores (a failed stage's message), else None.
    """

    run: str
    method: str
    kind: str
    arch: str = ""
    labels: int | None = None
    transfer_size: int | None = None
    rank: int | None = None
    teacher: str | None = None
    seed: int | None = None
    workers: int | None = None
    scores: dict[str, Any] | None = None
    pretrain_s: float | None = None
    finetune_s: float | None = None
    params: int | None = None
    size_mb: float | None = None
    latency_ms: float | None = None
    adapter_mb: float | None = None
    base_mb: float | None = None
    stage_dir: Path | None = None
    fingerprint: str = ""
    data_fp: str = ""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.scores is None

    def metric(self, name: str, cls: str | None = None) -> float:
        """``dice``/``hd95``/``miou`` (mean, or of class ``cls``); NaN when missing."""
        if self.scores is None:
            return math.nan
        src = self.scores if cls is None else self.scores.get("per_class", {}).get(cls, {})
        value = src.get(name)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class Failure:
    """A failed stage of a run: its name, the error's last line and the log file."""

    run: str
    stage: str
    message: str
    log_path: Path


@dataclass
class Run:
    """One run directory, read.

    Attributes:
        name: path relative to the report root (the directory name for the root itself).
        path: the run directory.
        results: its ``results.json`` (None when the run did not finish).
        manifests: stage -> the manifest of the store entry the run used.
        entries: stage -> that entry's directory.
        rows: one per scored (or failed) model.
        failures: the failed stages.
        config: the run's own resolved config (from the manifests of the entries this run
            built: their ``config.experiment`` is the run directory's name), else empty.
    """

    name: str
    path: Path
    results: dict[str, Any] | None
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: dict[str, Path] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Foreground class names, in label order."""
        if not self.results:
            return []
        labels = self.results.get("classes", {})
        return [labels[k] for k in sorted(labels, key=int) if int(k) > 0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return None


def is_run_dir(path: Path) -> bool:
    """A run directory: it holds ``results.json``, ``stages.json`` or a stage's error log."""
    path = Path(path)
    return ((path / RESULTS_FILE).is_file() or (path / VIEW_FILE).is_file()
            or any(path.glob(f"*{ERROR_SUFFIX}")))


def grid_cells(grid_dir: Path) -> dict[str, Path] | None:
    """``tskd grid``'s directory ``<output_dir>/<name>-grid`` (it holds ``grid.yaml``): cell
    label -> the cell's run directory ``<output_dir>/<name>-<label>`` (the cells of its results
    table ``grid.csv``, its failed cells ``errors/<label>.txt``, and the run directories named
    after the grid); None for any other directory."""
    import csv

    import yaml

    grid_dir = Path(grid_dir)
    if not (grid_dir / GRID_FILE).is_file():
        return None
    try:
        name = str(yaml.safe_load((grid_dir / GRID_FILE).read_text())["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        name = grid_dir.name.removesuffix("-grid")
    labels: set[str] = set()
    if (grid_dir / "grid.csv").is_file():
        with open(grid_dir / "grid.csv", newline="") as f:
            labels |= {row["cell"] for row in csv.DictReader(f) if row.get("cell")}
    labels |= {p.stem for p in (grid_dir / "errors").glob("*.txt")}
    if not labels:  # no table yet: the run directories named after the grid
        labels = {p.name[len(name) + 1:] for p in grid_dir.parent.glob(f"{name}-*")
                  if p != grid_dir and is_run_dir(p)}
    return {label: grid_dir.parent / f"{name}-{label}" for label in sorted(labels)}


def find_runs(root: str | Path, max_depth: int = 3) -> list[Path]:
    """The run directories at or under ``root`` (not inside a run, not in ``store/``), sorted;
    for a ``tskd grid`` directory, its cells' run directories.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no run.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    if is_run_dir(root):
        return [root]
    cells = grid_cells(root)
    if cells is not None:
        found = [p for p in cells.values() if p.is_dir()]
        if not found:
            raise FileNotFoundError(f"{root}: a grid whose cells have no run directory yet")
        return found
    found: list[Path] = []
    todo = [(root, 0)]
    while todo:
        here, depth = todo.pop()
        for sub in sorted(p for p in here.iterdir() if p.is_dir()):
            if sub.name in SKIP_DIRS or sub.name.startswith("."):
                continue
            if is_run_dir(sub):  # a linked run counts too; links are never searched
                found.append(sub)
            elif depth + 1 < max_depth and not sub.is_symlink():
                todo.append((sub, depth + 1))
    if not found:
        raise FileNotFoundError(f"{root}: no run found (a run directory holds {RESULTS_FILE} or "
                                f"{VIEW_FILE}; expected runs/<experiment> or a directory of them)")
    return sorted(found)


def _entries(run_dir: Path) -> dict[str, Path]:
    """Stage -> its store entry, from ``stages.json`` (else the run's stage links)."""
    view = _read_json(run_dir / VIEW_FILE)
    out: dict[str, Path] = {}
    if isinstance(view, dict) and isinstance(view.get("stages"), dict):
        for stage, rec in view["stages"].items():
            out[stage] = (run_dir / rec.get("entry", stage)).resolve()
    for link in run_dir.iterdir():
        if link.name not in out and (link / "manifest.json").is_file():
            out[link.name] = link.resolve()
    return out


def _closure(stage: str, manifests: dict[str, dict[str, Any]], store: Path | None,
             ) -> dict[str, dict[str, Any]]:
    """The manifests of ``stage`` and of every stage it was computed from (by ``upstream``)."""
    out: dict[str, dict[str, Any]] = {}
    todo = [(stage, manifests.get(stage))]
    while todo:
        name, man = todo.pop()
        if name in out or man is None:
            continue
        out[name] = man
        for up, fp in man.get("upstream", {}).items():
            up_man = manifests.get(up)
            if (up_man is None or up_man.get("fingerprint") != fp) and store is not None:
                up_man = _read_json(store / up / fp / "manifest.json")
            todo.append((up, up_man))
    return out


def _last_line(log_path: Path) -> str:
    """The error's message: the last non-empty line of the traceback before any worker part."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(unreadable error log)"
    main = text.split("\n--- worker traceback", 1)[0]
    lines = [ln.strip() for ln in main.splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty error log)"


def _kd_preset(distill_slice: dict[str, Any] | None) -> str | None:
    """The Table 8 preset whose values a distillation slice has (``ts_kd8`` = the defaults)."""
    from tskd.config import KD_PRESETS

    if not distill_slice:
        return None
    for name, values in KD_PRESETS.items():
        if all(distill_slice.get(k) == v for k, v in values.items()):
            return name
    return None


def _file_mb(path: Any) -> float | None:
    try:
        return round(Path(path).stat().st_size / 2**20, 3) if path else None
    except OSError:
        return None


def _teacher_base_mb(entries: dict[str, Path]) -> float | None:
    """Size of the teacher's base SAM checkpoint file (named in ``teacher/teacher.json``)."""
    info = _read_json(entries["teacher"] / "teacher.json") if "teacher" in entries else None
    return _file_mb(info.get("base_checkpoint")) if isinstance(info, dict) else None


def read_run(path: str | Path, root: str | Path | None = None) -> Run:
    """Read one run directory (see the module docstring)."""
    path = Path(path)
    try:
        name = path.relative_to(root).as_posix() if root is not None else "."
    except ValueError:  # a grid's cells lie beside its directory
        name = "."
    name = path.name if name == "." else name
    results_path = path / RESULTS_FILE
    results = _read_json(results_path)
    entries = _entries(path)
    manifests = {s: m for s, e in entries.items() if (m := _read_json(e / "manifest.json"))}
    run = Run(name, path, results if isinstance(results, dict) else None, manifests, entries)
    done_at = results_path.stat().st_mtime if results_path.is_file() else -math.inf
    for log_path in sorted(path.glob(f"*{ERROR_SUFFIX}")):
        if log_path.stat().st_mtime >= done_at:  # older logs: a later re-run finished
            stage = log_path.name[:-len(ERROR_SUFFIX)]
            run.failures.append(Failure(name, stage, _last_line(log_path), log_path))
    if run.failures and results_path.is_file():
        run.results = None  # results.json is from an earlier run of this directory
    run.config = next((m["config"] for m in manifests.values()
                       if isinstance(m.get("config"), dict)
                       and m["config"].get("experiment") == path.name), {})
    run.rows = _rows(run, _store_of(run))
    return run


def _store_of(run: Run) -> Path | None:
    """The store the run's entries live in (``<store>/<stage>/<fp>``)."""
    return next(iter(run.entries.values())).parent.parent if run.entries else None


def _axes(run: Run, stage: str, store: Path | None) -> dict[str, Any]:
    """Label budget, transfer size, teacher rank/arch and seed of the model of ``stage``
    (the axes that do not apply to it are None)."""
    closure = _closure(stage, run.manifests, store)
    data = closure.get("data") or run.manifests.get("data") or {}
    labels = (data.get("stage_config") or {}).get("data", {}).get("n_labels")
    if labels is None and run.results:
        seen = run.results.get("labelled_images", {}).get("teacher") or {}
        labels = seen.get("total")
    seed = run.results.get("seed") if run.results else None
    if seed is None:
        seed = next((m.get("seed") for m in run.manifests.values() if "seed" in m), None)
    axes: dict[str, Any] = {"labels": labels, "seed": seed, "transfer_size": None, "rank": None,
                            "teacher": None, "data_fp": data.get("fingerprint", "")}
    if "transfer" in closure:
        t = closure["transfer"]
        axes["transfer_size"] = (t.get("metrics", {}).get("transfer/n_images")
                                 or t.get("stage_config", {}).get("transfer", {}).get("n_images"))
    if "teacher" in closure:
        t = closure["teacher"].get("stage_config", {})
        axes["rank"] = t.get("lora", {}).get("rank")
        axes["teacher"] = t.get("arch")
    else:
        for man in closure.values():
            teacher = man.get("stage_config", {}).get("teacher")
            if isinstance(teacher, dict) and teacher.get("arch"):
                axes["teacher"] = teacher["arch"]
    axes["pretrain_s"] = sum(float(m.get("wall_time_s", 0.0)) for s, m in closure.items()
                             if s != stage and s not in SHARED_STAGES) or None
    return axes


def _student_arms(run: Run) -> list[str]:
    if run.results:
        return list(run.results.get("students", {}))
    arms = [s[len("student_"):] for s in run.manifests if s.startswith("student_")]
    arms += [f.stage.split("_", 1)[1] for f in run.failures
             if f.stage.startswith(("student_", "distill_")) and "_" in f.stage]
    arms += list(run.config.get("students", []))  # the run's own config names every arm
    return list(dict.fromkeys(arms))


def _rows(run: Run, store: Path | None) -> list[Row]:
    """The run's models; none for a run that neither finished nor failed (still running, a
    ``--only`` run, a ``tskd tune`` trial that stopped at its objective's stage)."""
    if not run.results and not run.failures:
        return []
    res = run.results or {}
    error = "; ".join(f"{f.stage}: {f.message}" for f in run.failures) or None
    rows: list[Row] = []

    def make(method: str, kind: str, stage: str, scores: dict[str, Any] | None, arch: str,
             model: dict[str, Any] | None = None) -> Row:
        man = run.manifests.get(stage, {})
        metrics = man.get("metrics", {})
        axes = _axes(run, stage, store)
        model = model or {}
        row = Row(run=run.name, method=method, kind=kind, arch=arch, labels=axes["labels"],
                  transfer_size=axes["transfer_size"], rank=axes["rank"],
                  teacher=axes["teacher"], seed=axes["seed"],
                  workers=man.get("config", {}).get("ray", {}).get("num_workers"), scores=scores,
                  pretrain_s=axes["pretrain_s"], finetune_s=man.get("wall_time_s"),
                  params=model.get("params", metrics.get("student/params")),
                  size_mb=model.get("size_mb", metrics.get("student/size_mb")),
                  latency_ms=model.get("latency_ms", metrics.get("student/latency_ms")),
                  stage_dir=run.entries.get(stage), fingerprint=man.get("fingerprint", ""),
                  data_fp=axes["data_fp"])
        if scores is None:
            own = [f for f in run.failures if f.stage in (stage, f"distill_{method}")]
            row.error = "; ".join(f"{f.stage}: {f.message}" for f in own) or error or \
                "not scored (the run has no results.json)"
            _fill_axes_from_config(row, run.config)
        return row

    teacher_man = run.manifests.get("teacher", {})
    teacher = make("teacher", "teacher", "teacher", res.get("teacher"),
                   teacher_man.get("stage_config", {}).get("arch", "sam"))
    teacher.adapter_mb = teacher_man.get("metrics", {}).get("teacher/adapter_mb")
    teacher.base_mb = _teacher_base_mb(run.entries)
    teacher.teacher = teacher.teacher or teacher.arch
    rows.append(teacher)
    for arm in _student_arms(run):
        scores = res.get("students", {}).get(arm)
        method = arm
        if arm == "ts_kd":
            slice_ = run.manifests.get("distill_ts_kd", {}).get("stage_config", {})
            preset = _kd_preset(slice_.get("distill"))
            if preset not in (None, "ts_kd8"):
                method = preset
        arch = (scores or {}).get("arch") or run.manifests.get(f"student_{arm}", {}).get(
            "stage_config", {}).get("student", {}).get("arch", "vit")
        rows.append(make(method, "student", f"student_{arm}", _scores(scores), arch,
                         (scores or {}).get("model")))
    ref = res.get("reference")
    ref_man = run.manifests.get("reference")
    planned = run.config.get("reference", {}).get("arch") not in (None, "none")
    if (ref is not None or ref_man is not None or (run.failures and planned)
            or any(f.stage == "reference" for f in run.failures)):
        arch = ((ref or {}).get("arch")
                or (ref_man or {}).get("stage_config", {}).get("reference", {}).get("arch")
                or run.config.get("reference", {}).get("arch", "reference"))
        row = make("reference", "reference", "reference", _scores(ref), arch,
                   (ref or {}).get("model"))
        row.pretrain_s = None
        rows.append(row)
    return rows


def _fill_axes_from_config(row: Row, config: dict[str, Any]) -> None:
    """Axes of a model that never ran, from the run's own config (the manifests of the
    entries this run built carry it): label budget, seed, and the transfer-set size for a
    student other than scratch."""
    if not config:
        return
    if row.labels is None:
        row.labels = config.get("data", {}).get("n_labels")
    if row.seed is None:
        row.seed = config.get("seed")
    if row.transfer_size is None and row.kind == "student" and row.method != "scratch":
        row.transfer_size = config.get("transfer", {}).get("n_images")


def _scores(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if not entry or "dice" not in entry:
        return None
    return {k: entry.get(k) for k in ("dice", "hd95", "miou", "per_class", "n_images")}


def read_runs(root: str | Path) -> list[Run]:
    """Every run at or under ``root`` (:func:`find_runs`), read. For a grid directory a cell
    whose error ``errors/<cell>.txt`` was recorded after its last ``results.json`` is failed
    (with that error where no stage left its own log)."""
    root = Path(root).expanduser()
    runs = [read_run(p, root) for p in find_runs(root)]
    cells = grid_cells(root) or {}
    errors = {path: root / "errors" / f"{label}.txt" for label, path in cells.items()}
    for run in runs:
        err = errors.get(run.path)
        if err is None or not err.is_file() or run.failures:
            continue
        done = run.path / RESULTS_FILE
        if not done.is_file() or err.stat().st_mtime >= done.stat().st_mtime:
            run.failures.append(Failure(run.name, "cell", _last_line(err), err))
            run.results = None
            run.rows = _rows(run, _store_of(run))
    return runs


def unique_rows(runs: list[Run]) -> list[Row]:
    """All rows, each model once: grid cells that share a store entry (scratch across transfer
    sizes, one teacher per budget) give the same row; the first run's is kept. A failed row is
    dropped where another run scored the same method at the same axes (scratch in a cell
    whose transfer set failed was scored by the cell beside it)."""
    seen: set[tuple[str, str, str, str]] = set()
    out: list[Row] = []
    for run in runs:
        for row in run.rows:
            key = (row.kind, row.method, row.fingerprint or f"{row.run}", row.data_fp)
            if row.fingerprint and key in seen:
                continue
            seen.add(key)
            out.append(row)
    scored = {_axes_key(r) for r in out if not r.failed}
    return [r for r in out if not r.failed or _axes_key(r) not in scored]


def _axes_key(r: Row) -> tuple[Any, ...]:
    return (r.kind, r.method, r.arch, r.labels, r.transfer_size, r.seed)
