"""fit_bayes: structure with sampling mocked, and a few real sampling runs (marked slow)."""

from __future__ import annotations

import importlib.util
import json
import threading
import warnings
from pathlib import Path

import arviz_stats as azs
import numpy as np
import pandas as pd
import pymc as pm
import pytest
import xarray as xr

import latefusion.bayes.fit
from _fake_sampler import MOCK, FakeSampler  # 2 x 400 draws: ESS near 800, above 400
from latefusion import FusionResult, SummarySet, TaskSummary, __version__
from latefusion.bayes import BayesFit, fit_bayes, load_spec, sample_prior
from latefusion.warnings import ConvergenceWarning, FewTasksWarning


def make_summaries(
    rng: np.random.Generator, K: int, p: int, eta: float = 0.3, excluded: int = 0
) -> tuple[SummarySet, np.ndarray]:
    """K tasks, theta_k ~ Normal(beta, eta^2 I), standard errors between 0.5 and 1.5."""
    names = ("effect",) if p == 1 else ("intercept", *(f"z{j}" for j in range(1, p)))
    beta = np.linspace(1.0, 2.0, p)
    tasks = []
    for k in range(K):
        se = rng.uniform(0.5, 1.5, size=p)
        corr = np.full((p, p), 0.3) + 0.7 * np.eye(p)
        V = corr * np.outer(se, se)
        theta_hat = rng.multivariate_normal(beta + eta * rng.normal(size=p), V)
        tasks.append(TaskSummary(f"site{k:02d}", "cate", names, theta_hat, V, 200))
    for k in range(excluded):
        tasks.append(TaskSummary.excluded(f"gone{k}", "cate", names, 15, "one arm is empty"))
    return SummarySet(tasks), beta


@pytest.fixture
def fake_sample(monkeypatch: pytest.MonkeyPatch) -> FakeSampler:
    fake = FakeSampler()
    monkeypatch.setattr(pm, "sample", fake)
    return fake


# Structure (sampling mocked) -------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["noncentered", "marginalized"])
@pytest.mark.parametrize("p", [1, 2])
def test_fit_structure(rng, fake_sample, p: int, parameterization: str) -> None:
    summaries, _ = make_summaries(rng, K=6, p=p, excluded=1)
    fit = fit_bayes(summaries, parameterization=parameterization, **MOCK)

    assert isinstance(fit, BayesFit)
    tasks, coefs = summaries.task_names, list(summaries.coef_names)
    dt = fit.datatree
    assert {"posterior", "sample_stats", "log_likelihood", "log_prior"} <= set(dt.children)
    assert {"posterior_predictive", "constant_data"} <= set(dt.children)
    post = dt.posterior
    assert list(post.coords["task"].values) == tasks, "the excluded task is not in the model"
    assert list(post.coords["coef"].values) == coefs
    for name, dims in {
        "beta": ("coef",),
        "tau": (),
        "lam": ("task",),
        "sd_delta": ("task", "coef"),
        "delta": ("task", "coef"),
        "theta": ("task", "coef"),
        "kappa": ("task",),
    }.items():
        assert post[name].dims == ("chain", "draw", *dims), name
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 400
    assert dt.log_likelihood["theta_hat"].dims == ("chain", "draw", "task")
    assert set(dt.log_prior.data_vars) >= {"beta_z", "tau", "lam"}
    assert dt.posterior_predictive["theta_new"].dims == ("chain", "draw", "coef")
    xr.testing.assert_allclose(
        post["theta"], (post["beta"] + post["delta"]).transpose(*post["theta"].dims)
    )

    result = fit.result
    assert isinstance(result, FusionResult) and result.method == "bayes_horseshoe"
    assert result.theta.estimate.shape == (6, p)
    assert result.beta.estimate.shape == result.new_task.estimate.shape == (p,)
    for part in (result.theta, result.beta, result.new_task):
        assert np.all(part.lower <= part.upper) and np.all(part.std_error > 0)
    np.testing.assert_allclose(result.theta.estimate, post["theta"].mean(("chain", "draw")))
    table = result.table()
    assert len(table) == 6 * p + 2 * p and set(table["method"]) == {"bayes_horseshoe"}

    assert isinstance(fit.shrinkage, pd.Series) and list(fit.shrinkage.index) == tasks
    assert fit.shrinkage.between(0, 1).all()
    assert set(fit.diagnostics) >= {
        "divergences",
        "max_rhat",
        "min_ess_bulk",
        "min_ess_tail",
        "min_bfmi",
        "target_accept",
        "retried",
    }
    assert fit.diagnostics["divergences"] == 0 and fit.diagnostics["retried"] is False

    attrs = dt.attrs
    assert attrs["latefusion_version"] == __version__ and attrs["model"] == "horseshoe"
    assert attrs["parameterization"] == parameterization
    assert json.loads(attrs["spec"])["deviation"] == "horseshoe"
    assert attrs["draws"] == 400 and attrs["seed"] == "3"


