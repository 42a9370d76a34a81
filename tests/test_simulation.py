"""Simulation designs, the study runner (resumable, summarised) and the ``simulate`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from latefusion import fusion
from latefusion.simulation import (
    Design,
    StudySettings,
    draw_summaries,
    generate,
    plot_mse,
    run_method,
    run_repetition,
    run_study,
    summarise,
    task_parameters,
)
from latefusion.simulation import study as study_mod
from latefusion.simulation.cli import add_simulate_parser, cmd_simulate

FAST = StudySettings(
    methods=("itl", "adaptive_sure", "random_effects"), level="summaries", n_boot=0
)


# Designs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"outcome": "count"},
        {"treatment": "alternating"},
        {"nuisance_spread": 1.5},
        {"outlier_share": -0.1},
        {"n_ratio": 0.5},
        {"n_covariates": 2},
        {"eta": -1.0},
    ],
)
def test_design_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        Design(**kwargs)


def test_sizes_equal_or_geometric():
    assert list(Design(n_tasks=4, n=100).sizes) == [100] * 4
    sizes = Design(n_tasks=5, n=200, n_ratio=4).sizes
    assert sizes[0] == 100 and sizes[-1] == 400  # n / sqrt(4) .. n * sqrt(4)
    assert np.all(np.diff(sizes) > 0)


def test_parameters_move_the_same_tasks_apart_as_eta_grows():
    d = Design(n_tasks=10, p=2, seed=3)
    base = task_parameters(d.with_eta(0.0))["theta"]
    assert np.allclose(base, 1.0)  # eta = 0: every task at the centre
    t1 = task_parameters(d.with_eta(0.5))["theta"]
    t2 = task_parameters(d.with_eta(1.0))["theta"]
    # The directions u_k do not depend on eta: deviations scale linearly.
    np.testing.assert_allclose(t2 - 1.0, 2 * (t1 - 1.0), rtol=1e-12)


def test_outliers_are_the_last_tasks_at_the_stated_distance():
    d = Design(n_tasks=10, eta=0.0, outlier_share=0.2, outlier_shift=3.0, p=3)
    par = task_parameters(d)
    assert par["outlier"].tolist() == [False] * 8 + [True] * 2
    dist = np.linalg.norm(par["theta"] - par["beta"], axis=1)
    np.testing.assert_allclose(dist[8:], 3.0)
    np.testing.assert_allclose(dist[:8], 0.0)


def test_nuisance_spread_zero_means_identical_functions():
    same = task_parameters(Design(n_tasks=5, nuisance_spread=0.0))
    assert np.allclose(same["c"], same["c"][0]) and np.allclose(same["d"], same["d"][0])
    apart = task_parameters(Design(n_tasks=5, nuisance_spread=1.0))
    assert not np.allclose(apart["c"], apart["c"][0])


def test_generate_is_seeded_and_has_the_documented_columns():
    d = Design(n_tasks=3, n=50, p=2, n_covariates=4)
    a, b, c = generate(d, 1), generate(d, 1), generate(d, 2)
    pd.testing.assert_frame_equal(a.data, b.data)
    assert not a.data["Y"].equals(c.data["Y"])
    expected = ["task", "A", "Y", "x1", "x2", "x3", "x4", "z1", "e"]
    assert list(a.data.columns) == expected
    assert a.theta.shape == (3, 2)
    assert a.data.groupby("task").size().tolist() == [50, 50, 50]


def test_randomised_and_observational_propensities():
    rnd = generate(Design(n_tasks=2, n=300), 0).data
    assert np.all(rnd["e"] == 0.5)
    obs = generate(Design(n_tasks=2, n=300, treatment="observational"), 0).data
    # expit(2 tanh(.)) stays in (0.119, 0.881)
    assert obs["e"].between(0.11, 0.89).all() and obs["e"].std() > 0.05


@pytest.mark.parametrize("seed", range(3))
def test_difference_in_means_recovers_theta_in_a_large_randomised_task(seed):
    d = Design(n_tasks=1, n=20_000, eta=0.5, seed=seed)
    sim = generate(d, seed)
    g = sim.data
    y1, y0 = g.loc[g["A"] == 1, "Y"], g.loc[g["A"] == 0, "Y"]
    se = np.sqrt(y1.var() / len(y1) + y0.var() / len(y0))
    # Randomised: the difference in means is unbiased for theta; 4 SE keeps it seed-robust.
    assert abs(y1.mean() - y0.mean() - sim.theta[0, 0]) < 4 * se


def test_binary_outcome_truth_accounts_for_clipping():
    # A risk difference of 0.1 + 3 * 0.1 * u_k leaves [0, 1] for some rows: truth by projection.
    d = Design(n_tasks=6, n=40, outcome="binary", eta=3.0, seed=1)
    sim = generate(d, 0)
    assert set(np.unique(sim.data["Y"])) <= {0.0, 1.0}
    par = task_parameters(d)["theta"]
    moved = ~np.isclose(sim.theta, par).ravel()
    assert moved.any(), "the design was meant to clip some tasks"
    assert np.all(np.abs(sim.theta[moved]) < np.abs(par[moved]))  # clipping shrinks effects


@pytest.mark.parametrize("seed", range(2))
def test_drawn_summaries_are_normal_around_the_truth(seed):
    d = Design(n_tasks=50, n=100, eta=0.3)
    z = []
    for r in range(40):
        s, theta = draw_summaries(d, 1000 * seed + r)
        th, V, _ = s.arrays()
        z.append((th - theta)[:, 0] / np.sqrt(V[:, 0, 0]))
    z = np.concatenate(z)  # 2000 standard normals
    assert abs(z.mean()) < 0.1 and abs(z.var() - 1) < 0.12  # > 4 Monte Carlo SE


# Methods ----------------------------------------------------------------------------------------


def test_fixed_effect_gives_every_task_the_centre():
    s, _ = draw_summaries(Design(n_tasks=5), 0)
    out = run_method("fixed_effect", s, seed=0)
    assert out.estimate.shape == (5, 1) and np.allclose(out.estimate, out.estimate[0])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        StudySettings(methods=("itl", "lasso"))


def test_bayes_methods_go_through_fit_bayes(monkeypatch):
    # Structure only: the sampler is replaced by the ITL result (real MCMC is tested in bayes).
    import latefusion.bayes as bayes
    from latefusion.fusion import itl

    calls = {}

    class FakeFit:
        def __init__(self, s):
            self.result = itl(s)
            self.diagnostics = {"divergences": 3, "max_rhat": 1.0}

    def fake_fit_bayes(summaries, model, **options):
        calls.update(model=model, **options)
        return FakeFit(summaries)

    monkeypatch.setattr(bayes, "fit_bayes", fake_fit_bayes)
    s, _ = draw_summaries(Design(n_tasks=4), 0)
    out = run_method("bayes_student_t", s, seed=5, bayes_options={"draws": 10})
    assert calls == {"model": "student_t", "cores": 1, "draws": 10, "seed": 5}
    assert out.info["divergences"] == 3


# Summaries --------------------------------------------------------------------------------------


def test_summarise_by_hand():
    # Two tasks, two repetitions, one method: errors chosen so every number is known.
    rows = []
    for rep, errs in enumerate([(0.1, -0.3), (0.3, 0.1)]):
        for task, err in zip(("a", "b"), errs, strict=True):
            rows.append(
                {
                    "eta": 0.0,
                    "rep": rep,
                    "nuisance": "task",
                    "method": "itl",
                    "task": task,
                    "coef": "effect",
                    "truth": 1.0,
                    "estimate": 1.0 + err,
                    "std_error": 0.1,
                    "lower": 1.0 + err - 0.2,
                    "upper": 1.0 + err + 0.2,
                    "seconds": 2.0 + rep,
                    "fusion_seconds": 0.0,
                    "divergences": np.nan,
                    "n_warnings": 0,
                    "error": "",
                }
            )
    s = summarise(pd.DataFrame(rows)).iloc[0]
    # task a: (0.01 + 0.09) / 2 = 0.05; task b: (0.09 + 0.01) / 2 = 0.05
    assert s["avg_mse"] == pytest.approx(0.05) and s["max_mse"] == pytest.approx(0.05)
    assert s["coverage"] == pytest.approx(0.5)  # |err| <= 0.2 in 2 of 4
    assert s["width"] == pytest.approx(0.4) and s["seconds"] == pytest.approx(2.5)
    assert s["avg_ratio_itl"] == pytest.approx(1.0) and s["n_reps"] == 2


@pytest.mark.parametrize("seed", range(3))
def test_fusion_beats_itl_when_tasks_are_equal(tmp_path, seed):
    d = Design(n_tasks=10, n=100, seed=seed)
    settings = StudySettings(
        methods=("itl", "adaptive", "adaptive_theory", "random_effects"),
        level="summaries",
        seed=seed,
        n_boot=0,
    )
    res = run_study(d, [0.0], 20, tmp_path, settings, plot=False)
    s = res.summary.set_index("method")
    # With K = 10 equal tasks full pooling has 1/10 of ITL's MSE; half is a loose bound that
    # still fails if fusion does not pool.
    for m in ("adaptive", "adaptive_theory", "random_effects"):
        assert s.loc[m, "avg_mse"] < 0.5 * s.loc["itl", "avg_mse"], m
    # ITL's Wald intervals are exact here: 200 intervals, coverage within 0.95 +- 0.06.
    assert abs(s.loc["itl", "coverage"] - 0.95) < 0.06


def test_sure_stays_near_itl_when_tasks_are_far_apart(tmp_path):
    d = Design(n_tasks=10, n=100, seed=1)
    settings = StudySettings(
        methods=("itl", "adaptive_sure", "adaptive"), level="summaries", n_boot=0
    )
    res = run_study(d, [3.0], 20, tmp_path, settings, plot=False)
    s = res.summary.set_index("method")
    # eta = 3 is 15 standard errors: nothing should be pooled, and SURE should see it (both
    # its minimiser and the default one-standard-error rule).
    for m in ("adaptive_sure", "adaptive"):
        assert s.loc[m, "max_mse"] < 1.2 * s.loc["itl", "max_mse"], m


def test_one_se_rule_protects_the_worst_task_at_moderate_spread():
    """The reason for the default C (see latefusion.fusion.adaptive, Notes), on Gaussian
    summaries of the reference design at a spread of about 1.4 standard errors."""
    d = Design(n_tasks=20, n=200, eta=0.2, seed=2025)
    methods = {"itl": None, "adaptive_sure": "sure", "adaptive": "sure_1se"}
    err = {m: [] for m in methods}
    for rep in range(60):
        summaries, theta = draw_summaries(d, rep)
        for m, rule in methods.items():
            est = (
                summaries.arrays()[0]
                if rule is None
                else fusion.adaptive(summaries, C=rule, n_boot=0).theta.estimate
            )
            err[m].append((est - theta)[:, 0] ** 2)
    mse = {m: np.mean(e, axis=0) for m, e in err.items()}
    # The one-SE rule fuses less: its worst task is no worse than the minimiser's, and within
    # 1.2 times ITL's (measured 1.05 at 200 repetitions; 60 give a Monte Carlo error of about
    # 0.1 on this ratio), while its average MSE stays below ITL's.
    assert mse["adaptive"].max() <= mse["adaptive_sure"].max()
    assert mse["adaptive"].max() <= 1.2 * mse["itl"].max()
    assert mse["adaptive"].mean() < mse["itl"].mean()


# Resumability -----------------------------------------------------------------------------------


def test_resume_skips_finished_repetitions_and_gives_the_same_summary(tmp_path, monkeypatch):
    d = Design(n_tasks=5, n=100)
    first = run_study(d, [0.0, 0.5], 4, tmp_path, FAST, plot=False)
    assert first.n_run == 8 and first.n_skipped == 0

    # Interrupt: two repetitions lost; count what the rerun recomputes.
    (tmp_path / "reps" / "eta=0.5" / "rep=0001.csv").unlink()
    (tmp_path / "reps" / "eta=0" / "rep=0003.csv").unlink()
    ran = []
    real = study_mod.run_repetition

    def counting(design, eta, rep, settings):
        ran.append((eta, rep))
        return real(design, eta, rep, settings)

    monkeypatch.setattr(study_mod, "run_repetition", counting)
    second = run_study(d, [0.0, 0.5], 4, tmp_path, FAST, plot=False)
    assert sorted(ran) == [(0.0, 3), (0.5, 1)]
    assert second.n_run == 2 and second.n_skipped == 6
    timings = ["seconds"]  # the recomputed repetitions took their own time
    pd.testing.assert_frame_equal(
        first.summary.drop(columns=timings), second.summary.drop(columns=timings)
    )

    # Extending the study runs only the new repetitions.
    ran.clear()
    run_study(d, [0.0, 0.5], 5, tmp_path, FAST, plot=False)
    assert sorted(ran) == [(0.0, 4), (0.5, 4)]


def test_resume_refuses_another_design(tmp_path):
    run_study(Design(n_tasks=3), [0.0], 1, tmp_path, FAST, plot=False)
    with pytest.raises(ValueError, match="another design"):
        run_study(Design(n_tasks=4), [0.0], 1, tmp_path, FAST, plot=False)
    with pytest.raises(ValueError, match="other settings"):
        other = StudySettings(methods=FAST.methods, level="summaries", n_boot=5)
        run_study(Design(n_tasks=3), [0.0], 1, tmp_path, other, plot=False)


def test_resume_accepts_a_study_started_before_a_setting_existed(tmp_path):
    import json

    run_study(Design(n_tasks=3), [0.0], 1, tmp_path, FAST, plot=False)
    path = tmp_path / "study.json"
    stored = json.loads(path.read_text())
    del stored["settings"]["sampler"]  # as written by an older latefusion
    path.write_text(json.dumps(stored))
    res = run_study(Design(n_tasks=3), [0.0], 2, tmp_path, FAST, plot=False)
    assert res.n_skipped == 1 and res.n_run == 1


def test_parallel_repetitions_match_serial(tmp_path):
    d = Design(n_tasks=4, n=100)
    serial = run_study(d, [0.0, 1.0], 3, tmp_path / "a", FAST, n_jobs=1, plot=False)
    parallel = run_study(d, [0.0, 1.0], 3, tmp_path / "b", FAST, n_jobs=2, plot=False)
    cols = ["eta", "method", "avg_mse", "max_mse", "coverage", "width"]
    pd.testing.assert_frame_equal(serial.summary[cols], parallel.summary[cols])


def test_a_failing_method_is_recorded_not_raised(tmp_path, monkeypatch):
    real = study_mod.run_method

    def flaky(name, *args, **kwargs):
        if name == "random_effects":
            raise RuntimeError("boom")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(study_mod, "run_method", flaky)
    res = run_study(Design(n_tasks=3), [0.0], 2, tmp_path, FAST, plot=False)
    s = res.summary.set_index("method")
    assert s.loc["random_effects", "n_failed"] == 2 and s.loc["itl", "n_failed"] == 0
    assert (
        res.errors.loc[res.errors["method"] == "random_effects", "error"].str.contains("boom").all()
    )


# Rows, DML and the outputs ----------------------------------------------------------------------


def test_repetition_from_rows_with_both_nuisance_variants():
    d = Design(n_tasks=4, n=80, p=2)
    settings = StudySettings(
        methods=("itl", "fixed_effect", "adaptive"), nuisance=("task", "multitask"), n_boot=20
    )
    rows = run_repetition(d, 0.2, 0, settings)
    assert list(rows.columns) == study_mod.ERROR_COLUMNS
    assert len(rows) == 4 * 2 * 3 * 2  # tasks x coefs x methods x nuisance variants
    assert rows["estimate"].notna().all() and (rows["error"] == "").all()
    itl = rows[rows["method"] == "itl"]
    # Per-task and multi-task nuisances give different estimates of the same truths.
    t, m = itl[itl["nuisance"] == "task"], itl[itl["nuisance"] == "multitask"]
    np.testing.assert_array_equal(t["truth"].to_numpy(), m["truth"].to_numpy())
    assert not np.allclose(t["estimate"].to_numpy(), m["estimate"].to_numpy())


def test_outputs_and_plot(tmp_path):
    res = run_study(Design(n_tasks=3), [0.0, 0.5], 2, tmp_path, FAST)
    for name in ("summary.csv", "errors.csv.gz", "mse.png", "study.json"):
        assert (tmp_path / name).exists(), name
    table = pd.read_csv(tmp_path / "summary.csv")
    required = ["eta", "method", "avg_mse", "max_mse", "coverage", "width", "seconds"]
    assert list(table.columns[:7]) == required
    assert len(table) == 2 * 3
    fig = plot_mse(res.summary)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # one line per method


def test_simulate_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "sim"
    argv = ["simulate", "--out", str(out), "--etas", "0", "1", "--reps", "2", "--tasks", "4"]
    argv += ["--level", "summaries", "--methods", "itl", "adaptive", "--no-plot"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert "avg_mse" in printed.out and "4 repetitions run" in printed.err
    assert Path(out / "summary.csv").exists() and not (out / "mse.png").exists()
    # The same command again finds everything finished.
    assert cmd_simulate(parser.parse_args(argv)) == 0
    assert "0 repetitions run, 4 already finished" in capsys.readouterr().err


def test_simulate_command_says_when_methods_fail(tmp_path, capsys):
    # Tasks of 5 rows are all excluded: every repetition fails. The table used to be all NaN
    # with exit status 0 and nothing said.
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    argv = ["simulate", "--out", str(tmp_path / "sim"), "--etas", "0.1", "--reps", "2",
            "--tasks", "3", "--n", "5", "--methods", "itl", "--no-plot"]  # fmt: skip
    assert cmd_simulate(parser.parse_args(argv)) == 1
    err = capsys.readouterr().err
    assert "itl at eta = 0.1: 2 of 2 repetitions failed, 6 task estimates missing" in err
    assert "every task is excluded" in err and "errors.csv.gz" in err
