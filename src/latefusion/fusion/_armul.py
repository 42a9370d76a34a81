"""Numpy core of adaptive robust aggregation (ARMUL) from task summaries.

The problem, in the notation of METHOD.md section 2, with ``W_k = V_k^{-1}``::

    minimise over beta, theta_1..theta_K:
        sum_k [ 1/2 (theta_k - theta_hat_k)' W_k (theta_k - theta_hat_k)
                + lam_k ||theta_k - beta||_2 ]

For a fixed ``beta`` the problem separates over tasks. With ``r = theta_hat_k - beta`` and
``d = theta_k - beta`` the inner solution is ``d = 0`` when ``||W r|| <= lam`` (the task is
*fused*) and otherwise ``d = (t W + I)^{-1} t W r`` with ``t = ||d|| / lam > 0`` the root of the
secular equation ``||(t W + I)^{-1} W r|| = lam``. In the eigenbasis of ``W`` the left side is
``||u / (w t + 1)||`` with ``u = Q' W r``, a decreasing function of one variable, and Newton's
method on ``1 / ||u / (w t + 1)|| - 1 / lam`` (concave and increasing, like the secular function
of a trust-region step) converges monotonically from the lower end of a bracket.

Profiling out the ``theta_k`` leaves ``F(beta) = sum_k f_k(theta_hat_k - beta)``, convex and
continuously differentiable (a multivariate Huber function), with gradient
``-sum_k W_k (r_k - d_k)`` and Hessian ``sum_k H_k``, ``H_k = W_k`` for fused tasks and
``H_k = W_k - W_k (W_k + G_k)^{-1} W_k`` otherwise, ``G_k = lam_k / ||d_k|| (I - e_k e_k')``,
``e_k = d_k / ||d_k||``. ``F`` is minimised by a Levenberg-Marquardt damped Newton method in the
metric ``M = sum_k W_k``: since every ``H_k <= W_k``, the step ``-(H + mu M)^{-1} g`` decreases
``F`` for every ``mu >= 1``, so the method converges from any start, and near the solution
``mu -> 0`` gives Newton's (semismooth) fast local convergence. Iterations stop when the
gradient, a sum of K forces ``W_k (r_k - d_k)`` of norm at most ``lam_k``, has cancelled to
rounding level relative to their total. With p = 1 the centre is first located exactly by
walking the breakpoints of the piecewise-linear ``F'`` (:func:`_scalar_centre`).

Every solve works on a leading batch axis (bootstrap replicates share ``V`` and ``lam``, so they
share the eigendecompositions). The profile evaluation and the Newton iterations are loops over
batch members and tasks compiled by numba (already a dependency, through PyTensor): in NumPy
they spent most of their time in per-call overhead (about 1.6 ms for K = 50, p = 3, against
0.1 ms compiled). The compiled functions are cached on disk after their first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "Problem",
    "Solution",
    "check_optimality",
    "objective",
    "solve",
    "sure",
    "sure_terms",
    "task_lambda",
    "theory_C",
]

logger = logging.getLogger(__name__)

_EPS = np.finfo(float).eps


def theory_C(K: int, p: int) -> float:
    """Theory default of the constant C: ``sqrt(1 + log(K) / p)``.

    ARMUL's penalty level is of order ``sqrt((p + log K) / n)`` times the noise level; with
    ``lam_k = C sqrt(p) / s_k`` this is ``C = sqrt(1 + log(K) / p)``.
    """
    return float(np.sqrt(1.0 + np.log(max(K, 1)) / p))


def task_scale(V: np.ndarray) -> np.ndarray:
    """Standard-error scale of each task, ``s_k = sqrt(trace(V_k) / p)``, shape ``(K,)``."""
    p = V.shape[-1]
    return np.sqrt(np.trace(V, axis1=-2, axis2=-1) / p)


def task_lambda(V: np.ndarray, C: float) -> np.ndarray:
    """Penalty per task, ``lam_k = C sqrt(p) / s_k``, shape ``(K,)``."""
    p = V.shape[-1]
    return C * np.sqrt(p) / task_scale(V)


@dataclass(frozen=True)
class Problem:
    """Per-task quantities that do not change between solves (or bootstrap replicates).

    Attributes
    ----------
    w : ndarray of shape (K, p)
        Eigenvalues of the precisions ``W_k``.
    Q : ndarray of shape (K, p, p)
        Eigenvectors (columns) of ``W_k``; ``W_k = Q_k diag(w_k) Q_k'``.
    lam : ndarray of shape (K,)
        Penalties.
    M : ndarray of shape (p, p)
        ``sum_k W_k``, the Hessian of full pooling.
    M_norm : float
        Spectral norm of ``M``.
    """

    w: np.ndarray
    Q: np.ndarray
    lam: np.ndarray
    M: np.ndarray
    M_norm: float

    @classmethod
    def build(cls, V: np.ndarray, lam: np.ndarray) -> Problem:
        """Eigendecompose the covariances ``V`` (K, p, p) once."""
        V = np.asarray(V, dtype=float)
        lam = np.asarray(lam, dtype=float)
        if V.ndim != 3 or V.shape[1] != V.shape[2] or lam.shape != V.shape[:1]:
            raise ValueError(
                f"covariances of shape {V.shape} and penalties of shape {lam.shape} do not "
                "fit: expected (K, p, p) and (K,)"
            )
        v, Q = np.linalg.eigh(V)
        if np.any(v <= 0):
            bad = np.flatnonzero(np.any(v <= 0, axis=1))
            raise ValueError(
                f"covariance of task(s) at position {bad.tolist()} is not positive definite"
            )
        if np.any(~np.isfinite(lam)) or np.any(lam <= 0):
            raise ValueError("every penalty lam_k must be positive and finite")
        w = 1.0 / v
        M = ((Q * w[:, None, :]) @ Q.transpose(0, 2, 1)).sum(axis=0)
        M_norm = float(np.linalg.eigvalsh(M)[-1])
        return cls(w=w, Q=Q, lam=lam, M=M, M_norm=M_norm)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape


@dataclass(frozen=True)
class Solution:
    """Solution of the ARMUL problem (with a leading batch axis B when solved in batch).

    Attributes
    ----------
    beta : ndarray of shape (p,) or (B, p)
    theta : ndarray of shape (K, p) or (B, K, p)
    fused : ndarray of bool, shape (K,) or (B, K)
        ``theta_k == beta`` exactly.
    objective : float or ndarray of shape (B,)
    n_iter : int
        Outer (Newton) iterations of the slowest batch member.
    converged : bool
        Every batch member met the gradient tolerance.
    """

    beta: np.ndarray
    theta: np.ndarray
    fused: np.ndarray
    objective: np.ndarray | float
    n_iter: int
    converged: bool


@dataclass
class _State:
    """Profile objective and what it needs, at a batch of centres."""

    F: np.ndarray  # (B,)
    g: np.ndarray  # (B, p)
    force: np.ndarray  # (B,); sum_k ||W_k (r_k - d_k)||, the scale of the cancellation in g
    H: np.ndarray | None  # (B, p, p)
    t: np.ndarray  # (B, K); 0 for fused tasks
    u: np.ndarray  # (B, K, p); Q' W r


# Compiled kernel: the profile objective at a batch of centres -------------------------------


@numba.njit(cache=True, nogil=True)
def _secular_root(u, w, lam, t0):  # pragma: no cover - compiled; tested through _evaluate
    """Root ``t > 0`` of ``||u / (w t + 1)|| = lam`` for one task with ``||u|| > lam``.

    Newton's method on the concave, increasing ``1 / ||u / (w t + 1)|| - 1 / lam`` steps from a
    start above the root to a point below it and from there increases monotonically to the
    root, so any start in the bracket ``[lo, hi]`` converges; ``t0 < 0`` starts at ``lo``.
    """
    p = u.shape[0]
    nu2, wmax, wmin = 0.0, w[0], w[0]
    for i in range(p):
        nu2 += u[i] * u[i]
        wmax = max(wmax, w[i])
        wmin = min(wmin, w[i])
    ratio = np.sqrt(nu2) / lam - 1.0
    lo, hi = ratio / wmax, ratio / wmin
    t = lo if t0 < 0.0 else min(max(t0, lo), hi)
    for _ in range(100):
        N, S = 0.0, 0.0
        for i in range(p):
            inv = 1.0 / (w[i] * t + 1.0)
            a = u[i] * u[i] * inv * inv
            N += a
            S += a * w[i] * inv
        psi = lam / np.sqrt(N) - 1.0
        dpsi = (psi + 1.0) / N * S
        t_new = min(max(t - psi / dpsi, lo), hi)
        # Quadratic convergence: once a step is below 1e-9 of t, the error left after it is of
        # order its square, below rounding; stop there (or at rounding level of psi).
        done = abs(t_new - t) <= 1e-9 * t_new or abs(psi) <= 8 * _EPS
        t = t_new
        if done:
            break
    return t


@numba.njit(cache=True, nogil=True)
def _profile(beta, Y, w, Q, lam, t0, hessian):  # pragma: no cover - compiled
    """See :func:`_evaluate`; ``t0`` of shape (0, 0) means no warm start."""
    B, K, p = Y.shape
    F = np.zeros(B)
    g = np.zeros((B, p))
    force = np.zeros(B)
    H = np.zeros((B, p, p))
    t = np.zeros((B, K))
    u = np.zeros((B, K, p))
    warm = t0.shape[0] == B
    rq = np.empty(p)
    ud = np.empty(p)
    y = np.empty(p)
    z = np.empty(p)
    for b in range(B):
        for k in range(K):
            # u = W r in the eigenbasis of W_k: w * Q_k' (theta_hat_k - beta).
            nu2 = 0.0
            for i in range(p):
                s = 0.0
                for j in range(p):
                    s += Q[k, j, i] * (Y[b, k, j] - beta[b, j])
                rq[i] = s
                u[b, k, i] = w[k, i] * s
                nu2 += u[b, k, i] * u[b, k, i]
            tk = 0.0
            if np.sqrt(nu2) > lam[k]:
                tk = _secular_root(u[b, k], w[k], lam[k], t0[b, k] if warm else -1.0)
            t[b, k] = tk
            # Fused: 1/2 r'Wr. Free: 1/2 (d - r)'W(d - r) + lam ||d||, d - r = -r / (w t + 1).
            fk, f2 = lam[k] * lam[k] * tk, 0.0
            for i in range(p):
                rd = rq[i] / (w[k, i] * tk + 1.0)
                ud[i] = w[k, i] * rd
                fk += 0.5 * ud[i] * rd
                f2 += ud[i] * ud[i]
            F[b] += fk
            force[b] += np.sqrt(f2)
            for i in range(p):
                s = 0.0
                for j in range(p):
                    s += Q[k, i, j] * ud[j]
                g[b, i] -= s
            if not hessian:
                continue
            # H_k = Q [diag(w / (w t + 1)) - y y' / c] Q', the rank-one part for free tasks.
            for i in range(p):
                for j in range(p):
                    s = 0.0
                    for m in range(p):
                        s += Q[k, i, m] * Q[k, j, m] * w[k, m] / (w[k, m] * tk + 1.0)
                    H[b, i, j] += s
            if tk > 0.0:
                # e = d / ||d|| in the eigenbasis, y = w e / (w t + 1), c = e'y.
                e2 = 0.0
                for i in range(p):
                    den = w[k, i] * tk + 1.0
                    y[i] = u[b, k, i] * tk / den
                    e2 += y[i] * y[i]
                en = np.sqrt(e2)
                c = 0.0
                for i in range(p):
                    e = y[i] / en
                    y[i] = w[k, i] * e / (w[k, i] * tk + 1.0)
                    c += e * y[i]
                sc = np.sqrt(c)
                for i in range(p):
                    s = 0.0
                    for j in range(p):
                        s += Q[k, i, j] * y[j]
                    z[i] = s / sc
                for i in range(p):
                    for j in range(p):
                        H[b, i, j] -= z[i] * z[j]
    return F, g, force, H, t, u


@numba.njit(cache=True, nogil=True)
def _newton(Y, beta0, w, Q, lam, M, floor, gtol, max_iter):  # pragma: no cover - compiled
    """Levenberg-Marquardt damped Newton on the profile objective, per batch member.

    Returns the centres (B, p), the state at them (F, g, force, t, u as in :func:`_profile`)
    and the iterations each member took. A step ``-(H + mu M)^{-1} g`` is accepted when it
    passes the Armijo test (or, below the rounding level of F, when it shrinks the gradient);
    ``mu`` then falls tenfold, else it rises tenfold (from at least 1e-3).
    """
    B, K, p = Y.shape
    beta = beta0.copy()
    F, g, force = np.zeros(B), np.zeros((B, p)), np.zeros(B)
    t, u = np.zeros((B, K)), np.zeros((B, K, p))
    iters = np.zeros(B, dtype=np.int64)
    none = np.zeros((0, 0))
    for b in range(B):
        Yb = Y[b : b + 1]
        bb = beta[b : b + 1].copy()
        Fb, gb, fb, Hb, tb, ub = _profile(bb, Yb, w, Q, lam, none, True)
        mu = 1e-12
        it = 0
        while it < max_iter:
            gnorm = np.sqrt(np.sum(gb[0] * gb[0]))
            # Converged (see solve), or mu > 1e15: no direction decreases F (rounding level).
            if gnorm <= gtol * fb[0] + floor or mu > 1e15:
                break
            it += 1
            step = -np.linalg.solve(Hb[0] + mu * M, gb[0])
            Fn, gn, fn, Hn, tn, un = _profile(bb + step, Yb, w, Q, lam, tb, True)
            slope = np.sum(gb[0] * step)
            armijo = Fn[0] <= Fb[0] + 1e-4 * slope
            # Below rounding level of F, judge the step by the gradient instead.
            flat = -slope <= 64 * _EPS * abs(Fb[0])
            if armijo or (flat and np.sqrt(np.sum(gn[0] * gn[0])) < gnorm):
                bb = bb + step
                Fb, gb, fb, Hb, tb, ub = Fn, gn, fn, Hn, tn, un
                mu = max(mu / 10.0, 1e-12)
            else:
                mu = max(mu * 10.0, 1e-3)
        beta[b], F[b], g[b], force[b], t[b], u[b] = bb[0], Fb[0], gb[0], fb[0], tb[0], ub[0]
        iters[b] = it
    return beta, F, g, force, t, u, iters


def _evaluate(
    beta: np.ndarray,
    theta_hat: np.ndarray,
    prob: Problem,
    hessian: bool,
    t0: np.ndarray | None = None,
) -> _State:
    """Profile objective, gradient and (optionally) Hessian at centres ``beta`` (B, p).

    ``t0`` (B, K), the inner roots at a nearby centre, warm-starts the secular equations.
    """
    beta = np.ascontiguousarray(beta, dtype=float)
    theta_hat = np.ascontiguousarray(theta_hat, dtype=float)
    warm = np.zeros((0, 0)) if t0 is None else np.ascontiguousarray(t0, dtype=float)
    F, g, force, H, t, u = _profile(beta, theta_hat, prob.w, prob.Q, prob.lam, warm, hessian)
    return _State(F=F, g=g, force=force, H=H if hessian else None, t=t, u=u)


def _inner(beta: np.ndarray, state: _State, prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Task estimates ``theta = beta + d`` and the fused mask from an evaluated state."""
    dq = state.u * state.t[..., None] / (prob.w * state.t[..., None] + 1.0)
    theta = beta[:, None, :] + (prob.Q @ dq[..., None])[..., 0]
    fused = state.t == 0
    theta[fused] = np.broadcast_to(beta[:, None, :], theta.shape)[fused]
    return theta, fused


