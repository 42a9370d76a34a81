"""Compare every fusion method: one tidy table, and plots to look at rather than read.

:func:`compare` lays the estimates of every method side by side (each task, the centre and a
new task); :func:`plot_forest` overlays the methods' intervals, :func:`plot_shrinkage` shows how
far each method moves every task from its own estimate, and :func:`plot_task_posteriors` draws
the Bayesian posterior of each task with the frequentist intervals marked on it.

>>> table = compare(run)                                  # doctest: +SKIP
>>> to_wide(table)                                        # doctest: +SKIP
>>> plot_shrinkage(table)                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from latefusion.report import estimates_table, forest_plot
from latefusion.results import ESTIMATE_COLUMNS, FusionResult
from latefusion.summaries import SummarySet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "COMPARE_COLUMNS",
    "compare",
    "method_colors",
    "plot_forest",
    "plot_shrinkage",
    "plot_task_posteriors",
    "to_wide",
]

#: Columns of the table :func:`compare` returns: those of ``estimates.csv`` and ``kind``.
COMPARE_COLUMNS = [*ESTIMATE_COLUMNS, "kind"]

#: Frequentist methods whose intervals :func:`plot_task_posteriors` marks by default.
DEFAULT_MARKED = ("itl", "random_effects_reml", "adaptive")

_Z95 = 1.959963984540054

#: Methods with a fixed colour (their place in matplotlib's colour cycle), so that a method
#: keeps its colour from one plot to the next; other methods take the next free colours.
_CANONICAL = ("itl", "fixed_effect", "random_effects_dl", "random_effects_reml", "adaptive")


def compare(
    *sources: Any,
    C: float | str = "sure_1se",
    n_boot: int = 200,
    seed: int = 0,
    wide: bool = False,
) -> pd.DataFrame:
    """Every method's estimates of every task, the centre and a new task, in one table.

    Parameters
    ----------
    *sources : FusionRun, SummarySet, FusionResult, BayesFit, or mapping label -> result
        What to lay side by side, in this order. A :class:`~latefusion.SummarySet` is fused
        by every frequentist method (ITL, fixed effect, random effects DL and REML, adaptive);
        Bayesian models are never fitted here: fit them with
        :func:`latefusion.bayes.fit_bayes` and pass the fits. A mapping renames its results
        (``{"horseshoe_tau0_0.1": fit}``), which lets two fits of one model stand side by side.
    C : float or str, default="sure_1se"
        Constant of the adaptive aggregator, for a SummarySet source.
    n_boot : int, default=200
        Bootstrap draws of the adaptive aggregator, for a SummarySet source.
    seed : int, default=0
        Seed of :func:`latefusion.fuse_summaries`, for a SummarySet source.
    wide : bool, default=False
        Return :func:`to_wide` of the table (estimates only, one column per method).

    Returns
    -------
    DataFrame
        Columns :data:`COMPARE_COLUMNS`: ``level`` (``pooled``, ``new_task`` or ``task``),
        ``task`` (empty unless ``level == "task"``), ``coef``, ``method``, ``estimate``,
        ``std_error``, ``lower``, ``upper`` (95% intervals) and ``kind`` (``frequentist`` or
        ``bayesian``). Rows ordered as in ``estimates.csv``. Bayesian rows hold the posterior
        mean, sd and equal-tailed interval, and for a new task the predictive median and the
        half-width of its central 68.3% interval.

    Raises
    ------
    ValueError
        If two different results carry the same method name (rename one with a mapping), or
        the sources disagree on the coefficients.
    TypeError
        If a source is of none of the accepted types.
    """
    if not sources:
        raise ValueError("compare() needs at least one source (a run, summaries or results)")
    results: list[FusionResult] = []
    for source in sources:
        for result in _results_of(source, C=C, n_boot=n_boot, seed=seed):
            same = [r for r in results if r.method == result.method]
            if any(r is result for r in same):
                continue
            if same:
                raise ValueError(
                    f"method {result.method!r} appears twice; pass one of them in a mapping to "
                    "rename it, e.g. compare(run, {'label': fit})"
                )
            results.append(result)
    coefs = {tuple(r.coef_names) for r in results}
    if len(coefs) > 1:
        raise ValueError(f"the sources estimate different coefficients: {sorted(coefs)}")

    table = estimates_table(results)
    bayesian = {r.method for r in results if _is_bayesian(r)}
    table["kind"] = np.where(table["method"].isin(bayesian), "bayesian", "frequentist")
    table = table[COMPARE_COLUMNS]
    return to_wide(table) if wide else table


def to_wide(table: pd.DataFrame, value: str = "estimate") -> pd.DataFrame:
    """One column per method, one row per (level, task, coef).

    Parameters
    ----------
    table : DataFrame
        As returned by :func:`compare` (or the rows of ``estimates.csv``).
    value : {"estimate", "std_error", "lower", "upper"}, default="estimate"

    Returns
    -------
    DataFrame
        Index (level, task, coef) in the order of ``table``; columns the methods, in order of
        first appearance; missing where a method has no such row (ITL has no centre).
    """
    if value not in ("estimate", "std_error", "lower", "upper"):
        raise ValueError(f"value must be estimate, std_error, lower or upper, got {value!r}")
    keys = ["level", "task", "coef"]
    wide = table.pivot(index=keys, columns="method", values=value)
    rows = pd.MultiIndex.from_frame(table[keys].drop_duplicates())
    methods = list(dict.fromkeys(table["method"]))
    wide = wide.reindex(index=rows, columns=methods)
    wide.columns.name = None
    return wide


# Plots -----------------------------------------------------------------------------------------


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """A colour per method, the same in every plot of this module.

    ITL, fixed effect, random effects (DL, REML) and adaptive take the first five colours of
    matplotlib's cycle in that order; the other methods (the Bayesian ones) the following
    colours, in the order given.
    """
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out = {m: cycle[i % len(cycle)] for i, m in enumerate(_CANONICAL) if m in methods}
    others = [m for m in dict.fromkeys(methods) if m not in out]
    for i, m in enumerate(others):
        out[m] = cycle[(len(_CANONICAL) + i) % len(cycle)]
    return out


def plot_forest(
    source: Any,
    coef: str | None = None,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    truth: Mapping[str, float] | pd.Series | None = None,
    max_tasks: int = 200,
) -> Figure:
    """Forest plot with every method overlaid: the centre and a new task on top, then each task.

    Parameters
    ----------
    source : DataFrame or anything :func:`compare` accepts
        A table from :func:`compare` (or ``estimates.csv``), or a source to compare.
    coef : str, optional
        One coefficient; by default one panel per coefficient.
    methods : sequence of str, optional
        Methods to show, in this order (default: all).
    tasks : sequence of str, optional
        Tasks to show (default: all, sorted by their own estimate).
    truth : mapping task -> float, optional
        True values of ``coef`` (or of the only coefficient), marked with a black cross; the
        key ``"pooled"`` marks the true centre.
    max_tasks : int, default=200

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = _select(_as_table(source), methods=methods, tasks=tasks)
    colors = method_colors(list(dict.fromkeys(_as_table(source)["method"])))
    fig = forest_plot(table, coef=coef, max_tasks=max_tasks, colors=colors)
    if truth is not None:
        truth = dict(truth)
        for ax in fig.axes:
            rows = {
                t.get_text(): y for y, t in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
            }
            hits = [(truth[label], y) for label, y in rows.items() if label in truth]
            if hits:
                xs, ys = zip(*hits, strict=True)
                ax.plot(xs, ys, "x", color="black", ms=6, mew=1.5, label="truth", zorder=5)
        fig.axes[0].legend(loc="upper right", fontsize=7, frameon=True)
    return fig


