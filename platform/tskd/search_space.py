"""Search spaces of ``tskd tune``: ``search_spaces/*.yaml``, parsed and validated on the driver.

A space file holds values only::

    objective: {metric: "teacher:val/dice", mode: max}   # <stage>:<metric of its manifest>
    num_samples: 9                     # trials
    max_concurrent_trials: 2
    seed: 0                            # OptunaSearch (TPE) seed
    resources_per_trial: {cpu: 0.25, gpu: 0}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2, max_t: 4}
    params:                            # dotted experiment-config key -> one distribution
      teacher.lora.rank: {choice: [1, 2, 4, 8]}
      distill.w_logits: {uniform: [0.0, 1.0]}       # [low, high]
      distill.lr: {loguniform: [1.0e-5, 1.0e-3]}    # [low, high], low > 0
      distill.epochs: {int: [1, 4]}                 # [low, high], both included
      distill.w_hidden: {quniform: [0.0, 1.0, 0.1]} # [low, high, q]

Defaults live in the dataclasses below (as for experiment configs). Every error is a
:class:`~tskd.config.ConfigError` naming the file and the entry, raised before Ray starts: unknown
keys, a parameter that is not a value of the experiment config, a malformed distribution, and a
value the experiment config would reject (each ``choice`` value and both bounds of a range are
checked against the experiment's own validation).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, get_type_hints

from tskd.config import (ConfigError, ExperimentConfig, _from_dict, _merge, config_from_dict,
                         nest, read_yaml_mapping, to_dict)

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "quniform")
_ARITY = {"uniform": 2, "loguniform": 2, "int": 2, "quniform": 3}
_METRIC = re.compile(r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_./-]+$")


@dataclass
class Objective:
    """What the search optimises: ``<stage>:<metric>`` from that stage's manifest metrics."""

    metric: str = "teacher:val/dice"
    mode: Literal["max", "min"] = "max"


@dataclass
class Resources:
    """Resources of one trial's driver (its stages' Ray Train workers and Ray Data actors ask for
    their own). What the trials hold at once is not free for their stages: ``tskd tune`` checks
    that one stage still fits (:func:`tskd.stages.ray_train.check_trial_room`)."""

    cpu: float = 0.25
    gpu: float = 0.0


@dataclass
class SchedulerConfig:
    """Early stopping on intermediate results (``training_iteration`` = the trial's reports)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 4
    rung_every: int = 0
    """For an objective on a student (``student_<arm>:...``/``distill_<arm>:...``): every this many
    distillation epochs a rung reports a short fine-tune's validation Dice as an intermediate
    result (sets ``distill.rung_every``; ``tskd.stages.rungs``), so ASHA stops trials inside
    distillation. 0: one result per trial."""


@dataclass
class Distribution:
    """One parameter's distribution: ``kind`` in :data:`DISTRIBUTIONS` and its arguments
    (``choice``: the values; ``int``: inclusive ``[low, high]``; ``quniform``: ``[low, high, q]``;
    ``uniform``/``loguniform``: ``[low, high]``)."""

    kind: str
    args: list[Any]

    def representatives(self) -> list[Any]:
        """Values checked against the experiment config: every choice, or both bounds."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "int":
            return [int(self.args[0]), int(self.args[1])]
        return [float(self.args[0]), float(self.args[1])]


@dataclass
class SpaceSettings:
    """Everything in a space file but ``params`` (defaults here, values in the YAML)."""

    objective: Objective = field(default_factory=Objective)
    num_samples: int = 12
    max_concurrent_trials: int = 2
    seed: int = 0
    resources_per_trial: Resources = field(default_factory=Resources)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class SearchSpace(SpaceSettings):
    """A parsed, validated search space (see the module docstring)."""

    params: dict[str, Distribution] = field(default_factory=dict)
    source: str = "<space>"

    @property
    def objective_stage(self) -> str:
        return self.objective.metric.split(":", 1)[0]

    def overrides(self, sample: dict[str, Any]) -> list[str]:
        """``--set`` strings for one trial's sampled values (dotted key -> value)."""
        return [f"{key}={json.dumps(value)}" for key, value in sorted(sample.items())]

    def to_tune(self) -> dict[str, Any]:
        """The ``param_space`` of a Ray Tune ``Tuner`` (dotted key -> a ``ray.tune`` domain)."""
        from ray import tune

        out = {}
        for key, d in self.params.items():
            if d.kind == "choice":
                out[key] = tune.choice(list(d.args))
            elif d.kind == "uniform":
                out[key] = tune.uniform(*map(float, d.args))
            elif d.kind == "loguniform":
                out[key] = tune.loguniform(*map(float, d.args))
            elif d.kind == "int":
                out[key] = tune.randint(int(d.args[0]), int(d.args[1]) + 1)  # upper exclusive
            else:
                out[key] = tune.quniform(*map(float, d.args))
        return out


_SETTINGS = [f.name for f in dataclasses.fields(SpaceSettings)]