def fixed_effect_centre(theta_hat: np.ndarray, prob: Problem) -> np.ndarray:
    """Inverse-variance weighted centre, shape ``(B, p)`` for ``theta_hat`` of shape (B, K, p)."""
    # W_k y_k = Q_k (w_k * Q_k' y_k), summed over tasks.
    yq = (theta_hat[..., None, :] @ prob.Q)[..., 0, :]
    Wy = (prob.Q @ (prob.w * yq)[..., None])[..., 0].sum(axis=1)
    return np.linalg.solve(prob.M, Wy.T).T


def _scalar_centre(Y: np.ndarray, prob: Problem) -> np.ndarray:
    """Exact centre for p = 1, shape ``(B, 1)`` for ``Y`` of shape (B, K, 1).

    The profile gradient ``F'(beta) = -sum_k clip(w_k (y_k - beta), -lam_k, lam_k)`` is
    continuous, non-decreasing and piecewise linear, with slope ``sum w_k`` over the tasks whose
    ``|y_k - beta| < lam_k / w_k``. Walking its 2K breakpoints in order locates the root exactly
    (a Huber M-estimate), where a Newton method would crawl when every task sits on a linear
    piece (small C).
    """
    w, lam = prob.w[:, 0], prob.lam
    y = Y[..., 0]
    c = lam / w
    x = np.concatenate([y - c, y + c], axis=1)
    dslope = np.broadcast_to(np.concatenate([w, -w]), x.shape)
    order = np.argsort(x, axis=1)
    xs = np.take_along_axis(x, order, axis=1)
    slope = np.cumsum(np.take_along_axis(dslope, order, axis=1), axis=1)
    Fp = -lam.sum() + np.concatenate(
        [np.zeros((x.shape[0], 1)), np.cumsum(slope[:, :-1] * np.diff(xs, axis=1), axis=1)], axis=1
    )
    j = np.argmax(Fp >= 0, axis=1)  # first breakpoint at or past the root; j >= 1
    rows = np.arange(x.shape[0])
    x0, F0, s0 = xs[rows, j - 1], Fp[rows, j - 1], slope[rows, j - 1]
    beta = np.where(s0 > 0, x0 - F0 / np.where(s0 > 0, s0, 1.0), xs[rows, j])
    return beta[:, None]


