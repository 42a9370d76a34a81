"""Prior sensitivity: refits over a grid (sampling mocked), power scaling, files and the CLI."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import arviz_stats as azs
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pymc as pm
import pytest
from matplotlib.figure import Figure

from _fake_sampler import MOCK, FakeSampler, make_summaries
from latefusion.bayes import fit_bayes
from latefusion.sensitivity import (
    POWER_SCALING_COLUMNS,
    SENSITIVITY_COLUMNS,
    SENSITIVITY_FILES,
    SensitivityResult,
    plot_power_scaling,
    plot_prior_sensitivity,
    plot_task_shifts,
    power_scaling,
    prior_sensitivity,
)
from latefusion.sensitivity_cli import add_sensitivity_parser


@pytest.fixture
def fake_sample(monkeypatch: pytest.MonkeyPatch) -> FakeSampler:
    fake = FakeSampler()
    monkeypatch.setattr(pm, "sample", fake)
    return fake


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def study_and_calls() -> tuple[SensitivityResult, object, FakeSampler]:
    """One mocked study shared by the tests that only read it (4 fits take a while)."""
    fake = FakeSampler()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pm, "sample", fake)
        summaries = make_summaries(np.random.default_rng(2), K=5, p=2, excluded=1)
        result = prior_sensitivity(
            summaries, models=["horseshoe", "normal"], global_scales=[0.5, 2.0], **MOCK
        )
    return result, summaries, fake


@pytest.fixture
def study(study_and_calls) -> tuple[SensitivityResult, object]:
    return study_and_calls[:2]


# The refits -------------------------------------------------------------------------------------


def test_table_has_every_fit_and_quantity(study_and_calls) -> None:
    result, summaries, fake_sample = study_and_calls
    K, p = 5, 2
    assert list(result.fits) == [
        ("horseshoe", 0.5), ("horseshoe", 2.0), ("normal", 0.5), ("normal", 2.0),
    ]  # fmt: skip
    assert len(fake_sample.calls) == 4
    for (model, scale), fit in result.fits.items():
        spec = json.loads(fit.datatree.attrs["spec"])
        assert (spec["name"], spec["global_scale"]) == (model, scale)

    t = result.table
    assert list(t.columns) == SENSITIVITY_COLUMNS
    per_fit = p + 1 + p + K * p + K  # beta, tau, theta_new, theta, kappa
    assert len(t) == 4 * per_fit
    counts = t.groupby(["model", "global_scale", "quantity"]).size().unstack()
    assert (counts["theta"] == K * p).all() and (counts["kappa"] == K).all()
    assert set(t.loc[t["quantity"] == "theta", "task"]) == set(summaries.task_names)
    assert set(t.loc[t["quantity"] == "tau", "level"]) == {"global"}
    assert (t["lower"] <= t["median"]).all() and (t["median"] <= t["upper"]).all()

    # Summaries are those of the draws.
    fit = result.fits[("normal", 2.0)]
    theta = fit.datatree.posterior["theta"].sel(task="site02", coef="z1").values.ravel()
    row = t[(t["model"] == "normal") & (t["global_scale"] == 2.0) & (t["task"] == "site02")]
    row = row[(row["quantity"] == "theta") & (row["coef"] == "z1")].iloc[0]
    assert row["mean"] == pytest.approx(theta.mean(), rel=1e-12)
    assert row["sd"] == pytest.approx(theta.std(ddof=1), rel=1e-12)
    assert row["lower"] == pytest.approx(np.quantile(theta, 0.025), rel=1e-12)


def test_shifts_are_against_the_reference(study) -> None:
    result, _ = study
    # Horseshoe's own global scale is 1: on a log scale 0.5 and 2 are equally near; the first.
    assert result.reference == ("horseshoe", 0.5)
    t = result.table
    ref = t[(t["model"] == "horseshoe") & (t["global_scale"] == 0.5)]
    assert (ref["shift"] == 0).all() and (ref["shift_sd"] == 0).all()

    key = ["quantity", "task", "coef"]
    other = t[(t["model"] == "normal") & (t["global_scale"] == 2.0)].merge(
        ref, on=key, suffixes=("", "_ref")
    )
    means = other["quantity"] != "theta_new"
    np.testing.assert_allclose(
        other.loc[means, "shift"], (other["mean"] - other["mean_ref"])[means], rtol=1e-12
    )
    np.testing.assert_allclose(
        other.loc[~means, "shift"], (other["median"] - other["median_ref"])[~means], rtol=1e-12
    )
    np.testing.assert_allclose(other["shift_sd"], other["shift"] / other["scale_ref"], rtol=1e-12)
    # The scale is the sd, but for theta_new (no finite sd under a horseshoe) a robust one.
    np.testing.assert_array_equal(other.loc[means, "scale"], other.loc[means, "sd"])
    assert np.all(
        other.loc[~means, "scale"] < other.loc[~means, "upper"] - other.loc[~means, "lower"]
    )
    # Different priors moved something (prior draws of two models differ).
    assert other["shift"].abs().max() > 0


def test_diagnostics_and_power_scaling_tables(study) -> None:
    result, _ = study
    d = result.diagnostics
    assert len(d) == 4 and (d["divergences"] == 0).all() and (d["seconds"] > 0).all()
    assert (d["problems"] == "").all()
    ps = result.power_scaling
    assert list(ps.columns) == POWER_SCALING_COLUMNS
    assert len(ps) == 4 * (2 + 1 + 5 * 2)
    assert set(ps["diagnosis"]) <= {"ok", "prior-data conflict", "strong prior / weak likelihood"}
    assert np.isfinite(ps[["prior", "likelihood"]].to_numpy()).all()


def test_own_scales_reference_choice_and_errors(rng, fake_sample) -> None:
    summaries = make_summaries(rng, K=4, p=1)
    own = prior_sensitivity(
        summaries, models=["normal"], global_scales=None, power_scaling_vars=None, **MOCK
    )
    assert list(own.fits) == [("normal", 1.0)] and own.power_scaling.empty

    # log(3 / 1) < log(1 / 0.3): the grid scale nearest the spec's 1 is 3.
    near = prior_sensitivity(
        summaries, models=["normal"], global_scales=[0.3, 3], power_scaling_vars=None, **MOCK
    )
    assert near.reference == ("normal", 3.0)

    with pytest.raises(ValueError, match=r"appear more than once"):
        prior_sensitivity(summaries, models=["normal", "normal"])
    with pytest.raises(ValueError, match=r"finite and > 0, got \[0.0\]"):
        prior_sensitivity(summaries, global_scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="reference model 'laplace'"):
        prior_sensitivity(summaries, reference="laplace")
    with pytest.raises(ValueError, match="reference scale 5"):
        prior_sensitivity(summaries, global_scales=[1.0], reference=("horseshoe", 5.0))
    with pytest.raises(FileNotFoundError, match="no model named 'nope'"):
        prior_sensitivity(summaries, models=["nope"])
    assert len(fake_sample.calls) == 1 + 2, "argument errors are raised before any fit"


# Power scaling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_power_scaling_matches_psense_summary(rng, fake_sample, p: int, caplog) -> None:
    """Our tidy table carries psense_summary's numbers, with tasks and coefs as columns."""
    fit = fit_bayes(make_summaries(rng, K=4, p=p), model="regularized_horseshoe", **MOCK)
    names = ["beta", "tau", "theta"]
    words = {
        "✓": "ok",
        "potential prior-data conflict": "prior-data conflict",
        "potential strong prior / weak likelihood": "strong prior / weak likelihood",
    }
    for ours, prior_terms in (
        (power_scaling(fit, names, prior_var_names="all"), None),
        (power_scaling(fit, names), ["beta_z", "tau", "c2"]),
    ):
        assert len(ours) == p + 1 + 4 * p
        # One variable at a time: arviz-stats 1.3.3 mislabels the rows of psense_summary when
        # variables of different dims are summarised together (values of theta in coef-major
        # order under task-major labels); our table does not go through that step.
        for name in names:
            with caplog.at_level(logging.CRITICAL, logger="arviz_stats"):
                theirs = azs.psense_summary(
                    fit.datatree, var_names=[name], prior_var_names=prior_terms
                )
            mine = ours[ours["quantity"] == name]
            labels = [
                f"{name}[{', '.join(x for x in (t, c) if x)}]" if (t or c) else name
                for t, c in zip(mine["task"], mine["coef"], strict=True)
            ]
            theirs = theirs.loc[labels]
            # psense_summary rounds to 3 decimals.
            np.testing.assert_allclose(mine["prior"], theirs["prior"], atol=5.1e-4)
            np.testing.assert_allclose(mine["likelihood"], theirs["likelihood"], atol=5.1e-4)
            assert list(mine["diagnosis"]) == [words[d] for d in theirs["diagnosis"]]
    row = ours[(ours["quantity"] == "theta") & (ours["task"] == "site01")]
    assert list(row["coef"]) == list(fit.datatree.posterior.coords["coef"].values)


