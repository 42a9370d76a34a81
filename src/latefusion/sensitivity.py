"""Prior sensitivity of Bayesian fusion: refits over priors, and power-scaling diagnostics.

Two complementary checks (METHOD.md section 4):

- :func:`prior_sensitivity` refits the model for every catalogue model and global scale
  ``tau_0`` of a grid, and tabulates how the centre beta, the between-task scale tau, each
  task's theta_k, its shrinkage factor kappa_k and a new task's theta_new move against a
  reference fit.
- :func:`power_scaling` measures, on one fit and without refitting, how much the posterior
  would change if the prior or the likelihood were raised to a power near 1 (Kallioinen et al.
  2024, via :func:`arviz_stats.psense`); it needs the ``log_prior`` and ``log_likelihood``
  groups that :func:`latefusion.bayes.fit_bayes` writes.

>>> result = prior_sensitivity(summaries, models=["horseshoe", "normal"],
...                            global_scales=[0.1, 1, 10], draws=500, chains=2)  # doctest: +SKIP
>>> result.table                                                                 # doctest: +SKIP
>>> result.write("sensitivity/")                                                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from latefusion._outdir import write_outputs
from latefusion._version import __version__
from latefusion.summaries import SummarySet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from latefusion.bayes import BayesFit, ModelSpec

__all__ = [
    "DEFAULT_GLOBAL_SCALES",
    "DEFAULT_MODELS",
    "POWER_SCALING_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "SENSITIVITY_FILES",
    "TOP_LEVEL_PRIORS",
    "SensitivityResult",
    "plot_power_scaling",
    "plot_prior_sensitivity",
    "plot_task_shifts",
    "power_scaling",
    "prior_sensitivity",
]

logger = logging.getLogger(__name__)

#: Models refitted when none are named.
DEFAULT_MODELS = ("horseshoe", "normal")
#: Global scales tau_0 (in units of the tasks' standard errors) when none are given.
DEFAULT_GLOBAL_SCALES = (0.1, 1.0, 10.0)
#: Log-prior terms power-scaled by default: the top-level priors (not the local scales).
TOP_LEVEL_PRIORS = ("beta_z", "tau", "c2")  # beta_z: beta in units of standard errors
#: Power-scaling sensitivity above this flags a prior or likelihood (Kallioinen et al. 2024).
PSENSE_THRESHOLD = 0.05

#: Columns of ``sensitivity.csv`` (a public interface: extend, never rename).
SENSITIVITY_COLUMNS = [
    "model", "global_scale", "level", "task", "coef", "quantity",
    "mean", "sd", "median", "lower", "upper", "shift", "shift_sd", "scale",
]  # fmt: skip
#: Columns of ``power_scaling.csv`` (a public interface: extend, never rename).
POWER_SCALING_COLUMNS = [
    "model", "global_scale", "quantity", "task", "coef", "prior", "likelihood", "diagnosis",
]  # fmt: skip
#: Columns of ``diagnostics.csv``.
DIAGNOSTICS_COLUMNS = [
    "model", "global_scale", "divergences", "max_rhat", "min_ess_bulk", "min_ess_tail",
    "min_bfmi", "retried", "seconds", "problems",
]  # fmt: skip
#: Files :meth:`SensitivityResult.write` writes.
SENSITIVITY_FILES = (
    "sensitivity.csv",
    "power_scaling.csv",
    "diagnostics.csv",
    "sensitivity.png",
    "sensitivity_tasks.png",
    "power_scaling.png",
    "report.md",
)

# Where each posterior quantity sits: (group, variable, level).
_QUANTITIES = {
    "beta": ("posterior", "beta", "pooled"),
    "tau": ("posterior", "tau", "global"),
    "theta_new": ("posterior_predictive", "theta_new", "new_task"),
    "theta": ("posterior", "theta", "task"),
    "kappa": ("posterior", "kappa", "task"),
}
_SAMPLE = ("chain", "draw")


@dataclass
class SensitivityResult:
    """Refits of a Bayesian fusion model over priors, with power-scaling diagnostics.

    Attributes
    ----------
    table : DataFrame
        Columns :data:`SENSITIVITY_COLUMNS`, one row per fit and quantity: ``quantity`` is
        ``beta`` (level ``pooled``), ``tau`` (level ``global``; in units of the standard
        errors D), ``theta_new`` (level ``new_task``), ``theta`` and ``kappa`` (level
        ``task``). ``mean``, ``sd``, ``median`` and the equal-tailed interval ``lower``,
        ``upper`` summarise the draws. ``shift`` is the centre minus the reference fit's
        centre and ``shift_sd`` that shift in units of the reference's ``scale``. The centre
        is the mean and ``scale`` the sd, except for theta_new, whose mean and variance need
        not exist under a horseshoe (its ``mean`` and ``sd`` are then sample moments of a
        heavy tail, unstable from fit to fit): there the centre is the median and ``scale``
        half the width of the central 68.3% interval.
    power_scaling : DataFrame
        Columns :data:`POWER_SCALING_COLUMNS`: for every fit, the power-scaling sensitivity
        of beta, tau and theta to the prior and to the likelihood (see :func:`power_scaling`);
        empty if it was not asked for.
    diagnostics : DataFrame
        Per fit: divergences, worst R-hat, ESS and E-BFMI, whether it was retried, seconds and
        the problems found (never hidden).
    reference : tuple of (str, float)
        The (model, global scale) the shifts are measured against.
    fits : dict
        (model, global scale) -> :class:`latefusion.bayes.BayesFit`, in fitting order.
    settings : dict
        Models, scales, fit options, latefusion version.
    """

    table: pd.DataFrame
    power_scaling: pd.DataFrame
    diagnostics: pd.DataFrame
    reference: tuple[str, float]
    fits: dict[tuple[str, float], Any] = field(default_factory=dict, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def plot(self, quantities: Sequence[str] = ("beta", "tau", "theta_new")) -> Figure:
        """Medians and 95% intervals of the global quantities across fits
        (:func:`plot_prior_sensitivity`)."""
        return plot_prior_sensitivity(self.table, quantities=quantities, reference=self.reference)

    def plot_tasks(self, coef: str | None = None, max_tasks: int = 30) -> Figure:
        """How far each theta_k moves, in reference sds (:func:`plot_task_shifts`)."""
        return plot_task_shifts(self.table, coef=coef, max_tasks=max_tasks)

    def plot_power_scaling(self, max_tasks: int = 10) -> Figure:
        """Prior and likelihood sensitivity of every fit (:func:`plot_power_scaling`)."""
        return plot_power_scaling(self.power_scaling, max_tasks=max_tasks)

    def largest_shifts(self, n: int = 10, quantity: str = "theta") -> pd.DataFrame:
        """The ``n`` rows of ``quantity`` that move most, by absolute ``shift_sd``."""
        rows = self.table[self.table["quantity"] == quantity]
        order = rows["shift_sd"].abs().sort_values(ascending=False, kind="stable").index
        return rows.loc[order[:n]].reset_index(drop=True)

    def markdown(self) -> str:
        """The report: settings, fit diagnostics, how the conclusions move, power scaling."""
        ref_model, ref_scale = self.reference
        t = self.table
        glob = t[t["quantity"].isin(["beta", "tau", "theta_new"])]
        cols = ["model", "global_scale", "quantity", "coef", "mean", "median", "lower", "upper"]
        cols += ["shift", "shift_sd"]
        lines = [
            "# latefusion prior sensitivity",
            "",
            f"latefusion {__version__}. {len(self.fits)} fits: models "
            f"{', '.join(self.settings.get('models', []))} at global scales tau_0 = "
            f"{', '.join(f'{g:g}' for g in self.settings.get('global_scales', []))} (in units "
            "of the tasks' standard errors). Shifts are measured against "
            f"`{ref_model}` at tau_0 = {ref_scale:g}.",
            "",
            "## Settings",
            "",
            "```",
            *(f"{k}: {v}" for k, v in self.settings.items()),
            "```",
            "",
            "## Sampling diagnostics",
            "",
            self.diagnostics.to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
        troubled = self.diagnostics[self.diagnostics["problems"] != ""]
        if len(troubled):
            lines += [
                f"**{len(troubled)} fit(s) show sampling problems**; read their rows with care.",
                "",
            ]
        lines += [
            "## Centre, between-task scale and a new task",
            "",
            "95% equal-tailed intervals. `shift`: posterior mean minus the reference's (median "
            "for theta_new); `shift_sd`: the same in reference posterior sds (for theta_new, "
            "whose sd need not exist under a horseshoe, in half-widths of the reference's "
            "central 68.3% interval).",
            "",
            glob[cols].to_markdown(index=False, floatfmt=".4g"),
            "",
            "## Tasks that move most",
            "",
            self.largest_shifts(10)[
                ["model", "global_scale", "task", "coef", *cols[4:]]
            ].to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
        ps = self.power_scaling
        if len(ps):
            head = ps[ps["quantity"].isin(["beta", "tau"])]
            flagged = ps[(ps["quantity"] == "theta") & (ps["diagnosis"] != "ok")]
            lines += [
                "## Power-scaling sensitivity",
                "",
                "Change of each posterior (cumulative Jensen-Shannon distance) when the prior "
                "or the likelihood is raised to a power near 1 (Kallioinen et al. 2024). Above "
                f"{PSENSE_THRESHOLD}: the prior is informative (prior), or the data are "
                "(likelihood); both above it suggest a prior-data conflict.",
                "",
                head.to_markdown(index=False, floatfmt=".3f"),
                "",
                f"theta: {len(flagged)} of {int((ps['quantity'] == 'theta').sum())} "
                "(fit, task, coefficient) rows flagged.",
                "",
            ]
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write :data:`SENSITIVITY_FILES` into ``out_dir`` (created if needed).

        Every file goes to a staging directory first and is moved into place only when all are
        complete, so an error never leaves a half-written output; an earlier run's
        ``power_scaling.png`` is removed when this run computed no power scaling.
        """
        return write_outputs(out_dir, SENSITIVITY_FILES, self._write_all)

    def _write_all(self, d: Path) -> None:
        import matplotlib.pyplot as plt

        self.table.to_csv(d / "sensitivity.csv", index=False, float_format="%.15g")
        self.power_scaling.to_csv(d / "power_scaling.csv", index=False, float_format="%.15g")
        self.diagnostics.to_csv(d / "diagnostics.csv", index=False, float_format="%.6g")
        plots = [("sensitivity.png", self.plot), ("sensitivity_tasks.png", self.plot_tasks)]
        if len(self.power_scaling):  # skipped with power_scaling_vars=None
            plots.append(("power_scaling.png", self.plot_power_scaling))
        for name, make in plots:
            fig = make()
            fig.savefig(d / name, dpi=100)
            plt.close(fig)
        (d / "report.md").write_text(self.markdown(), encoding="utf-8")