def solve(
    theta_hat: np.ndarray,
    V: np.ndarray | None = None,
    lam: np.ndarray | None = None,
    *,
    problem: Problem | None = None,
    beta0: np.ndarray | None = None,
    gtol: float = 1e-13,
    max_iter: int = 500,
) -> Solution:
    """Solve the ARMUL problem exactly (to rounding level).

    Parameters
    ----------
    theta_hat : ndarray of shape (K, p) or (B, K, p)
        Task estimates; a leading axis solves B problems that share ``V`` and ``lam``.
    V : ndarray of shape (K, p, p), optional
        Covariances of ``theta_hat``. Not needed when ``problem`` is given.
    lam : ndarray of shape (K,), optional
        Penalties. Not needed when ``problem`` is given.
    problem : Problem, optional
        Precomputed ``Problem.build(V, lam)``, reused across calls.
    beta0 : ndarray of shape (p,) or (B, p), optional
        Starting centre; the fixed-effect centre by default. The problem is convex, so the
        start changes only the number of iterations.
    gtol : float, default=1e-13
        Stop when ``||grad F(beta)|| <= gtol * sum_k ||W_k (r_k - d_k)||``, the forces whose
        sum is the gradient (or it is at the rounding level of the data, which matters only
        for tiny penalties).
    max_iter : int, default=500
        Outer iterations.

    Returns
    -------
    Solution
    """
    prob = problem if problem is not None else Problem.build(V, lam)
    theta_hat = np.asarray(theta_hat, dtype=float)
    single = theta_hat.ndim == 2
    Y = theta_hat[None] if single else theta_hat
    if Y.ndim != 3 or Y.shape[1:] != prob.shape:
        raise ValueError(
            f"theta_hat of shape {theta_hat.shape} does not fit {prob.shape[0]} tasks with "
            f"{prob.shape[1]} coefficients"
        )
    if not np.all(np.isfinite(Y)):
        raise ValueError("theta_hat has non-finite values")
    B = Y.shape[0]
    if Y.shape[2] == 1:
        beta = _scalar_centre(Y, prob)
    elif beta0 is None:
        beta = fixed_effect_centre(Y, prob)
    else:
        beta = np.array(np.broadcast_to(beta0, (B, Y.shape[2])), dtype=float)

    # The gradient sums K forces of norm at most lam_k; it is zero when they cancel to gtol
    # of their total, or to the rounding floor set by storing beta and theta_hat to eps.
    floor = 16 * _EPS * prob.M_norm * np.abs(Y).max()
    beta, F, g, force, t, u, iters = _newton(
        np.ascontiguousarray(Y), beta, prob.w, prob.Q, prob.lam, prob.M, floor, gtol, max_iter
    )
    state = _State(F=F, g=g, force=force, H=None, t=t, u=u)
    n_iter = int(iters.max())

    tol = gtol * state.force + floor
    gnorm = np.linalg.norm(state.g, axis=1)
    # A zero gradient meets any tolerance, including a zero one (all estimates 0).
    excess = np.where(gnorm == 0, 0.0, gnorm / np.where(tol > 0, tol, 1.0))
    converged = bool(np.all(excess <= 1e3))
    if not converged:
        logger.debug("ARMUL stopped with gradient %s times its tolerance", excess.max())
    theta, fused = _inner(beta, state, prob)
    if single:
        return Solution(beta[0], theta[0], fused[0], float(state.F[0]), n_iter, converged)
    return Solution(beta, theta, fused, state.F.copy(), n_iter, converged)


