"""Lay every method side by side: the tidy table, the per-task status, the forest plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from latefusion.results import ESTIMATE_COLUMNS, FusionResult
from latefusion.summaries import SummarySet

__all__ = ["estimates_table", "forest_plot", "status_table"]

#: Diagnostics shown in the per-task status table, in this order, when any task has them.
STATUS_DIAGNOSTICS = (
    "n_treated",
    "n_control",
    "n_folds",
    "propensity_min",
    "propensity_max",
    "clipped_treated",
    "clipped_control",
    "rows_dropped",
    "dropped_constant",
    "folds_reduced",
)


def estimates_table(results: Sequence[FusionResult]) -> pd.DataFrame:
    """One tidy table of every method, with the columns of ``estimates.csv``.

    Rows are ordered by level (pooled, new task, then tasks), coefficient, task and method.
    """
    frames = [r.table() for r in results]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty:
        return pd.DataFrame(columns=ESTIMATE_COLUMNS)
    level_order = {"pooled": 0, "new_task": 1, "task": 2}
    method_order = {r.method: i for i, r in enumerate(results)}
    task_order = {t: i for r in results for i, t in enumerate(r.task_names)}
    coef_order = {c: i for r in results for i, c in enumerate(r.coef_names)}
    key = pd.DataFrame(
        {
            "level": table["level"].map(level_order),
            "coef": table["coef"].map(coef_order),
            "task": table["task"].map(task_order).fillna(-1),
            "method": table["method"].map(method_order),
        }
    )
    order = key.sort_values(["level", "coef", "task", "method"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


def status_table(summaries: SummarySet) -> pd.DataFrame:
    """Per task: status, reason, rows used and the main diagnostics."""
    rows = []
    for s in summaries:
        row = {"task": s.task, "status": s.status, "reason": s.reason, "n": s.n}
        for key in STATUS_DIAGNOSTICS:
            if key in s.diagnostics:
                value = s.diagnostics[key]
                row[key] = ", ".join(map(str, value)) if isinstance(value, list) else value
        rows.append(row)
    table = pd.DataFrame(rows)
    if "rows_dropped" in table:  # recorded only where rows were dropped
        table["rows_dropped"] = table["rows_dropped"].fillna(0).astype(int)
    cols = ["task", "status", "reason", "n", *[c for c in STATUS_DIAGNOSTICS if c in table]]
    return table[cols]


def _method_order(table: pd.DataFrame) -> list[str]:
    """ITL first, then the others as they come in the task rows, then pooled-only methods."""
    task_methods = table.loc[table["level"] == "task", "method"]
    return list(dict.fromkeys([*task_methods, *table["method"]]))


def _task_order(task_rows: pd.DataFrame, coef: str) -> list[str]:
    """Tasks sorted by their own (ITL) estimate of ``coef`` when there is one."""
    own = task_rows[(task_rows["method"] == "itl") & (task_rows["coef"] == coef)]
    if len(own):
        return list(own.sort_values("estimate", kind="stable")["task"])
    return list(dict.fromkeys(task_rows["task"]))


def forest_plot(
    table: pd.DataFrame,
    coef: str | None = None,
    max_tasks: int = 200,
    colors: Mapping[str, str] | None = None,
):
    """Forest plot of every method: the pooled centre on top, then each task.

    Parameters
    ----------
    table : DataFrame
        As returned by :func:`estimates_table`.
    coef : str, optional
        One coefficient; by default one panel per coefficient.
    max_tasks : int, default=200
        Tasks beyond this are left out of the plot (never out of the table); the title says so.
    colors : mapping method -> colour, optional
        Colour of each method; by default the methods take matplotlib's colour cycle in order.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    coefs = [coef] if coef is not None else list(dict.fromkeys(table["coef"]))
    methods = _method_order(table)
    task_rows = table[table["level"] == "task"]
    tasks = _task_order(task_rows, coefs[0])
    shown = tasks[:max_tasks]
    labels = [*(lbl for lbl in ("pooled", "new_task") if (table["level"] == lbl).any()), *shown]
    height = max(3.0, 0.28 * len(labels) + 1.2)
    fig, axes = plt.subplots(1, len(coefs), figsize=(5.5 * len(coefs), height), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offsets = np.linspace(-0.3, 0.3, len(methods)) if len(methods) > 1 else np.zeros(1)
    for ax, c in zip(axes[0], coefs, strict=True):
        part = table[table["coef"] == c]
        for m, (method, off) in enumerate(zip(methods, offsets, strict=True)):
            rows = part[part["method"] == method]
            ys, xs, lo, hi = [], [], [], []
            for i, label in enumerate(labels):
                if label in ("pooled", "new_task"):
                    hit = rows[rows["level"] == label]
                else:
                    hit = rows[(rows["level"] == "task") & (rows["task"] == label)]
                if len(hit):
                    ys.append(i + off)
                    xs.append(hit["estimate"].iloc[0])
                    lo.append(hit["lower"].iloc[0])
                    hi.append(hit["upper"].iloc[0])
            color = (colors or {}).get(method, cycle[m % len(cycle)])
            ax.hlines(ys, lo, hi, color=color, lw=1.2)
            ax.plot(xs, ys, "o", ms=3.5, color=color, label=method)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        pooled = part[(part["level"] == "pooled")]
        if len(pooled):
            ax.axvline(pooled["estimate"].iloc[0], color="0.7", lw=0.8, ls="--", zorder=0)
        if len(labels) > 2 and labels[0] == "pooled":
            n_top = sum(lbl in ("pooled", "new_task") for lbl in labels)
            ax.axhline(n_top - 0.5, color="0.5", lw=0.8)
        ax.set_title(c if len(shown) == len(tasks) else f"{c} (first {len(shown)} tasks)")
        ax.set_xlabel("estimate with 95% interval")
    axes[0][0].legend(loc="upper right", fontsize=7, frameon=True)
    fig.tight_layout()
    return fig