def test_power_scaling_arguments(rng, fake_sample) -> None:
    fit = fit_bayes(make_summaries(rng, K=4, p=1), **MOCK)
    tau_only = power_scaling(fit, ["tau"], prior_var_names="tau")
    assert list(tau_only["quantity"]) == ["tau"] and tau_only["task"].item() == ""
    with pytest.raises(ValueError, match=r"log-prior term\(s\) \['c2'\]"):
        power_scaling(fit, prior_var_names=["c2"])
    with pytest.raises(ValueError, match=r"variable\(s\) \['mu'\]"):
        power_scaling(fit, ["mu"])
    no_prior = fit.datatree.copy()
    del no_prior["log_prior"]
    with pytest.raises(ValueError, match="log_prior"):
        power_scaling(no_prior)
    with pytest.raises(TypeError, match="BayesFit or DataTree"):
        power_scaling(3)


# Plots and files --------------------------------------------------------------------------------


def test_plots(study) -> None:
    result, _ = study
    fig = result.plot()
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == [
        "beta[intercept]", "beta[z1]", "tau (standard errors)", "theta_new[intercept]",
        "theta_new[z1]",
    ]  # fmt: skip
    # One line per model through its medians, at the grid scales (dodged multiplicatively).
    tau = fig.axes[2]
    line = next(ln for ln in tau.get_lines() if ln.get_label() == "normal")
    t = result.table
    medians = t[(t["model"] == "normal") & (t["quantity"] == "tau")]["median"]
    np.testing.assert_allclose(line.get_ydata(), medians)
    np.testing.assert_allclose(np.sort(line.get_xdata()) / [0.5, 2.0], line.get_xdata()[0] / 0.5)

    heat = result.plot_tasks(coef="z1", max_tasks=3)
    image = heat.axes[0].get_images()[0].get_array()
    assert image.shape == (3, 4)
    assert "3 of 5 tasks" in heat.axes[0].get_title()
    theta = t[(t["quantity"] == "theta") & (t["coef"] == "z1")]
    biggest = theta.groupby("task")["shift_sd"].apply(lambda s: s.abs().max()).max()
    assert np.nanmax(np.abs(image)) == pytest.approx(biggest)

    ps = result.plot_power_scaling(max_tasks=2)
    labels = [tick.get_text() for tick in ps.axes[0].get_yticklabels()]
    assert labels[:3] == ["beta[intercept]", "beta[z1]", "tau"] and len(labels) == 5