def objective(
    theta_hat: np.ndarray, V: np.ndarray, lam: np.ndarray, beta: np.ndarray, theta: np.ndarray
) -> float:
    """Joint objective at ``(beta, theta)``.

    Parameters
    ----------
    theta_hat : ndarray of shape (K, p)
    V : ndarray of shape (K, p, p)
    lam : ndarray of shape (K,)
    beta : ndarray of shape (p,)
    theta : ndarray of shape (K, p)
    """
    e = theta - theta_hat
    quad = np.einsum("ki,ki->k", e, np.linalg.solve(V, e[..., None])[..., 0])
    return float(np.sum(0.5 * quad + lam * np.linalg.norm(theta - beta, axis=1)))


def check_optimality(
    theta_hat: np.ndarray,
    V: np.ndarray,
    lam: np.ndarray,
    beta: np.ndarray,
    theta: np.ndarray,
    fused_tol: float = 1e-12,
) -> float:
    """Largest violation of the optimality (KKT) conditions, relative to the penalties.

    With ``W_k = V_k^{-1}`` and ``g_k`` the subgradient of ``||.||`` at ``theta_k - beta``:

    - fused task (``theta_k = beta``): ``||W_k (theta_hat_k - beta)|| <= lam_k``; the violation
      is ``max(0, ||W_k (theta_hat_k - beta)|| / lam_k - 1)``;
    - other task: ``W_k (theta_k - theta_hat_k) + lam_k e_k = 0`` with
      ``e_k = (theta_k - beta) / ||theta_k - beta||``; the violation is the norm of the left side
      over ``lam_k``;
    - centre: ``sum_k lam_k g_k = sum_k W_k (theta_hat_k - theta_k) = 0``; the violation is its
      norm over ``sum_k lam_k`` (each term has norm at most ``lam_k``).

    Parameters
    ----------
    theta_hat : ndarray of shape (K, p)
    V : ndarray of shape (K, p, p)
    lam : ndarray of shape (K,)
        Positive penalties.
    beta : ndarray of shape (p,)
    theta : ndarray of shape (K, p)
    fused_tol : float, default=1e-12
        A task counts as fused when ``||theta_k - beta|| <= fused_tol * s_k``, ``s_k`` its
        standard-error scale.

    Returns
    -------
    float
        The largest of the three violations (all dimensionless).
    """
    theta_hat, theta, beta = (np.asarray(a, dtype=float) for a in (theta_hat, theta, beta))
    lam = np.asarray(lam, dtype=float)
    W = np.linalg.inv(V)
    delta = theta - beta
    dist = np.linalg.norm(delta, axis=1)
    fused = dist <= fused_tol * task_scale(V)

    force = np.einsum("kij,kj->ki", W, theta_hat - theta)  # = lam_k g_k at a solution
    viol_fused = np.linalg.norm(force[fused], axis=1) / lam[fused] - 1.0
    e = delta[~fused] / dist[~fused, None]
    viol_free = np.linalg.norm(-force[~fused] + lam[~fused, None] * e, axis=1) / lam[~fused]
    viol_centre = np.linalg.norm(force.sum(axis=0)) / lam.sum()
    parts = [np.maximum(viol_fused, 0.0), viol_free, [viol_centre]]
    return float(max(np.max(x, initial=0.0) for x in parts))