def plot_shrinkage(
    source: Any,
    coef: str | None = None,
    methods: Sequence[str] | None = None,
    reference: str = "itl",
) -> Figure:
    """Each task's own estimate against its fused estimates, one colour per method.

    A point on the diagonal is a task left alone; a point on its method's dashed horizontal
    line (the method's centre) is a task pooled completely. The thin vertical segment joins a
    task's own estimate to where the method puts it.

    Parameters
    ----------
    source : DataFrame or anything :func:`compare` accepts
    coef : str, optional
        One coefficient; by default one panel per coefficient.
    methods : sequence of str, optional
        Fused methods to show (default: every method with per-task estimates but the
        reference).
    reference : str, default="itl"
        The method giving each task's own estimate (the x axis).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    table = _as_table(source)
    task_rows = table[table["level"] == "task"]
    if reference not in set(task_rows["method"]):
        raise ValueError(f"no per-task rows of the reference method {reference!r} in the table")
    if methods is None:
        methods = [m for m in dict.fromkeys(task_rows["method"]) if m != reference]
    missing = [m for m in methods if m not in set(task_rows["method"])]
    if missing:
        raise ValueError(f"no per-task rows of method(s) {missing} in the table")
    coefs = [coef] if coef is not None else list(dict.fromkeys(table["coef"]))

    fig, axes = plt.subplots(1, len(coefs), figsize=(5.0 * len(coefs), 4.6), squeeze=False)
    colors = method_colors(list(dict.fromkeys(table["method"])))
    for ax, c in zip(axes[0], coefs, strict=True):
        own = task_rows[(task_rows["method"] == reference) & (task_rows["coef"] == c)]
        own = own.set_index("task")["estimate"]
        for method in methods:
            color = colors[method]
            fused = task_rows[(task_rows["method"] == method) & (task_rows["coef"] == c)]
            fused = fused.set_index("task")["estimate"].reindex(own.index)
            ax.vlines(own.values, own.values, fused.values, color=color, lw=0.6, alpha=0.5)
            ax.plot(own.values, fused.values, "o", ms=4, color=color, label=method)
            centre = table[
                (table["level"] == "pooled") & (table["method"] == method) & (table["coef"] == c)
            ]
            if len(centre):
                ax.axhline(centre["estimate"].iloc[0], color=color, lw=0.8, ls="--")
        lo, hi = np.nanmin(own.values), np.nanmax(own.values)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, zorder=0)
        ax.set_xlabel(f"own estimate ({reference})")
        ax.set_ylabel("fused estimate")
        ax.set_title(c)
    axes[0][0].legend(loc="upper left", fontsize=7, frameon=True)
    fig.tight_layout()
    return fig


def plot_task_posteriors(
    fit: Any,
    table: pd.DataFrame | None = None,
    coef: str | None = None,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] = DEFAULT_MARKED,
    max_tasks: int = 12,
    ncols: int = 4,
) -> Figure:
    """Posterior density of each task's theta, with the frequentist 95% intervals marked.

    One panel per task, plus the centre (beta) and a new task (theta_new); a dotted line marks
    the posterior median. Below each density,
    a horizontal bar per frequentist method shows its estimate and 95% interval; the task's own
    estimate (``itl``) is always among them.

    Parameters
    ----------
    fit : BayesFit, FusionRun or xarray.DataTree
        A fit whose DataTree has ``posterior`` (theta (task, coef), beta (coef)) and, for the
        own estimates, ``observed_data`` (theta_hat) and ``constant_data`` (V), as
        :func:`latefusion.bayes.fit_bayes` writes.
    table : DataFrame, optional
        Frequentist estimates (from :func:`compare`); a FusionRun brings its own. Without one
        only the own estimate, computed from the DataTree, is marked.
    coef : str, optional
        Default: the first coefficient.
    tasks : sequence of str, optional
        Default: all tasks in the order of their own estimates if there are at most
        ``max_tasks``, else ``max_tasks`` of them spread evenly over that order (the extremes
        included).
    methods : sequence of str, default=("itl", "random_effects_reml", "adaptive")
        Methods whose intervals are marked, when ``table`` has them.
    max_tasks : int, default=12
    ncols : int, default=4

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    dt, table, bayes_method = _unpack_fit(fit, table)
    post = dt["posterior"]
    coefs = [str(c) for c in post["theta"].coords["coef"].values]
    coef = coefs[0] if coef is None else coef
    if coef not in coefs:
        raise ValueError(f"coefficient {coef!r} is not in the posterior (it has {coefs})")
    marks = _marks(dt, table, coef, methods, bayes_method)
    all_tasks = [str(t) for t in post["theta"].coords["task"].values]
    if tasks is None:
        own = {
            t: marks["itl"][("task", t)][0]
            for t in all_tasks
            if ("task", t) in marks.get("itl", {})
        }
        order = sorted(all_tasks, key=lambda t: own.get(t, np.inf))
        if len(order) > max_tasks:
            picks = np.unique(np.round(np.linspace(0, len(order) - 1, max_tasks)).astype(int))
            order = [order[i] for i in picks]
        tasks = order
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not in the posterior")

    panels: list[tuple[str, str, str, np.ndarray]] = [
        ("centre (beta)", "pooled", "", _draws(post["beta"].sel(coef=coef)))
    ]
    if "posterior_predictive" in dt.children and "theta_new" in dt["posterior_predictive"]:
        new = dt["posterior_predictive"]["theta_new"].sel(coef=coef)
        panels.append(("new task", "new_task", "", _draws(new)))
    for t in tasks:
        panels.append((t, "task", t, _draws(post["theta"].sel(task=t, coef=coef))))

    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.6 * ncols, 2.0 * nrows), squeeze=False, sharex=False
    )
    method_color = method_colors([*marks, bayes_method])
    for ax, (title, level, task, draws) in zip(axes.flat, panels, strict=False):
        # The density over the central 95% widened by a third on each side: all of a normal
        # posterior, and the body of a heavy-tailed one (a new task under a horseshoe).
        q_lo, q_hi = np.quantile(draws, [0.025, 0.975])
        lo, hi = q_lo - (q_hi - q_lo) / 3, q_hi + (q_hi - q_lo) / 3
        lo, hi = max(lo, draws.min()), min(hi, draws.max())
        rows = {m: rows_.get((level, task)) for m, rows_ in marks.items()}
        bounds = [lo, hi, *(v for r in rows.values() if r is not None for v in (r[1], r[2]))]
        x_lo, x_hi = min(bounds), max(bounds)
        grid = np.linspace(x_lo - 0.05 * (x_hi - x_lo), x_hi + 0.05 * (x_hi - x_lo), 200)
        inside = draws[(draws >= lo) & (draws <= hi)]
        density = gaussian_kde(inside)(grid) * inside.size / draws.size
        top = density.max()
        bayes_color = method_color[bayes_method]
        ax.fill_between(grid, density, color=bayes_color, alpha=0.25, lw=0)
        ax.plot(grid, density, color=bayes_color, lw=1.0)
        ax.axvline(float(np.median(draws)), color=bayes_color, lw=0.8, ls=":")
        for i, (m, r) in enumerate(rows.items()):
            if r is None:
                continue
            y = -top * 0.12 * (i + 1)
            ax.hlines(y, r[1], r[2], color=method_color[m], lw=1.6)
            ax.plot([r[0]], [y], "o", ms=3.5, color=method_color[m])
        ax.set_ylim(-top * 0.12 * (len(rows) + 1), top * 1.05)
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)

    handles = [
        plt.Line2D([], [], color=method_color[bayes_method], lw=1.0, label=f"{bayes_method}")
    ]
    handles += [
        plt.Line2D([], [], color=method_color[m], lw=1.6, marker="o", ms=3.5, label=m)
        for m in marks
    ]
    shown = len(tasks)
    title = f"{coef}: posterior and 95% intervals"
    if shown < len(all_tasks):
        title += f" ({shown} of {len(all_tasks)} tasks)"
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


