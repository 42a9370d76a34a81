"""Simulation designs with known task parameters (METHOD.md section 6).

A :class:`Design` fixes everything about a simulation except the rows: K tasks, their sizes,
the p coefficients of each task's effect, how far the tasks spread around the centre, a share of
outlier tasks, how much the nuisance functions differ between tasks, the outcome type and how
treatment is assigned. :func:`generate` draws one data set (one repetition) from it;
:func:`draw_summaries` skips the rows and draws task summaries directly, for fast studies of the
fusion step alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

from latefusion.summaries import SummarySet, TaskSummary

__all__ = ["Design", "SimData", "draw_summaries", "generate", "task_parameters"]

OUTCOMES = ("continuous", "binary")
TREATMENTS = ("randomised", "observational")

#: Rows drawn to compute the true parameters of a binary-outcome task whose probabilities had
#: to be clipped into [0, 1] (the population projection is then no longer ``theta_k``).
_TRUTH_ROWS = 200_000


@dataclass(frozen=True)
class Design:
    """A simulation design: K tasks with known parameters.

    Parameters
    ----------
    n_tasks : int, default=20
        K.
    n : int, default=200
        Rows per task (the geometric mean of the sizes when ``n_ratio > 1``).
    n_ratio : float, default=1.0
        Ratio of the largest to the smallest task; sizes are spaced geometrically from
        ``n / sqrt(n_ratio)`` to ``n * sqrt(n_ratio)`` (task 0 smallest). 1 gives equal sizes.
    p : int, default=1
        Coefficients per task: 1 is an average effect; with p > 1 the conditional effect is
        ``z' theta_k`` with ``z = (1, z1..z_{p-1})`` and the modifiers ``z_j`` independent,
        uniform with mean 0 and variance 1.
    eta : float, default=0.0
        Heterogeneity: ``theta_k = beta + eta * u_k`` with ``u_k ~ N(0, I_p)`` (drawn once per
        design seed, the same for every eta and repetition).
    centre : float, default=1.0
        Every coefficient of the centre ``beta``; binary outcomes use ``0.1 * centre`` (a risk
        difference).
    outlier_share : float, default=0.0
        Share of tasks (the last ``round(outlier_share * K)``) that are outliers:
        ``theta_k = beta + eta * u_k + outlier_shift * v_k`` with ``v_k`` a random unit vector.
    outlier_shift : float, default=2.0
        Distance of an outlier task from where it would otherwise be, in outcome units.
    nuisance_spread : float in [0, 1], default=0.1
        How much the nuisance functions differ between tasks. Each task's outcome and
        propensity coefficients are ``sqrt(1 - s^2) a_0 + s a_k`` with a shared ``a_0`` and a
        task-specific ``a_k`` (both i.i.d. normal), so 0 gives identical functions, 1
        independent ones, and the correlation between two tasks' functions is ``1 - s^2``.
    outcome : {"continuous", "binary"}, default="continuous"
    treatment : {"randomised", "observational"}, default="randomised"
        Randomised: ``P(A = 1) = 0.5``; observational: a logistic propensity in the covariates
        (between about 0.1 and 0.9).
    n_covariates : int, default=5
        Confounders ``x1..xq`` (independent standard normal), at least 3.
    noise : float, default=1.0
        Standard deviation of the outcome noise (continuous outcome).
    signal : float, default=1.0
        Scale of the baseline outcome function ``g_k(X)``.
    seed : int, default=0
        Seed of the task parameters and nuisance functions (rows use the repetition's seed).

    Notes
    -----
    Rows of task k, with ``b(X)`` the basis ``(x1..xq, sin(2 x1), x2^2 - 1, x1 x3, |x2| - 0.8)``
    (nonlinear on purpose, so nuisance learners have something to learn)::

        g_k(X)   = signal * b(X)' c_k / sqrt(dim b)
        e_k(X)   = 0.5                               (randomised)
                 = expit(2 tanh(x_{1:3}' d_k / sqrt(3)))  (observational)
        A        ~ Bernoulli(e_k(X))
        Y        = g_k(X) + A z' theta_k + noise * N(0, 1)                      (continuous)
        P(Y = 1) = clip(0.5 + 0.25 tanh(g_k(X)) + A z' theta_k, 0, 1)         (binary)

    with ``c_k`` and ``d_k`` mixed from shared and task-specific draws by ``nuisance_spread``.
    For a continuous outcome, and a binary one whose probabilities stay in [0, 1], ``theta_k`` is
    exactly what the partially linear and the interactive (AIPW, best linear projection) models
    estimate. When probabilities are clipped, the truth returned by :func:`generate` is the
    population best linear projection of the realised effect on ``z``, computed from
    200,000 draws.
    """

    n_tasks: int = 20
    n: int = 200
    n_ratio: float = 1.0
    p: int = 1
    eta: float = 0.0
    centre: float = 1.0
    outlier_share: float = 0.0
    outlier_shift: float = 2.0
    nuisance_spread: float = 0.1
    outcome: str = "continuous"
    treatment: str = "randomised"
    n_covariates: int = 5
    noise: float = 1.0
    signal: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tasks < 1 or self.n < 2 or self.p < 1:
            raise ValueError("n_tasks and p must be at least 1 and n at least 2")
        if self.n_ratio < 1:
            raise ValueError(f"n_ratio must be >= 1, got {self.n_ratio}")
        if self.eta < 0 or self.noise <= 0:
            raise ValueError("eta must be >= 0 and noise > 0")
        if not 0 <= self.outlier_share <= 1:
            raise ValueError(f"outlier_share must be in [0, 1], got {self.outlier_share}")
        if not 0 <= self.nuisance_spread <= 1:
            raise ValueError(f"nuisance_spread must be in [0, 1], got {self.nuisance_spread}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if self.treatment not in TREATMENTS:
            raise ValueError(f"treatment must be one of {TREATMENTS}, got {self.treatment!r}")
        if self.n_covariates < 3:
            raise ValueError("n_covariates must be at least 3")

    def with_eta(self, eta: float) -> Design:
        """The same design at another heterogeneity."""
        return dataclasses.replace(self, eta=float(eta))

    @property
    def sizes(self) -> np.ndarray:
        """Rows per task, shape (K,)."""
        if self.n_ratio == 1 or self.n_tasks == 1:
            return np.full(self.n_tasks, self.n)
        r = np.sqrt(self.n_ratio)
        sizes = np.geomspace(self.n / r, self.n * r, self.n_tasks)
        return np.maximum(np.round(sizes).astype(int), 2)

    @property
    def task_names(self) -> list[str]:
        width = len(str(self.n_tasks - 1))
        return [f"task{k:0{width}d}" for k in range(self.n_tasks)]

    @property
    def coef_names(self) -> list[str]:
        return ["effect"] if self.p == 1 else ["intercept", *self.modifiers]

    @property
    def covariates(self) -> list[str]:
        return [f"x{j + 1}" for j in range(self.n_covariates)]

    @property
    def modifiers(self) -> list[str]:
        return [f"z{j + 1}" for j in range(self.p - 1)]

    @property
    def n_outliers(self) -> int:
        return round(self.outlier_share * self.n_tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SimData:
    """One simulated data set.

    Attributes
    ----------
    data : DataFrame
        Columns ``task, A, Y, x1..xq, z1..z_{p-1}`` and ``e`` (the true propensity).
    theta : ndarray of shape (K, p)
        True per-task parameters (see :class:`Design`, Notes).
    design : Design
    seed : int
        Seed of the rows.
    """

    data: pd.DataFrame
    theta: np.ndarray
    design: Design
    seed: int


def task_parameters(design: Design) -> dict[str, np.ndarray]:
    """The fixed parts of a design: parameters and nuisance coefficients of every task.

    Depends on ``design.seed`` and not on the repetition; the directions ``u_k`` do not depend
    on ``eta`` either, so a study over eta moves the same tasks further apart.

    Returns
    -------
    dict
        ``theta`` (K, p), ``beta`` (p,), ``outlier`` (K,) bool, ``c`` (K, dim b) outcome
        coefficients, ``d`` (K, 3) propensity coefficients.
    """
    K, p = design.n_tasks, design.p
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 7]))
    u = rng.standard_normal((K, p))
    v = rng.standard_normal((K, p))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    outlier = np.zeros(K, dtype=bool)
    outlier[K - design.n_outliers :] = True

    scale = 0.1 if design.outcome == "binary" else 1.0
    beta = np.full(p, design.centre * scale)
    theta = beta + design.eta * scale * u + outlier[:, None] * design.outlier_shift * scale * v

    s = design.nuisance_spread
    dim_b = design.n_covariates + 4
    c0, ck = rng.standard_normal(dim_b), rng.standard_normal((K, dim_b))
    d0, dk = rng.standard_normal(3), rng.standard_normal((K, 3))
    mix = np.sqrt(1 - s**2)
    return {
        "theta": theta,
        "beta": beta,
        "outlier": outlier,
        "c": mix * c0 + s * ck,
        "d": mix * d0 + s * dk,
    }


def generate(design: Design, seed: int) -> SimData:
    """Draw the rows of every task of a design.

    Parameters
    ----------
    design : Design
    seed : int
        Seed of the rows (one repetition); the task parameters come from ``design.seed``.

    Returns
    -------
    SimData
    """
    params = task_parameters(design)
    theta = params["theta"].copy()
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 11, seed]))
    frames = []
    for k, (task, nk) in enumerate(zip(design.task_names, design.sizes, strict=True)):
        X, Z, e, a, y, clipped = _rows(design, params, k, nk, rng)
        if clipped:
            theta[k] = _clipped_truth(design, params, k)
        f = pd.DataFrame(X, columns=design.covariates)
        for j, name in enumerate(design.modifiers):
            f[name] = Z[:, j + 1]
        f.insert(0, "Y", y)
        f.insert(0, "A", a)
        f.insert(0, "task", task)
        f["e"] = e
        frames.append(f)
    data = pd.concat(frames, ignore_index=True)
    return SimData(data=data, theta=theta, design=design, seed=int(seed))


def draw_summaries(
    design: Design, seed: int, variance: float | None = None
) -> tuple[SummarySet, np.ndarray]:
    """Task summaries drawn directly, ``theta_hat_k ~ N(theta_k, V_k)``, without rows.

    Parameters
    ----------
    design : Design
    seed : int
    variance : float, optional
        Per-row variance ``v``, so that ``V_k = v / n_k * I_p``. By default that of the
        interactive (AIPW) estimator with a correct outcome model,
        ``noise^2 (1 / e + 1 / (1 - e))`` with ``e = 0.5`` (4 noise^2), or ``1`` for a binary
        outcome.

    Returns
    -------
    summaries : SummarySet
    theta : ndarray of shape (K, p)
    """
    params = task_parameters(design)
    theta = params["theta"]
    if variance is None:
        variance = 1.0 if design.outcome == "binary" else 4 * design.noise**2
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 13, seed]))
    out = []
    for k, (task, nk) in enumerate(zip(design.task_names, design.sizes, strict=True)):
        V = np.eye(design.p) * variance / nk
        theta_hat = theta[k] + rng.standard_normal(design.p) * np.sqrt(variance / nk)
        estimand = "ate" if design.p == 1 else "cate"
        out.append(TaskSummary(task, estimand, design.coef_names, theta_hat, V, int(nk)))
    meta = {"simulated": "summaries", "design": design.to_dict(), "seed": int(seed)}
    return SummarySet(out, meta=meta), theta


# Rows -------------------------------------------------------------------------------------------


def _basis(X: np.ndarray) -> np.ndarray:
    x1, x2, x3 = X[:, 0], X[:, 1], X[:, 2]
    extra = np.column_stack([np.sin(2 * x1), x2**2 - 1, x1 * x3, np.abs(x2) - 0.8])
    return np.column_stack([X, extra])


def _rows(design: Design, params: dict, k: int, nk: int, rng: np.random.Generator):
    X = rng.standard_normal((nk, design.n_covariates))
    Z = np.column_stack([np.ones(nk), rng.uniform(-np.sqrt(3), np.sqrt(3), (nk, design.p - 1))])
    b = _basis(X)
    g = design.signal * b @ params["c"][k] / np.sqrt(b.shape[1])
    if design.treatment == "randomised":
        e = np.full(nk, 0.5)
    else:
        e = expit(2 * np.tanh(X[:, :3] @ params["d"][k] / np.sqrt(3)))
    a = rng.binomial(1, e).astype(float)
    tau = Z @ params["theta"][k]
    clipped = False
    if design.outcome == "continuous":
        y = g + a * tau + design.noise * rng.standard_normal(nk)
    else:
        mu0 = 0.5 + 0.25 * np.tanh(g)
        raw = mu0 + tau
        clipped = bool(np.any((raw < 0) | (raw > 1)))
        prob = np.clip(mu0 + a * tau, 0, 1)
        y = rng.binomial(1, prob).astype(float)
    return X, Z, e, a, y, clipped


def _clipped_truth(design: Design, params: dict, k: int) -> np.ndarray:
    """Population projection of the clipped risk difference on ``z`` (binary outcome)."""
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 17, k]))
    m = _TRUTH_ROWS
    X = rng.standard_normal((m, design.n_covariates))
    Z = np.column_stack([np.ones(m), rng.uniform(-np.sqrt(3), np.sqrt(3), (m, design.p - 1))])
    b = _basis(X)
    mu0 = 0.5 + 0.25 * np.tanh(design.signal * b @ params["c"][k] / np.sqrt(b.shape[1]))
    effect = np.clip(mu0 + Z @ params["theta"][k], 0, 1) - mu0
    return np.linalg.lstsq(Z, effect, rcond=None)[0]
