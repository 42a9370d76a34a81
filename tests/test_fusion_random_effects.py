"""Random-effects baselines against metafor, and their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from latefusion.fusion import random_effects
from latefusion.fusion.random_effects import _mv_reml, _tau2_reml, generalised_q
from latefusion.warnings import FewTasksWarning
from test_fusion_data import random_problem, summaries_from

# Four designs (y, v) from PyMARE's test data, pymare/tests/data/metafor_small_sample.csv
# (neurostuff/PyMARE), with reference fits of R's metafor 4.6.0 pinned in
# pymare/tests/data/metafor_reference.json: rma.uni(y, v, method=..., test=...), intercept
# only, tau^2 interval from confint(fit, control=list(tol=1e-12)). Numbers copied as published.
DESIGNS = {
    "equal_k5": (
        [-0.375707, 0.087667, 3.101687, -0.06849, 0.31128],
        [0.8, 0.929221, 0.970525, 1.094569, 1.2],
    ),
    "unequal_k5": (
        [-0.073207, -0.415375, 5.226533, -0.785429, -2.088512],
        [0.02, 0.050569, 2.721731, 0.041877, 5.0],
    ),
    "extreme_k10": (
        [0.016779, 0.796272, 1.404543, -0.487727, 2.690687,
         0.731744, 2.31175, 0.109614, 0.858999, -2.844727],
        [0.001, 0.055928, 0.521481, 0.060657, 3.638258,
         0.016879, 0.00968, 0.013116, 2.818472, 10.0],
    ),
    "moderate_k20": (
        [0.91344, -0.013711, 0.71129, -0.349063, 0.524942, 1.390945, 1.394405, 1.712806,
         2.448195, 0.797816, -0.455644, 0.34701, 1.10191, 1.118779, 0.13778, 2.617864,
         0.139465, 0.330425, -0.784248, -0.138601],
        [0.1, 2.93755, 2.146649, 1.990442, 0.478369, 0.147635, 0.271023, 2.012027, 1.435666,
         1.058463, 1.071934, 0.310011, 0.949126, 0.39391, 0.856478, 0.39576, 0.108517,
         0.353627, 0.626412, 3.0],
    ),
}  # fmt: skip

# Heterogeneity, the same for every tau^2 estimator: QE, QEp, tau^2 interval.
METAFOR_Q = {
    "equal_k5": (8.3983359150613381, 0.078029419298244626, 0.0, 15.562063970721971),
    "unequal_k5": (20.315605412654854, 0.00043261444283937314, 0.37437910706976263,
                   62.648818709153389),
    "extreme_k10": (528.36542813689618, 4.8272097789668306e-108, 0.27621241313967376,
                    4.0683787385044337),
    "moderate_k20": (27.443467066041269, 0.094740008781753912, 0.0, 0.94040725109002843),
}  # fmt: skip

# (tau2, beta, se with test="z", I2, se with test="knha", knha ci_lb, knha ci_ub)
METAFOR_FIT = {
    ("DL", "equal_k5"): (1.08260596526162, 0.60497665381666177, 0.64379518699524474,
                         52.371516923650162, 0.63782138309867997, -1.1658994032781553,
                         2.3758527109114791),
    ("DL", "unequal_k5"): (0.28382585271252081, -0.25834451420148669, 0.31823753095856316,
                           80.310702444002246, 0.54387142220951235, -1.7683736622520501,
                           1.2516846338490768),
    ("DL", "extreme_k10"): (1.0914460604195859, 0.69453702188798982, 0.39079170141387481,
                            98.296633443309219, 0.33516575613229493, -0.06366059407135749,
                            1.4527346378473371),
    ("DL", "moderate_k20"): (0.18430288219628541, 0.7892305009327274, 0.1881149197003058,
                             30.766765167544271, 0.1840117740870352, 0.40408943147421506,
                             1.1743715703912398),
    ("REML", "equal_k5"): (1.0830683217408152, 0.60497869770208224, 0.64386731554321908,
                           52.382167455829745, 0.63782041947034707, -1.1658946839315667,
                           2.3758520793357314),
    ("REML", "unequal_k5"): (3.0539045155524738, 0.18480405951699172, 0.88814021281473954,
                             97.772237701301052, 1.0399695871305989, -2.7026144102263312,
                             3.0722225292603142),
    ("REML", "extreme_k10"): (0.8224002783454577, 0.68688970207394351, 0.3448079418402753,
                              97.751909699504225, 0.32791238847993598, -0.054899656296211186,
                              1.4286790604440982),
    ("REML", "moderate_k20"): (0.23909863987740002, 0.78602512965241322, 0.19840151801276223,
                               36.569035528086367, 0.1862742805111853, 0.39614857982490137,
                               1.1759016794799251),
}  # fmt: skip

#: Tolerance against metafor for REML and what derives from its tau^2: an iterative fit on both
#: sides (metafor stops its Fisher scoring at a change of 1e-5 in tau^2; we agree to 4e-6).
RTOL = 1e-4

#: Tolerance for closed forms (DL, Q, its p-value) and the Q-profile roots, which metafor's
#: reference solved to 1e-12: we agree to 1e-13.
RTOL_EXACT = 1e-10


def _fit(design, method, knapp_hartung=False):
    y, v = (np.array(a) for a in DESIGNS[design])
    return random_effects(summaries_from(y, v), method=method, knapp_hartung=knapp_hartung)


@pytest.mark.parametrize(("method", "design"), list(METAFOR_FIT))
def test_matches_metafor(method, design):
    tau2, beta, se, I2, se_kh, lo_kh, hi_kh = METAFOR_FIT[(method, design)]
    Q, Q_p, tau2_lo, tau2_hi = METAFOR_Q[design]
    res = _fit(design, method)
    (het,) = res.info["heterogeneity"]
    assert res.method == f"random_effects_{method.lower()}"
    assert het["Q"] == pytest.approx(Q, rel=RTOL_EXACT)
    assert het["Q_pvalue"] == pytest.approx(Q_p, rel=RTOL_EXACT)
    assert het["tau2_lower"] == pytest.approx(tau2_lo, rel=RTOL_EXACT, abs=1e-12)
    assert het["tau2_upper"] == pytest.approx(tau2_hi, rel=RTOL_EXACT)

    rtol = RTOL_EXACT if method == "DL" else RTOL
    kh = _fit(design, method, knapp_hartung=True)
    assert het["tau2"] == pytest.approx(tau2, rel=rtol)
    assert het["I2"] == pytest.approx(I2, rel=rtol)
    assert res.beta.estimate[0] == pytest.approx(beta, rel=rtol)
    assert res.beta.std_error[0] == pytest.approx(se, rel=rtol)
    assert kh.beta.std_error[0] == pytest.approx(se_kh, rel=rtol)
    assert kh.beta.lower[0] == pytest.approx(lo_kh, rel=rtol)
    assert kh.beta.upper[0] == pytest.approx(hi_kh, rel=rtol)


def test_eight_schools_dersimonian_laird_tau2_is_zero():
    # Rubin (1981): Q = 4.7 on 7 degrees of freedom, so the DL estimate of tau^2 is 0 and the
    # random-effects centre is the fixed-effect one, 7.69 (se 4.07).
    y = [28, 8, -3, 7, -1, 1, 18, 12]
    se = np.array([15, 10, 16, 11, 9, 11, 10, 18])
    res = random_effects(summaries_from(y, se**2))
    (het,) = res.info["heterogeneity"]
    assert het["tau2"] == 0.0 and het["I2"] == 0.0
    assert het["Q"] == pytest.approx(4.7071, abs=5e-5)  # printed to 4 decimals
    assert res.beta.estimate[0] == pytest.approx(7.6856, abs=5e-5)
    assert res.beta.std_error[0] == pytest.approx(4.0719, abs=5e-5)
    # tau^2 = 0: no shrinkage target spread, every BLUP is the centre.
    np.testing.assert_allclose(res.theta.estimate[:, 0], res.beta.estimate[0], rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_blups_and_prediction_interval_follow_their_formulas(seed, rng):
    _, y, V = random_problem(rng, K=12, p=1, spread=2.0)
    v = V[:, 0, 0]
    res = random_effects(summaries_from(y, v), method="REML", level=0.9)
    tau2 = res.info["heterogeneity"][0]["tau2"]
    assert tau2 > 0
    beta, var_beta = res.beta.estimate[0], res.beta.std_error[0] ** 2
    shrink = tau2 / (tau2 + v)
    # Closed forms given tau^2: rounding only.
    np.testing.assert_allclose(res.theta.estimate[:, 0], beta + shrink * (y[:, 0] - beta))
    np.testing.assert_allclose(
        res.theta.std_error[:, 0] ** 2, shrink * v + (1 - shrink) ** 2 * var_beta, rtol=1e-12
    )
    assert res.new_task.estimate[0] == beta
    assert res.new_task.std_error[0] == pytest.approx(np.sqrt(var_beta + tau2), rel=1e-12)
    half = res.new_task.upper[0] - beta
    assert half == pytest.approx(1.6448536269514722 * np.sqrt(var_beta + tau2), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_reml_score_is_zero_at_the_estimate(seed, rng):
    _, y, V = random_problem(rng, K=15, p=1, spread=1.5)
    y, v = y[:, 0], V[:, 0, 0]
    tau2 = _tau2_reml(y, v)

    def nll(t):
        w = 1 / (v + t)
        mu = np.sum(w * y) / np.sum(w)
        return 0.5 * (np.sum(np.log(v + t)) + np.log(np.sum(w)) + np.sum(w * (y - mu) ** 2))

    best = optimize.minimize_scalar(
        nll, bounds=(0, 100), method="bounded", options={"xatol": 1e-10}
    )
    # A bounded scalar search to 1e-10 against the score root.
    assert tau2 == pytest.approx(best.x, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_multivariate_reml_with_one_coefficient_is_univariate_reml(seed, rng):
    _, y, V = random_problem(rng, K=15, p=1, spread=1.5)
    T, converged = _mv_reml(y, V)
    # BFGS on the Cholesky factor against a bracketed root of the score: 1e-6 relative.
    assert converged
    assert T[0, 0] == pytest.approx(_tau2_reml(y[:, 0], V[:, 0, 0]), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_multivariate_reml_maximises_the_restricted_likelihood(seed, rng):
    K, p = 25, 2
    _, theta_hat, V = random_problem(rng, K=K, p=p, spread=1.0)
    res = random_effects(summaries_from(theta_hat, V), method="REML", multivariate=True)
    T = np.array(res.info["T"])

    def nll(T):
        S = V + T
        Si = np.linalg.inv(S)
        A = Si.sum(0)
        beta = np.linalg.solve(A, np.einsum("kij,kj->i", Si, theta_hat))
        r = theta_hat - beta
        ld = np.linalg.slogdet(S)[1].sum() + np.linalg.slogdet(A)[1]
        return 0.5 * (ld + np.einsum("ki,kij,kj->", r, Si, r))

    # No PSD perturbation of T does better (1e-9: rounding of a sum of K log-determinants).
    base = nll(T)
    for _ in range(20):
        E = rng.normal(scale=0.05, size=(p, p))
        trial = T + E @ E.T * rng.choice([-1, 1])
        if np.all(np.linalg.eigvalsh(trial) >= 0):
            assert nll(trial) >= base - 1e-9
    assert res.method == "random_effects_reml_mv"
    assert res.theta.estimate.shape == (K, p) and res.new_task is not None
    assert [h["coef"] for h in res.info["heterogeneity"]] == list(res.coef_names)


def test_one_task_is_its_own_estimate_and_says_so(rng):
    _, y, V = random_problem(rng, K=1, p=2)
    res = random_effects(summaries_from(y, V), method="REML")
    np.testing.assert_array_equal(res.theta.estimate, y)
    np.testing.assert_array_equal(res.beta.estimate, y[0])
    assert res.new_task is None
    assert "not estimable" in res.info["heterogeneity_note"]
    assert all(np.isnan(h["tau2"]) for h in res.info["heterogeneity"])


def test_two_tasks_work_with_a_warning(rng):
    _, y, V = random_problem(rng, K=2, p=1, spread=2.0)
    with pytest.warns(FewTasksWarning, match="two tasks"):
        res = random_effects(summaries_from(y, V), method="DL")
    assert np.isfinite(res.new_task.upper).all()


def test_unsupported_combinations_are_named(rng):
    _, y, V = random_problem(rng, K=5, p=2)
    ss = summaries_from(y, V)
    with pytest.raises(NotImplementedError, match="REML only"):
        random_effects(ss, method="DL", multivariate=True)
    with pytest.raises(NotImplementedError, match="Knapp-Hartung"):
        random_effects(ss, method="REML", multivariate=True, knapp_hartung=True)
    with pytest.raises(ValueError, match="method"):
        random_effects(ss, method="PM")


@pytest.mark.parametrize("scale", [1e-9, 1e-4, 1e5])
@pytest.mark.parametrize("method", ["DL", "REML"])
def test_fit_is_equivariant_under_a_change_of_units(method, scale):
    # Estimates in other units (an effect in 1e-9 of a unit, say) give the same fit in those
    # units. The root-finders used absolute tolerances of 1e-15, which at scale 1e-9 (tau^2
    # near 1e-18) left REML's tau^2 and the Q-profile bounds off by several percent.
    y, v = (np.array(a) for a in DESIGNS["moderate_k20"])
    base = _fit_arrays(y, v, method)
    scaled = _fit_arrays(y * scale, v * scale**2, method)
    for key in ("tau2", "tau2_lower", "tau2_upper"):
        assert scaled[0][key] == pytest.approx(base[0][key] * scale**2, rel=1e-9, abs=1e-300)
    for key in ("Q", "I2"):
        assert scaled[0][key] == pytest.approx(base[0][key], rel=1e-9)
    np.testing.assert_allclose(scaled[1], base[1] * scale, rtol=1e-9)


def _fit_arrays(y, v, method):
    res = random_effects(summaries_from(y, v), method=method)
    (het,) = res.info["heterogeneity"]
    return het, np.r_[res.beta.estimate, res.beta.std_error, res.theta.estimate[:, 0]]


def test_a_task_with_a_huge_variance_leaves_reml_unchanged_and_bounds_exact():
    # A task with a standard error of 1e9 has no weight: REML's tau^2 and centre are the other
    # tasks' (a root-finding tolerance relative to the largest variance once put REML's tau^2
    # at 888 for tasks whose tau^2 is 0.03, above its own upper bound). The Q-profile bounds
    # move (one more degree of freedom) but must still solve Q(tau^2) = chi^2 quantile.
    y, v = (np.array(a) for a in DESIGNS["moderate_k20"])
    base = _fit_arrays(y, v, "REML")
    y2, v2 = np.r_[y, 1.0], np.r_[v, 1e18]
    more = _fit_arrays(y2, v2, "REML")
    assert more[0]["tau2"] == pytest.approx(base[0]["tau2"], rel=1e-9)
    np.testing.assert_allclose(more[1][:2], base[1][:2], rtol=1e-9)
    het = more[0]
    assert het["tau2_lower"] <= het["tau2"] <= het["tau2_upper"]
    for key, q in (("tau2_lower", 0.975), ("tau2_upper", 0.025)):
        target = stats.chi2.ppf(q, y2.size - 1)
        if het[key] == 0:  # Q(0) already at or below the quantile
            assert generalised_q(y2, v2, 0.0) <= target
        else:
            assert generalised_q(y2, v2, het[key]) == pytest.approx(target, rel=1e-10)
    assert het["tau2_upper"] > 0


def test_a_standard_error_beyond_1e12_times_the_others_is_named():
    # Standard errors of 1e100 or 1e154 among tasks of 0.3 ended in scipy's RuntimeError or
    # "function value at x=inf is NaN", naming nothing.
    y, v = np.array([1.0, 1.3, 1.9]), np.array([0.27, 0.33, 1e100]) ** 2
    match = r"random_effects_reml: task 'task2' has a standard error of 'effect' 3.03e\+100"
    with pytest.raises(ValueError, match=match):
        random_effects(summaries_from(y, v), method="REML")
