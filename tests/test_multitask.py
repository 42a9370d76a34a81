"""Multi-task nuisance learning: cross-fitting validity, output contract, and that it helps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from latefusion.dml import DMLSettings, estimate_tasks
from latefusion.dml import multitask as mt
from latefusion.dml.multitask import estimate_tasks_multitask, estimate_tasks_with
from latefusion.simulation import Design, generate
from latefusion.warnings import TaskExcludedWarning

# Memorising learners: every row a model was fitted on is remembered, and an out-of-sample
# prediction (a call with rows the model has not seen) that includes a remembered row is counted
# as a leak. A call on training rows only is the in-sample fit the deviations are fitted to.
# Rows are identified by their first covariates, which are continuous and so unique.
SEEN_ROWS: list[int] = []
LEAKS: list[int] = []
N_KEY = 3


def _keys(X):
    return {tuple(np.round(r[:N_KEY], 12)) for r in np.asarray(X)}


class MemoRegressor(RegressorMixin, BaseEstimator):
    def fit(self, X, y):
        self.seen_ = _keys(X)
        self.mean_ = float(np.mean(y))
        SEEN_ROWS.append(len(self.seen_))
        return self

    def predict(self, X):
        _record(X, self.seen_)
        return np.full(len(X), self.mean_)


class MemoClassifier(ClassifierMixin, BaseEstimator):
    def fit(self, X, y):
        self.seen_ = _keys(X)
        self.classes_ = np.unique(y)
        self.rate_ = float(np.mean(y))
        SEEN_ROWS.append(len(self.seen_))
        return self

    def predict_proba(self, X):
        _record(X, self.seen_)
        return np.column_stack([np.full(len(X), 1 - self.rate_), np.full(len(X), self.rate_)])


def _record(X, seen):
    keys = _keys(X)
    if not keys <= seen:  # out of sample
        LEAKS.append(len(keys & seen))


@pytest.fixture
def memo_log():
    SEEN_ROWS.clear()
    LEAKS.clear()
    yield
    SEEN_ROWS.clear()
    LEAKS.clear()


def _sim(**kwargs):
    d = Design(**{"n_tasks": 4, "n": 60, **kwargs})
    return d, generate(d, 0)


def _run(sim, d, settings, **kwargs):
    return estimate_tasks_multitask(
        sim.data, "task", "A", "Y", d.covariates, d.modifiers, settings, **kwargs
    )


def test_memorising_learner_detects_a_leak(memo_log):
    # The check below can fail: predicting training rows is counted.
    X = np.random.default_rng(0).standard_normal((10, 4))
    memo = MemoRegressor().fit(X[:8], np.zeros(8))
    memo.predict(X[:8])  # in sample: not a leak
    memo.predict(X[6:])  # two seen rows among unseen ones
    assert LEAKS == [2]


@pytest.mark.parametrize("model", ["irm", "plr"])
def test_no_prediction_comes_from_a_model_that_saw_the_row(memo_log, monkeypatch, model):
    d, sim = _sim(treatment="observational")
    # The deviation models are wrapped too: each remembers its training rows.
    real_fit, real_predict = mt._fit_deviation, mt._predict_deviation

    def fit_dev(kind, X, y, h, seed):
        dev = real_fit(kind, X, y, h, seed)
        SEEN_ROWS.append(len(X))
        return {**dev, "seen": _keys(X)}

    def predict_dev(dev, kind, X, h):
        LEAKS.append(len(_keys(X) & dev["seen"]))
        return real_predict(dev, kind, X, h)

    monkeypatch.setattr(mt, "_fit_deviation", fit_dev)
    monkeypatch.setattr(mt, "_predict_deviation", predict_dev)
    settings = DMLSettings(
        model=model, ml_outcome=MemoRegressor(), ml_treatment=MemoClassifier(), n_folds=3, n_rep=2
    )
    _run(sim, d, settings)
    assert len(LEAKS) > 100 and sum(SEEN_ROWS) > 0  # the learners were used
    assert sum(LEAKS) == 0


def test_shared_model_sees_other_tasks_training_rows(memo_log):
    # The point of the method: a shared fit uses (F - 1) / F of all rows, not one task's.
    d, sim = _sim(n_tasks=4, n=60)
    settings = DMLSettings(ml_outcome=MemoRegressor(), propensity="design", n_folds=3)
    _run(sim, d, settings, select="none")
    n_arm_all = sim.data.groupby("A").size().to_numpy()
    # Shared fits of g0 / g1: about 2/3 of the arm's rows of all tasks.
    assert max(SEEN_ROWS) >= 0.6 * n_arm_all.max()


def test_every_row_is_predicted_once_per_repetition():
    d, sim = _sim(n_tasks=3, n=50)
    settings = DMLSettings(
        model="irm", n_folds=4, n_rep=2, ml_outcome=RidgeCV(), ml_treatment=LogisticRegression()
    )
    units = []
    for i, (task, g) in enumerate(sim.data.groupby("task", sort=False)):
        u = mt._Unit.from_frame(task, g, "A", "Y", d.covariates, [], None)
        u.seed = i
        units.append(u)
    preds = mt._cross_fit_all(units, settings, "ridge", False, "oof", 1)
    for unit, reps in zip(units, preds, strict=True):
        assert len(reps) == 2
        for p in reps:
            for key in ("g0", "g1", "m", "local:g0", "local:m"):
                assert p[key].shape == (unit.n,) and np.all(np.isfinite(p[key])), key


def test_same_contract_as_per_task_estimation():
    d, sim = _sim(n_tasks=4, n=80, p=2)
    data = sim.data.copy()
    data.loc[data["task"] == "task2", "A"] = 1.0  # one arm only: excluded
    settings = DMLSettings(propensity="design", ml_outcome=RidgeCV())
    with pytest.warns(TaskExcludedWarning):
        single = estimate_tasks(
            data, "task", "A", "Y", d.covariates, d.modifiers, settings, n_jobs=1
        )
    with pytest.warns(TaskExcludedWarning):
        multi = estimate_tasks_multitask(
            data, "task", "A", "Y", d.covariates, d.modifiers, settings
        )
    assert [s.task for s in multi] == [s.task for s in single]
    assert multi.coef_names == single.coef_names == ("intercept", "z1")
    assert multi.estimand == single.estimand == "cate"
    assert multi["task2"].status == "excluded" and "only one treatment arm" in multi["task2"].reason
    assert multi.meta["nuisance"]["kind"] == "multitask"
    assert multi["task0"].diagnostics["nuisance"] == "multitask"
    # Paired folds: per-task and multi-task estimates agree to within their standard errors.
    for s, m in zip(single.usable(), multi.usable(), strict=True):
        assert np.all(np.abs(s.theta_hat - m.theta_hat) < 2 * s.std_error)


def test_dispatch_and_unsupported_options():
    d, sim = _sim(n_tasks=3, n=50)
    args = (sim.data, "task", "A", "Y", d.covariates)
    settings = DMLSettings(propensity="design", ml_outcome=RidgeCV())
    single = estimate_tasks_with("task", *args, settings=settings, n_jobs=1)
    assert single.meta.get("nuisance") is None
    multi = estimate_tasks_with("multitask", *args, settings=settings)
    assert multi.meta["nuisance"]["kind"] == "multitask"
    with pytest.raises(ValueError, match="nuisance must be"):
        estimate_tasks_with("pooled", *args)
    with pytest.raises(NotImplementedError, match="clusters"):
        estimate_tasks_multitask(*args, cluster_col="x1")
    with pytest.raises(ValueError, match="deviation"):
        estimate_tasks_multitask(*args, deviation="lasso")


def test_ridge_deviation_vanishes_for_noise_and_finds_a_trend(rng):
    n = 200
    D = np.column_stack([np.ones(n), rng.standard_normal((n, 3))])
    noise = rng.standard_normal(n)
    # Pure noise: GCV picks a large penalty, the deviation is small against the noise.
    assert np.abs(mt._ridge_gcv(D, noise)).max() < 0.15
    # A real linear deviation (slope 2 on the first covariate) is found.
    b = mt._ridge_gcv(D, 2 * D[:, 1] + 0.1 * noise)
    assert b[1] == pytest.approx(2, abs=0.1)


def test_offset_logistic_matches_scikit_learn(rng):
    # With no offset, an intercept column, and alpha = 1 / C, it is scikit-learn's L2 logistic
    # regression without an unpenalised intercept.
    n = 300
    D = np.column_stack([np.ones(n), rng.standard_normal((n, 2))])
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + D[:, 1])))).astype(float)
    ours = mt._logistic_newton(D, y, np.zeros(n), alpha=2.0)
    ref = LogisticRegression(C=0.5, fit_intercept=False, tol=1e-12, max_iter=10_000)
    ref.fit(D, y)
    np.testing.assert_allclose(ours, ref.coef_[0], atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_multitask_fits_similar_nuisances_better(seed):
    # Similar nonlinear outcome functions, small tasks, a flexible-enough learner: the pooled fit
    # must predict held-out rows better than each task alone (out-of-fold R^2 of g0 and g1).
    d = Design(n_tasks=8, n=80, nuisance_spread=0.1, signal=3.0, seed=seed)
    sim = generate(d, seed)
    learner = make_pipeline(
        StandardScaler(), PolynomialFeatures(2), StandardScaler(), RidgeCV(np.logspace(-2, 4, 13))
    )
    settings = DMLSettings(ml_outcome=learner, propensity="design", n_folds=4, seed=seed)
    args = (sim.data, "task", "A", "Y", d.covariates, (), settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = estimate_tasks(*args, n_jobs=1)
        multi = estimate_tasks_multitask(*args, select="none")
    for key in ("r2_g0", "r2_g1"):
        r2_single = np.mean([s.diagnostics[key] for s in single])
        r2_multi = np.mean([s.diagnostics[key] for s in multi])
        assert r2_multi > r2_single + 0.02, key


def test_selection_falls_back_to_the_task_when_nuisances_differ():
    d = Design(n_tasks=6, n=120, nuisance_spread=1.0, signal=3.0, seed=2)
    sim = generate(d, 0)
    learner = make_pipeline(
        StandardScaler(), PolynomialFeatures(2), StandardScaler(), RidgeCV(np.logspace(-2, 4, 13))
    )
    settings = DMLSettings(ml_outcome=learner, propensity="design", n_folds=4)
    multi = estimate_tasks_multitask(sim.data, "task", "A", "Y", d.covariates, (), settings)
    shares = [s.diagnostics["multitask_share_g0"] for s in multi]
    assert all(0 <= x <= 1 for x in shares)
    # Unrelated functions: at least one task keeps its own learner.
    assert min(shares) < 1


def test_binary_outcome_and_estimated_propensity_use_offset_logistic_deviations():
    d = Design(n_tasks=3, n=90, outcome="binary", treatment="observational", seed=4)
    sim = generate(d, 0)
    settings = DMLSettings(
        ml_outcome=LogisticRegression(), ml_treatment=LogisticRegression(), n_folds=3
    )
    multi = _run(sim, d, settings)
    assert len(multi.usable()) == 3
    for s in multi:
        # Probabilities: log losses, not R^2, and propensities inside (0, 1).
        assert "logloss_g0" in s.diagnostics and "logloss_m" in s.diagnostics
        assert 0 < s.diagnostics["propensity_min"] < s.diagnostics["propensity_max"] < 1
        assert np.all(np.isfinite(s.theta_hat)) and abs(s.theta_hat[0]) < 1  # a risk difference
