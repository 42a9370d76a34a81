"""Fit a Bayesian fusion model: sample, diagnose, and summarise into a DataTree and a result."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import arviz_stats as azs
import numpy as np
import pandas as pd
import pymc as pm
import xarray as xr

from latefusion._version import __version__
from latefusion.bayes.model import (
    build_model,
    coef_scales,
    condition_delta,
    draw_new_sd,
    resolve_parameterization,
    shrinkage_factors,
)
from latefusion.bayes.spec import ModelSpec, load_spec
from latefusion.results import FusionResult, Interval
from latefusion.summaries import SummarySet
from latefusion.warnings import ConvergenceWarning, FewTasksWarning

__all__ = ["BayesFit", "fit_bayes", "nutpie_available", "sample_prior"]

logger = logging.getLogger(__name__)

#: Thresholds for the convergence warning (Vehtari et al. 2021).
RHAT_MAX = 1.01
ESS_MIN = 400
BFMI_MIN = 0.3
#: target_accept of the one retry after divergences (if the first run used less).
RETRY_TARGET_ACCEPT = 0.99
#: Fewer usable tasks than this and tau is hardly learnt from the data.
MIN_TASKS = 3
#: NUTS implementations. ``"auto"`` is nutpie when it is installed, else PyMC's own NUTS.
#: Measured with the default model (benchmarks/bench_bayes.py, results/bayes.txt; 4 chains x
#: 1000 + 1000 draws, medians of 3 seeds, a shared 2-core machine), seconds compile included,
#: nutpie against PyMC: eight schools 1.3 against 3.7, K = 78 2.0 against 6.2, K = 500 6.3
#: against 15.1. nutpie's draw loop is 3-22 times faster; its first call in a process costs
#: about 2.5 s more (numba warm-up), 3.7 s for eight schools against PyMC's 4.1 s. Under heavy
#: load from other jobs the order was the same.
SAMPLERS = ("auto", "pymc", "nutpie")
#: Start method of PyMC's chain processes when ``cores > 1`` (see :func:`fit_bayes`, Notes).
MP_CONTEXT = "forkserver"
_QUANTILES = (0.025, 0.975)


@dataclass(frozen=True)
class BayesFit:
    """A fitted Bayesian fusion model.

    Attributes
    ----------
    datatree : xarray.DataTree
        Groups ``posterior`` (beta (coef), tau, the local scales, sd_delta, delta and theta
        (task, coef), kappa (task)), ``posterior_predictive`` (theta_new (coef): a new task),
        ``sample_stats``, ``observed_data`` (theta_hat), ``constant_data`` (V, s),
        ``log_likelihood`` (theta_hat, dims task) and ``log_prior`` (the sampled variables);
        the root attrs hold the latefusion version, the spec and the settings. Marginalised,
        the log-likelihood of task k is that of theta_hat_k ~ MvNormal(beta, V_k + Sigma_k),
        delta integrated out, and the log-prior covers beta, tau and the local scales.
    result : FusionResult
        Method ``"bayes_" + spec.name``; theta and beta: posterior mean, sd and the 2.5% and
        97.5% quantiles; new_task: predictive median, half-width of the central 68.3%
        interval (the predictive mean and sd need not exist under a horseshoe) and the same
        quantiles.
    diagnostics : dict
        ``divergences`` (int, final run), ``max_rhat``, ``min_ess_bulk``, ``min_ess_tail``,
        ``min_bfmi``, ``target_accept`` (used in the final run), ``retried`` (bool),
        ``divergences_first_run``, ``sampling_seconds`` (wall time of sampling, compilation
        and the retry included), ``draw_seconds`` (time in the samplers' draw loops as they
        report it, NaN if they do not), ``sampler`` (``"pymc"`` or ``"nutpie"``),
        ``problems`` (list of str).
    shrinkage : pandas.Series
        Posterior mean of the shrinkage factor kappa_k = tr(V_k (V_k + Sigma_k)^-1) / p per task
        (index ``task``), Sigma_k = diag(sd_delta_k)^2: 0 keeps the task's own estimate,
        1 pools it fully. See :func:`latefusion.bayes.model.shrinkage_factors`.
    spec : ModelSpec
    """

    datatree: xr.DataTree
    result: FusionResult
    diagnostics: dict[str, Any]
    shrinkage: pd.Series
    spec: ModelSpec

    def prob_deviation(self, amount: float | Mapping[str, float] | np.ndarray) -> pd.DataFrame:
        """Posterior probability that each task deviates from the centre by more than ``amount``.

        Parameters
        ----------
        amount : float, mapping coef -> float, or ndarray of shape (p,)
            Threshold on |delta_kj| = |theta_kj - beta_j|, in the units of the coefficient.

        Returns
        -------
        DataFrame of shape (K, p)
            P(|delta_kj| > amount_j | data), index ``task``, columns ``coef``.
        """
        delta = self.datatree.posterior["delta"]
        coefs = [str(c) for c in delta.coords["coef"].values]
        if isinstance(amount, Mapping):
            missing = [c for c in coefs if c not in amount]
            if missing:
                raise ValueError(f"amount gives no threshold for coefficient(s) {missing}")
            amount = np.array([amount[c] for c in coefs], dtype=float)
        threshold = np.broadcast_to(np.asarray(amount, dtype=float), (len(coefs),))
        if np.any(threshold < 0):
            raise ValueError(f"amount must be >= 0, got {threshold}")
        limit = xr.DataArray(threshold, coords={"coef": coefs}, dims="coef")
        prob = (abs(delta) > limit).mean(("chain", "draw"))
        return prob.to_pandas()


def fit_bayes(
    summaries: SummarySet,
    model: str | os.PathLike[str] | ModelSpec = "horseshoe",
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    cores: int | None = None,
    target_accept: float = 0.95,
    seed: int | None = None,
    progressbar: bool = False,
    parameterization: str | None = None,
    sampler: str = "auto",
) -> BayesFit:
    """Fuse task summaries with a hierarchical Bayesian model.

    The model (METHOD.md section 3; the families are described in
    :func:`latefusion.bayes.model.build_model`)::

        theta_hat_k ~ MvNormal(theta_k, V_k),   theta_k = beta + delta_k
        delta_k = tau * lam_k * D z_k,          z_k ~ Normal(0, I_p)     (horseshoe, default)
        lam_k ~ HalfCauchy(1),  tau ~ HalfCauchy(global_scale),
        beta_j ~ Normal(0, (beta_scale * s_j)^2),  D = diag(s_1..s_p)

    with s_j the median over tasks of the standard error of coefficient j.

    Parameters
    ----------
    summaries : SummarySet
        Excluded tasks are left out (and logged).
    model : str, path or ModelSpec, default="horseshoe"
        Catalogue name (:func:`latefusion.bayes.list_models`), spec file, or spec.
    draws, tune, chains : int, default=1000, 1000, 4
        NUTS draws and tuning steps per chain, and the number of chains.
    cores : int, optional
        Parallel chains. nutpie runs chains in threads (default: one per CPU). PyMC's sampler
        runs them one after the other in this process by default (``cores=1``); ``cores > 1``
        starts that many worker processes (see Notes).
    target_accept : float, default=0.95
        NUTS target acceptance. After divergent transitions the model is sampled once more
        with ``max(0.99, (1 + target_accept) / 2)``; ``diagnostics["retried"]`` says so.
    seed : int, optional
        Seeds the sampler and the post-processing draws (theta_new, marginalised delta).
    progressbar : bool, default=False
    parameterization : {"noncentered", "centered", "marginalized"}, optional
        Overrides the spec's (the catalogue's is ``"marginalized"``: only beta, tau and the
        local scales are sampled, and delta_k is drawn afterwards from its Gaussian
        conditional, see :func:`latefusion.bayes.model.condition_delta`).
    sampler : {"auto", "pymc", "nutpie"}, default="auto"
        NUTS implementation, run through ``pymc.sample(nuts_sampler=...)``. ``"auto"`` is
        ``"nutpie"`` when the nutpie package is installed (``pip install latefusion[fast]``)
        and PyMC accepts its version, else ``"pymc"``. nutpie was measured faster, compile
        included, on eight schools, K = 78 and K = 500 (see :data:`SAMPLERS`).

    Returns
    -------
    BayesFit
        ``datatree``, ``result`` (a FusionResult), ``diagnostics``, ``shrinkage``, ``spec``.

    Warns
    -----
    ConvergenceWarning
        If divergences remain after the retry, R-hat > 1.01, bulk or tail ESS < 400 or
        E-BFMI < 0.3 anywhere in the posterior.
    FewTasksWarning
        With fewer than 3 usable tasks.

    Notes
    -----
    Chains in processes: PyMC starts its worker processes with ``fork`` by default, which
    Python 3.12 deprecates in a multi-threaded process (numpy's BLAS, numba, pytest-xdist,
    Jupyter and tqdm all run threads, so in practice always) because the child can deadlock.
    Here PyMC's sampler runs its chains in one process unless ``cores > 1`` is asked for, and
    then starts the workers with ``forkserver``, which is safe but re-imports PyMC and compiles
    the model in every worker: on eight schools (4 chains, 2 cores shared with other jobs) 7 s
    sequential, 16 s with fork, 51 s with forkserver. A script that asks for ``cores > 1`` with
    the PyMC sampler needs the ``if __name__ == "__main__":`` guard, as any multiprocessing code
    does.
    nutpie runs its chains in threads and forks nothing.

    Every prior scale is a multiple of s_j, so multiplying the outcome by c multiplies every
    estimate by c (scale-equivariance). The prior of beta is centred at 0: with beta_scale = 10
    it moves the posterior mean of beta towards 0 by a fraction of about
    1 / (1 + beta_scale^2 K) of its distance from 0 (under full pooling, equal standard errors),
    negligible unless K is tiny and the centre is hundreds of standard errors from 0.
    """
    spec = load_spec(model)
    parameterization = resolve_parameterization(spec, parameterization)
    nuts_sampler = _choose_sampler(sampler)
    _check_sampling(draws, tune, chains, target_accept)
    _check_tasks(summaries)
    pm_model = build_model(summaries, spec, parameterization)
    seeds = np.random.SeedSequence(seed).generate_state(3)
    settings = {"draws": draws, "tune": tune, "chains": chains, "progressbar": progressbar}
    settings |= _cores(nuts_sampler, cores, chains)

    # Sample; retry once at a higher target_accept after divergences.
    start = time.perf_counter()
    dt = _sample(pm_model, target_accept, int(seeds[0]), settings)
    draw_seconds = _draw_seconds(dt)
    first_divergences = _count_divergences(dt)
    used_accept, retried = target_accept, False
    if first_divergences > 0:
        used_accept = max(RETRY_TARGET_ACCEPT, (1 + target_accept) / 2)
        logger.info(
            "%d divergent transitions at target_accept=%.3f; sampling again at %.3f",
            first_divergences,
            target_accept,
            used_accept,
        )
        dt = _sample(pm_model, used_accept, int(seeds[1]), settings)
        draw_seconds += _draw_seconds(dt)
        retried = True
    seconds = time.perf_counter() - start

    # Log densities, then the quantities drawn outside PyMC.
    pm.stats.compute_log_likelihood(dt, model=pm_model, progressbar=False)
    pm.stats.compute_log_prior(dt, model=pm_model, progressbar=False)
    rng = np.random.default_rng(seeds[2])
    _add_derived(dt, summaries, spec, parameterization, rng)

    diagnostics = _diagnose(dt)
    diagnostics |= {
        "target_accept": used_accept,
        "retried": retried,
        "divergences_first_run": first_divergences,
        "sampling_seconds": seconds,
        "draw_seconds": draw_seconds,
        "sampler": nuts_sampler,
    }
    _warn_problems(diagnostics, spec)

    shrinkage = dt.posterior["kappa"].mean(("chain", "draw")).to_pandas().rename("shrinkage")
    result = _result(dt, spec, parameterization, diagnostics, shrinkage)
    _stamp(dt, spec, parameterization, diagnostics, settings, target_accept, seed)
    return BayesFit(dt, result, diagnostics, shrinkage, spec)


def sample_prior(
    summaries: SummarySet,
    model: str | os.PathLike[str] | ModelSpec = "horseshoe",
    draws: int = 1000,
    seed: int | None = None,
    parameterization: str | None = None,
) -> xr.DataTree:
    """Draw from the prior and the prior predictive of the model (no data are used).

    Parameters
    ----------
    summaries : SummarySet
        Fixes the tasks, coefficients and V_k (and so the scales D).
    model, parameterization : as in :func:`fit_bayes`.
    draws : int, default=1000
    seed : int, optional

    Returns
    -------
    xarray.DataTree
        Groups ``prior`` (beta, tau, local scales, delta, theta, ...) and ``prior_predictive``
        (theta_hat), stamped with the spec and the latefusion version.
    """
    spec = load_spec(model)
    parameterization = resolve_parameterization(spec, parameterization)
    if parameterization == "marginalized":
        # The prior of delta is the point of a prior check; sample it.
        parameterization = "noncentered"
    pm_model = build_model(summaries, spec, parameterization)
    dt = pm.sample_prior_predictive(draws=draws, model=pm_model, random_seed=seed)
    dt.attrs |= {
        "latefusion_version": __version__,
        "model": spec.name,
        "spec": json.dumps(spec.to_dict()),
        "parameterization": parameterization,
        "seed": "none" if seed is None else str(seed),
    }
    return dt


# Steps -----------------------------------------------------------------------------------------


def nutpie_available() -> bool:
    """Whether nutpie is installed in a version that PyMC can drive."""
    if importlib.util.find_spec("nutpie") is None:
        return False
    # PyMC checks the version itself when it has such a check (PyMC >= 6.4 does).
    check = getattr(pm.sampling.mcmc, "_nutpie_meets_min_version", None)
    return bool(check()) if callable(check) else True


def _choose_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {list(SAMPLERS)}")
    if sampler == "auto":
        return "nutpie" if nutpie_available() else "pymc"
    if sampler == "nutpie" and not nutpie_available():
        raise ImportError(
            "sampler='nutpie' needs the nutpie package in a version PyMC supports; install "
            "it with `pip install latefusion[fast]`, or pass sampler='pymc'"
        )
    return sampler


def _cores(nuts_sampler: str, cores: int | None, chains: int) -> dict[str, Any]:
    """Parallelism of the chains: nutpie's threads, or PyMC's processes (see fit_bayes, Notes)."""
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise ValueError(f"cores must be a positive integer or None, got {cores!r}")
    out: dict[str, Any] = {"nuts_sampler": nuts_sampler, "cores": cores, "mp_ctx": None}
    if nuts_sampler == "pymc":
        out["cores"] = 1 if cores is None else cores
        if out["cores"] > 1 and chains > 1:
            out["mp_ctx"] = MP_CONTEXT
    return out


def _check_sampling(draws: Any, tune: Any, chains: Any, target_accept: Any) -> None:
    """Clear errors for settings PyMC and nutpie fail on with tracebacks."""
    for name, value, least in (("draws", draws, 1), ("tune", tune, 0), ("chains", chains, 1)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if draws * chains < 2:
        raise ValueError("draws x chains must be at least 2: a posterior sd needs two draws")
    if not isinstance(target_accept, int | float) or not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be strictly between 0 and 1, got {target_accept!r}")


def _check_tasks(summaries: SummarySet) -> None:
    for s in summaries.excluded():
        logger.info("task %r is excluded from Bayesian fusion: %s", s.task, s.reason)
    K = len(summaries.usable())
    if K == 0:
        raise ValueError("no usable task: every task is excluded (see their reasons)")
    if K < MIN_TASKS:
        warnings.warn(
            f"only {K} usable task(s): the between-task scale tau is learnt mostly from its prior",
            FewTasksWarning,
            stacklevel=3,
        )


def _sample(model: pm.Model, target_accept: float, seed: int, settings: dict) -> xr.DataTree:
    dt = pm.sample(
        draws=settings["draws"],
        tune=settings["tune"],
        chains=settings["chains"],
        cores=settings["cores"],
        mp_ctx=settings["mp_ctx"],
        random_seed=seed,
        progressbar=settings["progressbar"],
        nuts_sampler=settings["nuts_sampler"],
        target_accept=target_accept,
        compute_convergence_checks=False,
        model=model,
    )
    _text_stats_as_strings(dt)
    return dt


def _text_stats_as_strings(dt: xr.DataTree) -> None:
    """nutpie's ``divergence_message`` is an object array holding None; netCDF needs strings."""
    if "sample_stats" not in dt.children:
        return
    stats = dt.sample_stats.to_dataset()
    text = [v for v in stats.data_vars if stats[v].dtype == object]
    if not text:
        return
    for name in text:
        values = np.vectorize(lambda x: "" if x is None else str(x), otypes=[str])(stats[name])
        stats[name] = stats[name].copy(data=values)
    dt["sample_stats"] = stats


