"""Individual-task learning and the fixed-effect centre against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from latefusion.fusion import fixed_effect, itl
from test_fusion_data import random_problem, summaries_from

SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_fixed_effect_is_the_inverse_variance_weighted_centre(seed, rng):
    _, theta_hat, V = random_problem(rng, K=7, p=3)
    res = fixed_effect(summaries_from(theta_hat, V))

    # Reference written out task by task, the obvious way.
    precision_sum = np.zeros((3, 3))
    weighted = np.zeros(3)
    for k in range(7):
        W = np.linalg.inv(V[k])
        precision_sum += W
        weighted += W @ theta_hat[k]
    cov = np.linalg.inv(precision_sum)
    # Two routes through the same linear algebra: agreement to a few ulps of the condition.
    np.testing.assert_allclose(res.beta.estimate, cov @ weighted, rtol=1e-10)
    np.testing.assert_allclose(res.beta.std_error, np.sqrt(np.diag(cov)), rtol=1e-10)
    assert res.theta is None and res.method == "fixed_effect"
    assert res.info["Q_df"] == 3 * 6


def test_fixed_effect_scalar_is_the_textbook_weighted_mean(rng):
    y = rng.normal(size=9)
    v = rng.uniform(0.1, 2.0, size=9)
    res = fixed_effect(summaries_from(y, v), level=0.9)
    w = 1 / v
    mean, se = np.sum(w * y) / np.sum(w), 1 / np.sqrt(np.sum(w))
    z = stats.norm.ppf(0.95)
    # Closed forms on nine numbers: rounding only.
    np.testing.assert_allclose(res.beta.estimate, [mean], rtol=1e-12)
    np.testing.assert_allclose(res.beta.std_error, [se], rtol=1e-12)
    np.testing.assert_allclose(res.beta.lower, [mean - z * se], rtol=1e-12)
    np.testing.assert_allclose(res.info["Q"], np.sum(w * (y - mean) ** 2), rtol=1e-12)


def test_itl_returns_own_estimates_with_wald_intervals(rng):
    _, theta_hat, V = random_problem(rng, K=5, p=2)
    res = itl(summaries_from(theta_hat, V))
    se = np.sqrt(np.diagonal(V, axis1=1, axis2=2))
    np.testing.assert_array_equal(res.theta.estimate, theta_hat)
    np.testing.assert_allclose(res.theta.upper, theta_hat + 1.959963984540054 * se, rtol=1e-12)
    assert res.beta is None and res.method == "itl"
    assert len(res.table()) == 10


def test_level_outside_the_unit_interval_is_refused(rng):
    _, theta_hat, V = random_problem(rng, K=3, p=1)
    with pytest.raises(ValueError, match="level"):
        itl(summaries_from(theta_hat, V), level=95)
