"""Monte Carlo coverage of the per-task 95% intervals over 500 simulated tasks.

With 500 tasks the coverage estimate has a standard error of about 0.01 at 0.95, so the band
[0.92, 0.98] is three standard errors wide on each side: a correct interval stays inside it,
an interval off by 20% in width (coverage about 0.90 or 0.985) does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from latefusion.datasets import simulate_rows
from latefusion.dml import DMLSettings, estimate_tasks

N_TASKS = 500

# Linear learners are fast, and correct where they must be: the treatment model (linear for a
# continuous treatment, logistic for a binary one) is correctly specified, so the orthogonal
# scores stay unbiased although the outcome model (sin(x1) + x2^2 / 2 + ...) is not.
LINEAR = {"ml_outcome": LinearRegression(), "ml_treatment": LinearRegression()}
LOGIT = {"ml_outcome": LinearRegression(), "ml_treatment": LogisticRegression(C=1e4)}


def _att_truth(theta):
    return theta  # constant effect within a task: ATT = ATE


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "estimand", "modifier", "learners"),
    [
        ("plr", None, False, LINEAR),
        ("irm", "ate", False, LOGIT),
        ("irm", "att", False, LOGIT),
        ("irm", "cate", True, LOGIT),
    ],
)
def test_intervals_cover_at_nominal_rate(model, estimand, modifier, learners):
    data, theta = simulate_rows(
        n_tasks=N_TASKS, n=400, effect=1.0, eta=0.5, n_covariates=3, model=model,
        modifier=modifier, seed=2026,
    )  # fmt: skip
    settings = DMLSettings(model=model, estimand=estimand, n_folds=3, clip=0.0, **learners)
    xcols = ["x1", "x2", "x3"]
    ss = estimate_tasks(
        data, "task", "A", "Y", xcols, ["z"] if modifier else [], settings=settings, n_jobs=1
    )
    assert len(ss.usable()) == N_TASKS
    theta_hat, V, _ = ss.arrays()
    se = np.sqrt(np.diagonal(V, axis1=1, axis2=2))
    covered = np.abs(theta_hat - theta) <= 1.959964 * se
    for j, coef in enumerate(ss.coef_names):
        rate = covered[:, j].mean()
        assert 0.92 <= rate <= 0.98, f"{model}/{estimand} {coef}: coverage {rate:.3f}"