def divergence(theta_hat: np.ndarray, sol: Solution, prob: Problem) -> np.ndarray:
    """Trace of each diagonal block of the Jacobian ``d theta_k / d theta_hat_k``, shape (K,).

    With ``D_k = d d_k / d r_k`` (zero for fused tasks, ``(W_k + G_k)^{-1} W_k`` otherwise),
    ``H_k = W_k (I - D_k)`` and ``H = sum_k H_k``, the implicit function theorem on
    ``sum_k W_k (r_k - d_k) = 0`` gives ``d beta / d theta_hat_k = H^{-1} H_k``, so that
    ``tr(d theta_k / d theta_hat_k) = tr(D_k) + tr((I - D_k) H^{-1} H_k)``.
    """
    w, Q = prob.w, prob.Q
    beta = np.asarray(sol.beta)[None]
    state = _evaluate(beta, np.asarray(theta_hat)[None], prob, hessian=True)
    t, u, H = state.t[0], state.u[0], state.H[0]
    free = t > 0
    den = w * t[:, None] + 1.0

    # In the eigenbasis: D = diag(w t / (w t + 1)) + f y' / c, with e the unit step direction,
    # f = e / (w t + 1), y = w f, c = e'y;  H_k = diag(w / (w t + 1)) - y y' / c.
    e = u * t[:, None] / den
    e /= np.where(free, np.linalg.norm(e, axis=1), 1.0)[:, None]
    f = e / den
    y = w * f
    c = np.where(free, np.sum(e * y, axis=1), 1.0)
    Dq = np.einsum("kj,ij->kij", w * t[:, None] / den, np.eye(w.shape[1]))
    Dq += np.einsum("ki,kj->kij", f, y) / c[:, None, None]
    Dq[~free] = 0.0
    Hq = np.einsum("kj,ij->kij", w / den, np.eye(w.shape[1]))
    Hq -= np.einsum("ki,kj->kij", y, y) / c[:, None, None] * free[:, None, None]

    # Back to the original basis: X = Q X_q Q'.
    Dk = Q @ Dq @ Q.transpose(0, 2, 1)
    Hk = Q @ Hq @ Q.transpose(0, 2, 1)
    A = np.einsum("ij,kjl->kil", _pinv_psd(H, prob.M), Hk)  # H^+ H_k, (K, p, p)
    eye = np.eye(w.shape[1])
    return np.trace(Dk, axis1=1, axis2=2) + np.einsum("kij,kji->k", eye - Dk, A)


