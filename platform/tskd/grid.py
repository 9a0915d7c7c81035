"""``tskd grid GRID.yaml``: the paper's comparison as an experiment grid on Ray Tune.

A grid file holds values only::

    base: demo.yaml            # an experiment config (path relative to the grid file); optional
    set: {distill: {epochs: 3}}   # values on top of it; optional
    name: demo-grid            # default: the grid file's stem
    axes:
      methods: [scratch, ta_kd, ts_kd, ts_kd5]   # student arms, or Table 8's ts_kdN presets
      transfer_sizes: [100, 200]                 # transfer.n_images
      label_budgets: [20, 40]                    # data.n_labels
      lora_ranks: [4]                            # teacher.lora.rank
      teachers: [sam_demo]                       # teacher.arch
      students: [vit16, resnet18]                # STUDENT_PRESETS names (student.*)
      workers: [1, 2, 4]                         # ray.num_workers (scaling studies)
      seeds: [0]
    global_batch: 48           # with a workers axis: distill.batch_size = global_batch / workers
    teacher_checkpoints: {vit_b: /models/sam_vit_b_01ec64.pth}   # per official teacher
    max_concurrent: 2
    resources_per_cell: {cpu: 1, gpu: 0}

Every combination of the axes is a *cell*: one experiment ``<name>-<cell>`` whose students are
that method's arm (``ts_kdN``: arm ``ts_kd`` with ``distill.preset: ts_kdN``), with the label-only
reference beside it. All cells write under one ``output_dir``, so they share the artifact store:
a teacher is fine-tuned once per (label budget, rank, teacher, seed), the DDPM once per (labels,
seed), a transfer set sampled from it once per (size, labels, seed), a pre-trained student once
per (method, its inputs) — whatever the stages' fingerprints say is the same is built once.

The cells run as the trials of a Ray Tune grid search (as many at once as
``max_concurrent`` and the resources allow). A cell whose ``results.json`` matches its config
(same ``config_fingerprint``) is finished and skipped when the grid runs again; a failed cell
records its error (``<grid dir>/errors/<cell>.txt``) and the others go on. The results table
(``grid.csv``, ``grid.parquet`` in ``<output_dir>/<name>-grid/``) has one row per cell: its axes,
status, mean and per-class Dice / HD95 / mIoU of the cell's student, the teacher's and the
reference's mean Dice, the metric conventions, the distillation (pre-training) and fine-tuning
wall times, the teacher's size and adapter size and the student's size in MB.
"""

from __future__ import annotations

import itertools
import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tskd.config import (KD_PRESETS, STUDENT_ARMS, STUDENT_PRESETS, ConfigError,
                         ExperimentConfig, _merge, config_from_dict, fingerprint,
                         read_yaml_mapping, to_dict)

log = logging.getLogger(__name__)

#: grid axis -> (config key it sets, what a value must be)
AXES: dict[str, tuple[str, str]] = {
    "methods": ("students", "a student arm or a ts_kdN preset"),
    "transfer_sizes": ("transfer.n_images", "an integer >= 1"),
    "label_budgets": ("data.n_labels", "an integer >= 2"),
    "lora_ranks": ("teacher.lora.rank", "an integer >= 1"),
    "teachers": ("teacher.arch", "a SAM architecture"),
    "students": ("student", "a name of STUDENT_PRESETS"),
    "workers": ("ray.num_workers", "an integer >= 1"),
    "seeds": ("seed", "an integer"),
}
GRID_KEYS = ("base", "set", "name", "axes", "teacher_checkpoints", "max_concurrent",
             "resources_per_cell", "global_batch")


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid."""

    name: str
    axes: dict[str, Any]
    config: ExperimentConfig


@dataclass
class Grid:
    name: str
    path: Path
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)
    max_concurrent: int = 1
    cpu: float = 1.0
    gpu: float = 0.0
    global_batch: int | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.base.get("output_dir", "runs")).expanduser().resolve()

    @property
    def dir(self) -> Path:
        return self.output_dir / f"{self.name}-grid"


def methods() -> list[str]:
    """Values of the ``methods`` axis: the student arms and Table 8's presets."""
    return [*STUDENT_ARMS, *KD_PRESETS]


