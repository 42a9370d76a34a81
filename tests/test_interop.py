"""Summaries from fitted DoubleML objects and from plain tables of estimates."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from latefusion.datasets import simulate_rows
from latefusion.dml import DMLSettings, estimate_task
from latefusion.dml._folds import make_folds
from latefusion.dml.interop import (
    summaries_from_doubleml,
    summaries_from_table,
    summaries_to_table,
    summary_from_doubleml,
)
from latefusion.fusion.baselines import fixed_effect
from latefusion.summaries import SummarySet, TaskSummary

dml = pytest.importorskip("doubleml")

XCOLS = ["x1", "x2", "x3", "x4", "x5"]


def _fit(cls, df, d, learners, folds=None, n_folds=5, n_rep=1, **kw):
    data = dml.DoubleMLData(df, y_col="Y", d_cols=d, x_cols=XCOLS)
    if folds is None:  # our seeded splits, not DoubleML's draw from numpy's global generator
        folds = make_folds(df["Y"].to_numpy(), n_folds, n_rep, 0, stratify=False)
    model = cls(data, *learners, n_folds=len(folds[0]), n_rep=len(folds),
                draw_sample_splitting=False, **kw)  # fmt: skip
    model.set_sample_splitting(folds)
    with warnings.catch_warnings():
        # DoubleML's IRM announces the deprecation of its trimming arguments on every fit
        warnings.simplefilter("ignore", DeprecationWarning)
        return model.fit()


def _two_treatments(seed: int, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    a1 = X[:, 0] + rng.standard_normal(n)
    a2 = a1 + 0.5 * rng.standard_normal(n)  # strongly correlated treatments
    y = 1.0 * a1 + 0.5 * a2 + X[:, 1] + rng.standard_normal(n)
    return pd.DataFrame({"Y": y, "A1": a1, "A2": a2, **{c: X[:, j] for j, c in enumerate(XCOLS)}})


# DoubleML ------------------------------------------------------------------------------------


# Same folds, same learners: the two implementations compute the same closed forms, so 1e-6
# relative leaves room for summation order only.
@pytest.mark.parametrize("n_rep", [1, 3])
def test_plr_summary_is_doubleml_estimate_and_equals_ours_on_same_folds(n_rep):
    df, _ = simulate_rows(n_tasks=1, n=400, model="plr", seed=3)
    reg = LinearRegression()
    folds = make_folds(df["A"].to_numpy(), 4, n_rep, 5, stratify=False)
    model = _fit(dml.DoubleMLPLR, df, "A", (reg, reg), folds)
    s = summary_from_doubleml(model, "site A")
    assert (s.task, s.estimand, s.coef_names, s.n) == ("site A", "plr", ("effect",), 400)
    assert s.theta_hat[0] == model.coef[0]
    assert s.std_error[0] == pytest.approx(model.se[0], rel=1e-12)
    assert s.diagnostics["n_folds"] == 4 and s.diagnostics["n_rep"] == n_rep
    assert s.diagnostics["loss_ml_l"] > 0 and s.diagnostics["treatment"] == "A"
    ours = estimate_task(
        "site A", df["Y"].to_numpy(), df["A"].to_numpy(), df[XCOLS].to_numpy(),
        DMLSettings(model="plr", ml_outcome=reg, ml_treatment=reg, n_folds=4, n_rep=n_rep),
        seed=5,
    )  # fmt: skip
    assert ours.theta_hat[0] == pytest.approx(s.theta_hat[0], rel=1e-6)
    if n_rep == 1:  # with repetitions DoubleML aggregates standard errors by another rule
        assert ours.std_error[0] == pytest.approx(s.std_error[0], rel=1e-6)


@pytest.mark.parametrize(("score", "estimand"), [("ATE", "ate"), ("ATTE", "att")])
def test_irm_summary_names_the_estimand_and_matches_ours(score, estimand):
    df, _ = simulate_rows(n_tasks=1, n=500, model="irm", seed=4)
    reg, clf = LinearRegression(), LogisticRegression()
    folds = make_folds(df["A"].to_numpy(), 5, 1, 8, stratify=True)
    model = _fit(dml.DoubleMLIRM, df, "A", (reg, clf), folds, score=score)
    s = summary_from_doubleml(model, "t")
    assert s.estimand == estimand
    ours = estimate_task(
        "t", df["Y"].to_numpy(), df["A"].to_numpy(), df[XCOLS].to_numpy(),
        DMLSettings(model="irm", estimand=estimand, ml_outcome=reg, ml_treatment=clf), seed=8,
    )  # fmt: skip
    assert s.theta_hat[0] == pytest.approx(ours.theta_hat[0], rel=1e-6)
    assert s.std_error[0] == pytest.approx(ours.std_error[0], rel=1e-6)
    # DoubleML stores clipped propensities; the range must agree with ours after clipping
    assert s.diagnostics["propensity_min"] == pytest.approx(
        max(ours.diagnostics["propensity_min"], 0.01), rel=1e-9
    )
    assert s.diagnostics["clipped_treated"] == ours.diagnostics["clipped_treated"]


def test_cate_from_doubleml_blp_equals_our_cate_with_its_covariance():
    df, _ = simulate_rows(n_tasks=1, n=600, model="irm", modifier=True, seed=6)
    reg, clf = LinearRegression(), LogisticRegression()
    folds = make_folds(df["A"].to_numpy(), 5, 1, 2, stratify=True)
    model = _fit(dml.DoubleMLIRM, df, "A", (reg, clf), folds)
    blp = model.cate(pd.DataFrame({"intercept": np.ones(len(df)), "z": df["z"]}))
    s = summary_from_doubleml(blp, "t")
    ours = estimate_task(
        "t", df["Y"].to_numpy(), df["A"].to_numpy(), df[XCOLS].to_numpy(),
        DMLSettings(ml_outcome=reg, ml_treatment=clf), Z=df[["z"]].to_numpy(),
        modifier_names=["z"], seed=2,
    )  # fmt: skip
    assert (s.estimand, s.coef_names) == (ours.estimand, ours.coef_names)
    assert s.coef_names == ("intercept", "z")
    # statsmodels' HC0 and our sandwich are the same formula; 1e-6 is summation order
    np.testing.assert_allclose(s.theta_hat, ours.theta_hat, rtol=1e-6)
    np.testing.assert_allclose(s.V, ours.V, rtol=1e-6)
    assert s.V[0, 1] != 0


def test_two_treatments_covariance_from_scores():
    df = _two_treatments(0)
    model = _fit(dml.DoubleMLPLR, df, ["A1", "A2"], (LinearRegression(), LinearRegression()))
    s = summary_from_doubleml(model, "t")
    assert s.coef_names == ("A1", "A2")
    np.testing.assert_allclose(s.std_error, model.se, rtol=1e-12)
    # Written out: Cov = sum(psi_1 psi_2) / (sum psi_a1 * sum psi_a2), psi = psi_a theta + psi_b
    pa, pb = model.psi_elements["psi_a"][:, 0, :], model.psi_elements["psi_b"][:, 0, :]
    psi = pa * model.coef + pb
    expected = np.sum(psi[:, 0] * psi[:, 1]) / (pa[:, 0].sum() * pa[:, 1].sum())
    assert s.V[0, 1] == pytest.approx(expected, rel=1e-10)


def test_two_treatments_covariance_matches_monte_carlo():
    # Over 200 independent draws the correlation of the two estimates is estimated with a
    # standard error of about (1 - r^2) / sqrt(200) < 0.05; a tolerance of 0.1 still fails an
    # independence assumption (r = 0) or a sign error, since the true r is far below -0.5.
    est, corr = [], []
    for seed in range(200):
        model = _fit(
            dml.DoubleMLPLR, _two_treatments(seed), ["A1", "A2"],
            (LinearRegression(), LinearRegression()), n_folds=3,
        )  # fmt: skip
        s = summary_from_doubleml(model, f"t{seed}")
        est.append(s.theta_hat)
        corr.append(s.V[0, 1] / np.prod(s.std_error))
    empirical = np.corrcoef(np.array(est).T)[0, 1]
    assert empirical < -0.5
    assert np.mean(corr) == pytest.approx(empirical, abs=0.1)


def test_repeated_two_treatments_keep_doubleml_standard_errors():
    df = _two_treatments(1)
    model = _fit(
        dml.DoubleMLPLR, df, ["A1", "A2"], (LinearRegression(), LinearRegression()), n_rep=4
    )
    s = summary_from_doubleml(model, "t", coef_names=["first", "second"])
    assert s.coef_names == ("first", "second")
    np.testing.assert_array_equal(s.theta_hat, model.coef)
    np.testing.assert_allclose(s.std_error, model.se, rtol=1e-12)
    assert -1 < s.V[0, 1] / np.prod(s.std_error) < -0.5  # the treatments are confounded


def test_summaries_from_doubleml_fuse_with_our_own():
    df, _ = simulate_rows(n_tasks=2, n=300, model="plr", seed=9)
    reg = LinearRegression()
    a = df[df["task"] == "task00"]
    b = df[df["task"] == "task01"]
    theirs = summaries_from_doubleml({"A": _fit(dml.DoubleMLPLR, a, "A", (reg, reg))})
    ours = estimate_task(
        "B", b["Y"].to_numpy(), b["A"].to_numpy(), b[XCOLS].to_numpy(),
        DMLSettings(model="plr", ml_outcome=reg, ml_treatment=reg),
    )  # fmt: skip
    both = SummarySet([*theirs, ours])
    fe = fixed_effect(both)
    w = 1 / np.array([s.V[0, 0] for s in both])
    expected = np.sum(w * np.array([s.theta_hat[0] for s in both])) / w.sum()
    assert fe.beta.estimate[0] == pytest.approx(expected, rel=1e-12)


def test_doubleml_errors_name_the_task():
    df, _ = simulate_rows(n_tasks=1, n=200, model="plr", seed=1)
    data = dml.DoubleMLData(df, y_col="Y", d_cols="A", x_cols=XCOLS)
    unfitted = dml.DoubleMLPLR(data, LinearRegression(), LinearRegression())
    with pytest.raises(ValueError, match="task 'k': the DoubleMLPLR object is not fitted"):
        summary_from_doubleml(unfitted, "k")
    with pytest.raises(TypeError, match="task 'k': cannot read a LinearRegression"):
        summary_from_doubleml(LinearRegression(), "k")
    fitted = _fit(dml.DoubleMLPLR, df, "A", (LinearRegression(), LinearRegression()))
    with pytest.raises(ValueError, match="2 coefficient names for 1 coefficients"):
        summary_from_doubleml(fitted, "k", coef_names=["a", "b"])


def test_clustered_fit_with_several_coefficients_is_not_implemented():
    df = _two_treatments(2)
    df["cl"] = np.arange(len(df)) // 10
    data = dml.DoubleMLData(df, y_col="Y", d_cols=["A1", "A2"], x_cols=XCOLS, cluster_cols="cl")
    np.random.seed(0)  # noqa: NPY002 (DoubleML draws cluster splits from the global generator)
    model = dml.DoubleMLPLR(data, LinearRegression(), LinearRegression(), n_folds=3).fit()
    with pytest.raises(NotImplementedError, match="joint covariance of several coefficients"):
        summary_from_doubleml(model, "t")


# Tables --------------------------------------------------------------------------------------


def _summary(task, theta, V, names=("intercept", "z")):
    return TaskSummary(task, "cate", names, np.asarray(theta), np.asarray(V), 100)


def _two_coef_set() -> SummarySet:
    return SummarySet(
        [
            _summary("a", [1.0, 0.5], [[0.04, -0.01], [-0.01, 0.09]]),
            _summary("b", [0.8, 0.2], [[0.02, 0.003], [0.003, 0.05]]),
        ]
    )


def test_univariate_csv_is_read_with_labels_as_text(tmp_path):
    path = tmp_path / "estimates.csv"
    path.write_text(
        "task,coef,estimate,std_error,n\n007,effect,0.3,0.1,120\n010,effect,-0.2,0.25,80\n"
    )
    ss = summaries_from_table(path)
    assert ss.task_names == ["007", "010"]
    assert ss["010"].theta_hat[0] == -0.2 and ss["010"].V[0, 0] == pytest.approx(0.0625)
    assert ss["007"].n == 120 and ss.estimand == "ate"
    assert ss.meta["path"] == str(path)


def test_table_round_trip_keeps_the_covariance_exactly():
    ss = _two_coef_set()
    back = summaries_from_table(summaries_to_table(ss))
    assert back.estimand == "cate" and back.coef_names == ("intercept", "z")
    for s, t in zip(ss, back, strict=True):
        np.testing.assert_array_equal(s.theta_hat, t.theta_hat)
        np.testing.assert_allclose(s.V, t.V, rtol=1e-15)


def test_one_triangle_of_correlations_is_enough():
    table = summaries_to_table(_two_coef_set(), covariance=False)
    table["corr_intercept"] = [1.0, np.nan, 1.0, np.nan]
    table["corr_z"] = [-0.01 / (0.2 * 0.3), 1.0, 0.003 / np.sqrt(0.02 * 0.05), 1.0]
    back = summaries_from_table(table)
    for s, t in zip(_two_coef_set(), back, strict=True):
        np.testing.assert_allclose(t.V, s.V, rtol=1e-12)


def test_text_or_impossible_values_in_covariance_columns_are_errors():
    # 'abc' in a variance cell was replaced by std_error^2 without a word, and a correlation of
    # 5 of a coefficient with itself was accepted.
    table = summaries_to_table(_two_coef_set(), covariance=True)
    table["cov_intercept"] = table["cov_intercept"].astype(object)
    table.loc[0, "cov_intercept"] = "abc"
    with pytest.raises(ValueError, match="column 'cov_intercept' holds 'abc', which is not a"):
        summaries_from_table(table)
    one = pd.DataFrame({"task": ["a", "b"], "coef": "effect", "estimate": [1.0, 1.2],
                        "std_error": 0.2, "corr_effect": [5.0, np.nan]})  # fmt: skip
    with pytest.raises(ValueError, match=r"task 'a'.*correlation \[5.0\] with itself"):
        summaries_from_table(one)


def test_several_coefficients_need_a_covariance_or_an_explicit_independence():
    table = summaries_to_table(_two_coef_set(), covariance=False)
    with pytest.raises(ValueError, match=r"add columns \['cov_intercept', 'cov_z'\]"):
        summaries_from_table(table)
    ss = summaries_from_table(table, assume_independent=True)
    assert ss["a"].V[0, 1] == 0 and ss.meta["assume_independent"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, r"task 'b', coefficient 'z': column 'std_error' is 0.0, must be finite and > 0"),
        (-0.1, r"task 'b', coefficient 'z': column 'std_error' is -0.1"),
        (np.inf, r"task 'b', coefficient 'z': column 'std_error' is inf"),
        (np.nan, r"task 'b', coefficient 'z': column 'std_error' is nan"),
    ],
)
def test_bad_standard_error_names_task_coefficient_and_column(value, message):
    table = summaries_to_table(_two_coef_set(), covariance=False)
    table.loc[3, "std_error"] = value
    with pytest.raises(ValueError, match=message):
        summaries_from_table(table, assume_independent=True)


def test_table_errors_name_what_is_wrong():
    table = summaries_to_table(_two_coef_set())
    with pytest.raises(ValueError, match=r"duplicate \(task, coef\) rows: \[\('a', 'z'\)\]"):
        summaries_from_table(pd.concat([table, table.iloc[[1]]]))
    with pytest.raises(ValueError, match=r"task 'b' has no row for coefficient\(s\) \['z'\]"):
        summaries_from_table(table.drop(index=3))
    with pytest.raises(ValueError, match=r"column\(s\) \['std_error'\] not found"):
        summaries_from_table(table.drop(columns="std_error"))
    bad = table.copy()
    bad.loc[0, "estimate"] = np.nan
    with pytest.raises(ValueError, match="task 'a', coefficient 'intercept': column 'estimate'"):
        summaries_from_table(bad)
    bad = table.copy()
    bad.loc[1, "cov_intercept"] = 0.5  # mirror of -0.01
    with pytest.raises(ValueError, match="task 'a'.*-0.01 in column 'cov_z' but 0.5"):
        summaries_from_table(bad)
    bad = table.copy()
    bad.loc[0, "cov_intercept"] = 0.05  # std_error**2 is 0.04
    with pytest.raises(ValueError, match="column 'cov_intercept' gives the variance 0.05"):
        summaries_from_table(bad)
    bad = table.copy()
    bad.loc[1, "n"] = 7
    with pytest.raises(ValueError, match="task 'a': column 'n' takes several values"):
        summaries_from_table(bad)
    bad = table.copy()
    bad["cov_age"] = 0.0
    with pytest.raises(ValueError, match=r"\['cov_age'\] name no coefficient"):
        summaries_from_table(bad)


def test_covariance_not_positive_definite_is_refused_or_projected():
    table = summaries_to_table(_two_coef_set())
    table.loc[0, "cov_z"] = table.loc[1, "cov_intercept"] = 0.07  # |corr| > 1 for task a
    with pytest.raises(ValueError, match="task 'a': covariance is not positive definite"):
        summaries_from_table(table)
    ss = summaries_from_table(table, project_psd=True)
    assert ss["a"].diagnostics["covariance_projected"] < 0
    assert np.linalg.eigvalsh(ss["a"].V)[0] > 0