# Helpers ---------------------------------------------------------------------------------------


def _results_of(source: Any, C: float | str, n_boot: int, seed: int) -> list[FusionResult]:
    from latefusion.workflow import FusionRun, fuse_summaries

    if isinstance(source, FusionRun):
        return list(source.results)
    if isinstance(source, SummarySet):
        return list(fuse_summaries(source, C=C, bayes=False, n_boot=n_boot, seed=seed).results)
    if isinstance(source, FusionResult):
        return [source]
    if isinstance(source, Mapping):
        out = []
        for label, item in source.items():
            if not _is_single(item):
                raise TypeError(
                    f"compare(): the mapping entry {label!r} must be a FusionResult or BayesFit, "
                    f"got {type(item).__name__}"
                )
            result = item if isinstance(item, FusionResult) else item.result
            out.append(dataclasses.replace(result, method=str(label)))
        return out
    result = getattr(source, "result", None)
    if isinstance(result, FusionResult):  # a BayesFit
        return [result]
    raise TypeError(
        "compare() takes FusionRun, SummarySet, FusionResult, BayesFit or a mapping of them, "
        f"got {type(source).__name__}"
    )


def _is_single(item: Any) -> bool:
    return isinstance(item, FusionResult) or isinstance(getattr(item, "result", None), FusionResult)