def prior_sensitivity(
    summaries: SummarySet,
    models: Sequence[str | os.PathLike[str] | ModelSpec] = DEFAULT_MODELS,
    global_scales: Sequence[float] | None = DEFAULT_GLOBAL_SCALES,
    reference: tuple[str, float | None] | str | None = None,
    power_scaling_vars: Sequence[str] | None = ("beta", "tau", "theta"),
    interval: float = 0.95,
    **fit_options: Any,
) -> SensitivityResult:
    """Refit the Bayesian fusion model over priors and tabulate how the posterior moves.

    For every model m and global scale tau_0 of the grid, the model of METHOD.md section 3 is
    fitted with ``tau ~ HalfCauchy(tau_0)`` (tau_0 in units of the standard errors D), every
    other setting as in the model's spec::

        theta_hat_k ~ MvNormal(beta + delta_k, V_k),   delta_k ~ family_m(tau, lam_k; D)

    Parameters
    ----------
    summaries : SummarySet
        Excluded tasks are left out, as in :func:`latefusion.bayes.fit_bayes`.
    models : sequence of str, path or ModelSpec, default=("horseshoe", "normal")
        Catalogue names (:func:`latefusion.bayes.list_models`), spec files or specs; their
        names must differ.
    global_scales : sequence of float or None, default=(0.1, 1.0, 10.0)
        The grid of tau_0; ``None`` fits each model at its own spec's global scale only.
    reference : str or (str, float or None), optional
        The fit shifts are measured against: a model name (at the grid scale nearest, on a log
        scale, to its spec's global scale) or (model, scale). Default: the first model so.
    power_scaling_vars : sequence of str or None, default=("beta", "tau", "theta")
        Posterior variables of :func:`power_scaling` for every fit; ``None`` skips it.
    interval : float, default=0.95
        Probability of the equal-tailed intervals.
    **fit_options
        Passed to :func:`latefusion.bayes.fit_bayes` (``draws``, ``tune``, ``chains``,
        ``cores``, ``target_accept``, ``seed``, ``sampler``, ``parameterization``). Every fit
        gets the same options, seed included.

    Returns
    -------
    SensitivityResult
        ``table``, ``power_scaling``, ``diagnostics``, ``reference``, ``fits``, ``settings``.

    Warns
    -----
    ConvergenceWarning
        From each fit with sampling problems (they are also in ``diagnostics``).

    Raises
    ------
    ValueError
        If no model or scale is given, a scale is not positive and finite, two models share a
        name, or the reference is not among the fits.
    """
    from latefusion.bayes import fit_bayes, load_spec

    specs = [load_spec(m) for m in models]
    if not specs:
        raise ValueError("prior_sensitivity() needs at least one model")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model name(s) {dupes} appear more than once; rename the spec files")
    grid = _grid(specs, global_scales)
    ref = _reference(specs, grid, reference)
    if not 0 < interval < 1:
        raise ValueError(f"interval must be in (0, 1), got {interval}")

    # Fit every (model, scale).
    fits: dict[tuple[str, float], BayesFit] = {}
    seconds: dict[tuple[str, float], float] = {}
    for spec in specs:
        for scale in grid[spec.name]:
            logger.info("fitting %s at global scale %g", spec.name, scale)
            started = time.perf_counter()
            fits[(spec.name, scale)] = fit_bayes(
                summaries, model=spec.replace(global_scale=scale), **fit_options
            )
            seconds[(spec.name, scale)] = time.perf_counter() - started

    # Summaries of the draws, shifts against the reference, diagnostics, power scaling.
    table = pd.concat(
        [_draw_summary(fit.datatree, key, interval) for key, fit in fits.items()],
        ignore_index=True,
    )
    table = _add_shifts(table, ref)
    diagnostics = pd.DataFrame(
        [_diagnostic_row(key, fit.diagnostics, seconds[key]) for key, fit in fits.items()],
        columns=DIAGNOSTICS_COLUMNS,
    )
    frames = []
    if power_scaling_vars:
        for (name, scale), fit in fits.items():
            ps = power_scaling(fit, var_names=power_scaling_vars)
            frames.append(ps.assign(model=name, global_scale=scale))
    ps_table = (
        pd.concat(frames, ignore_index=True)[POWER_SCALING_COLUMNS]
        if frames
        else pd.DataFrame(columns=POWER_SCALING_COLUMNS)
    )
    settings = {
        "latefusion_version": __version__,
        "models": names,
        "global_scales": sorted({g for gs in grid.values() for g in gs}),
        "reference": f"{ref[0]} at {ref[1]:g}",
        "interval": interval,
        "tasks": len(summaries.usable()),
        "fit_options": {k: v for k, v in fit_options.items()},
    }
    return SensitivityResult(table, ps_table, diagnostics, ref, fits, settings)