def _draw_seconds(dt: xr.DataTree) -> float:
    """Seconds the sampler spent drawing, as it reports it (no compilation), else NaN."""
    return float(dt.posterior.attrs.get("sampling_time", np.nan))


def _count_divergences(dt: xr.DataTree) -> int:
    return int(dt.sample_stats["diverging"].sum())


def _add_derived(
    dt: xr.DataTree,
    summaries: SummarySet,
    spec: ModelSpec,
    parameterization: str,
    rng: np.random.Generator,
) -> None:
    """Add delta and theta (if marginalised), kappa, theta_new and the constant data."""
    theta_hat, V, _ = summaries.arrays()
    s = coef_scales(V)
    post = dt.posterior
    n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
    S = n_chain * n_draw

    def flat(name: str, *dims: str) -> np.ndarray:
        da = post[name].transpose("chain", "draw", *dims)
        return da.values.reshape(S, *da.shape[2:])

    def unflat(values: np.ndarray, dims: tuple[str, ...]) -> xr.DataArray:
        coords = {d: post.coords[d] for d in ("chain", "draw", *dims) if d in post.coords}
        shaped = values.reshape(n_chain, n_draw, *values.shape[1:])
        return xr.DataArray(shaped, dims=("chain", "draw", *dims), coords=coords)

    sd_delta = flat("sd_delta", "task", "coef")
    new_vars: dict[str, xr.DataArray] = {}
    if parameterization == "marginalized":
        beta = flat("beta", "coef")
        delta = condition_delta(theta_hat, V, beta, sd_delta, rng)
        new_vars["delta"] = unflat(delta, ("task", "coef"))
        new_vars["theta"] = unflat(beta[:, None, :] + delta, ("task", "coef"))
    new_vars["kappa"] = unflat(shrinkage_factors(V, sd_delta), ("task",))
    dt["posterior"] = post.to_dataset().assign(new_vars)

    # A new task: theta_new = beta + sd_new * z, lam_new from the family's prior.
    c2 = flat("c2") if "c2" in post else None
    sd_new = draw_new_sd(spec, flat("tau"), s, rng, c2=c2)
    theta_new = flat("beta", "coef") + sd_new * rng.standard_normal(sd_new.shape)
    dt["posterior_predictive"] = xr.Dataset({"theta_new": unflat(theta_new, ("coef",))})

    coef = list(summaries.coef_names)
    dt["constant_data"] = xr.Dataset(
        {
            "V": (("task", "coef", "coef2"), V),
            "s": (("coef",), s),
        },
        coords={"task": list(summaries.task_names), "coef": coef, "coef2": coef},
    )