def _is_bayesian(result: FusionResult) -> bool:
    return result.method.startswith("bayes") or "spec" in result.info


def _as_table(source: Any) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        missing = [c for c in ESTIMATE_COLUMNS if c not in source.columns]
        if missing:
            raise ValueError(f"the table lacks the column(s) {missing}")
        table = source.copy()
        table["task"] = table["task"].fillna("").astype(str)
        return table
    return compare(source)


def _select(
    table: pd.DataFrame, methods: Sequence[str] | None, tasks: Sequence[str] | None
) -> pd.DataFrame:
    if methods is not None:
        unknown = [m for m in methods if m not in set(table["method"])]
        if unknown:
            raise ValueError(f"method(s) {unknown} are not in the table")
        table = table[table["method"].isin(methods)]
        order = {m: i for i, m in enumerate(methods)}
        table = table.iloc[np.argsort(table["method"].map(order).values, kind="stable")]
    if tasks is not None:
        unknown = [t for t in tasks if t not in set(table["task"])]
        if unknown:
            raise ValueError(f"task(s) {unknown} are not in the table")
        table = table[(table["level"] != "task") | table["task"].isin(tasks)]
    return table.reset_index(drop=True)


def _unpack_fit(fit: Any, table: pd.DataFrame | None) -> tuple[xr.DataTree, Any, str]:
    from latefusion.workflow import FusionRun

    if isinstance(fit, FusionRun):
        if fit.bayes is None:
            raise ValueError("the run has no Bayesian fit (it was run with bayes=False)")
        table = fit.table() if table is None else table
        fit = fit.bayes
    if isinstance(fit, xr.DataTree):
        dt = fit
        method = f"bayes_{dt.attrs['model']}" if "model" in dt.attrs else "bayes"
    elif isinstance(getattr(fit, "datatree", None), xr.DataTree):
        dt, method = fit.datatree, fit.result.method
    else:
        raise TypeError(f"expected a BayesFit, FusionRun or DataTree, got {type(fit).__name__}")
    if "posterior" not in dt.children or "theta" not in dt["posterior"]:
        raise ValueError("the DataTree has no posterior of theta (task, coef)")
    return dt, table, method


