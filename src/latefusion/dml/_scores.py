"""NumPy core of the orthogonal scores: no pandas, no learners.

Every function takes out-of-fold nuisance predictions and returns the estimate, its sandwich
covariance and the per-row score. Notation follows METHOD.md section 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["ScoreFit", "aggregate_repetitions", "aipw", "plr"]


class ScoreFit(NamedTuple):
    """Estimate from one cross-fitting repetition.

    theta : ndarray of shape (p,)
    V : ndarray of shape (p, p)
        Sandwich covariance of ``theta`` (already divided by n).
    psi : ndarray of shape (n, p)
        The orthogonal score at ``theta`` for each row.
    """

    theta: np.ndarray
    V: np.ndarray
    psi: np.ndarray


def plr(
    r_y: np.ndarray, r_a: np.ndarray, Z: np.ndarray, clusters: np.ndarray | None = None
) -> ScoreFit:
    """Partially linear model with effect modifiers, by partialling out.

    With ``Y = A z'theta + g(X) + e`` and residuals ``r_y = Y - l_hat(X)``,
    ``r_a = A - m_hat(X)``, the score ``psi = (r_y - r_a z'theta) r_a z`` is solved by
    ``theta_hat = (sum r_a^2 z z')^{-1} sum r_a r_y z``, with sandwich
    ``V = J^{-1} Omega J^{-1} / n``, ``J = mean(r_a^2 z z')``, ``Omega = mean(psi psi')``.

    Parameters
    ----------
    r_y, r_a : ndarray of shape (n,)
    Z : ndarray of shape (n, p)
        ``(1, modifiers)`` per row; a column of ones alone gives the average effect.
    clusters : ndarray of shape (n,), optional
        Cluster labels; ``Omega`` then sums scores within clusters (cluster-robust sandwich).
    """
    Xa = r_a[:, None] * Z
    J = Xa.T @ Xa / len(r_a)
    theta = np.linalg.solve(J, Xa.T @ r_y / len(r_a))
    psi = (r_y - Xa @ theta)[:, None] * Xa
    return ScoreFit(theta, _sandwich(J, psi, clusters), psi)


def aipw(phi: np.ndarray, Z: np.ndarray, clusters: np.ndarray | None = None) -> ScoreFit:
    """Best linear projection of the doubly robust pseudo-outcome on ``Z``.

    ``theta_hat = (Z'Z)^{-1} Z' phi``, with the heteroskedasticity-robust sandwich. With ``Z`` a
    column of ones this is the ATE, ``mean(phi)``, with ``V = mean((phi - theta)^2) / n``.

    Parameters
    ----------
    phi : ndarray of shape (n,)
        Pseudo-outcome ``mu_1 - mu_0 + A (Y - mu_1) / e - (1 - A) (Y - mu_0) / (1 - e)``.
    Z : ndarray of shape (n, p)
    clusters : ndarray of shape (n,), optional
    """
    J = Z.T @ Z / len(phi)
    theta = np.linalg.solve(J, Z.T @ phi / len(phi))
    psi = (phi - Z @ theta)[:, None] * Z
    return ScoreFit(theta, _sandwich(J, psi, clusters), psi)


def att(y: np.ndarray, a: np.ndarray, mu0: np.ndarray, e: np.ndarray) -> ScoreFit:
    """Average effect on the treated, doubly robust.

    ``theta = sum[A (Y - mu_0) - e (1 - A) (Y - mu_0) / (1 - e)] / sum A``, with the score
    ``psi = [A (Y - mu_0) - e (1 - A)(Y - mu_0)/(1 - e) - A theta] / pi``, ``pi = mean(A)``.
    """
    n = len(y)
    pi = a.mean()
    num = a * (y - mu0) - e * (1 - a) * (y - mu0) / (1 - e)
    theta = np.array([num.sum() / a.sum()])
    psi = ((num - a * theta[0]) / pi)[:, None]
    V = np.array([[np.mean(psi[:, 0] ** 2) / n]])
    return ScoreFit(theta, V, psi)


def _sandwich(J: np.ndarray, psi: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    n = psi.shape[0]
    if clusters is None:
        omega = psi.T @ psi / n
    else:
        _, inverse = np.unique(clusters, return_inverse=True)
        sums = np.zeros((inverse.max() + 1, psi.shape[1]))
        np.add.at(sums, inverse, psi)
        omega = sums.T @ sums / n
    J_inv = np.linalg.inv(J)
    V = J_inv @ omega @ J_inv.T / n
    return (V + V.T) / 2


def aggregate_repetitions(fits: list[ScoreFit]) -> tuple[np.ndarray, np.ndarray]:
    """Combine repeated cross-fitting by the median, as DoubleML does.

    ``theta`` is the coordinate-wise median over repetitions; the covariance is the element-wise
    median of ``V_r + (theta_r - theta)(theta_r - theta)'``, which for p = 1 is DoubleML's
    ``se^2 = median(se_r^2 + (theta_r - theta)^2)``. A result that is not positive semidefinite
    (possible for p > 1) is projected onto the PSD cone by clipping eigenvalues at zero.

    Returns
    -------
    theta : ndarray of shape (p,)
    V : ndarray of shape (p, p)
    """
    if len(fits) == 1:
        return fits[0].theta, fits[0].V
    thetas = np.stack([f.theta for f in fits])
    theta = np.median(thetas, axis=0)
    dev = thetas - theta
    adjusted = np.stack([f.V for f in fits]) + dev[:, :, None] * dev[:, None, :]
    V = np.median(adjusted, axis=0)
    w, Q = np.linalg.eigh(V)
    if w.min() < 0:
        V = (Q * np.clip(w, 0, None)) @ Q.T
    return theta, V