def _fail(path: Path, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: invalid value {value!r}; allowed: {allowed}")


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid file; every cell's config is validated here (on the driver).

    Raises:
        ConfigError: naming the file, the key (or the cell and config field) and the value.
    """
    from tskd.config import parse_override

    path = Path(path)
    data = read_yaml_mapping(path, "grid file")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise _fail(path, unknown[0], data[unknown[0]], f"one of {list(GRID_KEYS)}")
    base: dict[str, Any] = {}
    if data.get("base") is not None:
        base = read_yaml_mapping((path.parent / str(data["base"])).resolve(), "base config")
    if data.get("set") is not None:
        if not isinstance(data["set"], dict):
            raise _fail(path, "set", data["set"], "a mapping of config values")
        base = _merge(base, data["set"])
    for text in overrides or []:
        base = _merge(base, parse_override(text))
    try:
        base = to_dict(config_from_dict(base))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "://" in base["output_dir"] and not base["output_dir"].startswith("file://"):
        raise ConfigError(f"{path}: output_dir: invalid value {base['output_dir']!r}; allowed "
                          "for tskd grid: a local directory or a shared mount (object stores: "
                          "tskd run only)")
    # cells run in Tune's trial directories: every path absolute (relative ones: to the cwd)
    base["output_dir"] = str(Path(base["output_dir"]).expanduser().resolve())
    if base["data"]["root"] is not None:
        base["data"]["root"] = str(Path(base["data"]["root"]).expanduser().resolve())
    if base["teacher"]["checkpoint"] is not None:
        base["teacher"]["checkpoint"] = str(Path(base["teacher"]["checkpoint"]).expanduser()
                                            .resolve())
    axes = data.get("axes")
    if not isinstance(axes, dict) or "methods" not in axes:
        raise _fail(path, "axes", axes, f"a mapping with 'methods' and any of {list(AXES)}")
    for key, values in axes.items():
        if key not in AXES:
            raise _fail(path, f"axes.{key}", values, f"one of {list(AXES)}")
        if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
            raise _fail(path, f"axes.{key}", values, "a non-empty list of distinct values")
    for m in axes["methods"]:
        if m not in methods():
            raise _fail(path, "axes.methods", m, f"one of {methods()}")
    for s in axes.get("students", []):
        if s not in STUDENT_PRESETS:
            raise _fail(path, "axes.students", s, f"one of {list(STUDENT_PRESETS)}")
    res = data.get("resources_per_cell") or {}
    if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
        raise _fail(path, "resources_per_cell", res, "a mapping with cpu and/or gpu")
    concurrent = data.get("max_concurrent", 1)
    if not isinstance(concurrent, int) or concurrent < 1:
        raise _fail(path, "max_concurrent", concurrent, "an integer >= 1")
    global_batch = data.get("global_batch")
    if global_batch is not None:
        if not isinstance(global_batch, int) or global_batch < 1:
            raise _fail(path, "global_batch", global_batch, "an integer >= 1")
        for n in axes.get("workers", []):
            if not isinstance(n, int) or n < 1 or global_batch % n:
                raise _fail(path, "axes.workers", n,
                            f"integers >= 1 that divide global_batch={global_batch}")
    checkpoints = data.get("teacher_checkpoints") or {}
    if not isinstance(checkpoints, dict):
        raise _fail(path, "teacher_checkpoints", checkpoints, "a mapping teacher -> file")
    grid = Grid(name=str(data.get("name") or path.stem), path=path, base=base,
                axes={k: list(v) for k, v in axes.items()},
                teacher_checkpoints={k: str((path.parent / v).resolve()) if not Path(v).is_absolute()
                                     else str(v) for k, v in checkpoints.items()},
                max_concurrent=concurrent, cpu=float(res.get("cpu", 1.0)),
                gpu=float(res.get("gpu", 0.0)), global_batch=global_batch)
    cells(grid)  # every cell's config validates now, before Ray starts
    return grid


def cells(grid: Grid) -> list[Cell]:
    """Every combination of the axes, as validated experiment configs (axis order as in
    :data:`AXES`; an axis the grid does not list keeps the base config's value)."""
    names = [a for a in AXES if a in grid.axes]
    out = []
    for combo in itertools.product(*(grid.axes[a] for a in names)):
        axes = dict(zip(names, combo))
        label = "-".join(_short(a, v) for a, v in axes.items())
        data = dict(grid.base, experiment=f"{grid.name}-{label}")
        for axis, value in axes.items():
            data = _merge(data, _setting(grid, axis, value))
        try:
            cfg = config_from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{grid.path}: cell {label}: {exc}") from None
        out.append(Cell(label, axes, cfg))
    return out


def _short(axis: str, value: Any) -> str:
    prefix = {"methods": "", "transfer_sizes": "n", "label_budgets": "l", "lora_ranks": "r",
              "teachers": "", "students": "", "workers": "w", "seeds": "s"}[axis]
    return f"{prefix}{value}"


def _setting(grid: Grid, axis: str, value: Any) -> dict[str, Any]:
    from tskd.config import nest

    if axis == "methods":
        if value in KD_PRESETS:
            return {"students": ["ts_kd"], "distill": {"preset": value}}
        return {"students": [value]}
    if axis == "students":
        return {"student": dict(STUDENT_PRESETS[value])}
    if axis == "workers" and grid.global_batch is not None:
        return {"ray": {"num_workers": value},
                "distill": {"batch_size": grid.global_batch // value}}
    if axis == "teachers":
        teacher: dict[str, Any] = {"arch": value}
        if value in grid.teacher_checkpoints:
            teacher["checkpoint"] = grid.teacher_checkpoints[value]
        return {"teacher": teacher}
    return nest(AXES[axis][0], value)


def is_done(cell: Cell) -> bool:
    """The cell's ``results.json`` exists and was written for exactly this config (with
    ``data.image_size: auto`` resolved, as the run resolved it)."""
    from tskd.data.fingerprint import resolve_image_size

    results = cell.config.run_dir / "results.json"
    if not results.is_file():
        return False
    try:
        return json.loads(results.read_text()).get("config_fingerprint") == fingerprint(
            to_dict(resolve_image_size(cell.config)))
    except (OSError, ValueError):
        return False


def _cell_trial(params: dict[str, Any], *, configs: dict[str, dict[str, Any]],
                errors: str, planner: Any) -> None:
    """Tune function trainable: run one cell's pipeline; a failure is recorded, not raised."""
    from ray import tune

    from tskd.pipeline import run_pipeline
    from tskd.stages.ray_train import configure_worker_logging

    configure_worker_logging()  # the cell's stage lines reach the console, as in tskd run
    name = params["cell"]
    cfg = config_from_dict(configs[name])
    try:
        run_pipeline(cfg, planner=planner)
    except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid
        path = Path(errors) / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.error("cell %s failed: %s (%s)", name, first, path)
        tune.report({"failed": True, "error": f"{type(exc).__name__}: {first}"})
        return
    tune.report({"failed": False, "error": ""})


def run_grid(grid: Grid, *, planner: Any = None) -> list[dict[str, Any]]:
    """Run the grid's unfinished cells as Tune trials (Ray must be initialised); write and
    return the results table (one row per cell)."""
    from ray import tune

    all_cells = cells(grid)
    todo = [c for c in all_cells if not is_done(c)]
    grid.dir.mkdir(parents=True, exist_ok=True)
    (grid.dir / "grid.yaml").write_text(yaml.safe_dump(
        {"name": grid.name, "axes": grid.axes, "base": grid.base}, sort_keys=False))
    log.info("grid %s: %d cells, %d finished before, %d to run (%d at once)", grid.name,
             len(all_cells), len(all_cells) - len(todo), len(todo), grid.max_concurrent)
    for stale in todo:  # an old error of a cell that now runs again
        (grid.dir / "errors" / f"{stale.name}.txt").unlink(missing_ok=True)
    if todo:
        from tskd.stages.ray_train import check_trial_room

        try:
            check_trial_room(todo[0].config.ray, trials=min(grid.max_concurrent, len(todo)),
                             cpu_per_trial=grid.cpu,
                             fields=("max_concurrent", "resources_per_cell.cpu"))
        except ConfigError as exc:
            raise ConfigError(f"{grid.path}: {exc}") from None
        trainable = tune.with_resources(
            tune.with_parameters(_cell_trial, configs={c.name: to_dict(c.config) for c in todo},
                                 errors=str(grid.dir / "errors"), planner=planner),
            {"cpu": grid.cpu, "gpu": grid.gpu})
        tuner = tune.Tuner(
            trainable, param_space={"cell": tune.grid_search([c.name for c in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=grid.max_concurrent),
            run_config=tune.RunConfig(name=f"tune-{len(list(grid.dir.glob('tune-*')))}",
                                      storage_path=str(grid.dir), verbose=0,
                                      callbacks=[_progress(len(todo))]))
        tuner.fit()
    rows = [cell_row(c, grid.dir) for c in all_cells]
    _write_table(rows, grid.dir)
    return rows


def _progress(total: int) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            self.done += 1
            state = "FAILED: " + result["error"] if result.get("failed") else "done"
            log.info("cell %s %s (%d/%d)", trial.config["cell"], state, self.done, total)

    return Progress()


def cell_row(cell: Cell, grid_dir: Path) -> dict[str, Any]:
    """The cell's row of the results table (status ``done``, ``failed`` or ``missing``)."""
    row: dict[str, Any] = {"cell": cell.name, **{k: _axis_value(v) for k, v in cell.axes.items()}}
    error = grid_dir / "errors" / f"{cell.name}.txt"
    if not is_done(cell):
        row["status"] = "failed" if error.is_file() else "missing"
        if error.is_file():
            lines = error.read_text().strip().splitlines()
            row["error"] = lines[-1] if lines else ""
        return row
    results = json.loads((cell.config.run_dir / "results.json").read_text())
    (arm,) = cell.config.students
    scores = results["students"][arm]
    row["status"] = "done"
    for metric in ("dice", "hd95", "miou"):
        row[metric] = scores.get(metric)
        for cls, per in (scores.get("per_class") or {}).items():
            row[f"{metric}/{cls}"] = per.get(metric)
    row["teacher_dice"] = results.get("teacher", {}).get("dice")
    row["reference_dice"] = (results.get("reference") or {}).get("dice")
    conv = results.get("metrics", {})
    row["convention"] = conv.get("convention")
    row["hd95_unit"] = conv.get("hd95_unit")
    stages = _stage_times(cell.config.run_dir)
    row["pretrain_s"] = sum(t for s, t in stages.items()
                            if s.startswith(("distill_", "pretrain_")))
    row["finetune_s"] = stages.get(f"student_{arm}")
    teacher = _manifest_metrics(cell.config.run_dir / "teacher")
    row["teacher_mb"] = _teacher_mb(cell.config, len(scores.get("per_class") or {}) + 1)
    row["adapter_mb"] = teacher.get("teacher/adapter_mb")
    model = scores.get("model") or {}
    row["student_mb"] = model.get("size_mb")
    row["student_params"] = model.get("params")
    row["student_latency_ms"] = model.get("latency_ms")
    return row


def _teacher_mb(cfg: ExperimentConfig, num_classes: int) -> float:
    """fp32 size of the teacher (a ``meta``-device build: no memory)."""
    from tskd.memory_plan import teacher_size

    t = teacher_size(cfg.teacher.arch, cfg.teacher.img_size, num_classes)
    return round(t.params * 4 / 2**20, 1)


def _axis_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str)) else str(v)


def _stage_times(run_dir: Path) -> dict[str, float]:
    times = {}
    for manifest in run_dir.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        times[data["stage"]] = data.get("wall_time_s")
    return times


def _manifest_metrics(stage_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((stage_dir / "manifest.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


def _write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "grid.csv", index=False)
    df.to_parquet(out / "grid.parquet", index=False)


def format_grid(rows: list[dict[str, Any]]) -> str:
    """A short text table: cell, status, Dice, HD95, teacher and reference Dice."""
    head = ["cell", "status", "dice", "hd95", "teacher_dice", "reference_dice"]
    lines = [head]
    for r in rows:
        lines.append([f"{r.get(c):.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                      for c in head])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)