def power_scaling(
    fit: Any,
    var_names: Sequence[str] = ("beta", "tau", "theta"),
    prior_var_names: Sequence[str] | str | None = None,
    threshold: float = PSENSE_THRESHOLD,
    alphas: tuple[float, float] = (0.99, 1.01),
) -> pd.DataFrame:
    """Power-scaling sensitivity of the posterior to the prior and to the likelihood.

    The posterior p(theta | y) is proportional to p(theta) p(y | theta); raising the prior (or
    the likelihood) to a power alpha near 1 and measuring, by importance sampling without a
    refit, how far each posterior margin moves (the cumulative Jensen-Shannon distance per
    unit of log alpha) gives the diagnostics of Kallioinen et al. (2024), computed by
    :func:`arviz_stats.psense`. The numbers are those of :func:`arviz_stats.psense_summary`
    given the same prior terms, in a tidy table with the task and coefficient in columns of
    their own.

    Parameters
    ----------
    fit : BayesFit or xarray.DataTree
        Needs the ``posterior``, ``log_prior`` and ``log_likelihood`` groups. Marginalised, the
        log-prior covers beta, tau and the local scales, and the log-likelihood is that of
        theta_hat_k with delta integrated out.
    var_names : sequence of str, default=("beta", "tau", "theta")
        Posterior variables to diagnose.
    prior_var_names : sequence of str or "all", optional
        Terms of the log-prior to power-scale. Default: the top-level priors, those of beta,
        tau and (regularised horseshoe) the slab c2, not the local scales lam_k: these are
        the population distribution of the tasks, part of the model rather than of the
        prior, and scaling them flags every quantity of a hierarchical model (Kallioinen et
        al. 2024 power-scale top-level priors only). ``"all"``: the whole log-prior;
        ``["tau"]``: the prior of the global scale alone.
    threshold : float, default=0.05
    alphas : (float, float), default=(0.99, 1.01)

    Returns
    -------
    DataFrame
        Columns ``quantity``, ``task``, ``coef`` (empty where the variable has no such dim),
        ``prior``, ``likelihood`` and ``diagnosis``: ``"prior-data conflict"`` when both
        sensitivities reach the threshold, ``"strong prior / weak likelihood"`` when only the
        prior's does, else ``"ok"``.
    """
    import arviz_stats as azs

    dt = fit.datatree if hasattr(fit, "datatree") else fit
    if not isinstance(dt, xr.DataTree):
        raise TypeError(f"expected a BayesFit or DataTree, got {type(fit).__name__}")
    missing = [g for g in ("posterior", "log_prior", "log_likelihood") if g not in dt.children]
    if missing:
        raise ValueError(f"the DataTree lacks the group(s) {missing} that power scaling needs")
    absent = [v for v in var_names if v not in dt["posterior"]]
    if absent:
        raise ValueError(f"variable(s) {absent} are not in the posterior")
    terms = list(dt["log_prior"].data_vars)
    if prior_var_names is None:
        prior_var_names = [v for v in TOP_LEVEL_PRIORS if v in terms]
    elif isinstance(prior_var_names, str) and prior_var_names == "all":
        prior_var_names = terms
    elif isinstance(prior_var_names, str):
        prior_var_names = [prior_var_names]
    unknown = [v for v in prior_var_names if v not in terms]
    if unknown:
        raise ValueError(f"log-prior term(s) {unknown} are not in the DataTree (it has {terms})")
    common = {"var_names": list(var_names), "alphas": tuple(alphas)}
    prior = azs.psense(dt, group="prior", group_var_names=list(prior_var_names), **common)
    like = azs.psense(dt, group="likelihood", **common)

    rows = []
    for name in var_names:
        dims = [d for d in dt["posterior"][name].dims if d not in _SAMPLE]
        p_da, l_da = prior[name].transpose(*dims), like[name].transpose(*dims)
        for idx in np.ndindex(p_da.shape):
            sel = dict(zip(p_da.dims, idx, strict=True))
            labels = {d: str(p_da.coords[d].values[i]) for d, i in sel.items() if d in p_da.coords}
            rows.append(
                {
                    "quantity": name,
                    "task": labels.get("task", ""),
                    "coef": labels.get("coef", ""),
                    "prior": float(p_da.values[idx]),
                    "likelihood": float(l_da.isel(sel).values),
                }
            )
    table = pd.DataFrame(rows, columns=["quantity", "task", "coef", "prior", "likelihood"])
    table["diagnosis"] = [
        _diagnose(p, lk, threshold)
        for p, lk in zip(table["prior"], table["likelihood"], strict=True)
    ]
    return table


