"""Per-task double machine learning: against DoubleML on the same folds, and against truth."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression

from latefusion.datasets import simulate_rows
from latefusion.dml import DMLSettings, _scores, estimate_task, estimate_tasks
from latefusion.dml._folds import make_folds
from latefusion.warnings import ClippedPropensityWarning, LateFusionWarning

dml = pytest.importorskip("doubleml")


def _doubleml_fit(cls, df, y, d, xcols, learners, folds, **kw):
    data = dml.DoubleMLData(df, y_col=y, d_cols=d, x_cols=xcols)
    model = cls(
        data, *learners, n_folds=len(folds[0]), n_rep=len(folds), draw_sample_splitting=False, **kw
    )
    model.set_sample_splitting(folds)
    model.fit()
    return float(model.coef[0]), float(model.se[0])


def _one_task(df, settings, seed, xcols):
    return estimate_task(
        "t", df["Y"].to_numpy(), df["A"].to_numpy(), df[xcols].to_numpy(), settings, seed=seed
    )


LEARNERS = {
    "linear": (LinearRegression(), LogisticRegression(max_iter=1000)),
    "forest": (
        RandomForestRegressor(n_estimators=30, max_depth=4, random_state=3),
        RandomForestClassifier(n_estimators=30, max_depth=4, random_state=3),
    ),
}


# DoubleML computes the same closed forms in float64; 1e-6 relative leaves room only for
# summation order, not for any difference in the estimator.
@pytest.mark.parametrize("learners", LEARNERS)
@pytest.mark.parametrize("seed", range(2))
def test_plr_matches_doubleml_on_same_folds(learners, seed):
    df, _ = simulate_rows(n_tasks=1, n=400, model="plr", seed=seed)
    xcols = [c for c in df if c.startswith("x")]
    reg, _ = LEARNERS[learners]
    settings = DMLSettings(model="plr", ml_outcome=reg, ml_treatment=reg, n_folds=4)
    ours = _one_task(df, settings, seed, xcols)
    folds = make_folds(df["A"].to_numpy(), 4, 1, seed, stratify=False)
    coef, se = _doubleml_fit(dml.DoubleMLPLR, df, "Y", "A", xcols, (reg, reg), folds)
    assert ours.theta_hat[0] == pytest.approx(coef, rel=1e-6)
    assert ours.std_error[0] == pytest.approx(se, rel=1e-6)


@pytest.mark.parametrize("learners", LEARNERS)
@pytest.mark.parametrize("score", ["ATE", "ATTE"])
def test_irm_matches_doubleml_on_same_folds(learners, score):
    df, _ = simulate_rows(n_tasks=1, n=600, model="irm", seed=7)
    xcols = [c for c in df if c.startswith("x")]
    reg, clf = LEARNERS[learners]
    estimand = "ate" if score == "ATE" else "att"
    settings = DMLSettings(
        model="irm", estimand=estimand, ml_outcome=reg, ml_treatment=clf, n_folds=5, clip=0.01
    )
    with warnings.catch_warnings():
        # a few propensities fall below 0.01 here; clipping must then agree with DoubleML's
        warnings.simplefilter("ignore", ClippedPropensityWarning)
        ours = _one_task(df, settings, 11, xcols)
    folds = make_folds(df["A"].to_numpy(), 5, 1, 11, stratify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # DoubleML's own trimming notice
        coef, se = _doubleml_fit(
            dml.DoubleMLIRM, df, "Y", "A", xcols, (reg, clf), folds, score=score
        )
    assert ours.theta_hat[0] == pytest.approx(coef, rel=1e-6)
    assert ours.std_error[0] == pytest.approx(se, rel=1e-6)


def test_repeated_splits_take_the_median_estimate_as_doubleml():
    df, _ = simulate_rows(n_tasks=1, n=300, model="plr", seed=5)
    xcols = [c for c in df if c.startswith("x")]
    reg = LinearRegression()
    settings = DMLSettings(model="plr", ml_outcome=reg, ml_treatment=reg, n_folds=3, n_rep=5)
    ours = _one_task(df, settings, 2, xcols)
    folds = make_folds(df["A"].to_numpy(), 3, 5, 2, stratify=False)
    coef, _ = _doubleml_fit(dml.DoubleMLPLR, df, "Y", "A", xcols, (reg, reg), folds)
    assert ours.theta_hat[0] == pytest.approx(coef, rel=1e-6)


def test_median_aggregation_closed_form_for_one_coefficient():
    # se^2 = median(se_r^2 + (theta_r - theta_med)^2), written out by hand.
    fits = [
        _scores.ScoreFit(np.array([t]), np.array([[v]]), np.zeros((1, 1)))
        for t, v in [(1.0, 0.04), (1.5, 0.09), (0.7, 0.01)]
    ]
    theta, V = _scores.aggregate_repetitions(fits)
    assert theta[0] == 1.0
    assert V[0, 0] == pytest.approx(np.median([0.04, 0.09 + 0.25, 0.01 + 0.09]))


def test_plr_with_modifiers_is_the_weighted_least_squares_closed_form(rng):
    n = 200
    r_a, r_y, z = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n)
    Z = np.column_stack([np.ones(n), z])
    fit = _scores.plr(r_y, r_a, Z)
    # theta = argmin sum (r_y - r_a z'theta)^2: ordinary least squares on columns r_a * Z
    ref, *_ = np.linalg.lstsq(r_a[:, None] * Z, r_y, rcond=None)
    np.testing.assert_allclose(fit.theta, ref, rtol=1e-10)
    # the score is zero at the solution
    np.testing.assert_allclose(fit.psi.mean(axis=0), 0, atol=1e-12)


# Truth within 3 standard errors: a 3-SE miss has probability 0.3% per draw under correct
# inference, so over 4 seeds x 3 estimands a false failure is about 3%... the seeds are fixed,
# so this passes or fails deterministically; it guards against bias of the order of one SE.
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("model", "modifier"), [("plr", False), ("irm", False), ("irm", True)])
def test_recovers_known_effect_within_three_standard_errors(seed, model, modifier):
    df, theta = simulate_rows(
        n_tasks=1, n=1500, effect=1.0, model=model, modifier=modifier, seed=100 + seed
    )
    xcols = [c for c in df if c.startswith("x")]
    ss = estimate_tasks(
        df,
        "task",
        "A",
        "Y",
        xcols,
        ["z"] if modifier else [],
        DMLSettings(model=model, seed=seed),
    )
    s = ss.summaries[0]
    assert s.ok
    z = (s.theta_hat - theta[0]) / s.std_error
    assert np.all(np.abs(z) < 3), (s.theta_hat, theta[0], s.std_error)


def test_design_propensity_uses_no_learner_and_the_task_share():
    df, theta = simulate_rows(n_tasks=1, n=400, randomised=True, seed=1)
    xcols = [c for c in df if c.startswith("x")]
    s = estimate_tasks(
        df, "task", "A", "Y", xcols, settings=DMLSettings(propensity="design")
    ).summaries[0]
    share = df["A"].mean()
    assert s.diagnostics["propensity_min"] == pytest.approx(share)
    assert s.diagnostics["propensity_max"] == pytest.approx(share)
    assert abs(s.theta_hat[0] - theta[0, 0]) < 3 * s.std_error[0]


def test_parallel_tasks_equal_serial():
    df, _ = simulate_rows(n_tasks=4, n=200, seed=3)
    xcols = [c for c in df if c.startswith("x")]
    runs = [
        estimate_tasks(df, "task", "A", "Y", xcols, n_jobs=j, settings=DMLSettings(seed=9))
        for j in (1, 2)
    ]
    a, b = (r.arrays() for r in runs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# Bad input -----------------------------------------------------------------------------------


def _small_frame(rng):
    # randomised: these tests are about bad input, not about clipped propensities
    df, _ = simulate_rows(n_tasks=3, n=120, randomised=True, seed=int(rng.integers(1000)))
    return df, [c for c in df if c.startswith("x")]


def test_one_arm_task_is_excluded_with_reason_and_others_go_on(rng):
    df, xcols = _small_frame(rng)
    df.loc[df["task"] == "task01", "A"] = 1.0
    with pytest.warns(UserWarning, match="1 of 3 tasks excluded"):
        ss = estimate_tasks(df, "task", "A", "Y", xcols)
    bad = ss["task01"]
    assert not bad.ok and "only one treatment arm" in bad.reason
    assert [s.task for s in ss.usable()] == ["task00", "task02"]


def test_too_few_units_per_fold_is_excluded_or_folds_reduced(rng):
    df, xcols = _small_frame(rng)
    t1 = df.index[(df["task"] == "task01") & (df["A"] == 1)]
    df = df.drop(t1[3:])  # 3 treated units, 5 folds
    with pytest.warns(UserWarning, match="excluded"):
        ss = estimate_tasks(df, "task", "A", "Y", xcols)
    assert "fewer than the 5 cross-fitting folds" in ss["task01"].reason
    settings = DMLSettings(min_folds=3, propensity="design")
    ss = estimate_tasks(df, "task", "A", "Y", xcols, settings=settings)
    assert ss["task01"].ok and ss["task01"].diagnostics["n_folds"] == 3


def test_missing_values_name_column_and_tasks_or_are_dropped_and_counted(rng):
    df, xcols = _small_frame(rng)
    df.loc[df.index[df["task"] == "task02"][:4], "x2"] = np.nan
    with pytest.raises(
        ValueError, match=r"column 'x2' has 4 missing values in task\(s\) \['task02'\]"
    ):
        estimate_tasks(df, "task", "A", "Y", xcols)
    ss = estimate_tasks(df, "task", "A", "Y", xcols, dropna=True)
    assert ss["task02"].diagnostics["rows_dropped"] == 4
    assert ss["task02"].n == 116


def test_infinite_or_overflowing_values_name_column_and_task(rng):
    df, xcols = _small_frame(rng)
    df.loc[df.index[df["task"] == "task01"][:2], "x1"] = np.inf
    with pytest.raises(
        ValueError, match=r"column 'x1' has infinite values in task\(s\) \['task01'\]"
    ):
        estimate_tasks(df, "task", "A", "Y", xcols)
    # Finite but beyond 1e100: sklearn would square it to inf and report "contains NaN".
    df, xcols = _small_frame(rng)
    df.loc[df["task"] == "task02", "x2"] *= 1e200
    with pytest.raises(
        ValueError, match=r"column 'x2' has values of magnitude .*'task02'.*rescale"
    ):
        estimate_tasks(df, "task", "A", "Y", xcols)


@pytest.mark.parametrize("role", ["A", "Y", "task"])
def test_treatment_outcome_or_task_as_covariate_is_an_error(rng, role):
    df, xcols = _small_frame(rng)
    with pytest.raises(ValueError, match=rf"column '{role}' is the .* cannot also be a covariate"):
        estimate_tasks(df, "task", "A", "Y", [*xcols, role])
    with pytest.raises(ValueError, match=rf"column '{role}' is the"):
        estimate_tasks(df, "task", "A", "Y", xcols, modifiers=[role])


def test_unknown_column_lists_the_columns_found(rng):
    df, xcols = _small_frame(rng)
    with pytest.raises(ValueError, match=r"\['nope'\] not found; the data has columns \['task'"):
        estimate_tasks(df, "task", "A", "Y", [*xcols, "nope"])


def test_string_treatment_needs_the_treated_value(rng):
    df, xcols = _small_frame(rng)
    df["arm"] = np.where(df["A"] == 1, "small", "regular")
    with pytest.raises(ValueError, match="say which value is treated"):
        estimate_tasks(df, "task", "arm", "Y", xcols)
    ss = estimate_tasks(df, "task", "arm", "Y", xcols, treated="small")
    ref = estimate_tasks(df, "task", "A", "Y", xcols)
    np.testing.assert_array_equal(ss.arrays()[0], ref.arrays()[0])


def test_a_third_treatment_value_is_named_when_it_becomes_control(rng):
    df, xcols = _small_frame(rng)
    df["arm"] = np.where(df["A"] == 1, "small", "regular")
    df.loc[df.index[:5], "arm"] = "aide"
    with pytest.warns(LateFusionWarning, match=r"\['aide', 'regular'\] are all taken as control"):
        estimate_tasks(df, "task", "arm", "Y", xcols, treated="small")
    with pytest.raises(ValueError, match="treated and control values are both 'small'"):
        estimate_tasks(df, "task", "arm", "Y", xcols, treated="small", control="small")


def test_constant_outcome_gives_excluded_task_not_zero_standard_error(rng):
    df, xcols = _small_frame(rng)
    df.loc[df["task"] == "task00", "Y"] = 3.0
    with pytest.warns(UserWarning, match="excluded"):
        ss = estimate_tasks(df, "task", "A", "Y", xcols)
    assert "zero standard error" in ss["task00"].reason


def test_regressor_for_propensity_is_rejected(rng):
    df, xcols = _small_frame(rng)
    with pytest.raises(TypeError, match="must be a classifier with predict_proba"):
        estimate_tasks(
            df, "task", "A", "Y", xcols, settings=DMLSettings(ml_treatment=LinearRegression())
        )


def test_constant_modifier_excludes_the_task(rng):
    df, xcols = _small_frame(rng)
    df["z"] = rng.standard_normal(len(df))
    df.loc[df["task"] == "task01", "z"] = 0.0
    with pytest.warns(UserWarning, match="excluded"):
        ss = estimate_tasks(df, "task", "A", "Y", xcols, ["z"])
    assert "modifier(s) ['z'] constant" in ss["task01"].reason
    assert ss["task00"].coef_names == ("intercept", "z")


def test_categorical_covariates_are_one_hot_and_constant_ones_dropped(rng):
    df, xcols = _small_frame(rng)
    df["site_type"] = np.where(rng.random(len(df)) < 0.5, "urban", "rural")
    df.loc[df["task"] == "task00", "site_type"] = "rural"
    ss = estimate_tasks(df, "task", "A", "Y", [*xcols, "site_type"])
    assert ss.meta["columns"]["covariates_encoded"][-1] == "site_type[urban]"
    assert ss["task00"].diagnostics["dropped_constant"] == ["site_type[urban]"]
    assert "dropped_constant" not in ss["task01"].diagnostics


def test_data_frame_is_required():
    with pytest.raises(TypeError, match="pandas DataFrame"):
        estimate_tasks(np.zeros((3, 3)), "task", "A", "Y")  # type: ignore[arg-type]


def test_summary_records_settings_and_folds(rng):
    df, xcols = _small_frame(rng)
    ss = estimate_tasks(df, "task", "A", "Y", xcols, settings=DMLSettings(n_folds=3, n_rep=2))
    assert ss.meta["dml"]["n_folds"] == 3 and ss.meta["dml"]["n_rep"] == 2
    assert all(s.diagnostics["n_folds"] == 3 for s in ss)
    assert isinstance(pd.DataFrame([s.diagnostics for s in ss]), pd.DataFrame)


def test_binary_outcome_gets_classifier_nuisances_and_matches_doubleml():
    rng = np.random.default_rng(8)
    n = 800
    X = rng.standard_normal((n, 3))
    a = rng.binomial(1, 1 / (1 + np.exp(-0.5 * X[:, 0])))
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 * X[:, 1] + 0.8 * a))))
    df = pd.DataFrame({"Y": y, "A": a, "x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2]})
    xcols = ["x1", "x2", "x3"]
    clf = LogisticRegression(max_iter=1000)
    settings = DMLSettings(model="irm", ml_outcome=clf, ml_treatment=clf, n_folds=5)
    ours = _one_task(df, settings, 4, xcols)
    # out-of-fold fit of the outcome is a log loss: the nuisance predicted probabilities
    assert "logloss_g0" in ours.diagnostics and "r2_g0" not in ours.diagnostics
    folds = make_folds(df["A"].to_numpy(), 5, 1, 4, stratify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        coef, se = _doubleml_fit(dml.DoubleMLIRM, df, "Y", "A", xcols, (clf, clf), folds)
    assert ours.theta_hat[0] == pytest.approx(coef, rel=1e-6)
    assert ours.std_error[0] == pytest.approx(se, rel=1e-6)


def test_cluster_robust_sandwich_sums_scores_within_clusters(rng):
    n, G = 300, 30
    psi_r_a = rng.standard_normal(n)
    Z = np.ones((n, 1))
    r_y = rng.standard_normal(n)
    groups = np.repeat(np.arange(G), n // G)
    fit = _scores.plr(r_y, psi_r_a, Z, clusters=groups)
    # closed form for p = 1: V = sum_g (sum_i psi_i)^2 / (sum r_a^2)^2
    psi = (r_y - psi_r_a * fit.theta[0]) * psi_r_a
    sums = np.bincount(groups, weights=psi)
    expected = np.sum(sums**2) / np.sum(psi_r_a**2) ** 2
    assert fit.V[0, 0] == pytest.approx(expected, rel=1e-12)


def test_clustered_tasks_keep_clusters_within_one_fold(rng):
    df, _ = simulate_rows(n_tasks=1, n=400, randomised=True, seed=2)
    df["class"] = np.arange(len(df)) // 20
    a = df["A"].to_numpy()
    for split in make_folds(a, 4, 2, 0, stratify=True, groups=df["class"].to_numpy()):
        for train, test in split:
            assert not set(df["class"].iloc[train]) & set(df["class"].iloc[test])
    xcols = [c for c in df if c.startswith("x")]
    plain = estimate_tasks(df, "task", "A", "Y", xcols).summaries[0]
    clustered = estimate_tasks(df, "task", "A", "Y", xcols, cluster_col="class").summaries[0]
    assert clustered.ok and clustered.std_error[0] != plain.std_error[0]


def test_best_of_picks_inside_training_folds_and_beats_a_bad_candidate():
    from sklearn.dummy import DummyRegressor

    from latefusion.dml.learners import best_of

    df, theta = simulate_rows(n_tasks=1, n=600, model="plr", seed=12)
    xcols = [c for c in df if c.startswith("x")]
    lib = best_of([DummyRegressor(), LinearRegression()])
    s = _one_task(df, DMLSettings(model="plr", ml_outcome=lib, ml_treatment=lib), 0, xcols)
    dummy = _one_task(
        df, DMLSettings(model="plr", ml_outcome=DummyRegressor(), ml_treatment=DummyRegressor()),
        0, xcols,
    )  # fmt: skip
    # The library chooses the linear model (the treatment is linear in X), so its out-of-fold
    # R^2 for m is far above the dummy's (which is <= 0 by construction).
    assert s.diagnostics["r2_m"] > 0.3 > dummy.diagnostics["r2_m"]
    assert abs(s.theta_hat[0] - theta[0, 0]) < 3 * s.std_error[0]


def test_a_task_with_too_few_clusters_is_excluded_and_others_go_on(rng):
    df, xcols = _small_frame(rng)
    df["class"] = np.arange(len(df)) % 7
    df.loc[df["task"] == "task01", "class"] = 0  # one cluster only
    with pytest.warns(UserWarning, match="1 of 3 tasks excluded"):
        ss = estimate_tasks(df, "task", "A", "Y", xcols, cluster_col="class")
    assert "1 clusters, fewer than the 5 cross-fitting folds" in ss["task01"].reason
    assert ss["task00"].ok and ss["task00"].diagnostics["n_clusters"] == 7


def test_text_outcome_is_an_error_naming_the_column(rng):
    df, xcols = _small_frame(rng)
    df["grade"] = np.array(["low", "mid", "high"])[np.arange(len(df)) % 3]
    with pytest.raises(ValueError, match="outcome column 'grade' is not numeric"):
        estimate_tasks(df, "task", "A", "grade", xcols)


def test_a_modifier_is_a_nuisance_covariate_even_when_not_listed_as_one(rng):
    # A modifier that confounds (it drives treatment and outcome) must be adjusted for: giving
    # it only as a modifier used to leave it out of the nuisance models, with no warning.
    df, _ = simulate_rows(n_tasks=2, n=300, modifier=True, seed=int(rng.integers(1000)))
    settings = DMLSettings(seed=1, n_folds=3)
    alone = estimate_tasks(df, "task", "A", "Y", ["x1"], ["z"], settings)
    listed = estimate_tasks(df, "task", "A", "Y", ["x1", "z"], ["z"], settings)
    for a, b in zip(alone, listed, strict=True):
        np.testing.assert_array_equal(a.theta_hat, b.theta_hat)
        np.testing.assert_array_equal(a.V, b.V)
    assert alone.meta["columns"]["covariates_encoded"] == ["x1", "z"]


def test_a_string_where_a_list_of_columns_is_expected_is_named(rng):
    df, _ = _small_frame(rng)
    with pytest.raises(TypeError, match="covariates must be a list of column names, not the"):
        estimate_tasks(df, "task", "A", "Y", "x1")


def test_cate_without_modifiers_and_min_folds_outside_its_range_are_refused(rng):
    df, xcols = _small_frame(rng)
    with pytest.raises(ValueError, match="estimand 'cate' needs effect modifiers"):
        estimate_tasks(df, "task", "A", "Y", xcols, settings=DMLSettings(estimand="cate"))
    with pytest.raises(ValueError, match="min_folds must be between 2 and n_folds"):
        DMLSettings(n_folds=5, min_folds=10)
