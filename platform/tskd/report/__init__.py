"""``tskd report RUN_DIR``: a self-contained HTML report of one run or of a directory of runs
(seeds, grid cells), laid out as the paper presents its comparison (core: no Ray).

    from tskd.report import write_report
    write_report("runs/demo", "runs/demo/report.html")

Sections: paper-style tables (per-class Dice and HD95 plus mean, one table per label budget,
Tables 1–5), a Dice-per-method plot, Dice against the label budget (Figure 3, with two or more
budgets) and against the transfer-set size (Figures 5–9, with two or more sizes), compute
(Table 6), memory (Table 7), paired tests across seeds (with two or more seeds), qualitative
overlays of a few test images per method (Figure 4), the transfer set's quality (Table 16) with
samples, and the failed cells. The label-only reference row is always shown. The template is
``dashboards/report.html`` (jinja2); plots are matplotlib PNGs embedded as base64, so the file
needs nothing beside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tskd.report import tables
from tskd.report.collect import Row, Run, find_runs, read_run, read_runs, unique_rows
from tskd.report.tables import Table

__all__ = ["Row", "Run", "Table", "build_report", "find_runs", "read_run", "read_runs",
           "render_report", "write_report", "TEMPLATE", "REPORT_FILE"]

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[3] / "dashboards" / "report.html"
REPORT_FILE = "report.html"


def build_report(root: str | Path, *, n_images: int = 3, n_transfer: int = 6) -> dict[str, Any]:
    """Everything the template shows, for the runs at or under ``root``.

    Args:
        n_images: test images in the qualitative overlays (0: none).
        n_transfer: transfer-set samples shown per transfer set (0: none).

    Raises:
        FileNotFoundError: ``root`` holds no run.
    """
    from tskd.report import images, plots

    root = Path(root).expanduser()
    runs = read_runs(root)
    rows = unique_rows(runs)
    done = [r for r in runs if r.results]
    first = done[0].results if done else {}
    classes = next((r.classes for r in done), [])
    unit = (first.get("metrics") or {}).get("hd95_unit") or first.get("hd95_unit", "")
    groups = tables.group_rows(rows)
    log.info("report: %d run(s) (%d finished), %d models", len(runs), len(done), len(rows))

    figures: list[dict[str, str]] = []
    for title, png, caption in (
            ("Dice per method", plots.scores_plot(groups, classes),
             "Mean and per-class test Dice (mean over seeds; bars: sample std)."),
            ("Dice against the label budget (Figure 3)", plots.labels_plot(groups),
             "One panel per method, a line per transfer-set size; scratch and the label-only "
             "reference dashed in every panel (mean over seeds; bars: sample std)."),
            ("Dice against the transfer-set size (Figures 5–9)", plots.transfer_plot(groups),
             "Methods that read no transfer set are horizontal lines.")):
        if png:
            figures.append({"title": title, "png": png, "caption": caption})

    overlay_png, overlay_note = images.overlays_figure(runs, rows, n_images)
    transfers = _transfer_sets(runs)
    transfer_figs = []
    if n_transfer > 0:  # samples of one set per size (largest budget, lowest seed), at most 3
        shown: dict[Any, Run] = {}
        for t in sorted(transfers, key=lambda t: (-(t.labels or 0), t.seed or 0)):
            shown.setdefault(t.size, t.run)
        for run in [shown[k] for k in sorted(shown, key=lambda k: (k is None, k or 0))][:3]:
            png, note = images.transfer_figure(run, n_transfer)
            transfer_figs.append({"png": png, "caption": note})

    seed_table = tables.seed_tests_table(rows)
    failure_table = tables.failures_table(runs, root)
    return {
        "title": f"tskd report: {first.get('dataset', root.name)}",
        "root": str(root),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "version": _version(),
        "runs": [{"name": r.name, "status": "failed" if r.failures else (
                  "finished" if r.results else "incomplete"),
                  "seed": r.results.get("seed") if r.results else None,
                  "experiment": r.results.get("experiment") if r.results else None,
                  "config": r.results.get("config_fingerprint") if r.results else None}
                 for r in runs],
        "dataset": first.get("dataset"), "classes": classes, "n_test": first.get("n_test"),
        "metrics": first.get("metrics") or {},
        "seeds": sorted({r.seed for r in rows if r.seed is not None}),
        "paper_tables": tables.paper_tables(rows, classes, unit),
        "figures": figures,
        "compute": [tables.compute_table(rows), tables.shared_stage_table(runs)],
        "memory": tables.memory_table(rows),
        "deploy": tables.deploy_table(rows),
        "seed_tests": seed_table,
        "overlays": {"png": overlay_png, "caption": overlay_note},
        "transfer_table": tables.transfer_table(transfers) if transfers else None,
        "transfer_figures": transfer_figs,
        "failures": failure_table,
    }


def render_report(context: dict[str, Any], template: Path = TEMPLATE) -> str:
    """The HTML of ``context`` (:func:`build_report`) through the jinja2 template."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template.parent)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template.name).render(**context)


def write_report(root: str | Path, output: str | Path | None = None, **kwargs: Any) -> Path:
    """Build and write the report of ``root``; return its path (default
    ``<root>/report.html``)."""
    root = Path(root).expanduser()
    out = Path(output) if output else root / REPORT_FILE
    html = render_report(build_report(root, **kwargs))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    log.info("report: wrote %s (%.0f kB)", out, out.stat().st_size / 1024)
    return out


def _transfer_sets(runs: list[Run]) -> list[tables.TransferSet]:
    """Each transfer-set entry once, with the run that first used it."""
    out, seen = [], set()
    for run in runs:
        man = run.manifests.get("transfer")
        if not man or man.get("fingerprint") in seen:
            continue
        seen.add(man.get("fingerprint"))
        data = run.manifests.get("data", {}).get("stage_config", {}).get("data", {})
        size = man.get("stage_config", {}).get("transfer", {}).get("n_images")
        out.append(tables.TransferSet(run, data.get("n_labels"), man.get("seed"), size, man,
                                      _read(run.entries["transfer"] / "quality.json")))
    return out


def _read(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tskd")
    except metadata.PackageNotFoundError:
        return "unknown"
