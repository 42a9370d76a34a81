"""Random-effects baselines: DerSimonian-Laird and REML, univariate and multivariate.

Model, per coefficient j (univariate) with ``y_k = theta_hat_kj`` and ``v_k = V_k[j, j]``::

    y_k ~ N(theta_k, v_k),    theta_k ~ N(beta, tau^2)

and, with ``multivariate=True``, ``theta_hat_k ~ N(theta_k, V_k)``, ``theta_k ~ N(beta, T)`` with
an unstructured p x p between-task covariance ``T`` fitted by REML.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from latefusion.fusion.baselines import _check_level, _check_spread, _stamp
from latefusion.results import FusionResult, Interval
from latefusion.summaries import SummarySet
from latefusion.warnings import FewTasksWarning

__all__ = ["q_profile", "random_effects"]

logger = logging.getLogger(__name__)


def generalised_q(y: np.ndarray, v: np.ndarray, tau2: float) -> float:
    """Generalised Cochran Q at ``tau2``: ``sum w (y - mu)^2`` with ``w = 1 / (v + tau2)``."""
    w = 1.0 / (v + tau2)
    mu = np.sum(w * y) / np.sum(w)
    return float(np.sum(w * (y - mu) ** 2))


def q_profile(y: np.ndarray, v: np.ndarray, target: float) -> float:
    """The ``tau2 >= 0`` at which the generalised Q equals ``target`` (0 if Q(0) <= target).

    Q decreases in ``tau2`` (Viechtbauer 2007), so the root is unique.

    Parameters
    ----------
    y, v : ndarray of shape (K,)
        Estimates and their variances.
    target : float
        A chi-squared quantile with ``K - 1`` degrees of freedom.
    """
    if generalised_q(y, v, 0.0) <= target:
        return 0.0
    hi = max(float(np.var(y)), float(np.max(v)))
    while generalised_q(y, v, hi) > target:
        hi *= 2.0
    return _root(lambda t: generalised_q(y, v, t) - target, hi, float(np.min(v)))


def _tau2_dl(y: np.ndarray, v: np.ndarray) -> float:
    w = 1.0 / v
    df = y.size - 1
    c = np.sum(w) - np.sum(w**2) / np.sum(w)
    return max(0.0, (generalised_q(y, v, 0.0) - df) / c)


def _reml_score(y: np.ndarray, v: np.ndarray, tau2: float) -> float:
    """Derivative of the restricted log-likelihood in ``tau2`` (times 2)."""
    w = 1.0 / (v + tau2)
    mu = np.sum(w * y) / np.sum(w)
    return float(np.sum(w**2 * (y - mu) ** 2) - (np.sum(w) - np.sum(w**2) / np.sum(w)))


def _tau2_reml(y: np.ndarray, v: np.ndarray) -> float:
    """REML ``tau2``: the first root of the score, 0 when the score is negative at 0."""
    if _reml_score(y, v, 0.0) <= 0:
        return 0.0
    hi = max(float(np.var(y)), float(np.max(v)))
    while _reml_score(y, v, hi) > 0:
        hi *= 2.0
    return _root(lambda t: _reml_score(y, v, t), hi, float(np.min(v)))


def _root(f, hi: float, scale: float) -> float:
    """The root of ``f`` in [0, hi], to a tolerance relative to ``scale``.

    ``scale`` is the smallest within-task variance: a tau2 far below it changes no weight. An
    absolute tolerance stopped early when variances are tiny (estimates in units of 1e-9 give
    tau2 near 1e-18); one relative to ``hi`` did so when one task's variance is huge (a task
    with a standard error of 1e9 among tasks of 0.1 put REML's tau2 at 888 instead of 0.03).
    """
    # Generous iterations: hi can be many orders of magnitude above scale (one far estimate).
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-15 * scale, rtol=1e-15, maxiter=4000))


@dataclass(frozen=True)
class _Univariate:
    """Fit of the univariate random-effects model for one coefficient."""

    beta: float
    beta_se: float
    tau2: float
    tau2_lower: float
    tau2_upper: float
    Q: float
    Q_pvalue: float
    I2: float
    blup: np.ndarray
    blup_se: np.ndarray
    crit: float


def _univariate(
    y: np.ndarray, v: np.ndarray, method: str, knapp_hartung: bool, level: float
) -> _Univariate:
    K = y.size
    df = K - 1
    alpha = 1.0 - level
    tau2 = _tau2_dl(y, v) if method == "DL" else _tau2_reml(y, v)

    # Centre, with the Knapp-Hartung scale and t quantile when asked for (metafor's "knha",
    # which does not truncate the scale at 1).
    w = 1.0 / (v + tau2)
    beta = float(np.sum(w * y) / np.sum(w))
    var_beta = 1.0 / np.sum(w)
    if knapp_hartung:
        var_beta *= float(np.sum(w * (y - beta) ** 2)) / df
        crit = float(stats.t.ppf(1 - alpha / 2, df))
    else:
        crit = float(stats.norm.ppf(1 - alpha / 2))

    # Heterogeneity: Cochran's Q at tau2 = 0, the Q-profile interval, and I^2 as
    # tau2 / (tau2 + typical within-task variance), metafor's definition, which equals the
    # Q-based one (Q - df) / Q for DL.
    Q = generalised_q(y, v, 0.0)
    w0 = 1.0 / v
    v_typical = df / (np.sum(w0) - np.sum(w0**2) / np.sum(w0))
    lower = q_profile(y, v, float(stats.chi2.ppf(1 - alpha / 2, df)))
    upper = q_profile(y, v, float(stats.chi2.ppf(alpha / 2, df)))

    # BLUPs: shrink towards beta by tau2 / (tau2 + v); their prediction error variance is
    # lam v + (1 - lam)^2 Var(beta), exact given tau2 (the cross term vanishes).
    shrink = tau2 / (tau2 + v)
    blup = beta + shrink * (y - beta)
    blup_se = np.sqrt(shrink * v + (1 - shrink) ** 2 * var_beta)
    return _Univariate(
        beta=beta,
        beta_se=float(np.sqrt(var_beta)),
        tau2=tau2,
        tau2_lower=lower,
        tau2_upper=upper,
        Q=Q,
        Q_pvalue=float(stats.chi2.sf(Q, df)),
        I2=float(100 * tau2 / (tau2 + v_typical)),
        blup=blup,
        blup_se=blup_se,
        crit=crit,
    )


def _mv_reml(theta_hat: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, bool]:
    """REML estimate of the between-task covariance T (p, p), through its Cholesky factor."""
    p = theta_hat.shape[1]
    tril = np.tril_indices(p)

    def unpack(x: np.ndarray) -> np.ndarray:
        L = np.zeros((p, p))
        L[tril] = x
        return L

    def nll_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        L = unpack(x)
        S = V + L @ L.T
        Si = np.linalg.inv(S)
        A = Si.sum(axis=0)
        Ai = np.linalg.inv(A)
        beta = Ai @ np.einsum("kij,kj->i", Si, theta_hat)
        r = theta_hat - beta
        Sr = np.einsum("kij,kj->ki", Si, r)
        logdet = np.linalg.slogdet(S)[1].sum() + np.linalg.slogdet(A)[1]
        nll = 0.5 * (logdet + np.einsum("ki,ki->", r, Sr))
        G = 0.5 * (Si.sum(axis=0) - np.einsum("kij,jl,klm->im", Si, Ai, Si) - Sr.T @ Sr)
        return float(nll), (2.0 * G @ L)[tril]

    # Start from the univariate REML variances, lifted off zero (a zero column of L is a
    # stationary point of the Cholesky parametrisation).
    v = np.diagonal(V, axis1=1, axis2=2)
    start = np.array([_tau2_reml(theta_hat[:, j], v[:, j]) for j in range(p)])
    start = np.maximum(start, 0.1 * v.mean(axis=0))
    res = optimize.minimize(
        nll_grad,
        np.diag(np.sqrt(start))[tril],
        jac=True,
        method="BFGS",
        options={"gtol": 1e-10, "maxiter": 2000},
    )
    L = unpack(res.x)
    return L @ L.T, bool(res.success)


def random_effects(
    summaries: SummarySet,
    method: str = "DL",
    knapp_hartung: bool = False,
    level: float = 0.95,
    multivariate: bool = False,
) -> FusionResult:
    """Random-effects meta-analysis of the task summaries, one coefficient at a time.

    Parameters
    ----------
    summaries : SummarySet
        K usable tasks with p coefficients.
    method : {"DL", "REML"}, default="DL"
        Estimator of the between-task variance ``tau^2``: DerSimonian-Laird (moments, clipped at
        0) or restricted maximum likelihood.
    knapp_hartung : bool, default=False
        Scale the variance of the centre by the weighted residual mean square and use t
        quantiles with ``K - 1`` degrees of freedom (metafor's ``test="knha"``).
    level : float, default=0.95
        Level of every interval.
    multivariate : bool, default=False
        With p > 1, fit ``theta_hat_k ~ N(beta, V_k + T)`` with the full ``V_k`` and an
        unstructured ``T`` by REML (``method="REML"`` only).

    Returns
    -------
    FusionResult
        Method ``"random_effects_dl"``, ``"random_effects_reml"`` or
        ``"random_effects_reml_mv"``. ``theta`` holds the shrunken per-task estimates (BLUPs),
        ``beta`` the centre, and ``new_task`` the prediction for a new task: estimate
        ``beta``, standard error ``sqrt(se(beta)^2 + tau^2)`` and the prediction interval.
        ``info["heterogeneity"]`` lists, per coefficient, ``coef, tau2, tau2_lower,
        tau2_upper, Q, Q_pvalue, I2``.

    Notes
    -----
    Per coefficient, with ``w_k = 1 / (v_k + tau^2)``: ``beta = sum w y / sum w``,
    ``Var(beta) = 1 / sum w``. Cochran's ``Q = sum (y - beta_FE)^2 / v`` on ``K - 1`` degrees of
    freedom; the ``tau^2`` interval inverts the generalised Q statistic (Q-profile, Viechtbauer
    2007); ``I^2 = 100 tau^2 / (tau^2 + v_typ)`` with ``v_typ = (K - 1) / (sum w0 -
    sum w0^2 / sum w0)``, which for DL equals the Q-based ``(Q - df) / Q``. BLUPs are
    ``beta + tau^2 / (tau^2 + v_k) (y_k - beta)`` with prediction error variance
    ``s_k v_k + (1 - s_k)^2 Var(beta)``, ``s_k = tau^2 / (tau^2 + v_k)``.

    The multivariate fit reports ``T`` in ``info["T"]``; its per-coefficient heterogeneity
    rows hold ``tau2 = T_jj`` with the univariate Q, Q-profile interval and I^2 of that
    coefficient (the marginal model of one coefficient is the univariate one).

    With one task nothing about heterogeneity is estimable: the task's own estimate is returned
    as ``theta`` and ``beta``, ``new_task`` is None and ``info["heterogeneity_note"]`` says so.
    With two tasks the fit runs but warns (:class:`~latefusion.warnings.FewTasksWarning`).
    """
    _check_level(level)
    method = method.upper()
    if method not in ("DL", "REML"):
        raise ValueError(f"method must be 'DL' or 'REML', got {method!r}")
    theta_hat, V, _ = summaries.arrays()
    K, p = theta_hat.shape
    coefs = list(summaries.coef_names)
    _check_spread(summaries, V, f"random_effects_{method.lower()}")
    if multivariate and method != "REML":
        raise NotImplementedError("multivariate random effects are fitted by REML only")
    if multivariate and knapp_hartung:
        raise NotImplementedError("Knapp-Hartung adjustment of the multivariate fit")
    name = f"random_effects_{method.lower()}" + ("_mv" if multivariate else "")
    info = _stamp(summaries, level)
    info.update(method=method, knapp_hartung=knapp_hartung, multivariate=multivariate)

    if K == 1:
        se = np.sqrt(np.diag(V[0]))
        info["heterogeneity"] = [_het_row(c) for c in coefs]
        info["heterogeneity_note"] = "one task: between-task heterogeneity is not estimable"
        return FusionResult(
            method=name,
            task_names=summaries.task_names,
            coef_names=coefs,
            theta=Interval.normal(theta_hat, se[None], level),
            beta=Interval.normal(theta_hat[0], se, level),
            info=info,
        )
    if K == 2:
        warnings.warn(
            f"{name}: only two tasks; tau^2 rests on one degree of freedom",
            FewTasksWarning,
            stacklevel=2,
        )

    v = np.diagonal(V, axis1=1, axis2=2)
    fits = [_univariate(theta_hat[:, j], v[:, j], method, knapp_hartung, level) for j in range(p)]
    if multivariate:
        return _multivariate(summaries, theta_hat, V, fits, level, name, info)

    het = [
        _het_row(c, f.tau2, f.tau2_lower, f.tau2_upper, f.Q, f.Q_pvalue, f.I2)
        for c, f in zip(coefs, fits, strict=True)
    ]
    crit = np.array([f.crit for f in fits])
    blup = np.stack([f.blup for f in fits], axis=1)
    blup_se = np.stack([f.blup_se for f in fits], axis=1)
    beta = np.array([f.beta for f in fits])
    beta_se = np.array([f.beta_se for f in fits])
    pred_se = np.sqrt(beta_se**2 + np.array([f.tau2 for f in fits]))
    info["heterogeneity"] = het
    return FusionResult(
        method=name,
        task_names=summaries.task_names,
        coef_names=coefs,
        theta=_interval(blup, blup_se, crit),
        beta=_interval(beta, beta_se, crit),
        new_task=_interval(beta, pred_se, crit),
        info=info,
    )


def _multivariate(summaries, theta_hat, V, fits, level, name, info) -> FusionResult:
    T, converged = _mv_reml(theta_hat, V)
    if not converged:
        logger.warning("multivariate REML: the optimiser reported no convergence")
    S = V + T
    Si = np.linalg.inv(S)
    cov_beta = np.linalg.inv(Si.sum(axis=0))
    beta = cov_beta @ np.einsum("kij,kj->i", Si, theta_hat)

    # BLUPs beta + T S_k^{-1} (theta_hat_k - beta), error covariance
    # G_k V_k + (I - G_k) Cov(beta) (I - G_k)', G_k = T S_k^{-1}.
    G = T @ Si
    blup = beta + np.einsum("kij,kj->ki", G, theta_hat - beta)
    IG = np.eye(T.shape[0]) - G
    err = G @ V + IG @ cov_beta @ IG.transpose(0, 2, 1)
    blup_se = np.sqrt(np.diagonal(err, axis1=1, axis2=2))

    crit = np.full(T.shape[0], stats.norm.ppf(0.5 + level / 2))
    beta_se = np.sqrt(np.diag(cov_beta))
    info["T"] = T.tolist()
    info["converged"] = converged
    info["heterogeneity"] = [
        _het_row(c, T[j, j], f.tau2_lower, f.tau2_upper, f.Q, f.Q_pvalue, f.I2)
        for j, (c, f) in enumerate(zip(summaries.coef_names, fits, strict=True))
    ]
    return FusionResult(
        method=name,
        task_names=summaries.task_names,
        coef_names=summaries.coef_names,
        theta=_interval(blup, blup_se, crit),
        beta=_interval(beta, beta_se, crit),
        new_task=_interval(beta, np.sqrt(beta_se**2 + np.diag(T)), crit),
        info=info,
    )


def _interval(estimate: np.ndarray, se: np.ndarray, crit: np.ndarray) -> Interval:
    return Interval(estimate, se, estimate - crit * se, estimate + crit * se)


def _het_row(coef, tau2=np.nan, lower=np.nan, upper=np.nan, Q=np.nan, Q_pvalue=np.nan, I2=np.nan):
    return {
        "coef": coef,
        "tau2": float(tau2),
        "tau2_lower": float(lower),
        "tau2_upper": float(upper),
        "Q": float(Q),
        "Q_pvalue": float(Q_pvalue),
        "I2": float(I2),
    }
