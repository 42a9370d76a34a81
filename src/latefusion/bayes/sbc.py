"""Simulation-based calibration (SBC) of a Bayesian fusion model.

Talts et al. (2018): draw parameters from the prior, simulate task summaries from them, fit the
model, and find the rank of each true parameter among L posterior draws. If the sampler, the
model code and the post-processing (delta drawn by Gaussian conditioning when marginalised) are
right, every rank is uniform on {0, ..., L}. The prior draws here come from NumPy, apart from
PyMC, so the check also compares the PyMC model with an independent statement of the prior.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from latefusion.bayes.fit import fit_bayes
from latefusion.bayes.model import coef_scales, draw_new_sd
from latefusion.bayes.spec import ModelSpec, load_spec
from latefusion.summaries import SummarySet, TaskSummary
from latefusion.warnings import ConvergenceWarning

__all__ = ["SBCResult", "draw_prior", "simulation_based_calibration"]


def draw_prior(
    spec: ModelSpec, V: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray | float]:
    """One draw of (beta, tau, delta, theta) from the model's prior, and summaries from it.

    Parameters
    ----------
    spec : ModelSpec
    V : ndarray of shape (K, p, p)
        The tasks' covariances, held fixed (they fix D).
    rng : numpy.random.Generator

    Returns
    -------
    dict
        ``beta`` (p,), ``tau`` (float), ``delta`` and ``theta`` (K, p) and ``theta_hat``
        (K, p), with theta_hat_k ~ MvNormal(theta_k, V_k).
    """
    K, p = V.shape[:2]
    s = coef_scales(V)
    beta = spec.beta_scale * s * rng.standard_normal(p)
    tau = spec.global_scale * abs(rng.standard_cauchy())
    c2 = None
    if spec.deviation == "regularized_horseshoe":
        df, slab = spec.params["slab_df"], spec.params["slab_scale"]
        c2 = np.full(K, 1.0 / rng.gamma(df / 2, 2.0 / (df * slab**2)))
    # The K tasks' scales given tau are K independent draws of a new task's scale.
    sd = draw_new_sd(spec, np.full(K, tau), s, rng, c2=c2)
    delta = sd * rng.standard_normal((K, p))
    theta = beta + delta
    noise = np.einsum("kij,kj->ki", np.linalg.cholesky(V), rng.standard_normal((K, p)))
    return {"beta": beta, "tau": tau, "delta": delta, "theta": theta, "theta_hat": theta + noise}


@dataclass(frozen=True)
class SBCResult:
    """Ranks of the true parameters among thinned posterior draws.

    Attributes
    ----------
    ranks : DataFrame
        One row per replication, one column per quantity (``beta[coef]``, ``tau``,
        ``theta[task,coef]``), integer ranks in 0..n_draws.
    n_draws : int
        L, the posterior draws each rank is taken among.
    divergences : ndarray of shape (n_reps,)
        Divergent transitions of each fit's final run.
    seconds : float
        Wall time of all the fits.
    """

    ranks: pd.DataFrame
    n_draws: int
    divergences: np.ndarray
    seconds: float

    def uniformity(self, bins: int = 10) -> pd.DataFrame:
        """Chi-square test of uniform ranks, per quantity.

        The L + 1 possible ranks are split into ``bins`` bins of nearly equal size; each bin's
        expected count is n_reps times its share of the possible ranks.

        Returns
        -------
        DataFrame
            Index: the quantities; columns ``chi2``, ``df``, ``p_value`` and ``counts`` (the
            bin counts, a list).
        """
        n_values = self.n_draws + 1
        edges = np.linspace(0, n_values, bins + 1)
        share = np.diff(np.floor(edges)) / n_values
        rows = {}
        for name, ranks in self.ranks.items():
            counts = np.histogram(ranks.to_numpy(), bins=np.floor(edges) - 0.5)[0]
            expected = share * len(ranks)
            chi2 = float(np.sum((counts - expected) ** 2 / expected))
            p_value = float(stats.chi2.sf(chi2, bins - 1))
            rows[name] = {
                "chi2": chi2,
                "df": bins - 1,
                "p_value": p_value,
                "counts": [int(c) for c in counts],
            }
        return pd.DataFrame.from_dict(rows, orient="index")


def simulation_based_calibration(
    V: np.ndarray,
    model: str | os.PathLike[str] | ModelSpec = "horseshoe",
    n_reps: int = 100,
    n_draws: int = 99,
    draws: int = 200,
    tune: int = 300,
    chains: int = 2,
    tasks: tuple[int, ...] = (0,),
    seed: int = 0,
    **fit_options,
) -> SBCResult:
    """Run SBC of a model with fixed task covariances.

    Parameters
    ----------
    V : ndarray of shape (K, p, p)
        Covariances of the K simulated tasks, the same in every replication.
    model : str, path or ModelSpec, default="horseshoe"
    n_reps : int, default=100
        Replications (prior draw, simulated summaries, fit).
    n_draws : int, default=99
        L: posterior draws kept per fit, evenly thinned from ``chains * draws``, so that they
        are close to independent (ranks of autocorrelated draws are not uniform).
    draws, tune, chains : int
        Sampler settings of each fit; the other :func:`latefusion.bayes.fit_bayes` settings
        stay at their defaults unless given in ``fit_options``.
    tasks : tuple of int, default=(0,)
        Tasks whose theta is ranked as well.
    seed : int, default=0

    Returns
    -------
    SBCResult
    """
    spec = load_spec(model)
    V = np.asarray(V, dtype=float)
    K, p = V.shape[:2]
    if chains * draws < n_draws:
        raise ValueError(f"chains * draws = {chains * draws} is fewer than n_draws = {n_draws}")
    coefs = ("effect",) if p == 1 else tuple(f"c{j}" for j in range(p))
    names = [f"task{k}" for k in range(K)]
    seeds = np.random.SeedSequence(seed).spawn(n_reps)
    rows, divergences = [], []
    start = time.perf_counter()
    for child in seeds:
        rng = np.random.default_rng(child)
        truth = draw_prior(spec, V, rng)
        summaries = SummarySet(
            [
                TaskSummary(names[k], "ate", coefs, truth["theta_hat"][k], V[k], 100)
                for k in range(K)
            ]
        )
        with warnings.catch_warnings():
            # Short chains fall below the ESS threshold by design; thinning handles it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit = fit_bayes(
                summaries,
                spec,
                draws=draws,
                tune=tune,
                chains=chains,
                seed=int(rng.integers(2**31)),
                **fit_options,
            )
        post = fit.datatree.posterior
        keep = np.linspace(0, chains * draws - 1, n_draws).round().astype(int)

        def thinned(name: str, *dims: str, post=post, keep=keep) -> np.ndarray:
            da = post[name].transpose("chain", "draw", *dims)
            return da.values.reshape(chains * draws, *da.shape[2:])[keep]

        row = {}
        for j, c in enumerate(coefs):
            row[f"beta[{c}]"] = int(np.sum(thinned("beta", "coef")[:, j] < truth["beta"][j]))
            for k in tasks:
                below = thinned("theta", "task", "coef")[:, k, j] < truth["theta"][k, j]
                row[f"theta[{names[k]},{c}]"] = int(np.sum(below))
        row["tau"] = int(np.sum(thinned("tau") < truth["tau"]))
        rows.append(row)
        divergences.append(fit.diagnostics["divergences"])
    seconds = time.perf_counter() - start
    return SBCResult(pd.DataFrame(rows), n_draws, np.array(divergences), seconds)
