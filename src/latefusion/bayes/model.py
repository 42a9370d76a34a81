"""Build the PyMC model of Bayesian fusion from a spec and the task summaries.

The model (METHOD.md section 3), for tasks k = 1..K and coefficients j = 1..p::

    theta_hat_k ~ MvNormal(theta_k, V_k)                 (Normal when p = 1)
    theta_k     = beta + delta_k
    delta_kj | scales ~ Normal(0, sd_delta_kj^2),  sd_delta_kj = tau * lam_kj * s_j
    beta_j      ~ Normal(0, (beta_scale * s_j)^2)
    tau         ~ HalfCauchy(global_scale)

with D = diag(s_1..s_p) and s_j the median over tasks of sqrt(V_k[j, j]), so that tau and the
local scales lam are in units of standard errors and the model is scale-equivariant. The
families differ only in the local scales lam_kj (see :func:`build_model`), so every one of
them is a scale mixture of normals and can be marginalised over delta.

The second half of the module is a small NumPy core, independent of PyMC: drawing the local
scale of a new task from its prior, drawing delta by Gaussian conditioning, and the shrinkage
factors.
"""

from __future__ import annotations

import os

import numpy as np
import pymc as pm
import pytensor.tensor as pt

from latefusion.bayes.spec import PARAMETERIZATIONS, ModelSpec, load_spec
from latefusion.summaries import SummarySet

__all__ = [
    "build_model",
    "coef_scales",
    "condition_delta",
    "draw_new_sd",
    "resolve_parameterization",
    "shrinkage_factors",
]

#: Draws per block in the NumPy core, to bound memory at draws x K x p x p.
_BLOCK = 512


def coef_scales(V: np.ndarray) -> np.ndarray:
    """The scales s_j of D: the median over tasks of the standard error of coefficient j.

    Parameters
    ----------
    V : ndarray of shape (K, p, p)

    Returns
    -------
    s : ndarray of shape (p,)
    """
    return np.median(np.sqrt(np.diagonal(V, axis1=1, axis2=2)), axis=0)


def resolve_parameterization(spec: ModelSpec, parameterization: str | None) -> str:
    """The parameterisation to use: the argument if given, else the spec's."""
    chosen = spec.parameterization if parameterization is None else parameterization
    if chosen not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization {chosen!r} is not one of {list(PARAMETERIZATIONS)}")
    return chosen


