"""Baselines every comparison reports: individual-task learning and the fixed-effect centre."""

from __future__ import annotations

import numpy as np
from scipy import stats

from latefusion._version import __version__
from latefusion.results import FusionResult, Interval
from latefusion.summaries import SummarySet

__all__ = ["fixed_effect", "itl"]


def itl(summaries: SummarySet, level: float = 0.95) -> FusionResult:
    """Individual-task learning: each task keeps its own estimate.

    Parameters
    ----------
    summaries : SummarySet
        K usable tasks with p coefficients.
    level : float, default=0.95
        Confidence level of the Wald intervals ``theta_hat_k +- z sqrt(diag(V_k))``.

    Returns
    -------
    FusionResult
        Method ``"itl"``; ``theta`` of shape (K, p), no centre.
    """
    _check_level(level)
    theta_hat, V, _ = summaries.arrays()
    se = np.sqrt(np.diagonal(V, axis1=1, axis2=2))
    return FusionResult(
        method="itl",
        task_names=summaries.task_names,
        coef_names=summaries.coef_names,
        theta=Interval.normal(theta_hat, se, level),
        info=_stamp(summaries, level),
    )


def fixed_effect(summaries: SummarySet, level: float = 0.95) -> FusionResult:
    """Multivariate inverse-variance weighted (fixed-effect) centre.

    Parameters
    ----------
    summaries : SummarySet
        K usable tasks with p coefficients.
    level : float, default=0.95
        Confidence level of the Wald intervals.

    Returns
    -------
    FusionResult
        Method ``"fixed_effect"``; ``beta`` of shape (p,), no per-task estimates. ``info`` holds
        the multivariate heterogeneity statistic ``Q``, its degrees of freedom ``p (K - 1)`` and
        p-value.

    Notes
    -----
    With ``W_k = V_k^{-1}``::

        beta = (sum_k W_k)^{-1} sum_k W_k theta_hat_k,    Cov(beta) = (sum_k W_k)^{-1}
        Q = sum_k (theta_hat_k - beta)' W_k (theta_hat_k - beta)  ~  chi^2_{p (K - 1)}

    under homogeneity. This is full pooling, the limit of the adaptive aggregation as its
    constant C grows.
    """
    _check_level(level)
    theta_hat, V, _ = summaries.arrays()
    K, p = theta_hat.shape
    W = np.linalg.inv(V)
    cov = np.linalg.inv(W.sum(axis=0))
    beta = cov @ np.einsum("kij,kj->i", W, theta_hat)

    r = theta_hat - beta
    Q = float(np.einsum("ki,kij,kj->", r, W, r))
    df = p * (K - 1)
    info = _stamp(summaries, level)
    info.update(
        Q=Q,
        Q_df=df,
        Q_pvalue=float(stats.chi2.sf(Q, df)) if df > 0 else float("nan"),
        cov=cov.tolist(),
    )
    return FusionResult(
        method="fixed_effect",
        task_names=summaries.task_names,
        coef_names=summaries.coef_names,
        beta=Interval.normal(beta, np.sqrt(np.diag(cov)), level),
        info=info,
    )


#: Largest ratio of a task's standard error to the median over tasks (per coefficient) that the
#: fusion methods handle. Beyond it weights underflow and sums of squares overflow: a standard
#: error of 1e100 among tasks of 0.3 ended in a ZeroDivisionError in the adaptive solver and a
#: scipy RuntimeError in the Q-profile. Such a task carries no weight anyway.
MAX_SE_RATIO = 1e12


def _check_spread(summaries: SummarySet, V: np.ndarray, method: str) -> None:
    """A clear error naming a task whose standard error is far outside the other tasks'."""
    se = np.sqrt(np.diagonal(V, axis1=1, axis2=2))
    ratio = se / np.median(se, axis=0)
    bad = (ratio > MAX_SE_RATIO) | (ratio < 1 / MAX_SE_RATIO)
    if bad.any():
        k, j = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"{method}: task {summaries.usable()[k].task!r} has a standard error of "
            f"{summaries.coef_names[j]!r} {ratio[k, j]:.3g} times the median (outside 1e-12 to "
            "1e12); drop the task or check its summary"
        )


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _stamp(summaries: SummarySet, level: float) -> dict:
    """Settings every fusion result carries."""
    return {
        "level": level,
        "n_tasks": len(summaries.task_names),
        "excluded_tasks": [s.task for s in summaries.excluded()],
        "latefusion_version": __version__,
    }