def _draws(da: xr.DataArray) -> np.ndarray:
    values = np.asarray(da.values, dtype=float).ravel()
    return values[np.isfinite(values)]


def _marks(
    dt: xr.DataTree,
    table: pd.DataFrame | None,
    coef: str,
    methods: Sequence[str],
    bayes_method: str,
) -> dict[str, dict[tuple[str, str], tuple[float, float, float]]]:
    """Per method: (level, task) -> (estimate, lower, upper) of ``coef``; ITL first."""
    marks: dict[str, dict[tuple[str, str], tuple[float, float, float]]] = {}
    if table is not None:
        table = _as_table(table)
        part = table[(table["coef"] == coef) & (table["method"] != bayes_method)]
        for method in methods:
            rows = part[part["method"] == method]
            if len(rows):
                marks[method] = {
                    (r.level, r.task): (r.estimate, r.lower, r.upper)
                    for r in rows.itertuples(index=False)
                }
    has_own = "observed_data" in dt.children and "constant_data" in dt.children
    if "itl" not in marks and has_own and "V" in dt["constant_data"]:
        marks = {"itl": _own_interval(dt, coef), **marks}
    return marks


def _own_interval(dt: xr.DataTree, coef: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """The task's own estimate with its Wald 95% interval, from theta_hat and V."""
    obs = _observed(dt, coef)
    V = dt["constant_data"]["V"].sel(coef=coef, coef2=coef)
    out = {}
    for task in obs.coords["task"].values:
        est = float(obs.sel(task=task))
        sd = float(np.sqrt(V.sel(task=task)))
        out[("task", str(task))] = (est, est - _Z95 * sd, est + _Z95 * sd)
    return out


def _observed(dt: xr.DataTree, coef: str) -> xr.DataArray:
    """theta_hat of ``coef`` (dims task); with one coefficient PyMC stores it without coef."""
    obs = dt["observed_data"]["theta_hat"]
    return obs.sel(coef=coef) if "coef" in obs.dims else obs