def build_model(
    summaries: SummarySet,
    spec: str | os.PathLike[str] | ModelSpec = "horseshoe",
    parameterization: str | None = None,
) -> pm.Model:
    """The PyMC model of Bayesian fusion for the usable tasks of ``summaries``.

    Parameters
    ----------
    summaries : SummarySet
        K usable tasks with p coefficients; excluded tasks are left out.
    spec : str, path or ModelSpec, default="horseshoe"
        Catalogue name, spec file or spec (see :func:`latefusion.bayes.load_spec`).
    parameterization : {"noncentered", "centered", "marginalized"}, optional
        Overrides the spec's. ``"noncentered"``: delta_k = sd_delta_k * z_k with
        z_k ~ Normal(0, I). ``"centered"``: delta_k ~ Normal(0, diag(sd_delta_k)^2) sampled
        directly. ``"marginalized"``: delta is integrated out,
        theta_hat_k ~ MvNormal(beta, V_k + diag(sd_delta_k)^2), and neither delta nor theta
        is in the model (:func:`latefusion.bayes.fit_bayes` draws them afterwards).

    Returns
    -------
    pymc.Model
        With coords ``task`` (K) and ``coef`` (p). Variables: ``beta_z`` (coef, beta in units
        of s_j) and ``beta`` (coef), ``tau``,
        the family's local scales, ``sd_delta`` (task, coef), ``z`` or ``delta`` and
        ``theta`` (task, coef) unless marginalised, and the observed ``theta_hat``, whose
        log-likelihood has one term per task (dims ``task``).

    Notes
    -----
    The local scales lam_kj of each family (``lam`` has dims ``task`` unless stated):

    - ``normal``: lam_kj = 1 (no local scale).
    - ``horseshoe``: lam_k ~ HalfCauchy(1), one per task.
    - ``horseshoe_elementwise``: lam_kj ~ HalfCauchy(1), dims (task, coef).
    - ``regularized_horseshoe``: lam_k ~ HalfCauchy(1), c2 ~ InvGamma(slab_df / 2,
      slab_df * slab_scale^2 / 2), and the model uses
      lam_tilde_k = sqrt(c2 lam_k^2 / (c2 + tau^2 lam_k^2)) (Piironen and Vehtari 2017).
    - ``student_t``: lam2_k ~ InvGamma(nu / 2, nu / 2), lam_k = sqrt(lam2_k), so delta_k is
      multivariate t_nu(0, tau^2 D^2).
    - ``laplace``: lam2_k ~ Gamma((p + 1) / 2, rate=1/2), lam_k = sqrt(lam2_k), so the density
      of delta_k is proportional to exp(-||D^-1 delta_k|| / tau) (Bayesian group lasso).
    """
    spec = load_spec(spec)
    parameterization = resolve_parameterization(spec, parameterization)
    theta_hat, V, _ = summaries.arrays()
    K, p = theta_hat.shape
    s = coef_scales(V)
    coords = {"task": list(summaries.task_names), "coef": list(summaries.coef_names)}

    with pm.Model(coords=coords) as model:
        # beta in units of s (beta = s * beta_z), like tau and the local scales: every sampled
        # variable is then free of the data's units, so NUTS's adaptation, which starts from
        # unit scales, works alike for effects of size 1e-12 and 1e6 (with beta sampled in raw
        # units, estimates near 1e-12 gave every draw divergent).
        beta_z = pm.Normal("beta_z", mu=0.0, sigma=spec.beta_scale, dims="coef")
        beta = pm.Deterministic("beta", beta_z * s, dims="coef")
        tau = pm.HalfCauchy("tau", beta=spec.global_scale)

        # Prior sd of each deviation given the scales, shape (K, p).
        lam = _local_scales(spec, tau, p)
        sd = tau * s[None, :] if lam is None else tau * lam * s[None, :]
        sd_delta = pm.Deterministic("sd_delta", pt.broadcast_to(sd, (K, p)), dims=("task", "coef"))

        if parameterization == "marginalized":
            _marginal_likelihood(beta, sd_delta, theta_hat, V)
            return model
        if parameterization == "noncentered":
            z = pm.Normal("z", mu=0.0, sigma=1.0, dims=("task", "coef"))
            delta = pm.Deterministic("delta", sd_delta * z, dims=("task", "coef"))
        else:
            delta = pm.Normal("delta", mu=0.0, sigma=sd_delta, dims=("task", "coef"))
        theta = pm.Deterministic("theta", beta + delta, dims=("task", "coef"))
        _likelihood(theta, theta_hat, V)
    return model


def _local_scales(spec: ModelSpec, tau: pt.TensorVariable, p: int) -> pt.TensorVariable | None:
    """Register the family's local scales; return lam broadcastable to (K, p), or None."""
    family = spec.deviation
    if family == "normal":
        return None
    if family == "horseshoe":
        return pm.HalfCauchy("lam", beta=1.0, dims="task")[:, None]
    if family == "horseshoe_elementwise":
        return pm.HalfCauchy("lam", beta=1.0, dims=("task", "coef"))
    if family == "regularized_horseshoe":
        df, slab = spec.params["slab_df"], spec.params["slab_scale"]
        lam = pm.HalfCauchy("lam", beta=1.0, dims="task")
        c2 = pm.InverseGamma("c2", alpha=df / 2, beta=df * slab**2 / 2)
        lam_tilde = pm.Deterministic(
            "lam_tilde", pt.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2)), dims="task"
        )
        return lam_tilde[:, None]
    if family == "student_t":
        nu = spec.params["nu"]
        lam2 = pm.InverseGamma("lam2", alpha=nu / 2, beta=nu / 2, dims="task")
        return pm.Deterministic("lam", pt.sqrt(lam2), dims="task")[:, None]
    if family == "laplace":
        lam2 = pm.Gamma("lam2", alpha=(p + 1) / 2, beta=0.5, dims="task")
        return pm.Deterministic("lam", pt.sqrt(lam2), dims="task")[:, None]
    raise NotImplementedError(f"deviation family {family!r} has no PyMC builder")


