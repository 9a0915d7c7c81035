"""The report's plots, drawn with matplotlib (object API, Agg canvas: no display, no global
pyplot state) and embedded as base64 PNG.

* :func:`scores_plot` — mean and per-class Dice per method, one panel per label budget;
* :func:`labels_plot` — Dice against the label budget per method (the paper's Figure 3);
* :func:`transfer_plot` — Dice against the transfer-set size (Figures 5–9);
* :func:`image_grid` — a grid of images with titles (qualitative overlays, transfer samples).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Sequence

import numpy as np

from tskd.report.tables import METHOD_ORDER, Group, method_key, method_name

DPI = 100
_PALETTE = ("tab:purple", "tab:gray", "tab:olive", "tab:cyan", "tab:pink", "tab:blue",
            "tab:orange", "tab:brown", "tab:red", "tab:green")
MARKERS = ("o", "s", "^", "D", "v", "P")


def colour(method: str) -> str:
    """One colour per method in every plot (the reference black, the teacher purple)."""
    if method == "reference":
        return "black"
    if method in METHOD_ORDER:
        return _PALETTE[METHOD_ORDER.index(method) % len(_PALETTE)]
    return _PALETTE[sum(map(ord, method)) % len(_PALETTE)]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def to_png_base64(fig) -> str:
    """The figure as a base64 PNG (for ``<img src="data:image/png;base64,...">``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _budgets(groups: Sequence[Group]) -> list[int | None]:
    return sorted({g.labels for g in groups}, key=lambda v: (v is None, v or 0))


def _line_label(g: Group) -> str:
    name = method_name(g.method)
    if g.transfer_size is not None:
        name += f" ({g.transfer_size} imgs)"
    return name


def scores_plot(groups: Sequence[Group], classes: Sequence[str]) -> str | None:
    """Grouped bars: each method's mean Dice and per-class Dice (mean over seeds, std as error
    bars), one panel per label budget (at most four: the largest budgets)."""
    budgets = _budgets(groups)[-4:]
    scored = [g for g in groups if g.ok and g.labels in budgets]
    if not scored:
        return None
    fig = _figure(max(6.0, 3.2 * len(budgets)), 3.6)
    axes = fig.subplots(1, len(budgets), squeeze=False, sharey=True)[0]
    series = ["mean", *classes]
    for ax, budget in zip(axes, budgets):
        block = [g for g in scored if g.labels == budget]
        x = np.arange(len(block))
        width = 0.8 / len(series)
        for k, cls in enumerate(series):
            stats = [g.stat("dice", None if cls == "mean" else cls) for g in block]
            mean = [s[0] for s in stats]
            err = [0.0 if not math.isfinite(s[1]) else s[1] for s in stats]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, mean, width, yerr=err,
                   label="mean Dice" if cls == "mean" else cls, capsize=2)
        ax.set_xticks(x, [_line_label(g) for g in block], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{budget} labels", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice (test)")
    axes[-1].legend(fontsize=7, loc="upper right")
    return to_png_base64(fig)


def labels_plot(groups: Sequence[Group]) -> str | None:
    """Mean Dice against the label budget (Figure 3): one panel per student method, a line
    per transfer-set size, and in every panel the scratch student and the label-only
    reference as dashed lines to compare with; None with fewer than two budgets."""
    scored = [g for g in groups if g.ok and g.labels is not None]
    if len({g.labels for g in scored}) < 2:
        return None
    baselines = ("scratch", "reference")
    methods = sorted({g.method for g in scored if g.kind == "student"
                      and g.method not in baselines}, key=method_key) or ["scratch"]
    sizes = sorted({g.transfer_size for g in scored if g.transfer_size is not None})
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = _figure(3.3 * cols, 3.0 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for k, method in enumerate(methods):
        ax = axes[k // cols][k % cols]
        lines: dict[tuple[str, int | None], list[Group]] = {}
        for g in scored:
            if g.method in (method, *baselines):
                lines.setdefault((g.method, g.transfer_size), []).append(g)
        for (m, size), gs in sorted(lines.items(),
                                    key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)):
            gs = sorted(gs, key=lambda g: g.labels)
            stats = [g.stat("dice") for g in gs]
            ax.errorbar([g.labels for g in gs], [st[0] for st in stats],
                        yerr=[0.0 if not math.isfinite(st[1]) else st[1] for st in stats],
                        marker="o" if size is None else MARKERS[sizes.index(size) % len(MARKERS)],
                        capsize=3, label=_line_label(gs[0]), color=colour(m),
                        linestyle="--" if m in baselines else "-",
                        alpha=0.6 + 0.4 * (size is None or size == max(sizes)))
        ax.set_title(method_name(method), fontsize=10)
        ax.set_xlabel("labelled images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for k in range(len(methods), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    for r in range(rows):
        axes[r][0].set_ylabel("mean Dice (test)")
    return to_png_base64(fig)


def transfer_plot(groups: Sequence[Group]) -> str | None:
    """Mean Dice against the transfer-set size per method, one panel per label budget, with
    the methods that read no transfer set as horizontal lines (Figures 5–9); None with fewer
    than two sizes."""
    sizes = {g.transfer_size for g in groups if g.transfer_size is not None}
    if len(sizes) < 2:
        return None
    budgets = [b for b in _budgets(groups) if b is not None][-4:]
    fig = _figure(max(6.0, 3.4 * len(budgets)), 3.8)
    axes = fig.subplots(1, len(budgets), squeeze=False, sharey=True)[0]
    for ax, budget in zip(axes, budgets):
        block = [g for g in groups if g.ok and g.labels == budget]
        by_method: dict[str, list[Group]] = {}
        for g in block:
            by_method.setdefault(g.method, []).append(g)
        for method, gs in sorted(by_method.items(), key=lambda kv: method_key(kv[0])):
            with_size = sorted((g for g in gs if g.transfer_size is not None),
                               key=lambda g: g.transfer_size)
            if with_size:
                stats = [g.stat("dice") for g in with_size]
                ax.errorbar([g.transfer_size for g in with_size], [s[0] for s in stats],
                            yerr=[0.0 if not math.isfinite(s[1]) else s[1] for s in stats],
                            marker="o", capsize=3, label=method_name(method),
                            color=colour(method))
            else:
                ax.axhline(gs[0].stat("dice")[0], linestyle="--", linewidth=1,
                           label=method_name(method), color=colour(method))
        ax.set_title(f"{budget} labels", fontsize=10)
        ax.set_xlabel("transfer-set images")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (test)")
    axes[-1].legend(fontsize=7)
    return to_png_base64(fig)


def image_grid(images: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str],
               row_titles: Sequence[str] = (), cell_titles: Sequence[Sequence[str]] = (),
               size: float = 1.8) -> str:
    """``images[row][col]``: uint8 (H, W, 3) arrays drawn as a grid (axes off) with column
    titles, optional row titles and per-cell captions; returns a base64 PNG."""
    n_rows, n_cols = len(images), max(len(r) for r in images)
    fig = _figure(size * n_cols, size * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(images):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            else:
                ax.set_axis_off()
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
            if cell_titles and j < len(cell_titles[i]) and cell_titles[i][j]:
                ax.set_xlabel(cell_titles[i][j], fontsize=7)
        if i < len(row_titles):
            axes[i][0].set_ylabel(row_titles[i], fontsize=7)
    return to_png_base64(fig)