# Plots -----------------------------------------------------------------------------------------


def plot_prior_sensitivity(
    table: pd.DataFrame,
    quantities: Sequence[str] = ("beta", "tau", "theta_new"),
    reference: tuple[str, float] | None = None,
) -> Figure:
    """Posterior median and interval of each global quantity, across global scales and models.

    Parameters
    ----------
    table : DataFrame
        ``SensitivityResult.table`` (or ``sensitivity.csv``).
    quantities : sequence of str, default=("beta", "tau", "theta_new")
        One panel per quantity and coefficient.
    reference : (str, float), optional
        Its median is drawn as a dashed horizontal line.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    table = _clean(table)
    panels = [
        (q, c) for q in quantities for c in dict.fromkeys(table.loc[table["quantity"] == q, "coef"])
    ]
    if not panels:
        raise ValueError(f"no rows of {list(quantities)} in the table")
    models = list(dict.fromkeys(table["model"]))
    scales = sorted(set(table["global_scale"]))
    log_x = len(scales) > 1
    span = math.log(max(scales) / min(scales)) if log_x else 1.0
    width = 0.04 * (span or 1.0)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (q, c) in zip(axes[0], panels, strict=True):
        rows = table[(table["quantity"] == q) & (table["coef"] == c)]
        for m, model in enumerate(models):
            part = rows[rows["model"] == model].sort_values("global_scale")
            off = (m - (len(models) - 1) / 2) * width
            x = part["global_scale"].to_numpy(float) * math.exp(off)
            color = cycle[m % len(cycle)]
            ax.vlines(x, part["lower"], part["upper"], color=color, lw=1.3)
            ax.plot(x, part["median"], "o-", ms=4, lw=0.8, color=color, label=model)
        if reference is not None:
            ref = rows[(rows["model"] == reference[0]) & (rows["global_scale"] == reference[1])]
            if len(ref):
                ax.axhline(ref["median"].iloc[0], color="0.5", lw=0.8, ls="--", zorder=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(scales, [f"{g:g}" for g in scales])
        ax.minorticks_off()
        ax.set_xlabel("global scale tau_0 (standard errors)")
        unit = " (standard errors)" if q == "tau" else ""
        ax.set_title(f"{q}[{c}]{unit}" if c else f"{q}{unit}", fontsize=9)
    axes[0][0].set_ylabel("posterior median and interval")
    axes[0][0].legend(fontsize=7, frameon=True)
    fig.tight_layout()
    return fig


def plot_task_shifts(
    table: pd.DataFrame, coef: str | None = None, max_tasks: int = 30, value: str = "shift_sd"
) -> Figure:
    """Heat map of how far each task's theta moves in every fit, in reference sds.

    Parameters
    ----------
    table : DataFrame
        ``SensitivityResult.table`` (or ``sensitivity.csv``).
    coef : str, optional
        Default: the first coefficient.
    max_tasks : int, default=30
        With more tasks, those that move most (largest absolute value in any fit) are shown,
        most first.
    value : {"shift_sd", "shift", "mean", "median"}, default="shift_sd"

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    table = _clean(table)
    theta = table[table["quantity"] == "theta"]
    if theta.empty:
        raise ValueError("no rows of theta in the table")
    coef = str(theta["coef"].iloc[0]) if coef is None else coef
    theta = theta[theta["coef"] == coef]
    if theta.empty:
        raise ValueError(f"no rows of theta[{coef!r}] in the table")
    grid = theta.pivot_table(
        index="task", columns=["model", "global_scale"], values=value, sort=False
    )
    tasks = list(dict.fromkeys(theta["task"]))
    grid = grid.reindex(index=tasks)
    note = ""
    if len(tasks) > max_tasks:
        keep = grid.abs().max(axis=1).sort_values(ascending=False, kind="stable").index[:max_tasks]
        grid = grid.loc[list(keep)]
        note = f"\n{max_tasks} of {len(tasks)} tasks: those that move most"

    values = grid.to_numpy(float)
    diverging = value in ("shift_sd", "shift")
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * values.shape[1], 1.3 + 0.22 * values.shape[0]))
    image = ax.imshow(
        values,
        aspect="auto",
        cmap="RdBu_r" if diverging else "viridis",
        vmin=-limit if diverging else None,
        vmax=limit if diverging else None,
    )
    ax.set_yticks(range(len(grid.index)), grid.index, fontsize=7)
    ax.set_xticks(
        range(values.shape[1]),
        [f"{m}\n{g:g}" for m, g in grid.columns],
        fontsize=7,
        rotation=90 if values.shape[1] > 6 else 0,
    )
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label=value, shrink=0.8)
    ax.set_title(f"theta[{coef}]: {value} by model and tau_0{note}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_power_scaling(
    table: pd.DataFrame, max_tasks: int = 10, threshold: float = PSENSE_THRESHOLD
) -> Figure:
    """Prior and likelihood power-scaling sensitivity, one row per quantity, one point per fit.

    Parameters
    ----------
    table : DataFrame
        From :func:`power_scaling` or ``SensitivityResult.power_scaling``.
    max_tasks : int, default=10
        theta rows shown: those of the tasks with the largest prior sensitivity in any fit.
    threshold : float, default=0.05
        Drawn as a vertical line.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    table = _clean(table)
    if table.empty:
        raise ValueError("the power-scaling table is empty")
    if "model" not in table:
        table = table.assign(model="fit", global_scale=np.nan)
    table = table.assign(label=[_label(r) for r in table.itertuples(index=False)])
    table["fit"] = [
        m if pd.isna(g) else f"{m}, tau_0={g:g}"
        for m, g in zip(table["model"], table["global_scale"], strict=True)
    ]
    theta = table[table["quantity"] == "theta"]
    top = theta.groupby("label", sort=False)["prior"].max().sort_values(ascending=False)
    labels = [
        *dict.fromkeys(table.loc[table["quantity"] != "theta", "label"]),
        *top.index[:max_tasks],
    ]
    table = table[table["label"].isin(labels)]
    fits = list(dict.fromkeys(table["fit"]))
    models = list(dict.fromkeys(table["model"]))
    scales = list(dict.fromkeys(table["global_scale"]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^DvP*X"

    fig, axes = plt.subplots(
        1, 2, figsize=(9.0, 1.4 + 0.28 * len(labels)), sharey=True, squeeze=False
    )
    y_of = {lbl: i for i, lbl in enumerate(labels)}
    offsets = np.linspace(-0.25, 0.25, len(fits)) if len(fits) > 1 else np.zeros(1)
    for ax, component in zip(axes[0], ("prior", "likelihood"), strict=True):
        for fit, off in zip(fits, offsets, strict=True):
            part = table[table["fit"] == fit]
            model, scale = part["model"].iloc[0], part["global_scale"].iloc[0]
            ax.plot(
                part[component],
                part["label"].map(y_of).to_numpy(float) + off,
                markers[scales.index(scale) % len(markers)],
                ms=4,
                ls="none",
                color=cycle[models.index(model) % len(cycle)],
                label=fit,
            )
        ax.axvline(threshold, color="0.5", lw=0.8, ls="--")
        ax.set_title(f"{component} sensitivity", fontsize=9)
        ax.set_xlabel("power-scaling sensitivity")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].set_ylim(len(labels) - 0.5, -0.5)
    axes[0][1].legend(fontsize=6, frameon=True, loc="best")
    fig.tight_layout()
    return fig


# Helpers ---------------------------------------------------------------------------------------


def _grid(specs: Sequence[ModelSpec], scales: Sequence[float] | None) -> dict[str, list[float]]:
    if scales is None:
        return {s.name: [float(s.global_scale)] for s in specs}
    values = [float(g) for g in scales]
    if not values:
        raise ValueError("global_scales is empty; pass None to use each model's own scale")
    bad = [g for g in values if not (math.isfinite(g) and g > 0)]
    if bad:
        raise ValueError(f"global scales must be finite and > 0, got {bad}")
    values = list(dict.fromkeys(values))
    return {s.name: values for s in specs}


def _reference(
    specs: Sequence[ModelSpec],
    grid: Mapping[str, Sequence[float]],
    reference: tuple[str, float | None] | str | None,
) -> tuple[str, float]:
    if reference is None:
        name, scale = specs[0].name, None
    elif isinstance(reference, str):
        name, scale = reference, None
    else:
        name, scale = reference
    if name not in grid:
        raise ValueError(f"reference model {name!r} is not among the models {list(grid)}")
    if scale is None:
        own = next(s.global_scale for s in specs if s.name == name)
        return name, min(grid[name], key=lambda g: abs(math.log(g / own)))
    if float(scale) not in grid[name]:
        raise ValueError(
            f"reference scale {scale:g} is not in the grid {list(grid[name])} of {name!r}"
        )
    return name, float(scale)


def _summarise(values: np.ndarray, interval: float) -> dict[str, float]:
    """mean, sd, median, lower, upper of draws along axis 0."""
    a = (1 - interval) / 2
    q = np.quantile(values, [a, 0.5, 1 - a, 0.15866, 0.84134], axis=0)
    return {
        "mean": values.mean(axis=0),
        "sd": values.std(axis=0, ddof=1),
        "median": q[1],
        "lower": q[0],
        "upper": q[2],
        "half68": (q[4] - q[3]) / 2,
    }


def _draw_summary(dt: xr.DataTree, key: tuple[str, float], interval: float) -> pd.DataFrame:
    """One row per scalar of beta, tau, theta_new, theta, kappa, for one fit."""
    rows = []
    for quantity, (group, var, level) in _QUANTITIES.items():
        if group not in dt.children or var not in dt[group]:
            continue
        da = dt[group][var]
        dims = [d for d in da.dims if d not in _SAMPLE]
        da = da.transpose(*_SAMPLE, *dims)
        flat = da.values.reshape(-1, *da.shape[2:])
        stats = _summarise(flat, interval)
        for idx in np.ndindex(*da.shape[2:]):
            labels = {d: str(da.coords[d].values[i]) for d, i in zip(dims, idx, strict=True)}
            row = {
                "model": key[0],
                "global_scale": key[1],
                "level": level,
                "task": labels.get("task", ""),
                "coef": labels.get("coef", ""),
                "quantity": quantity,
            }
            row |= {k: float(v[idx]) for k, v in stats.items()}
            half68 = row.pop("half68")
            row["scale"] = half68 if quantity == "theta_new" else row["sd"]
            rows.append(row)
    return pd.DataFrame(rows)


def _add_shifts(table: pd.DataFrame, reference: tuple[str, float]) -> pd.DataFrame:
    keys = ["quantity", "task", "coef"]
    is_ref = (table["model"] == reference[0]) & (table["global_scale"] == reference[1])
    ref = table.loc[is_ref, [*keys, "mean", "median", "scale"]].rename(
        columns={"mean": "ref_mean", "median": "ref_median", "scale": "ref_scale"}
    )
    merged = table.merge(ref, on=keys, how="left", validate="many_to_one")
    by_median = merged["quantity"] == "theta_new"
    centre = np.where(by_median, merged["median"], merged["mean"])
    ref_centre = np.where(by_median, merged["ref_median"], merged["ref_mean"])
    merged["shift"] = centre - ref_centre
    with np.errstate(divide="ignore", invalid="ignore"):
        merged["shift_sd"] = merged["shift"] / merged["ref_scale"]
    return merged[SENSITIVITY_COLUMNS]


def _diagnostic_row(key: tuple[str, float], d: Mapping[str, Any], seconds: float) -> dict:
    return {
        "model": key[0],
        "global_scale": key[1],
        **{c: d.get(c) for c in DIAGNOSTICS_COLUMNS[2:8]},
        "seconds": round(seconds, 2),
        "problems": "; ".join(d.get("problems", [])),
    }


def _diagnose(prior: float, likelihood: float, threshold: float) -> str:
    """The rule of :func:`arviz_stats.psense_summary`, in words without symbols."""
    if prior >= threshold and likelihood >= threshold:
        return "prior-data conflict"
    if prior > threshold > likelihood:
        return "strong prior / weak likelihood"
    return "ok"


def _clean(table: pd.DataFrame) -> pd.DataFrame:
    """Empty strings for missing task and coef labels (as read back from a CSV)."""
    table = table.copy()
    for col in ("task", "coef"):
        if col in table:
            table[col] = table[col].fillna("").astype(str)
    return table


def _label(row: Any) -> str:
    inside = ", ".join(x for x in (row.task, row.coef) if x)
    return f"{row.quantity}[{inside}]" if inside else row.quantity