def test_write_and_read_back(study, tmp_path: Path) -> None:
    result, _ = study
    paths = result.write(tmp_path / "out")
    assert sorted(paths) == sorted(SENSITIVITY_FILES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SENSITIVITY_FILES)

    table = pd.read_csv(paths["sensitivity.csv"], keep_default_na=False, na_values=[""])
    assert list(table.columns) == SENSITIVITY_COLUMNS and len(table) == len(result.table)
    ps = pd.read_csv(paths["power_scaling.csv"])
    assert list(ps.columns) == POWER_SCALING_COLUMNS
    # The plot functions take the tables as read back from the CSV files.
    assert isinstance(plot_prior_sensitivity(table), Figure)
    assert isinstance(plot_task_shifts(table), Figure)
    assert isinstance(plot_power_scaling(ps), Figure)

    report = paths["report.md"].read_text()
    assert "measured against `horseshoe` at tau_0 = 0.5" in report
    assert "## Sampling diagnostics" in report and "## Power-scaling sensitivity" in report


# The command ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latefusion")
    add_sensitivity_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_writes_every_file_from_json_and_csv(rng, fake_sample, tmp_path: Path, capsys) -> None:
    summaries = make_summaries(rng, K=4, p=1)
    json_path = summaries.to_json(tmp_path / "site_a.json")
    rows = [
        {"task": f"b{k}", "coef": "effect", "estimate": 1.0 + 0.2 * k, "std_error": 0.8}
        for k in range(3)
    ]
    rows = [{**r, "estimand": "cate"} for r in rows]  # as make_summaries' tasks
    csv_path = tmp_path / "site_b.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    args = _parser().parse_args(
        ["sensitivity", str(json_path), str(csv_path), "--models", "horseshoe", "normal",
         "--global-scales", "0.5", "1", "--reference", "normal", "--out", str(tmp_path / "o"),
         "--draws", "400", "--tune", "10", "--chains", "2", "--seed", "3"]
    )  # fmt: skip
    summaries_from_csv = pytest.importorskip("latefusion.dml.interop").summaries_from_table
    assert len(summaries_from_csv(csv_path)) == 3

    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "Fitting 4 models: horseshoe, normal at tau_0 = 0.5, 1" in out.err
    assert "shifts against normal at 1" in out.out and "Wrote sensitivity.csv" in out.out
    table = pd.read_csv(tmp_path / "o" / "sensitivity.csv", keep_default_na=False)
    assert set(table.loc[table["quantity"] == "theta", "task"]) == {
        *summaries.task_names, "b0", "b1", "b2",
    }  # fmt: skip
    assert fake_sample.calls[0]["draws"] == 400 and len(fake_sample.calls) == 4
    assert (tmp_path / "o" / "power_scaling.png").is_file()

    # --no-power-scaling writes everything else (it used to fail on the empty table) and
    # removes the earlier run's power-scaling plot, which is not this run's.
    again = _parser().parse_args(
        ["sensitivity", str(json_path), "--models", "normal", "--global-scales", "1",
         "--out", str(tmp_path / "o"), "--draws", "400", "--tune", "10", "--chains", "2",
         "--no-power-scaling"]
    )  # fmt: skip
    assert again.func(again) == 0
    assert not (tmp_path / "o" / "power_scaling.png").exists()
    assert (tmp_path / "o" / "sensitivity.png").is_file()
    assert len(pd.read_csv(tmp_path / "o" / "power_scaling.csv")) == 0


def test_cli_errors_name_the_file(tmp_path: Path) -> None:
    args = _parser().parse_args(["sensitivity", str(tmp_path / "none.json"), "--out", "x"])
    with pytest.raises(FileNotFoundError, match="none.json"):
        args.func(args)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = _parser().parse_args(["sensitivity", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="bad.json"):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_the_command_is_wired_into_latefusion(tmp_path: Path, capsys) -> None:
    from latefusion.cli import main

    missing = tmp_path / "none.json"
    assert main(["sensitivity", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"latefusion: error: no such file: {missing}" in capsys.readouterr().err
