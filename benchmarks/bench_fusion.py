"""Adaptive robust aggregation: our exact solver against a generic convex solver.

Targets (issue 4): the same objective value as a generic conic solver (cvxpy with Clarabel) on
the same problem, at least 20 times faster; K = 10,000 tasks with p = 5 fused in under 2 s.

Two workloads: one solve (the estimate), and the 200 re-solves of the parametric bootstrap that
every adaptive fit runs for its intervals (the same K, V_k and penalties, new estimates). For
the bootstrap the generic solver gets its best case: the problem is compiled once by cvxpy with
the estimates as a parameter, and only the conic solve is repeated.

Run: ``.venv/bin/python benchmarks/bench_fusion.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from latefusion.fusion import _armul


def problem(K: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K tasks with random covariances; a fifth of them outliers."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((K, p, p)) / np.sqrt(p)
    V = A @ A.transpose(0, 2, 1) + 0.2 * np.eye(p)
    L = np.linalg.cholesky(V)
    theta = np.where(rng.random((K, 1)) < 0.2, 4.0, 0.0) + 0.3 * rng.standard_normal((K, p))
    theta_hat = theta + np.einsum("kij,kj->ki", L, rng.standard_normal((K, p)))
    lam = _armul.task_lambda(V, _armul.theory_C(K, p))
    return theta_hat, V, lam


def ours(theta_hat, V, lam):
    start = time.perf_counter()
    sol = _armul.solve(theta_hat, V, lam)
    return time.perf_counter() - start, _armul.objective(theta_hat, V, lam, sol.beta, sol.theta)


def generic(theta_hat, V, lam):
    """cvxpy + Clarabel on the same problem, written in vectorised form.

    Returns (conic solver seconds as the solver reports them, end-to-end seconds including
    cvxpy's compilation, objective at the solution).
    """
    import cvxpy as cp
    import scipy.sparse as sp

    K, p = theta_hat.shape
    beta = cp.Variable(p)
    theta = cp.Variable((K, p))
    # W_k = Lw_k Lw_k': the quadratic term is 1/2 ||blockdiag(Lw_k') vec(theta - theta_hat)||^2
    Lw = np.linalg.cholesky(np.linalg.inv(V))
    M = sp.block_diag([sp.csr_array(Lw[k].T) for k in range(K)], format="csr")
    resid = cp.vec(theta - theta_hat, order="C")
    dev = cp.norm(theta - np.ones((K, 1)) @ cp.reshape(beta, (1, p), order="C"), 2, axis=1)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M @ resid) + lam @ dev))
    start = time.perf_counter()
    prob.solve(solver=cp.CLARABEL)
    total = time.perf_counter() - start
    value = _armul.objective(theta_hat, V, lam, beta.value, theta.value)
    return prob.solver_stats.solve_time, total, value


def bootstrap_draws(theta_hat, V, B: int, seed: int) -> np.ndarray:
    """B redraws ``theta_hat*_k ~ N(theta_hat_k, V_k)``, shape (B, K, p)."""
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(V)
    return theta_hat + np.einsum("kij,bkj->bki", L, rng.standard_normal((B, *theta_hat.shape)))


def ours_batch(draws, V, lam):
    """Seconds for our batched solve of every draw, and the objective of each."""
    start = time.perf_counter()
    prob = _armul.Problem.build(V, lam)
    sol = _armul.solve(draws, problem=prob)
    seconds = time.perf_counter() - start
    values = [
        _armul.objective(d, V, lam, b, t)
        for d, b, t in zip(draws, sol.beta, sol.theta, strict=True)
    ]
    return seconds, np.array(values)


def generic_batch(draws, V, lam):
    """Seconds for cvxpy + Clarabel over every draw (compiled once, parameterised)."""
    import cvxpy as cp
    import scipy.sparse as sp

    B, K, p = draws.shape
    beta = cp.Variable(p)
    theta = cp.Variable((K, p))
    y = cp.Parameter((K, p))
    Lw = np.linalg.cholesky(np.linalg.inv(V))
    M = sp.block_diag([sp.csr_array(Lw[k].T) for k in range(K)], format="csr")
    dev = cp.norm(theta - np.ones((K, 1)) @ cp.reshape(beta, (1, p), order="C"), 2, axis=1)
    obj = 0.5 * cp.sum_squares(M @ cp.vec(theta - y, order="C")) + lam @ dev
    prob = cp.Problem(cp.Minimize(obj))
    values = np.empty(B)
    start = time.perf_counter()
    for b in range(B):
        y.value = draws[b]
        prob.solve(solver=cp.CLARABEL)
        values[b] = _armul.objective(draws[b], V, lam, beta.value, theta.value)
    return time.perf_counter() - start, values


def main(quick: bool = False) -> dict:
    """Print the comparison table and return the figures."""
    results: dict = {"benchmark": "fusion", "cases": []}
    sizes = [(50, 3), (200, 3)] if quick else [(50, 3), (200, 3), (1000, 5), (5000, 5)]
    # Warm both up (imports, cvxpy's and Clarabel's first-call caches) so that neither is timed
    # paying a one-off cost.
    generic(*problem(10, 3, seed=0))
    ours(*problem(10, 3, seed=0))
    print(f"{'K':>6} {'p':>2} {'ours s':>8} {'solver s':>9} {'cvxpy s':>8} "
          f"{'x solver':>9} {'x cvxpy':>8} {'rel. objective gap':>19}")  # fmt: skip
    for K, p in sizes:
        args = problem(K, p, seed=K)
        t_ours = min(ours(*args)[0] for _ in range(3))
        f_ours = ours(*args)[1]
        t_solver, t_total, f_gen = generic(*args)
        gap = (f_ours - f_gen) / abs(f_gen)
        print(f"{K:>6} {p:>2} {t_ours:>8.4f} {t_solver:>9.4f} {t_total:>8.3f} "
              f"{t_solver / t_ours:>9.1f} {t_total / t_ours:>8.1f} {gap:>19.2e}")  # fmt: skip
        results["cases"].append(
            {"K": K, "p": p, "ours_s": t_ours, "clarabel_solve_s": t_solver,
             "cvxpy_total_s": t_total, "speedup_vs_solver": t_solver / t_ours,
             "speedup_vs_cvxpy": t_total / t_ours, "objective_ours": f_ours,
             "objective_cvxpy": f_gen, "relative_gap": gap}
        )  # fmt: skip
    print("\nBootstrap: 200 re-solves of the same problem with redrawn estimates")
    print(f"{'K':>6} {'p':>2} {'ours s':>8} {'cvxpy s':>8} {'x cvxpy':>8} {'max rel. gap':>13}")
    boot_sizes = [(50, 3)] if quick else [(50, 3), (200, 3), (1000, 5)]
    results["bootstrap"] = []
    for K, p in boot_sizes:
        theta_hat, V, lam = problem(K, p, seed=K)
        draws = bootstrap_draws(theta_hat, V, 200, seed=K)
        t_ours, f_ours = min((ours_batch(draws, V, lam) for _ in range(3)), key=lambda r: r[0])
        t_gen, f_gen = generic_batch(draws, V, lam)
        gap = float(np.max((f_ours - f_gen) / np.abs(f_gen)))
        print(f"{K:>6} {p:>2} {t_ours:>8.4f} {t_gen:>8.2f} {t_gen / t_ours:>8.1f} {gap:>13.2e}")
        results["bootstrap"].append(
            {"K": K, "p": p, "B": 200, "ours_s": t_ours, "cvxpy_s": t_gen,
             "speedup_vs_cvxpy": t_gen / t_ours, "max_relative_gap": gap}
        )  # fmt: skip

    args = problem(10_000, 5, seed=1)
    t_big = min(ours(*args)[0] for _ in range(3))
    print(f"K = 10,000, p = 5: {t_big:.3f} s (target < 2 s)")
    results["K10000_p5_seconds"] = t_big
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    res = main(a.quick)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