def _pinv_psd(H: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of the profile Hessian ``H = sum_k H_k`` (p, p).

    ``H`` is singular when no task is fused along some direction (with p = 1 and equal
    variances: every task free, the centre then not unique). Every ``H_k`` is positive
    semidefinite, so the null space of ``H`` is common to all of them and ``H^+ H_k`` is the
    derivative of the centre that the solver returns along the directions where it is unique;
    along the others no task's estimate depends on the centre.
    """
    h, U = np.linalg.eigh(0.5 * (H + H.T))
    keep = h > 1e-12 * np.linalg.norm(M, 2)
    return (U[:, keep] / h[keep]) @ U[:, keep].T


def sure(theta_hat: np.ndarray, sol: Solution, prob: Problem) -> float:
    """Stein's unbiased estimate of the precision-weighted risk of the fused estimates.

    Under ``theta_hat_k ~ N(theta_k, V_k)`` independently, for the loss
    ``sum_k (theta_est_k - theta_k)' W_k (theta_est_k - theta_k)``::

        SURE = sum_k ||theta_est_k - theta_hat_k||^2_{W_k} - K p + 2 sum_k tr(J_kk)

    with ``J_kk = d theta_est_k / d theta_hat_k`` (exact for general ``V_k``: the weight ``W``
    cancels the noise covariance in Stein's identity). The estimator is Lipschitz in
    ``theta_hat``, so Stein's identity applies.
    """
    return float(np.sum(sure_terms(theta_hat, sol, prob)))


def sure_terms(theta_hat: np.ndarray, sol: Solution, prob: Problem) -> np.ndarray:
    """Task k's term of :func:`sure`, shape (K,): ``||theta_est_k - theta_hat_k||^2_{W_k} - p
    + 2 tr(J_kk)``, an unbiased estimate of task k's own risk (noisy: one draw per task)."""
    theta_hat = np.asarray(theta_hat, dtype=float)
    p = theta_hat.shape[1]
    res = np.einsum("kji,kj->ki", prob.Q, sol.theta - theta_hat)
    fit = np.sum(prob.w * res**2, axis=1)
    return fit - p + 2.0 * divergence(theta_hat, sol, prob)
