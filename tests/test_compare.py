"""compare: the one-call table and its plots (sampling mocked), and ArviZ on our DataTrees."""

from __future__ import annotations

import warnings
from pathlib import Path

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pymc as pm
import pytest
import xarray as xr
from matplotlib.figure import Figure

from _fake_sampler import MOCK, FakeSampler, make_summaries
from latefusion import fuse_summaries
from latefusion.bayes import fit_bayes
from latefusion.compare import (
    COMPARE_COLUMNS,
    compare,
    method_colors,
    plot_forest,
    plot_shrinkage,
    plot_task_posteriors,
    to_wide,
)
from latefusion.warnings import ConvergenceWarning

FREQUENTIST = ["itl", "fixed_effect", "random_effects_dl", "random_effects_reml", "adaptive"]


@pytest.fixture
def fake_sample(monkeypatch: pytest.MonkeyPatch) -> FakeSampler:
    fake = FakeSampler()
    monkeypatch.setattr(pm, "sample", fake)
    return fake


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def run_and_fit(rng, fake_sample):
    """A run with the horseshoe, and a normal-model fit, on 6 tasks with 2 coefficients."""
    summaries = make_summaries(rng, K=6, p=2, excluded=1)
    run = fuse_summaries(summaries, bayes_options=MOCK, n_boot=20)
    normal = fit_bayes(summaries, model="normal", **MOCK)
    return summaries, run, normal


# The table --------------------------------------------------------------------------------------


def test_compare_summaries_gives_every_frequentist_method(rng) -> None:
    summaries = make_summaries(rng, K=5, p=1, excluded=1)
    table = compare(summaries, n_boot=20)

    assert list(table.columns) == COMPARE_COLUMNS
    assert list(dict.fromkeys(table["method"])) == [
        "fixed_effect",
        "random_effects_dl",
        "random_effects_reml",
        "adaptive",
        "itl",
    ]  # fmt: skip  (pooled rows first, and ITL has none)
    assert set(table["kind"]) == {"frequentist"}
    tasks = table[table["level"] == "task"]
    assert set(tasks["task"]) == set(summaries.task_names), "the excluded task has no rows"
    assert set(tasks["method"]) == {"itl", "random_effects_dl", "random_effects_reml", "adaptive"}
    own = tasks[tasks["method"] == "itl"].set_index("task")["estimate"]
    for s in summaries.usable():
        assert own[s.task] == pytest.approx(s.theta_hat[0], rel=1e-12)
    assert (table["lower"] <= table["estimate"]).all() and (
        table["estimate"] <= table["upper"]
    ).all()
    assert set(table["level"]) == {"pooled", "new_task", "task"}


def test_run_results_by_name_and_fused_tasks_by_task(run_and_fit) -> None:
    summaries, run, _ = run_and_fit
    assert run.result("adaptive").method == "adaptive"
    assert run.result("bayes_horseshoe") is run.bayes.result
    with pytest.raises(KeyError, match="no method 'lasso'"):
        run.result("lasso")
    fused = run.fused_tasks()
    usable = [s.task for s in summaries.usable()]
    assert list(fused.index) == usable and len(usable) == len(summaries) - 1
    assert fused.tolist() == list(run.result("adaptive").info["fused"])
    with pytest.raises(TypeError, match="summaries must be a SummarySet .* got list"):
        fuse_summaries(list(summaries))


def test_compare_run_and_fit(run_and_fit) -> None:
    summaries, run, normal = run_and_fit
    table = compare(run, normal)

    methods = set(table["method"])
    assert methods == {*FREQUENTIST, "bayes_horseshoe", "bayes_normal"}
    kinds = table.groupby("method")["kind"].first()
    assert kinds["bayes_horseshoe"] == kinds["bayes_normal"] == "bayesian"
    assert (kinds[FREQUENTIST] == "frequentist").all()
    K, p = len(summaries.task_names), 2
    bayes = table[table["method"] == "bayes_normal"]
    assert len(bayes) == K * p + 2 * p, "each task, the centre and a new task, per coefficient"
    theta = normal.datatree.posterior["theta"].mean(("chain", "draw"))
    row = bayes[(bayes["task"] == "site03") & (bayes["coef"] == "z1")]
    assert row["estimate"].item() == pytest.approx(float(theta.sel(task="site03", coef="z1")))

    # The run's own fit passed again is the same object, not a clash.
    assert len(compare(run, run.bayes)) == len(compare(run))


