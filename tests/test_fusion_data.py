"""Summary sets for the fusion tests, built from arrays (and a check of the builder)."""

from __future__ import annotations

import numpy as np

from latefusion import SummarySet, TaskSummary


def summaries_from(theta_hat: np.ndarray, V: np.ndarray) -> SummarySet:
    """SummarySet of K tasks from ``theta_hat`` (K, p) or (K,) and ``V`` (K, p, p) or (K,)."""
    theta_hat = np.asarray(theta_hat, dtype=float)
    if theta_hat.ndim == 1:
        theta_hat = theta_hat[:, None]
    K, p = theta_hat.shape
    V = np.asarray(V, dtype=float).reshape(K, p, p)
    coefs = ("effect",) if p == 1 else ("intercept", *(f"z{j}" for j in range(1, p)))
    tasks = [TaskSummary(f"task{k}", "cate", coefs, theta_hat[k], V[k], n=100) for k in range(K)]
    return SummarySet(tasks)


def random_problem(
    rng: np.random.Generator, K: int, p: int, spread: float = 1.0, outliers: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truths, estimates and general (non-diagonal) covariances of K tasks.

    Returns ``theta`` (K, p), ``theta_hat`` (K, p) and ``V`` (K, p, p): ``V_k`` a random
    correlation structure at a task-specific scale, ``theta_k = 1 + spread * s_k * N(0, I)``
    with a share ``outliers`` moved 6 standard errors away, ``theta_hat_k ~ N(theta_k, V_k)``.
    """
    X = rng.normal(size=(K, p, p))
    V = X @ X.transpose(0, 2, 1) / p + 0.3 * np.eye(p)
    V *= rng.uniform(0.3, 2.0, size=K)[:, None, None]
    s = np.sqrt(np.trace(V, axis1=1, axis2=2) / p)
    theta = 1.0 + spread * s[:, None] * rng.normal(size=(K, p))
    n_out = round(outliers * K)
    theta[:n_out] += 6 * s[:n_out, None] * rng.choice([-1.0, 1.0], size=(n_out, p))
    theta_hat = theta + np.einsum("kij,kj->ki", np.linalg.cholesky(V), rng.normal(size=(K, p)))
    return theta, theta_hat, V


def test_summaries_from_round_trips_the_arrays(rng):
    _, theta_hat, V = random_problem(rng, K=4, p=3)
    got_theta, got_V, n = summaries_from(theta_hat, V).arrays()
    np.testing.assert_array_equal(got_theta, theta_hat)
    np.testing.assert_array_equal(got_V, V)
    assert n.tolist() == [100] * 4