def _likelihood(theta: pt.TensorVariable, theta_hat: np.ndarray, V: np.ndarray) -> None:
    """theta_hat_k ~ MvNormal(theta_k, V_k), one log-likelihood term per task."""
    if theta_hat.shape[1] == 1:
        pm.Normal(
            "theta_hat",
            mu=theta[:, 0],
            sigma=np.sqrt(V[:, 0, 0]),
            observed=theta_hat[:, 0],
            dims="task",
        )
    else:
        pm.MvNormal(
            "theta_hat",
            mu=theta,
            chol=np.linalg.cholesky(V),
            observed=theta_hat,
            dims=("task", "coef"),
        )


def _marginal_likelihood(
    beta: pt.TensorVariable, sd_delta: pt.TensorVariable, theta_hat: np.ndarray, V: np.ndarray
) -> None:
    """theta_hat_k ~ MvNormal(beta, V_k + diag(sd_delta_k)^2), delta integrated out."""
    if theta_hat.shape[1] == 1:
        pm.Normal(
            "theta_hat",
            mu=beta[0],
            sigma=pt.sqrt(V[:, 0, 0] + sd_delta[:, 0] ** 2),
            observed=theta_hat[:, 0],
            dims="task",
        )
    else:
        p = theta_hat.shape[1]
        cov = V + sd_delta[:, :, None] ** 2 * np.eye(p)
        pm.MvNormal("theta_hat", mu=beta, cov=cov, observed=theta_hat, dims=("task", "coef"))


# NumPy core -----------------------------------------------------------------------------------


def draw_new_sd(
    spec: ModelSpec,
    tau: np.ndarray,
    s: np.ndarray,
    rng: np.random.Generator,
    c2: np.ndarray | None = None,
) -> np.ndarray:
    """Prior sd of a new task's deviation, one draw per posterior draw of the hyperparameters.

    Parameters
    ----------
    spec : ModelSpec
    tau : ndarray of shape (S,)
        Posterior draws of tau.
    s : ndarray of shape (p,)
        The scales of D.
    rng : numpy.random.Generator
    c2 : ndarray of shape (S,), optional
        Posterior draws of the slab variance (regularised horseshoe only).

    Returns
    -------
    sd_new : ndarray of shape (S, p)
        tau * lam_new * s_j with lam_new drawn from the family's prior.
    """
    tau = np.asarray(tau, dtype=float)
    S, p = tau.shape[0], s.shape[0]
    family = spec.deviation
    if family == "normal":
        lam = np.ones((S, 1))
    elif family == "horseshoe":
        lam = np.abs(rng.standard_cauchy((S, 1)))
    elif family == "horseshoe_elementwise":
        lam = np.abs(rng.standard_cauchy((S, p)))
    elif family == "regularized_horseshoe":
        if c2 is None:
            raise ValueError("the regularised horseshoe needs posterior draws of c2")
        raw = np.abs(rng.standard_cauchy((S, 1)))
        c2 = np.asarray(c2, dtype=float)[:, None]
        lam = np.sqrt(c2 * raw**2 / (c2 + tau[:, None] ** 2 * raw**2))
    elif family == "student_t":
        nu = spec.params["nu"]
        lam = np.sqrt(1.0 / rng.gamma(nu / 2, 2.0 / nu, size=(S, 1)))
    elif family == "laplace":
        lam = np.sqrt(rng.gamma((p + 1) / 2, 2.0, size=(S, 1)))
    else:
        raise NotImplementedError(f"deviation family {family!r} has no new-task draw")
    return tau[:, None] * lam * s[None, :]