def test_compare_refuses_clashes_and_renames_with_a_mapping(run_and_fit, fake_sample) -> None:
    summaries, run, normal = run_and_fit
    other = fit_bayes(summaries, model="normal", **{**MOCK, "seed": 4})
    with pytest.raises(ValueError, match="method 'bayes_normal' appears twice"):
        compare(normal, other)

    table = compare(run, {"normal_a": normal, "normal_b": other})
    assert {"normal_a", "normal_b"} <= set(table["method"])
    assert set(table.loc[table["method"].isin(["normal_a", "normal_b"]), "kind"]) == {"bayesian"}
    with pytest.raises(TypeError, match="mapping entry 'x'"):
        compare({"x": 3})
    with pytest.raises(TypeError, match="got int"):
        compare(3)
    with pytest.raises(ValueError, match="at least one source"):
        compare()


def test_to_wide(rng) -> None:
    summaries = make_summaries(rng, K=4, p=2)
    table = compare(summaries, n_boot=20)
    wide = compare(summaries, n_boot=20, wide=True)

    assert wide.index.names == ["level", "task", "coef"]
    assert list(wide.columns) == list(dict.fromkeys(table["method"]))
    assert len(wide) == 4 * 2 + 2 * 2
    assert np.isnan(wide.loc[("pooled", "", "z1"), "itl"])
    row = table[(table["method"] == "adaptive") & (table["task"] == "site02")]
    row = row[row["coef"] == "intercept"]
    assert wide.loc[("task", "site02", "intercept"), "adaptive"] == row["estimate"].item()
    se = to_wide(table, "std_error")
    assert (se.stack().dropna() > 0).all()
    with pytest.raises(ValueError, match="value must be"):
        to_wide(table, "mean")


# Plots ------------------------------------------------------------------------------------------


def _line(ax, label: str):
    hits = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(hits) == 1, f"{label}: {[ln.get_label() for ln in ax.get_lines()]}"
    return hits[0]


def test_plot_forest_overlays_methods_and_marks_the_truth(run_and_fit) -> None:
    summaries, run, normal = run_and_fit
    table = compare(run, normal)
    truth = {t: 1.5 for t in summaries.task_names[:3]} | {"pooled": 1.0}

    fig = plot_forest(table, coef="intercept", truth=truth)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["pooled", "new_task"] and len(labels) == 2 + 6
    marks = _line(ax, "truth")
    assert sorted(marks.get_xdata()) == [1.0, 1.5, 1.5, 1.5]
    y_of = {lbl: i for i, lbl in enumerate(labels)}
    assert sorted(marks.get_ydata()) == sorted(y_of[t] for t in truth)
    colors = method_colors(list(dict.fromkeys(table["method"])))
    assert _line(ax, "bayes_normal").get_color() == colors["bayes_normal"]

    shown = plot_forest(run, methods=["itl", "adaptive"], tasks=["site01", "site04"])
    assert len(shown.axes) == 2, "one panel per coefficient"
    rows = [t.get_text() for t in shown.axes[0].get_yticklabels()]
    assert rows[0] == "pooled" and sorted(rows[1:]) == ["site01", "site04"]
    # Labelled lines are the methods; the centre and separator lines are unlabelled.
    names = {ln.get_label() for ln in shown.axes[0].get_lines()}
    names = {n for n in names if not n.startswith("_")}
    assert names == {"itl", "adaptive"}
    with pytest.raises(ValueError, match=r"method\(s\) \['nope'\]"):
        plot_forest(table, methods=["nope"])


def test_method_colors_are_stable() -> None:
    a = method_colors(["itl", "adaptive", "bayes_horseshoe"])
    b = method_colors(["bayes_horseshoe", "fixed_effect", "adaptive", "itl"])
    assert a["itl"] == b["itl"] and a["adaptive"] == b["adaptive"]
    assert a["bayes_horseshoe"] == b["bayes_horseshoe"]
    assert len(set(b.values())) == 4


