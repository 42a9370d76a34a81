"""The PyMC model: structure, log density against SciPy, and the NumPy core against closed forms."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest
from scipy import stats

from latefusion import SummarySet, TaskSummary
from latefusion.bayes import build_model, coef_scales, load_spec
from latefusion.bayes.model import condition_delta, draw_new_sd, shrinkage_factors
from latefusion.bayes.spec import DEVIATIONS


def make_summaries(rng: np.random.Generator, K: int, p: int, excluded: int = 0) -> SummarySet:
    """K tasks around beta = (1, 2, ...) with correlated V_k, plus some excluded tasks."""
    names = ("effect",) if p == 1 else tuple(f"c{j}" for j in range(p))
    beta = np.arange(1.0, p + 1)
    tasks = []
    for k in range(K):
        A = rng.normal(size=(p, p))
        V = 0.1 * (A @ A.T + p * np.eye(p)) * rng.uniform(0.5, 2.0)
        theta_hat = rng.multivariate_normal(beta + 0.3 * rng.normal(size=p), V)
        tasks.append(TaskSummary(f"site{k}", "plr", names, theta_hat, V, 100 + k))
    for k in range(excluded):
        tasks.insert(1, TaskSummary.excluded(f"bad{k}", "plr", names, 20, "no treated units"))
    return SummarySet(tasks)


@pytest.mark.parametrize("parameterization", ["noncentered", "centered", "marginalized"])
@pytest.mark.parametrize("deviation", list(DEVIATIONS))
def test_variables_dims_and_coords(rng, deviation: str, parameterization: str) -> None:
    summaries = make_summaries(rng, K=5, p=2, excluded=1)
    spec = load_spec("horseshoe").replace(name=deviation, deviation=deviation)
    model = build_model(summaries, spec, parameterization)

    assert list(model.coords["task"]) == [f"site{k}" for k in range(5)]
    assert "bad0" not in model.coords["task"], "excluded tasks stay out of the model"
    assert list(model.coords["coef"]) == ["c0", "c1"]
    dims = model.named_vars_to_dims
    assert dims["beta"] == ("coef",)
    assert dims["sd_delta"] == ("task", "coef")
    assert dims["theta_hat"] == ("task", "coef")
    assert "tau" in model.named_vars
    if deviation != "normal":
        assert dims["lam"] == (("task", "coef") if deviation.endswith("elementwise") else ("task",))
    if parameterization == "marginalized":
        assert not {"z", "delta", "theta"} & set(model.named_vars)
    else:
        assert dims["delta"] == dims["theta"] == ("task", "coef")
        assert ("z" in model.named_vars) == (parameterization == "noncentered")


def test_scalar_effect_uses_normal_per_task(rng) -> None:
    model = build_model(make_summaries(rng, K=4, p=1), "horseshoe")
    assert model.named_vars_to_dims["theta_hat"] == ("task",)
    assert isinstance(model["theta_hat"].owner.op, type(pm.Normal.dist().owner.op))


def test_rejects_bad_parameterization(rng) -> None:
    with pytest.raises(ValueError, match="parameterization 'ncp'"):
        build_model(make_summaries(rng, K=3, p=1), "normal", "ncp")


def test_scales_are_median_standard_errors() -> None:
    V = np.stack([np.diag([1.0, 4.0]), np.diag([9.0, 16.0]), np.diag([4.0, 100.0])])
    np.testing.assert_allclose(coef_scales(V), [2.0, 4.0])


# Log density against a hand-written SciPy computation ------------------------------------------


def _reference_logp(spec, p, s, theta_hat, V, values, parameterization) -> float:
    """log p(values, theta_hat) of METHOD.md section 3, on the constrained scale."""
    # beta is sampled in units of s: beta = s * beta_z, beta_z ~ Normal(0, beta_scale).
    tau, beta = values["tau"], s * values["beta_z"]
    out = stats.norm(0, spec.beta_scale).logpdf(values["beta_z"]).sum()
    out += stats.halfcauchy(scale=spec.global_scale).logpdf(tau)
    family = spec.deviation
    if family == "normal":
        lam = np.ones((len(theta_hat), 1))
    elif family in ("horseshoe", "horseshoe_elementwise"):
        lam = values["lam"] if family.endswith("elementwise") else values["lam"][:, None]
        out += stats.halfcauchy().logpdf(lam).sum()
    elif family == "regularized_horseshoe":
        raw, c2 = values["lam"], values["c2"]
        out += stats.halfcauchy().logpdf(raw).sum()
        df, slab = spec.params["slab_df"], spec.params["slab_scale"]
        out += stats.invgamma(df / 2, scale=df * slab**2 / 2).logpdf(c2)
        lam = np.sqrt(c2 * raw**2 / (c2 + tau**2 * raw**2))[:, None]
    elif family == "student_t":
        nu = spec.params["nu"]
        out += stats.invgamma(nu / 2, scale=nu / 2).logpdf(values["lam2"]).sum()
        lam = np.sqrt(values["lam2"])[:, None]
    else:
        out += stats.gamma((p + 1) / 2, scale=2.0).logpdf(values["lam2"]).sum()
        lam = np.sqrt(values["lam2"])[:, None]
    sd = tau * lam * s
    if parameterization == "marginalized":
        for k in range(len(theta_hat)):
            cov = V[k] + np.diag(sd[k] ** 2 if sd.shape[1] > 1 else np.full(p, sd[k, 0] ** 2))
            out += stats.multivariate_normal(beta, cov).logpdf(theta_hat[k])
        return float(out)
    if parameterization == "noncentered":
        out += stats.norm().logpdf(values["z"]).sum()
        delta = sd * values["z"]
    else:
        delta = values["delta"]
        out += stats.norm(0, np.broadcast_to(sd, delta.shape)).logpdf(delta).sum()
    for k in range(len(theta_hat)):
        out += stats.multivariate_normal(beta + delta[k], V[k]).logpdf(theta_hat[k])
    return float(out)


_POSITIVE = ("tau", "lam", "lam2", "c2")


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("parameterization", ["noncentered", "centered", "marginalized"])
@pytest.mark.parametrize("deviation", list(DEVIATIONS))
def test_log_density_matches_scipy(rng, deviation: str, parameterization: str, p: int) -> None:
    summaries = make_summaries(rng, K=4, p=p)
    theta_hat, V, _ = summaries.arrays()
    s = coef_scales(V)
    spec = load_spec("horseshoe").replace(
        name=deviation, deviation=deviation, global_scale=0.7, beta_scale=3.0
    )
    model = build_model(summaries, spec, parameterization)

    # A random test point: positive variables on the log scale, as PyMC's value variables.
    point, values = {}, {}
    for key, x in model.initial_point().items():
        name = key.removesuffix("_log__")
        if name in _POSITIVE:
            values[name] = np.exp(rng.normal(scale=0.5, size=np.shape(x)))
            point[key] = np.log(values[name])
        else:
            values[name] = rng.normal(size=np.shape(x))
            point[key] = values[name]
    got = model.compile_logp(jacobian=False, mode="FAST_COMPILE")(point)
    want = _reference_logp(spec, p, s, theta_hat, V, values, parameterization)
    # The same terms, summed in another order and with other log-density formulas (log1p,
    # gammaln): agreement to about 1e-10 relative; 1e-8 leaves room.
    assert got == pytest.approx(want, rel=1e-8)


# NumPy core ------------------------------------------------------------------------------------


def test_conditioning_matches_closed_form() -> None:
    rng = np.random.default_rng(7)
    theta_hat = np.array([[1.0, -0.5], [0.2, 0.3]])
    V = np.array([[[1.0, 0.4], [0.4, 0.8]], [[0.5, -0.1], [-0.1, 0.3]]])
    beta, sd = np.array([0.1, 0.2]), np.array([[0.7, 1.5], [0.0, 0.4]])
    S = 40_000
    delta = condition_delta(theta_hat, V, np.tile(beta, (S, 1)), np.tile(sd, (S, 1, 1)), rng)

    for k in range(2):
        Sigma = np.diag(sd[k] ** 2)
        gain = Sigma @ np.linalg.inv(V[k] + Sigma)
        mean = gain @ (theta_hat[k] - beta)
        cov = Sigma - gain @ Sigma
        # Monte Carlo: the mean within 5 standard errors, the covariance within 0.02 absolute
        # (its entries are O(1) and their MC sd is about sqrt(2 / S) ~ 0.007).
        se = np.sqrt(np.diag(cov) / S)
        assert np.all(np.abs(delta[:, k].mean(0) - mean) <= 5 * se + 1e-12)
        np.testing.assert_allclose(np.cov(delta[:, k].T), cov, atol=0.02)
    assert np.all(delta[:, 1, 0] == 0.0), "a zero prior sd fixes the deviation at zero"


def test_conditioning_scalar_path_matches_closed_form() -> None:
    rng = np.random.default_rng(8)
    theta_hat, V = np.array([[1.0], [-2.0]]), np.array([[[0.5]], [[2.0]]])
    beta, sd = np.array([0.3]), np.array([[1.0], [0.5]])
    S = 40_000
    delta = condition_delta(theta_hat, V, np.tile(beta, (S, 1)), np.tile(sd, (S, 1, 1)), rng)

    gain = sd[:, 0] ** 2 / (V[:, 0, 0] + sd[:, 0] ** 2)
    mean, var = gain * (theta_hat[:, 0] - beta), sd[:, 0] ** 2 * (1 - gain)
    # Mean within 5 Monte Carlo standard errors; variance within 3% (its MC sd is ~0.7%).
    assert np.all(np.abs(delta[..., 0].mean(0) - mean) <= 5 * np.sqrt(var / S))
    np.testing.assert_allclose(delta[..., 0].var(0), var, rtol=0.03)


def test_shrinkage_factor_closed_forms(rng) -> None:
    V = np.stack([np.diag([1.0]), np.diag([4.0])])
    sd = np.array([[[1.0], [0.0]], [[3.0], [2.0]]])
    np.testing.assert_allclose(shrinkage_factors(V, sd), [[0.5, 1.0], [0.1, 0.5]])

    p, K, S = 3, 4, 5
    A = rng.normal(size=(K, p, p))
    V = A @ A.transpose(0, 2, 1) + np.eye(p)
    sd = np.abs(rng.normal(size=(S, K, p)))
    want = np.array(
        [
            [np.trace(V[k] @ np.linalg.inv(V[k] + np.diag(sd[i, k] ** 2))) / p for k in range(K)]
            for i in range(S)
        ]
    )
    np.testing.assert_allclose(shrinkage_factors(V, sd), want, rtol=1e-12)
    assert np.all((want > 0) & (want < 1))


@pytest.mark.parametrize("deviation", list(DEVIATIONS))
def test_new_task_scale_matches_the_pymc_prior(rng, deviation: str) -> None:
    """The NumPy draw of a new task's sd_delta has the law of the model's (parity test)."""
    summaries = make_summaries(rng, K=2, p=2)
    spec = load_spec("horseshoe").replace(name=deviation, deviation=deviation)
    model = build_model(summaries, spec, "noncentered")
    prior = pm.sample_prior_predictive(
        draws=3000, model=model, random_seed=11, compile_kwargs={"mode": "FAST_COMPILE"}
    ).prior
    tau = prior["tau"].values.ravel()
    c2 = prior["c2"].values.ravel() if "c2" in prior else None
    s = coef_scales(summaries.arrays()[1])

    new = draw_new_sd(spec, tau, s, np.random.default_rng(5), c2=c2)
    ref = prior["sd_delta"].isel(task=0).values.reshape(-1, 2)
    for j in range(2):
        # Two samples of 3000 from one law: the KS test rejects at 1e-4 with probability 1e-4.
        assert stats.ks_2samp(np.log(new[:, j]), np.log(ref[:, j])).pvalue > 1e-4


def test_new_task_laws_in_closed_form() -> None:
    """With one coefficient, tau = s = 1: Laplace(0, 1), t_nu and |Cauchy| local scales."""
    rng = np.random.default_rng(9)
    tau, s, S = np.ones(20_000), np.ones(1), 20_000
    z = rng.standard_normal((S, 1))
    laplace = (draw_new_sd(load_spec("laplace"), tau, s, rng) * z).ravel()
    student = (draw_new_sd(load_spec("student_t"), tau, s, rng) * z).ravel()
    lam = draw_new_sd(load_spec("horseshoe"), tau, s, rng).ravel()
    assert stats.kstest(laplace, stats.laplace().cdf).pvalue > 1e-4
    assert stats.kstest(student, stats.t(4.0).cdf).pvalue > 1e-4
    assert stats.kstest(lam, stats.halfcauchy().cdf).pvalue > 1e-4