def condition_delta(
    theta_hat: np.ndarray,
    V: np.ndarray,
    beta: np.ndarray,
    sd_delta: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw delta_k given (beta, scales) and the data, by Gaussian conditioning.

    Given beta and Sigma_k = diag(sd_delta_k)^2, the prior delta_k ~ Normal(0, Sigma_k) and the
    likelihood theta_hat_k ~ Normal(beta + delta_k, V_k) give the conditional

        delta_k | ... ~ Normal(Sigma_k A_k^-1 r_k, Sigma_k - Sigma_k A_k^-1 Sigma_k),
        r_k = theta_hat_k - beta,  A_k = V_k + Sigma_k.

    One draw per row is made by perturbation (Matheron's rule), which needs only solves with
    A_k and stays exact when some sd_delta are zero: d ~ Normal(0, Sigma_k),
    e ~ Normal(0, V_k), delta_k = d + Sigma_k A_k^-1 (r_k - d - e).

    Parameters
    ----------
    theta_hat : ndarray of shape (K, p)
    V : ndarray of shape (K, p, p)
    beta : ndarray of shape (S, p)
    sd_delta : ndarray of shape (S, K, p)
    rng : numpy.random.Generator

    Returns
    -------
    delta : ndarray of shape (S, K, p)
    """
    S, K, p = sd_delta.shape
    chol_V = np.linalg.cholesky(V)
    out = np.empty((S, K, p))
    for start in range(0, S, _BLOCK):
        block = slice(start, min(start + _BLOCK, S))
        n = block.stop - block.start
        var = sd_delta[block] ** 2
        d = np.sqrt(var) * rng.standard_normal((n, K, p))
        e = np.einsum("kij,skj->ski", chol_V, rng.standard_normal((n, K, p)))
        resid = theta_hat[None] - beta[block][:, None, :] - d - e
        if p == 1:
            out[block] = d + var * resid / (V[None, :, 0, :] + var)
        else:
            A = V[None] + var[..., None] * np.eye(p)
            out[block] = d + var * np.linalg.solve(A, resid[..., None])[..., 0]
    return out


def shrinkage_factors(V: np.ndarray, sd_delta: np.ndarray) -> np.ndarray:
    """Per-draw shrinkage factor of each task, kappa_k = tr(V_k (V_k + Sigma_k)^-1) / p.

    Given the scales, the conditional mean of theta_k is
    beta + Sigma_k A_k^-1 (theta_hat_k - beta) = theta_hat_k - V_k A_k^-1 (theta_hat_k - beta),
    with A_k = V_k + Sigma_k: the matrix V_k A_k^-1 is the fraction of the distance to the
    centre that the task is moved. kappa_k is its average eigenvalue: 0 keeps the task's own
    estimate, 1 pools it fully. With p = 1 it is V_k / (V_k + sd_delta_k^2), the horseshoe's
    shrinkage coefficient (Carvalho, Polson and Scott 2010) and the classical B_k of normal
    random effects.

    Parameters
    ----------
    V : ndarray of shape (K, p, p)
    sd_delta : ndarray of shape (S, K, p)

    Returns
    -------
    kappa : ndarray of shape (S, K)
    """
    S, K, p = sd_delta.shape
    if p == 1:
        return V[None, :, 0, 0] / (V[None, :, 0, 0] + sd_delta[..., 0] ** 2)
    out = np.empty((S, K))
    for start in range(0, S, _BLOCK):
        block = slice(start, min(start + _BLOCK, S))
        A = V[None] + sd_delta[block][..., None] ** 2 * np.eye(p)
        # tr(V A^-1) = tr(A^-1 V) since both are square.
        out[block] = np.trace(np.linalg.solve(A, np.broadcast_to(V, A.shape)), axis1=2, axis2=3)
    return out / p