def _diagnose(dt: xr.DataTree) -> dict[str, Any]:
    """Divergences, worst R-hat, ESS and E-BFMI over every posterior variable."""
    post = dt.posterior.to_dataset()
    names = [v for v in post.data_vars if v != "kappa"]
    rhat = azs.rhat(post[names])
    ess_bulk = azs.ess(post[names], method="bulk")
    ess_tail = azs.ess(post[names], method="tail")
    bfmi = azs.bfmi(dt)
    return {
        "divergences": _count_divergences(dt),
        "max_rhat": _extreme(rhat, np.nanmax),
        "min_ess_bulk": _extreme(ess_bulk, np.nanmin),
        "min_ess_tail": _extreme(ess_tail, np.nanmin),
        "min_bfmi": _extreme(bfmi, np.nanmin),
    }


def _extreme(stats: xr.Dataset | xr.DataTree, reduce) -> float:
    ds = stats.to_dataset() if isinstance(stats, xr.DataTree) else stats
    values = [np.asarray(ds[v].values, dtype=float).ravel() for v in ds.data_vars]
    values = np.concatenate(values) if values else np.array([np.nan])
    if np.all(np.isnan(values)):
        return float("nan")
    return float(reduce(values))


def _warn_problems(diagnostics: dict[str, Any], spec: ModelSpec) -> None:
    problems = []
    if diagnostics["divergences"] > 0:
        problems.append(
            f"{diagnostics['divergences']} divergent transitions at target_accept="
            f"{diagnostics['target_accept']:.3f}"
        )
    # A diagnostic that could not be computed (one chain, a handful of draws) is a problem too:
    # NaN compares False against every threshold and would pass silently.
    unknown = [
        name
        for name, key in (("R-hat", "max_rhat"), ("bulk ESS", "min_ess_bulk"),
                          ("tail ESS", "min_ess_tail"))
        if np.isnan(diagnostics[key])
    ]  # fmt: skip
    if unknown:
        problems.append(
            f"{', '.join(unknown)} not computable (R-hat needs at least 2 chains, ESS enough "
            "draws): convergence is unchecked"
        )
    if diagnostics["max_rhat"] > RHAT_MAX:
        problems.append(f"R-hat up to {diagnostics['max_rhat']:.3f} (> {RHAT_MAX})")
    for kind in ("bulk", "tail"):
        ess = diagnostics[f"min_ess_{kind}"]
        if ess < ESS_MIN:
            problems.append(f"{kind} ESS down to {ess:.0f} (< {ESS_MIN})")
    if diagnostics["min_bfmi"] < BFMI_MIN:
        problems.append(f"E-BFMI down to {diagnostics['min_bfmi']:.2f} (< {BFMI_MIN})")
    diagnostics["problems"] = problems
    if problems:
        warnings.warn(
            f"Bayesian fusion with model {spec.name!r} (tau_0 = {spec.global_scale:g}): "
            + "; ".join(problems)
            + ". Treat the posterior with care: more draws, another parameterization or "
            "another prior may help.",
            ConvergenceWarning,
            stacklevel=3,
        )