def load_space(path: str | Path, base: ExperimentConfig | None = None,
               stages: Iterable[str] | None = None) -> SearchSpace:
    """Read and validate a space file against the experiment config ``base``.

    Args:
        stages: the experiment's stage names; when given, the objective's stage must be one.

    Raises:
        ConfigError: naming the file and the entry (``params.teacher.lora.rank``, ``scheduler.
            max_t``...), the value and what is allowed.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "search space file")
    try:
        return parse_space(data, base or ExperimentConfig(), stages, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_space(data: Any, base: ExperimentConfig, stages: Iterable[str] | None = None,
                source: str = "<space>") -> SearchSpace:
    """:func:`load_space` on an already-loaded mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
    unknown = [k for k in data if k not in _SETTINGS and k != "params"]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; allowed keys: {_SETTINGS + ['params']}")
    settings = _from_dict(SpaceSettings, {k: v for k, v in data.items() if k != "params"})
    _validate_settings(settings, stages)
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"params: invalid value {raw!r}; allowed: a non-empty mapping of "
                          "dotted config keys to distributions, e.g. "
                          "{teacher.lora.rank: {choice: [2, 4, 8]}}")
    base_dict = trial_base(to_dict(base), settings.objective.metric.split(":", 1)[0])
    params = {}
    for key, spec in raw.items():
        entry = f"params.{key}"
        _check_key(str(key), entry)
        dist = _parse_distribution(spec, entry)
        for value in dist.representatives():
            try:
                config_from_dict(_merge(base_dict, nest(str(key), value)))
            except ConfigError as exc:
                raise ConfigError(f"{entry}: {dist.kind} value {value!r} is not a valid "
                                  f"experiment config: {exc}") from None
        params[str(key)] = dist
    return SearchSpace(**{f.name: getattr(settings, f.name)
                          for f in dataclasses.fields(SpaceSettings)},
                       params=params, source=source)


def trial_base(base: dict[str, Any], objective_stage: str, rung_every: int = 0
               ) -> dict[str, Any]:
    """The experiment config (as a dict) a trial starts from. Trials run the pipeline only up to
    the objective's stage, so a student arm other than the objective's never runs: it is dropped
    from ``students``, and with it the checks only that arm needs (task-agnostic KD's hidden
    term, say, when a KD-weights search samples ``distill.w_hidden = 0``). ``rung_every``
    (the scheduler's) sets ``distill.rung_every``."""
    if rung_every:
        base = _merge(base, {"distill": {"rung_every": rung_every}})
    for prefix in ("student_", "distill_", "pretrain_", "init_"):
        arm = objective_stage[len(prefix):] if objective_stage.startswith(prefix) else None
        if arm in base.get("students", ()):
            return {**base, "students": [arm]}
    return base


def _validate_settings(s: SpaceSettings, stages: Iterable[str] | None) -> None:
    def check(cond: bool, name: str, value: Any, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"{name}: invalid value {value!r}; allowed: {allowed}")

    check(bool(_METRIC.match(s.objective.metric)), "objective.metric", s.objective.metric,
          "'<stage>:<metric>', e.g. 'teacher:val/dice' or 'student_ts_kd:val/dice'")
    if stages is not None:
        names = list(stages)
        stage = s.objective.metric.split(":", 1)[0]
        check(stage in names, "objective.metric", s.objective.metric,
              f"a metric of one of this experiment's stages {names}")
    check(s.num_samples >= 1, "num_samples", s.num_samples, "an integer >= 1")
    check(s.max_concurrent_trials >= 1, "max_concurrent_trials", s.max_concurrent_trials,
          "an integer >= 1")
    check(s.resources_per_trial.cpu >= 0, "resources_per_trial.cpu", s.resources_per_trial.cpu,
          "a number >= 0")
    check(s.resources_per_trial.gpu >= 0, "resources_per_trial.gpu", s.resources_per_trial.gpu,
          "a number >= 0")
    sch = s.scheduler
    check(sch.grace_period >= 1, "scheduler.grace_period", sch.grace_period, "an integer >= 1")
    check(sch.reduction_factor >= 2, "scheduler.reduction_factor", sch.reduction_factor,
          "an integer >= 2")
    check(sch.max_t >= sch.grace_period, "scheduler.max_t", sch.max_t,
          f"an integer >= scheduler.grace_period ({sch.grace_period})")
    check(sch.rung_every >= 0, "scheduler.rung_every", sch.rung_every, "an integer >= 0")
    check(sch.rung_every == 0 or s.objective.metric.startswith(("student_", "distill_")),
          "scheduler.rung_every", sch.rung_every,
          "0 unless the objective is a student's (rungs fall inside distillation)")


def _check_key(key: str, entry: str) -> None:
    """``key`` names a value (not a section) of :class:`ExperimentConfig`."""
    node: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the experiment config"
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise ConfigError(f"{entry}: unknown config key ({where} is a value, not a section)")
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            raise ConfigError(f"{entry}: unknown config key; keys of {where}: {list(fields)}")
        node = _field_type(node, part)
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        raise ConfigError(f"{entry}: {key} is a section; name one of its values: "
                          f"{[f.name for f in dataclasses.fields(node)]}")


def _field_type(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


def _parse_distribution(spec: Any, entry: str) -> Distribution:
    example = ("one of {choice: [v1, v2, ...]}, {uniform: [low, high]}, "
               "{loguniform: [low, high]}, {int: [low, high]}, {quniform: [low, high, q]}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{entry}: invalid distribution {spec!r}; allowed: {example}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{entry}: unknown distribution {kind!r}; allowed: {example}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{entry}.{kind}: invalid value {args!r}; allowed: a non-empty list")

    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{entry}.{kind}: invalid value {args!r}; allowed: {allowed}")

    if kind == "choice":
        if any(a in args[:i] for i, a in enumerate(args)):
            raise bad("distinct values")
        return Distribution(kind, list(args))
    n = _ARITY[kind]
    if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                 for a in args):
        raise bad(f"{n} numbers [low, high{', q' if n == 3 else ''}]")
    low, high = args[0], args[1]
    if kind == "int":
        if not all(isinstance(a, int) for a in args) or low > high:
            raise bad("two integers [low, high] with low <= high (both included)")
    elif low >= high:
        raise bad("[low, high] with low < high")
    if kind == "loguniform" and low <= 0:
        raise bad("[low, high] with 0 < low < high")
    if kind == "quniform" and not args[2] > 0:
        raise bad("[low, high, q] with q > 0")
    return Distribution(kind, list(args))


