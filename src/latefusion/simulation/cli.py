"""The ``latefusion simulate`` command: a simulation study from the command line.

:func:`add_simulate_parser` adds the sub-command to the ``latefusion`` parser and
:func:`cmd_simulate` runs it. Like the rest of the CLI, only this module prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from latefusion._argtypes import add_sampling_options, jobs, non_negative_int, positive_int
from latefusion.simulation.designs import OUTCOMES, TREATMENTS, Design
from latefusion.simulation.study import DEFAULT_METHODS, NUISANCE_MODES, StudySettings, run_study

__all__ = ["add_simulate_parser", "cmd_simulate"]

DEFAULT_ETAS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``simulate`` to the sub-commands of the ``latefusion`` parser; returns it."""
    p = subparsers.add_parser(
        "simulate",
        help="simulation study: methods over heterogeneity eta and repetitions",
        description="Run a simulation design over a list of eta values and repetitions, fuse "
        "each repetition's task summaries by every method, and write per-repetition, per-task "
        "errors, summary.csv (average and maximum over tasks of the task's MSE, coverage, "
        "width, seconds) and mse.png. Resumable: rerun the same command to continue an "
        "interrupted study; finished repetitions are kept.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--etas",
        type=float,
        nargs="+",
        default=list(DEFAULT_ETAS),
        metavar="ETA",
        help=f"heterogeneity values (default {' '.join(map(str, DEFAULT_ETAS))})",
    )
    p.add_argument(
        "--reps", type=positive_int, default=100, help="repetitions per eta (default 100)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="NAME",
        help="itl fixed_effect random_effects random_effects_reml adaptive (the default C: "
        "SURE's one-standard-error rule) adaptive_sure (C minimising SURE) adaptive_theory "
        "(theory C) "
        "bayes_<catalogue model>, or 'all' (default: " + " ".join(DEFAULT_METHODS) + ")",
    )
    p.add_argument(
        "--nuisance",
        nargs="+",
        choices=NUISANCE_MODES,
        default=["task"],
        help="nuisance learning: per task, multi-task, or both (default task)",
    )
    p.add_argument(
        "--level",
        choices=["rows", "summaries"],
        default="rows",
        help="generate rows and run DML (default), or draw summaries directly (fast)",
    )
    p.add_argument("--jobs", type=jobs, default=1, help="repetitions in parallel (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="study seed (default 0)")
    p.add_argument("--no-plot", action="store_true", help="do not write mse.png")

    g = p.add_argument_group("design")
    g.add_argument("--tasks", type=positive_int, default=20, help="K (default 20)")
    g.add_argument("--n", type=positive_int, default=200, help="rows per task (default 200)")
    g.add_argument("--n-ratio", type=float, default=1.0, help="largest / smallest task size")
    g.add_argument("--p", type=positive_int, default=1, help="coefficients per task (default 1)")
    g.add_argument("--outlier-share", type=float, default=0.0, help="share of outlier tasks")
    g.add_argument("--outlier-shift", type=float, default=2.0, help="outliers' distance")
    g.add_argument(
        "--nuisance-spread",
        type=float,
        default=0.1,
        help="0: identical nuisance functions across tasks, 1: unrelated (default 0.1)",
    )
    g.add_argument("--outcome", choices=OUTCOMES, default="continuous")
    g.add_argument("--treatment", choices=TREATMENTS, default="randomised")
    g.add_argument("--n-covariates", type=positive_int, default=5, help="confounders (default 5)")
    g.add_argument("--noise", type=float, default=1.0, help="outcome noise sd (default 1)")
    g.add_argument("--signal", type=float, default=1.0, help="baseline outcome scale")
    g.add_argument(
        "--design-seed", type=non_negative_int, default=0, help="seed of the task parameters"
    )

    e = p.add_argument_group("estimation and fusion")
    e.add_argument("--model", choices=["irm", "plr"], default="irm", help="per-task DML model")
    e.add_argument(
        "--learner",
        choices=["default", "linear", "forest", "boosting"],
        default="linear",
        help="nuisance learners: a preset of 'latefusion run' ('default' there picks "
        "learners by task size); here the default is linear, the fastest",
    )
    e.add_argument("--propensity", choices=["auto", "design", "estimate"], default="auto")
    e.add_argument(
        "--n-folds", type=positive_int, default=5, help="cross-fitting folds (default 5)"
    )
    e.add_argument(
        "--n-boot", type=non_negative_int, default=200, help="adaptive bootstrap replicates"
    )
    add_sampling_options(e, draws=500, tune=500, chains=2)
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the study the arguments describe; print the table. Returns the exit status."""
    from latefusion.simulation.methods import available_methods

    methods = available_methods() if args.methods == ["all"] else args.methods
    design = Design(
        n_tasks=args.tasks,
        n=args.n,
        n_ratio=args.n_ratio,
        p=args.p,
        outlier_share=args.outlier_share,
        outlier_shift=args.outlier_shift,
        nuisance_spread=args.nuisance_spread,
        outcome=args.outcome,
        treatment=args.treatment,
        n_covariates=args.n_covariates,
        noise=args.noise,
        signal=args.signal,
        seed=args.design_seed,
    )
    settings = StudySettings(
        methods=tuple(methods),
        nuisance=tuple(args.nuisance),
        level=args.level,
        model=args.model,
        learner=args.learner,
        propensity=args.propensity,
        n_folds=args.n_folds,
        n_boot=args.n_boot,
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        sampler=args.sampler,
        seed=args.seed,
    )
    started = time.perf_counter()
    res = run_study(
        design,
        args.etas,
        args.reps,
        args.out,
        settings,
        n_jobs=args.jobs,
        progress=True,
        plot=not args.no_plot,
    )
    seconds = time.perf_counter() - started
    cols = ["eta", "method", "avg_mse", "max_mse", "coverage", "width", "seconds"]
    if len(settings.nuisance) > 1:
        cols.insert(2, "nuisance")
    print(res.summary[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(
        f"\n{res.n_run} repetitions run, {res.n_skipped} already finished; "
        f"wrote {', '.join(res.paths)} to {args.out} in {seconds:.0f} s.",
        file=sys.stderr,
    )
    return _report_failures(res.summary, args.out)


def _report_failures(summary, out: Path) -> int:
    """Say which methods failed or lost tasks; 1 when a method has no result at some eta."""
    from latefusion.simulation.study import read_errors

    bad = summary[(summary["n_failed"] > 0) | (summary["n_missing"] > 0)]
    if bad.empty:
        return 0
    errors = read_errors(out)
    messages = errors["error"].fillna("").astype(str)
    for row in bad.itertuples():
        text = f"warning: {row.method} at eta = {row.eta:g}: "
        text += f"{row.n_failed} of {row.n_reps} repetitions failed"
        if row.n_missing:
            text += f", {row.n_missing} task estimates missing"
        mine = messages[(errors["method"] == row.method) & (errors["eta"] == row.eta)]
        mine = mine[mine != ""]
        if len(mine):
            text += f" (first error: {mine.iloc[0]})"
        print(text, file=sys.stderr)
    print(f"the errors are in {out / 'errors.csv.gz'}, column 'error'", file=sys.stderr)
    return 1 if (bad["n_failed"] == bad["n_reps"]).any() else 0