@pytest.mark.parametrize("model", ["normal", "regularized_horseshoe", "horseshoe_elementwise"])
def test_other_families_fit(rng, fake_sample, model: str) -> None:
    summaries, _ = make_summaries(rng, K=5, p=2)
    fit = fit_bayes(summaries, model=model, **MOCK)
    assert fit.result.method == f"bayes_{model}"
    assert ("lam" in fit.datatree.posterior) == (model != "normal")
    assert fit.result.new_task.estimate.shape == (2,)


def test_datatree_round_trips_through_netcdf(rng, fake_sample, tmp_path: Path) -> None:
    summaries, _ = make_summaries(rng, K=5, p=2)
    fit = fit_bayes(summaries, **MOCK)
    path = tmp_path / "fit.nc"
    fit.datatree.to_netcdf(path, engine="h5netcdf")

    with xr.open_datatree(path, engine="h5netcdf") as back:
        for group in fit.datatree.children:
            xr.testing.assert_identical(back[group].to_dataset(), fit.datatree[group].to_dataset())
        assert back.attrs["spec"] == fit.datatree.attrs["spec"]
        assert json.loads(back.attrs["diagnostics"])["divergences"] == 0


def test_divergences_trigger_one_retry(rng, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSampler(divergences=(5, 0))
    monkeypatch.setattr(pm, "sample", fake)
    summaries, _ = make_summaries(rng, K=5, p=1)
    fit = fit_bayes(summaries, target_accept=0.9, **MOCK)

    assert [c["target_accept"] for c in fake.calls] == [0.9, 0.99]
    assert fake.calls[0]["random_seed"] != fake.calls[1]["random_seed"]
    d = fit.diagnostics
    assert d["retried"] is True and d["target_accept"] == 0.99
    assert (d["divergences_first_run"], d["divergences"]) == (5, 0)
    assert fit.datatree.attrs["target_accept_requested"] == 0.9


def test_remaining_divergences_warn(rng, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSampler(divergences=(5, 2))
    monkeypatch.setattr(pm, "sample", fake)
    summaries, _ = make_summaries(rng, K=5, p=1)
    with pytest.warns(ConvergenceWarning, match="2 divergent transitions at target_accept=0.99"):
        fit = fit_bayes(summaries, target_accept=0.99, **MOCK)
    assert [c["target_accept"] for c in fake.calls] == [0.99, 0.995]
    assert fit.diagnostics["divergences"] == 2 and fit.diagnostics["problems"]


def test_uncomputable_diagnostics_warn(rng, fake_sample) -> None:
    # One chain has no R-hat (NaN), which compares False against every threshold: it used to
    # pass without a word.
    summaries, _ = make_summaries(rng, K=5, p=1)
    with pytest.warns(ConvergenceWarning, match="R-hat not computable"):
        fit = fit_bayes(summaries, draws=500, tune=10, chains=1, seed=1)
    assert np.isnan(fit.diagnostics["max_rhat"])


def test_effects_in_units_of_1e_minus_12_sample_cleanly() -> None:
    # A bad-input helper's five tasks: with beta sampled in raw units every draw diverged and
    # the pooled estimate was -0.135 (the truth is about 1.2e-12).
    est = np.array([1.08, 1.31, 1.95, 0.90, 1.20]) * 1e-12
    se = np.array([0.27, 0.33, 0.46, 0.30, 0.25]) * 1e-12
    summaries = SummarySet(
        [TaskSummary(f"t{k}", "ate", ("effect",), [e], [[s**2]], 100)
         for k, (e, s) in enumerate(zip(est, se, strict=True))]
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # short run: ESS below 400
        fit = fit_bayes(summaries, draws=300, tune=300, chains=2, seed=0)
    assert fit.diagnostics["divergences"] == 0
    # The fixed-effect centre is 1.17e-12 with standard error 0.13e-12.
    assert 0.8e-12 < fit.result.beta.estimate[0] < 1.6e-12


def test_low_ess_warns(rng, fake_sample) -> None:
    summaries, _ = make_summaries(rng, K=5, p=1)
    with pytest.warns(ConvergenceWarning, match=r"bulk ESS down to \d+ \(< 400\)"):
        fit_bayes(summaries, draws=50, tune=10, chains=2, seed=1)
    # The warning names the global scale: a sensitivity study fits one model at several.
    spec = load_spec("normal").replace(global_scale=0.1)
    with pytest.warns(ConvergenceWarning, match=r"model 'normal' \(tau_0 = 0.1\)"):
        fit_bayes(summaries, model=spec, draws=50, tune=10, chains=2, seed=1)


def test_prob_deviation(rng, fake_sample) -> None:
    summaries, _ = make_summaries(rng, K=4, p=2)
    fit = fit_bayes(summaries, **MOCK)
    delta = fit.datatree.posterior["delta"].values.reshape(-1, 4, 2)

    prob = fit.prob_deviation({"intercept": 0.5, "z1": 1.0})
    assert prob.shape == (4, 2) and list(prob.index) == summaries.task_names
    np.testing.assert_allclose(prob.values, (np.abs(delta) > [0.5, 1.0]).mean(0))
    np.testing.assert_allclose(fit.prob_deviation(0.0).values, 1.0)
    with pytest.raises(ValueError, match=r"coefficient\(s\) \['z1'\]"):
        fit.prob_deviation({"intercept": 0.5})
    with pytest.raises(ValueError, match="must be >= 0"):
        fit.prob_deviation(-1.0)


def test_few_tasks_and_bad_arguments(rng, fake_sample) -> None:
    summaries, _ = make_summaries(rng, K=2, p=1)
    with pytest.warns(FewTasksWarning, match="only 2 usable task"):
        fit_bayes(summaries, **MOCK)
    with pytest.raises(ValueError, match="sampler 'stan'"):
        fit_bayes(summaries, sampler="stan")
    with pytest.raises(ValueError, match="parameterization 'ncp'"):
        fit_bayes(summaries, parameterization="ncp")
    nothing = SummarySet([TaskSummary.excluded("a", "ate", ("effect",), 10, "empty")])
    with pytest.raises(ValueError, match="no usable task"):
        fit_bayes(nothing)
    # PyMC and nutpie answered these with ZeroDivisionError, OverflowError or IndexError.
    for bad, match in (
        ({"chains": 0}, "chains must be an integer >= 1, got 0"),
        ({"draws": -5}, "draws must be an integer >= 1"),
        ({"tune": -1}, "tune must be an integer >= 0"),
        ({"draws": 2.5}, "draws must be an integer"),
        ({"target_accept": 1.5}, "target_accept must be strictly between 0 and 1"),
        ({"draws": 1, "chains": 1}, "draws x chains must be at least 2"),
    ):
        with pytest.raises(ValueError, match=match):
            fit_bayes(summaries, **{**MOCK, **bad})


HAS_NUTPIE = importlib.util.find_spec("nutpie") is not None


@pytest.mark.parametrize("installed", [True, False])
def test_auto_sampler_is_nutpie_when_installed(rng, fake_sample, monkeypatch, installed) -> None:
    monkeypatch.setattr(latefusion.bayes.fit, "nutpie_available", lambda: installed)
    summaries, _ = make_summaries(rng, K=4, p=1)
    fit = fit_bayes(summaries, **MOCK)

    expected = "nutpie" if installed else "pymc"
    assert fake_sample.calls[0]["nuts_sampler"] == expected
    assert fit.diagnostics["sampler"] == fit.datatree.attrs["sampler"] == expected
    if not installed:
        with pytest.raises(ImportError, match=r"latefusion\[fast\]"):
            fit_bayes(summaries, sampler="nutpie", **MOCK)


@pytest.mark.parametrize(
    ("sampler", "cores", "chains", "expected"),
    [
        # PyMC's sampler: chains in this process unless asked, then forkserver, never fork.
        ("pymc", None, 4, (1, None)),
        ("pymc", 1, 4, (1, None)),
        ("pymc", 2, 4, (2, "forkserver")),
        ("pymc", 2, 1, (2, None)),
        # nutpie runs chains in threads; PyMC's own default for cores applies.
        ("nutpie", None, 4, (None, None)),
        ("nutpie", 2, 4, (2, None)),
    ],
)
def test_chains_never_fork(rng, fake_sample, monkeypatch, sampler, cores, chains, expected) -> None:
    monkeypatch.setattr(latefusion.bayes.fit, "nutpie_available", lambda: True)
    summaries, _ = make_summaries(rng, K=4, p=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 1 mocked chain: no R-hat
        fit_bayes(summaries, sampler=sampler, cores=cores, draws=50, tune=5, chains=chains, seed=1)
    call = fake_sample.calls[0]
    assert (call["cores"], call["mp_ctx"]) == expected


@pytest.mark.parametrize("cores", [0, -1, 1.5, True])
def test_bad_cores(rng, fake_sample, cores) -> None:
    summaries, _ = make_summaries(rng, K=4, p=1)
    with pytest.raises(ValueError, match="cores must be a positive integer"):
        fit_bayes(summaries, cores=cores, **MOCK)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NUTPIE, reason="nutpie is not installed (pip install latefusion[fast])")
def test_nutpie_backend_is_reproducible_and_agrees_with_pymc(tmp_path: Path) -> None:
    rng = np.random.default_rng(31)
    summaries, _ = make_summaries(rng, K=8, p=2, eta=1.0)
    kwargs = {"draws": 500, "tune": 300, "chains": 2, "cores": 1, "seed": 4}
    with warnings.catch_warnings():
        # The heavy-tailed local scales may fall short of 400 effective draws; the comparison
        # below uses Monte Carlo standard errors, which account for that.
        warnings.simplefilter("ignore", ConvergenceWarning)
        first = fit_bayes(summaries, sampler="nutpie", **kwargs)
        again = fit_bayes(summaries, sampler="nutpie", **kwargs)
        pymc = fit_bayes(summaries, sampler="pymc", **kwargs)

    assert first.datatree.attrs["sampler"] == first.diagnostics["sampler"] == "nutpie"
    d = first.diagnostics
    assert d["divergences"] == 0 and d["max_rhat"] < 1.02 and d["min_ess_bulk"] > 200, d
    # nutpie reports its draw time; compilation makes up the rest of the wall time.
    assert 0 < d["draw_seconds"] < d["sampling_seconds"]
    # Same seed, same draws (threads do not make it nondeterministic); attrs hold timings.
    xr.testing.assert_equal(
        first.datatree.posterior.to_dataset(), again.datatree.posterior.to_dataset()
    )

    # The backends sample the same posterior: means within 4 Monte Carlo standard errors.
    a, b = first.datatree.posterior, pymc.datatree.posterior
    for name in ("beta", "tau", "theta"):
        mcse = np.hypot(azs.mcse(a[name]).values, azs.mcse(b[name]).values)
        diff = np.abs(a[name].mean(("chain", "draw")) - b[name].mean(("chain", "draw"))).values
        assert np.all(diff < 4 * mcse), (name, diff, mcse)

    # nutpie's text statistic (divergence messages) survives netCDF.
    path = tmp_path / "nutpie.nc"
    first.datatree.to_netcdf(path, engine="h5netcdf")
    with xr.open_datatree(path, engine="h5netcdf") as back:
        assert back.sample_stats["divergence_message"].dtype.kind == "U"
        np.testing.assert_array_equal(back.posterior["beta"], a["beta"])


def _threads_alive() -> threading.Event:
    """Start a Python thread that lives until the returned event is set (as xdist, tqdm do)."""
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    return stop


@pytest.mark.slow
def test_pymc_sampler_in_a_threaded_process_does_not_fork() -> None:
    """Python 3.12 deprecates fork with threads alive; warnings are errors in this suite."""
    summaries, _ = make_summaries(np.random.default_rng(5), K=6, p=1)
    stop = _threads_alive()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("ignore", ConvergenceWarning)  # few draws
            seq = fit_bayes(summaries, sampler="pymc", draws=100, tune=100, chains=2, seed=1)
            par = fit_bayes(summaries, sampler="pymc", draws=100, tune=100, chains=2, cores=2,
                            seed=1)  # fmt: skip
    finally:
        stop.set()
    assert seq.diagnostics["sampler"] == par.diagnostics["sampler"] == "pymc"
    # Chains are seeded alike in one process and in forkserver workers.
    xr.testing.assert_allclose(seq.datatree.posterior["beta"], par.datatree.posterior["beta"])


def test_sample_prior(rng) -> None:
    summaries, _ = make_summaries(rng, K=4, p=2)
    dt = sample_prior(summaries, "laplace", draws=50, seed=1)
    assert {"prior", "prior_predictive"} <= set(dt.children)
    assert dt.prior["theta"].dims == ("chain", "draw", "task", "coef")
    assert dt.prior_predictive["theta_hat"].dims == ("chain", "draw", "task", "coef")
    assert dt.attrs["model"] == "laplace"


# Real sampling ---------------------------------------------------------------------------------
# Chains run in one process (cores=1): forking a pytest-xdist worker, which runs threads, is
# unsafe (Python warns about deadlocks), and under xdist both cores are busy anyway.


@pytest.mark.slow
def test_recovers_beta_and_reports_diagnostics() -> None:
    rng = np.random.default_rng(2024)
    summaries, beta = make_summaries(rng, K=20, p=2, eta=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_bayes(summaries, draws=500, tune=500, chains=2, cores=1, seed=1)

    # Warnings, if any, are convergence warnings that the diagnostics explain.
    assert all(issubclass(w.category, ConvergenceWarning) for w in caught), [
        (w.category, str(w.message)) for w in caught
    ]
    assert bool(caught) == bool(fit.diagnostics["problems"])
    d = fit.diagnostics
    assert isinstance(d["divergences"], int) and d["divergences"] <= 5
    assert d["max_rhat"] < 1.05 and d["min_ess_bulk"] > 100 and d["min_bfmi"] > 0.3

    # beta within 3 posterior sds of the truth (a 3-sd miss has probability ~0.003 per coef).
    est = fit.result.beta
    assert np.all(np.abs(est.estimate - beta) < 3 * est.std_error), (est, beta)
    assert np.all((est.lower < beta) | (est.upper > beta))
    # Tasks are similar (eta = 0.3 against standard errors near 1): strong pooling.
    assert fit.shrinkage.mean() > 0.5


@pytest.mark.slow
def test_marginalized_agrees_with_noncentered() -> None:
    rng = np.random.default_rng(77)
    summaries, _ = make_summaries(rng, K=8, p=2, eta=1.0)
    kwargs = {"draws": 600, "tune": 500, "chains": 2, "cores": 1, "seed": 5}
    with warnings.catch_warnings():
        # A few divergences of the non-centred run do not bias these summaries detectably.
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = {
            par: fit_bayes(summaries, parameterization=par, **kwargs)
            for par in ("noncentered", "marginalized")
        }

    a, b = (fits[par].datatree.posterior for par in ("noncentered", "marginalized"))
    for name in ("beta", "theta", "kappa"):
        mcse = np.hypot(azs.mcse(a[name]).values, azs.mcse(b[name]).values)
        diff = np.abs(a[name].mean(("chain", "draw")) - b[name].mean(("chain", "draw"))).values
        # Posterior means within 4 Monte Carlo standard errors of each other.
        assert np.all(diff < 4 * mcse), (name, diff, mcse)


def test_log_groups_support_power_scaling_sensitivity(rng, fake_sample) -> None:
    """METHOD.md section 4 (ii): psense needs the log_prior and log_likelihood groups."""
    summaries, _ = make_summaries(rng, K=5, p=1)
    fit = fit_bayes(summaries, **MOCK)
    sens = azs.psense(fit.datatree, var_names=["beta", "tau"], group="prior")
    assert np.all(np.isfinite(sens["beta"].values)) and np.all(np.isfinite(sens["tau"].values))


EIGHT_SCHOOLS = {
    "estimate": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "std_error": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["normal", "horseshoe"])
def test_eight_schools_without_divergences_at_defaults(model: str) -> None:
    """The default parameterisation was chosen for this: no divergences at default settings."""
    tasks = [
        TaskSummary(f"school_{name}", "ate", ("effect",), [y], [[se**2]], 30)
        for name, y, se in zip("ABCDEFGH", *EIGHT_SCHOOLS.values(), strict=True)
    ]
    fit = fit_bayes(SummarySet(tasks), model=model, cores=1, seed=0)
    d = fit.diagnostics
    assert d["divergences_first_run"] == 0 and not d["retried"], d
    assert d["max_rhat"] < 1.01 and min(d["min_ess_bulk"], d["min_ess_tail"]) > 400, d
    # Rubin (1981) and later analyses: a centre near 8 with a wide posterior.
    assert 4 < fit.result.beta.estimate[0] < 11


@pytest.mark.slow
@pytest.mark.parametrize("c", [250.0, 1e-12])
def test_posterior_is_scale_equivariant(c: float) -> None:
    # Estimates x c and covariances x c^2 must multiply the posterior of beta and theta by c:
    # every prior scale is tied to the standard errors. Compared within 4 Monte Carlo
    # standard errors of the two fits (independent chains, so not draw by draw). At 1e-12 a
    # beta sampled in raw units made every draw divergent; beta is now sampled in units of s.
    rng = np.random.default_rng(77)
    summaries, _ = make_summaries(rng, K=10, p=1, eta=0.5)
    scaled = SummarySet(
        [
            TaskSummary(s.task, s.estimand, s.coef_names, c * s.theta_hat, c**2 * s.V, s.n)
            for s in summaries
        ]
    )
    kwargs = {"draws": 1000, "tune": 500, "chains": 2, "cores": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # short runs; MCSE accounts for it
        base = fit_bayes(summaries, seed=3, **kwargs).datatree.posterior
        big = fit_bayes(scaled, seed=4, **kwargs).datatree.posterior
    for name in ("beta", "theta"):
        a, b = base[name], big[name] / c
        mcse = np.hypot(azs.mcse(a).values, azs.mcse(b).values)
        diff = np.abs(a.mean(("chain", "draw")).values - b.mean(("chain", "draw")).values)
        assert np.all(diff < 4 * mcse), (name, diff, mcse)
        # and the spread scales too: posterior sds agree within 10%
        ratio = b.std(("chain", "draw")).values / a.std(("chain", "draw")).values
        assert np.all(np.abs(ratio - 1) < 0.1), (name, ratio)
