"""The report's tables, as the paper presents them (core: numpy + scipy).

* :func:`paper_tables` — Tables 1–5: per-class Dice and HD95 plus their means (and mIoU), one
  block per label budget, one row per method × transfer-set size; mean ± std over seeds;
* :func:`compute_table` — Table 6: pre-training and fine-tuning time, mean-Dice change over
  scratch in %; :func:`shared_stage_table`: the teacher's and the transfer set's time;
* :func:`memory_table` — Table 7: teacher base and adapter size, student size;
* :func:`deploy_table` — which student to deploy: Dice vs CPU latency vs size, the Pareto front,
  the best against the label-only reference;
* :func:`seed_tests_table` — paired tests across seeds (``scipy.stats.ttest_rel``, ``wilcoxon``);
* :func:`transfer_table` — Table 16: the transfer set's quality report;
* :func:`failures_table` — failed stages.

Every table is a :class:`Table` of :class:`Cell`; numbers carry ``data-value`` (the unrounded
value) so readers and tests need not parse the formatted text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tskd.report.collect import Row, Run

METHOD_ORDER = ("teacher", "scratch", "imagenet_mae", "mae", "mocov3", "ta_kd", "ts_kd",
                *(f"ts_kd{i}" for i in range(1, 9)))
"""Row order of the tables (others follow in name order, the reference last)."""
METHOD_NAMES = {"teacher": "Teacher (LoRA SAM)", "scratch": "Scratch", "imagenet_mae":
                "ImageNet MAE", "mae": "MAE", "mocov3": "MoCo v3", "ta_kd": "Task-agnostic KD",
                "ts_kd": "TS-KD", "reference": "Reference (labels only)"}
BASELINES = ("scratch", "reference")
"""Methods every other method is tested against, paired by seed."""


@dataclass
class Cell:
    """One table cell: its text, CSS class, ``data-*`` attributes, span and header flag."""

    text: str
    cls: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    colspan: int = 1
    header: bool = False


@dataclass
class Table:
    """A titled table: header rows and body rows of cells (``row_cls``: a class per body row)."""

    id: str
    title: str
    head: list[list[Cell]]
    body: list[list[Cell]]
    caption: str = ""
    row_cls: list[str] = field(default_factory=list)


def method_name(method: str) -> str:
    if method in METHOD_NAMES:
        return METHOD_NAMES[method]
    if method.startswith("ts_kd") and method[5:].isdigit():
        return f"TS-KD{method[5:]}"
    return method


def method_key(method: str) -> tuple[int, str]:
    if method == "reference":
        return (len(METHOD_ORDER) + 1, method)
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ------------------------------------------------------------------------------ groups of seeds


@dataclass
class Group:
    """The rows of one configuration over seeds (everything equal but the seed)."""

    method: str
    kind: str
    arch: str
    labels: int | None
    transfer_size: int | None
    rank: int | None
    teacher: str | None
    workers: int | None
    rows: list[Row]

    @property
    def ok(self) -> list[Row]:
        return [r for r in self.rows if not r.failed]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    def values(self, metric: str, cls: str | None = None) -> np.ndarray:
        """The metric over the scored seeds (NaN where a seed has none)."""
        return np.array([r.metric(metric, cls) for r in self.ok], dtype=np.float64)

    def stat(self, metric: str, cls: str | None = None) -> tuple[float, float, int]:
        """(mean, sample std (NaN for one seed), n) over the seeds with a finite value."""
        v = self.values(metric, cls)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return math.nan, math.nan, 0
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)

    def mean_of(self, attr: str) -> float | None:
        vals = [getattr(r, attr) for r in self.rows if getattr(r, attr) is not None]
        return float(np.mean(vals)) if vals else None


def group_rows(rows: Iterable[Row]) -> list[Group]:
    """Rows grouped over seeds, in table order (method, label budget, transfer size, rank)."""
    groups: dict[tuple[Any, ...], Group] = {}
    for r in rows:
        key = (r.method, r.kind, r.arch, r.labels, r.transfer_size, r.rank, r.teacher,
               r.workers)
        # a failed model is its own row (its run named), never mixed into a scored mean
        full = key + (None if not r.failed else r.run,)
        groups.setdefault(full, Group(*key, rows=[])).rows.append(r)
    return sorted(groups.values(), key=_group_key)


def _group_key(g: Group) -> tuple[Any, ...]:
    return (_none_last(g.labels), method_key(g.method), _none_last(g.transfer_size),
            _none_last(g.rank), g.teacher or "", g.arch, _none_last(g.workers))


def _none_last(v: Any) -> tuple[int, Any]:
    return (1, 0) if v is None else (0, v)


# ------------------------------------------------------------------------------ formatting


def fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _num(value: float | None, digits: int, **attrs: str) -> Cell:
    data = {"data-value": "" if value is None or not math.isfinite(value) else repr(float(value))}
    return Cell(fmt(value, digits), "num", data | attrs)


def _stat_cell(g: Group, metric: str, cls: str | None, digits: int) -> Cell:
    mean, std, n = g.stat(metric, cls)
    text = fmt(mean, digits) + (f" ± {fmt(std, digits)}" if n > 1 else "")
    attrs = {"data-metric": metric, "data-class": cls or "mean",
             "data-value": repr(mean) if math.isfinite(mean) else "", "data-n": str(n)}
    if n > 1:
        attrs["data-std"] = repr(std)
    return Cell(text, "num", attrs)


def _label(g: Group, detail: frozenset[str] = frozenset()) -> list[Cell]:
    """Method name and transfer-set size. The reference names its arch, the teacher its rank;
    ``detail`` (:func:`_varying`) adds what tells rows apart where a table mixes several
    teachers (``teacher``), student architectures (``arch``) or worker counts (``workers``)."""
    name = method_name(g.method)
    if g.kind == "reference":
        name = f"{name}: {g.arch}"
    if "teacher" in detail and g.rank is not None:
        name += f" [{g.teacher} r={g.rank}]"
    elif g.kind == "teacher" and g.rank is not None:
        name += f" r={g.rank}"
    if "arch" in detail and g.kind == "student":
        name += f" [{g.arch}]"
    if "workers" in detail and g.workers is not None:
        name += f" [{g.workers} workers]"
    return [Cell(name, "method", {"data-method": g.method}),
            Cell("–" if g.transfer_size is None else str(g.transfer_size), "num")]


def _varying(groups: Iterable[Group]) -> frozenset[str]:
    """Which of teacher (arch, rank), student arch and worker count vary among ``groups``."""
    groups = list(groups)
    out = set()
    if len({(g.teacher, g.rank) for g in groups if g.rank is not None}) > 1:
        out.add("teacher")
    if len({g.arch for g in groups if g.kind == "student"}) > 1:
        out.add("arch")
    if len({g.workers for g in groups if g.kind != "teacher" and g.workers is not None}) > 1:
        out.add("workers")
    return frozenset(out)


# ------------------------------------------------------------------------------ Tables 1–5


def paper_tables(rows: list[Row], classes: list[str], hd95_unit: str) -> list[Table]:
    """One table per label budget: per-class Dice, mean Dice, per-class HD95, mean HD95, mIoU
    per method × transfer size (× teacher and rank, named in the row, where a budget has
    several); mean ± std over seeds. The label-only reference row is always there (``not
    run`` where the runs had none); each failed model is a row marked ``failed`` with its run
    and error."""
    groups = group_rows(rows)
    labels = sorted({g.labels for g in groups}, key=_none_last)
    tables = []
    for budget in labels:
        block = [g for g in groups if g.labels == budget]
        n_seeds = max(len(g.rows) for g in block)
        unit = f" ({hd95_unit})" if hd95_unit else ""
        head = [[Cell("Method", header=True), Cell("Transfer set", header=True),
                 Cell("Seeds", header=True)]
                + [Cell(f"Dice {c}", header=True) for c in classes]
                + [Cell("Mean Dice", header=True)]
                + [Cell(f"HD95 {c}{unit}", header=True) for c in classes]
                + [Cell(f"Mean HD95{unit}", header=True), Cell("mIoU", header=True)]]
        body, row_cls = [], []
        detail = _varying(block)
        students = [g for g in block if g.kind == "student" and g.ok]
        best = max((g.stat("dice")[0] for g in students), default=math.nan)
        for g in block:
            label = _label(g, detail)
            seeds = Cell(str(len(g.ok)), "num")  # a group is all scored or all failed
            if not g.ok:
                err = g.failed[0].error or "failed"
                body.append(label + [seeds, Cell(f"failed ({g.failed[0].run}): {err}", "failed",
                                                 colspan=2 * len(classes) + 3)])
                row_cls.append("failed")
                continue
            cells = [_stat_cell(g, "dice", c, 4) for c in [*classes, None]]
            if g.kind == "student" and math.isfinite(best) and g.stat("dice")[0] == best:
                cells[-1].cls += " best"
            cells += [_stat_cell(g, "hd95", c, 2) for c in classes]
            cells += [_stat_cell(g, "hd95", None, 2), _stat_cell(g, "miou", None, 4)]
            body.append(label + [seeds] + cells)
            row_cls.append(g.kind)
        if not any(g.kind == "reference" for g in block):
            body.append([Cell(method_name("reference"), "method", {"data-method": "reference"}),
                         Cell("–"), Cell("0", "num"),
                         Cell("not run (reference.arch: none, or its run stopped before it)",
                              "failed", colspan=2 * len(classes) + 3)])
            row_cls.append("reference missing")
        title = f"{budget} labelled images" if budget is not None else "label budget unknown"
        caption = ("Test-split scores per method (Tables 1–5 of the paper); "
                   + ("mean ± sample std over seeds. " if n_seeds > 1 else "one seed. ")
                   + "Bold: the best student by mean Dice.")
        tables.append(Table(f"paper-labels-{budget}", title, head, body, caption, row_cls))
    return tables


# ------------------------------------------------------------------------------ Table 6


def compute_table(rows: list[Row]) -> Table:
    """Pre-training and fine-tuning wall time per method (means over seeds) and the mean-Dice
    change over scratch at the same label budget, in % (Table 6)."""
    groups = group_rows(rows)
    scratch = {g.labels: g.stat("dice")[0] for g in groups if g.method == "scratch" and g.ok}
    head = [[Cell(h, header=True) for h in ("Method", "Transfer set", "Labels",
                                            "Pre-training (s)", "Fine-tuning (s)", "Mean Dice",
                                            "Δ Dice vs scratch (%)")]]
    body = []
    detail = _varying(groups)
    for g in groups:
        dice = g.stat("dice")[0]
        base = scratch.get(g.labels, math.nan)
        gain = (dice - base) / base * 100 if math.isfinite(base) and base > 0 else math.nan
        body.append(_label(g, detail) + [
            Cell("–" if g.labels is None else str(g.labels), "num"),
            _num(g.mean_of("pretrain_s"), 1, **{"data-col": "pretrain_s"}),
            _num(g.mean_of("finetune_s"), 1, **{"data-col": "finetune_s"}),
            _num(dice, 4, **{"data-col": "dice"}),
            _num(gain if g.method != "scratch" else math.nan, 1, **{"data-col": "gain"})])
    return Table("compute", "Compute (Table 6)", head, body,
                 "Wall time of each model's own stages (the teacher: its LoRA fine-tuning; "
                 "a KD student: its distillation as pre-training), mean over seeds; Δ: mean "
                 "Dice relative to scratch at the same label budget.")


def shared_stage_table(runs: list[Run]) -> Table:
    """Wall time of the stages the students share (data, teacher pre-training and LoRA
    fine-tuning, the DDPM, transfer set), each store entry once."""
    seen: set[tuple[str, str]] = set()
    body = []
    for run in runs:
        for stage in ("data", "teacher_pretrain", "teacher", "ddpm", "transfer"):
            man = run.manifests.get(stage)
            if not man or (stage, man.get("fingerprint", "")) in seen:
                continue
            seen.add((stage, man.get("fingerprint", "")))
            body.append([Cell(stage), Cell(run.name), Cell(man.get("fingerprint", ""), "mono"),
                         _num(man.get("wall_time_s"), 1, **{"data-col": "wall_time_s"})])
    head = [[Cell(h, header=True) for h in ("Stage", "First run", "Entry", "Wall time (s)")]]
    return Table("shared-stages", "Shared stages", head, body,
                 "Built once per store entry and reused by every method and run that needs "
                 "it (the demo teacher's pre-training is also cached per machine).")


# ------------------------------------------------------------------------------ Table 7


def memory_table(rows: list[Row]) -> Table:
    """Teacher base checkpoint and adapter size, student and reference size (Table 7)."""
    head = [[Cell(h, header=True) for h in ("Model", "Arch", "Teacher rank", "Parameters",
                                            "Size (MB)", "Adapter (MB)", "CPU latency (ms)")]]
    body, seen = [], set()
    for g in group_rows(rows):
        key = (g.method, g.arch, g.rank if g.kind == "teacher" else None)
        if key in seen or not g.rows:
            continue
        seen.add(key)
        r = g.rows[0]
        if g.kind == "teacher":
            body.append([Cell(method_name("teacher")), Cell(g.arch),
                         Cell("–" if g.rank is None else str(g.rank), "num"), Cell("–"),
                         _num(r.base_mb, 1, **{"data-col": "size_mb"}),
                         _num(r.adapter_mb, 3, **{"data-col": "adapter_mb"}), Cell("–")])
        else:
            body.append([Cell(method_name(g.method)), Cell(g.arch), Cell("–"),
                         Cell("–" if r.params is None else f"{int(r.params):,}", "num",
                              {"data-value": str(r.params or "")}),
                         _num(r.size_mb, 3, **{"data-col": "size_mb"}), Cell("–"),
                         _num(r.latency_ms, 1, **{"data-col": "latency_ms"})])
    return Table("memory", "Memory (Table 7)", head, body,
                 "Teacher: its base SAM checkpoint file and the adapter file its LoRA stage "
                 "writes (teacher/adapter_mb); students and reference: fp32 parameters, batch-1 "
                 "CPU latency as measured by their stage.")


# ------------------------------------------------------------------------------ deployment


def pareto_front(points: list[tuple[float, float, float]]) -> list[bool]:
    """Which of ``(dice, latency_ms, size_mb)`` no other point dominates (at least as good in
    all three — higher Dice, lower latency and size — and better in one). NaN never
    dominates and is never on the front."""
    def finite(p: tuple[float, float, float]) -> bool:
        return all(math.isfinite(v) for v in p)

    def dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
        no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
        return no_worse and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])

    return [finite(p) and not any(finite(q) and dominates(q, p) for q in points)
            for p in points]


def deploy_table(rows: list[Row]) -> Table | None:
    """Which student to deploy: every trained student configuration (and the label-only
    reference) per label budget, by mean Dice over seeds, with its CPU latency and size; the
    rows no other dominates in all three are marked (Pareto front), and the best Dice is
    compared with the reference's. None when no student has a footprint."""
    head = [[Cell(h, header=True) for h in ("Labels", "Model", "Arch", "Mean Dice",
                                            "CPU latency (ms)", "Size (MB)", "Pareto",
                                            "vs reference")]]
    body: list[list[Cell]] = []
    row_cls: list[str] = []
    groups = [g for g in group_rows(rows) if g.kind in ("student", "reference") and g.ok]
    for labels in sorted({g.labels for g in groups}, key=_none_last):
        block = sorted((g for g in groups if g.labels == labels),
                       key=lambda g: -np.nan_to_num(g.stat("dice")[0], nan=-1.0))
        if not any(g.mean_of("latency_ms") is not None for g in block):
            continue
        points = [(g.stat("dice")[0], g.mean_of("latency_ms") or math.nan,
                   g.mean_of("size_mb") or math.nan) for g in block]
        front = pareto_front(points)
        ref = next((p[0] for g, p in zip(block, points) if g.kind == "reference"), math.nan)
        for i, (g, (dice, latency, size)) in enumerate(zip(block, points)):
            diff = dice - ref if g.kind != "reference" else math.nan
            name = method_name(g.method) + (f": {g.arch}" if g.kind == "reference" else "")
            body.append([Cell("–" if labels is None else str(labels), "num"),
                         Cell(name, "", {"data-method": g.method}), Cell(g.arch),
                         _num(dice, 4, **{"data-col": "dice"}),
                         _num(latency, 1, **{"data-col": "latency_ms"}),
                         _num(size, 3, **{"data-col": "size_mb"}),
                         Cell("yes" if front[i] else "", "", {"data-value": str(front[i])}),
                         Cell("–" if not math.isfinite(diff) else f"{diff:+.4f}", "num",
                              {"data-value": "" if not math.isfinite(diff) else repr(diff)})])
            row_cls.append("best" if i == 0 else "")
    if not body:
        return None
    return Table("deploy", "Which student to deploy", head, body,
                 "Per label budget, every student (and the label-only reference) by mean test "
                 "Dice over seeds, best first; CPU latency at batch 1, measured in each run's "
                 "evaluate stage with its models taking turns (comparable within a run; across "
                 "runs only when the machine was equally loaded), and size. Pareto: no other "
                 "model here has at least its Dice with at most its latency and size (and is "
                 "better in one). vs reference: Dice minus the "
                 "reference's at the same budget — negative means the labels alone did better.",
                 row_cls=row_cls)