def _interval(da: xr.DataArray) -> Interval:
    sample = ("chain", "draw")
    q = da.quantile(list(_QUANTILES), dim=sample)
    return Interval(
        estimate=da.mean(sample).values,
        std_error=da.std(sample, ddof=1).values,
        lower=q.sel(quantile=_QUANTILES[0]).values,
        upper=q.sel(quantile=_QUANTILES[1]).values,
    )


def _predictive_interval(da: xr.DataArray) -> Interval:
    q = da.quantile([_QUANTILES[0], 0.15866, 0.5, 0.84134, _QUANTILES[1]], dim=("chain", "draw"))
    q = q.values
    return Interval(estimate=q[2], std_error=(q[3] - q[1]) / 2, lower=q[0], upper=q[4])


def _result(
    dt: xr.DataTree,
    spec: ModelSpec,
    parameterization: str,
    diagnostics: dict[str, Any],
    shrinkage: pd.Series,
) -> FusionResult:
    post = dt.posterior
    tau = post["tau"].values.ravel()
    return FusionResult(
        method=f"bayes_{spec.name}",
        task_names=list(post.coords["task"].values),
        coef_names=list(post.coords["coef"].values),
        theta=_interval(post["theta"].transpose("chain", "draw", "task", "coef")),
        beta=_interval(post["beta"]),
        new_task=_predictive_interval(dt.posterior_predictive["theta_new"]),
        info={
            "spec": spec.to_dict(),
            "parameterization": parameterization,
            "diagnostics": dict(diagnostics),
            "shrinkage": shrinkage.to_dict(),
            "tau_median": float(np.median(tau)),
            "tau_interval": [float(np.quantile(tau, q)) for q in _QUANTILES],
            "tau_units": "standard errors (D)",
            "new_task_summary": "median; half-width of the central 68.3% interval; 95% ETI",
        },
    )


def _stamp(
    dt: xr.DataTree,
    spec: ModelSpec,
    parameterization: str,
    diagnostics: dict[str, Any],
    settings: dict[str, Any],
    target_accept: float,
    seed: int | None,
) -> None:
    """Provenance in the root attrs, as netCDF-safe strings and numbers."""
    dt.attrs |= {
        "latefusion_version": __version__,
        "model": spec.name,
        "deviation": spec.deviation,
        "spec": json.dumps(spec.to_dict()),
        "parameterization": parameterization,
        "sampler": settings["nuts_sampler"],
        "draws": int(settings["draws"]),
        "tune": int(settings["tune"]),
        "chains": int(settings["chains"]),
        "target_accept_requested": float(target_accept),
        "target_accept": float(diagnostics["target_accept"]),
        "seed": "none" if seed is None else str(seed),
        "diagnostics": json.dumps(diagnostics),
    }