def test_plot_shrinkage_points_are_own_against_fused(run_and_fit) -> None:
    _, run, normal = run_and_fit
    table = compare(run, normal)
    fig = plot_shrinkage(table, coef="z1", methods=["adaptive", "bayes_normal"])

    ax = fig.axes[0]
    tasks = table[(table["level"] == "task") & (table["coef"] == "z1")]
    own = tasks[tasks["method"] == "itl"].set_index("task")["estimate"]
    fused = tasks[tasks["method"] == "bayes_normal"].set_index("task")["estimate"][own.index]
    line = _line(ax, "bayes_normal")
    np.testing.assert_allclose(line.get_xdata(), own.values)
    np.testing.assert_allclose(line.get_ydata(), fused.values)
    # The centre of each method is a dashed horizontal line at its pooled estimate.
    centre = table[(table["level"] == "pooled") & (table["method"] == "adaptive")]
    centre = centre[centre["coef"] == "z1"]["estimate"].item()
    flat = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert any(np.allclose(ln.get_ydata(), centre) for ln in flat)

    default = plot_shrinkage(run)
    assert len(default.axes) == 2
    with pytest.raises(ValueError, match="reference method 'own'"):
        plot_shrinkage(table, reference="own")


def test_plot_task_posteriors(run_and_fit, rng) -> None:
    summaries, run, normal = run_and_fit
    fig = plot_task_posteriors(run, coef="z1", methods=["itl", "adaptive"], ncols=3)

    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible[:2]] == ["centre (beta)", "new task"]
    assert len(visible) == 2 + 6
    # Tasks in order of their own estimate; ITL's point is the task's own estimate.
    own = {s.task: s.theta_hat[1] for s in summaries.usable()}
    titles = [ax.get_title() for ax in visible[2:]]
    assert titles == sorted(own, key=own.get)
    points = [ln for ln in visible[2].get_lines() if ln.get_marker() == "o"]
    assert pytest.approx(points[0].get_xdata()[0]) == own[titles[0]]

    # From the DataTree alone: ITL is computed from theta_hat and V.
    dt_fig = plot_task_posteriors(normal.datatree, coef="intercept", max_tasks=3)
    shown = [ax.get_title() for ax in dt_fig.axes if ax.get_visible()][2:]
    first = {s.task: s.theta_hat[0] for s in summaries.usable()}
    order = sorted(first, key=first.get)
    assert shown == [order[0], order[2], order[5]], "spread evenly, the extremes included"
    assert "3 of 6 tasks" in dt_fig.texts[0].get_text()

    with pytest.raises(ValueError, match="coefficient 'nope'"):
        plot_task_posteriors(normal, coef="nope")
    with pytest.raises(ValueError, match="no Bayesian fit"):
        plot_task_posteriors(fuse_summaries(summaries, bayes=False, n_boot=20))


# ArviZ on our DataTrees, as they are -----------------------------------------------------------


@pytest.mark.slow
def test_arviz_runs_on_our_datatrees_as_they_are(tmp_path: Path, monkeypatch) -> None:
    """az.summary, az.loo, az.compare and az.plot_* take a fit's DataTree without reshaping."""
    rng = np.random.default_rng(11)
    summaries = make_summaries(rng, K=8, p=1)
    with warnings.catch_warnings():
        # Small test settings: R-hat and ESS thresholds may be missed; not under test here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        real = fit_bayes(summaries, draws=300, tune=300, chains=2, cores=1, seed=2)
    monkeypatch.setattr(pm, "sample", FakeSampler())
    mocked = fit_bayes(summaries, model="normal", **MOCK)

    summary = az.summary(real.datatree, var_names=["beta", "tau", "theta"])
    assert isinstance(summary, pd.DataFrame) and len(summary) == 1 + 1 + 8
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(summary.columns)
    assert summary.loc["beta[effect]", "mean"] == pytest.approx(
        float(real.datatree.posterior["beta"].mean()), abs=0.01
    )
    with warnings.catch_warnings():
        # Horseshoe posteriors of a few tasks can give Pareto k > 0.7 (arviz_stats warns).
        warnings.filterwarnings("ignore", "Estimated shape parameter of Pareto", UserWarning)
        loo = az.loo(real.datatree)
        ranked = az.compare({"horseshoe": real.datatree, "normal": mocked.datatree})
    assert np.isfinite(loo.elpd) and loo.n_data_points == 8
    assert set(ranked.index) == {"horseshoe", "normal"} and ranked["rank"].min() == 0

    pc = az.plot_forest(real.datatree, var_names=["theta"])
    assert pc.viz["point_estimate"]["theta"].sizes["task"] == 8
    az.plot_trace_dist(real.datatree, var_names=["beta", "tau"])

    # And after a round trip through netCDF, the file `latefusion run` writes.
    path = tmp_path / "posterior.nc"
    real.datatree.to_netcdf(path, engine="h5netcdf")
    back = az.from_netcdf(path)
    assert isinstance(back, xr.DataTree)
    again = az.summary(back, var_names=["beta", "tau", "theta"])
    pd.testing.assert_frame_equal(again, summary)