# ------------------------------------------------------------------------------ seeds


def paired(rows: list[Row], method: Group, baseline: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean Dice of ``method``'s seeds and of ``baseline``'s at the same label budget and seed."""
    base = {r.seed: r.metric("dice") for r in rows
            if r.method == baseline and r.labels == method.labels and not r.failed}
    pairs = [(r.metric("dice"), base[r.seed]) for r in method.ok if r.seed in base]
    pairs = [p for p in pairs if all(math.isfinite(x) for x in p)]
    a = np.array([p[0] for p in pairs], np.float64)
    b = np.array([p[1] for p in pairs], np.float64)
    return a, b


def seed_tests_table(rows: list[Row]) -> Table | None:
    """Paired tests of each method's mean Dice against scratch and the reference, paired by
    seed (None when no configuration has two seeds)."""
    from scipy import stats

    groups = group_rows(rows)
    if not any(len(g.ok) > 1 for g in groups):
        return None
    head = [[Cell(h, header=True) for h in ("Method", "Transfer set", "Labels", "vs", "Pairs",
                                            "Mean Δ Dice", "t-test p", "Wilcoxon p")]]
    body = []
    for g in groups:
        for baseline in BASELINES:
            if g.method == baseline or g.kind == "teacher":
                continue
            a, b = paired(rows, g, baseline)
            if len(a) < 2:
                continue
            diff = a - b
            t_p = wil_p = math.nan
            if np.any(diff != 0):
                wil_p = float(stats.wilcoxon(a, b).pvalue)
                if not np.allclose(diff, diff[0], rtol=1e-9, atol=1e-12):  # else no variance
                    t_p = float(stats.ttest_rel(a, b).pvalue)
            body.append(_label(g) + [Cell(str(g.labels), "num"), Cell(method_name(baseline)),
                                     Cell(str(len(a)), "num"),
                                     _num(float(diff.mean()), 4, **{"data-col": "diff"}),
                                     _num(t_p, 4, **{"data-col": "ttest_p"}),
                                     _num(wil_p, 4, **{"data-col": "wilcoxon_p"})])
    return Table("seed-tests", "Paired tests across seeds", head, body,
                 "Mean Dice per seed, paired by seed with the baseline at the same label "
                 "budget: scipy.stats.ttest_rel and scipy.stats.wilcoxon (two-sided; few seeds "
                 "give little power: Wilcoxon's smallest p with 5 pairs is 0.0625).")


# ------------------------------------------------------------------------------ Table 16, failures


@dataclass
class TransferSet:
    """One transfer-set entry: the run that first used it, its label budget, seed, configured
    size, its stage manifest and its ``quality.json``."""

    run: Run
    labels: int | None
    seed: int | None
    size: int | None
    manifest: dict[str, Any]
    quality: dict[str, Any]


def transfer_table(transfers: list[TransferSet]) -> Table:
    """One row per transfer set: its quality report (Table 16)."""
    head = [[Cell(h, header=True) for h in ("Run", "Labels", "Seed", "Size", "Sources",
                                            "Sampled", "Kept", "Dropped", "PSNR mean (dB)",
                                            "PSNR min–max (dB)", "MSE mean", "Near-copies",
                                            "Nearest references")]]
    body = []
    for t in transfers:
        man, q = t.manifest, t.quality
        kept = q.get("kept") or {}
        psnr, mse = kept.get("psnr") or {}, kept.get("mse") or {}
        all_ = q.get("all") or {}
        kinds = ", ".join(f"{k}: {v}" for k, v in (q.get("nearest_kind_counts") or {}).items())
        body.append([Cell(t.run.name), Cell(_opt(t.labels), "num"), Cell(_opt(t.seed), "num"),
                     Cell(_opt(t.size), "num"), Cell(", ".join(q.get("sources", []))),
                     Cell(str(q.get("n_sampled", "–")), "num"),
                     Cell(str(man.get("metrics", {}).get("transfer/n_images",
                                                         q.get("n_kept", "–"))), "num"),
                     Cell(str(q.get("n_dropped", 0)), "num"),
                     _num(psnr.get("mean"), 2, **{"data-col": "psnr_mean"}),
                     Cell(f"{fmt(psnr.get('min'), 2)}–{fmt(psnr.get('max'), 2)}", "num"),
                     _num(mse.get("mean"), 1, **{"data-col": "mse_mean"}),
                     Cell(str(all_.get("n_near_copies", 0)), "num"), Cell(kinds or "–")])
    return Table("transfer-quality", "Transfer-set quality (Table 16)", head, body,
                 "Nearest-neighbour PSNR and MSE of the kept synthetic images against the "
                 "privacy references (the labelled training images, their flips and the "
                 "augmented copies); near-copies are counted over all samples.")


def _opt(v: Any) -> str:
    return "–" if v is None else str(v)


def failures_table(runs: list[Run], root: Path) -> Table | None:
    failures = [f for run in runs for f in run.failures]
    if not failures:
        return None
    head = [[Cell(h, header=True) for h in ("Run", "Stage", "Error", "Log")]]
    body = []
    for f in failures:
        try:
            log = f.log_path.relative_to(root).as_posix()
        except ValueError:
            log = str(f.log_path)
        body.append([Cell(f.run), Cell(f.stage), Cell(f.message, "failed"), Cell(log, "mono")])
    return Table("failures", "Failed cells", head, body,
                 "Stages that failed; their models are marked failed in the tables above.",
                 ["failed"] * len(body))
