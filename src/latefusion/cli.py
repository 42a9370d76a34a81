"""The ``latefusion`` command line.

The commands, their options, and the names and columns of the files they write are a public
interface: extend them, never rename them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from latefusion._argtypes import add_sampling_options, jobs, non_negative_int, positive_int
from latefusion._version import __version__

log = logging.getLogger("latefusion")

#: Smallest treatment arm a task may export with ``latefusion summarize`` unless
#: ``--allow-small``: an estimate from a handful of units says little about the effect and,
#: with its diagnostics, too much about those units.
MIN_ARM_SIZE = 10


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``latefusion`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    warnings.showwarning = _show_warning
    # SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C, so that the outputs' staging
    # directory is removed and earlier outputs stay as they were.
    previous = _terminate_as_interrupt()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError, OverflowError) as exc:
        print(f"latefusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latefusion: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (main thread only); return the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning ({category.__name__}): {message}", file=sys.stderr)


# Arguments ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latefusion",
        description="Late-fusion multi-task causal inference: per-task double machine "
        "learning, fused across tasks from summaries alone.",
    )
    parser.add_argument("--version", action="version", version=f"latefusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="estimate every task of a CSV file, then fuse",
        description="Estimate each task by double machine learning, then fuse the summaries "
        "by individual-task learning, fixed and random effects, adaptive robust aggregation "
        "and a Bayesian shrinkage model.",
    )
    _add_data_arguments(run)
    _add_estimation_options(run)
    _add_fusion_options(run)
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.set_defaults(func=_cmd_run)

    summarize = sub.add_parser(
        "summarize",
        help="at one site: estimate its task(s) and write only the summaries",
        description="Run the per-task estimation at one site and write its summaries "
        "(estimate, covariance, size, diagnostics; no rows) to a JSON file for a coordinator "
        f"to fuse. A task whose smaller treatment arm has fewer than --min-arm-size "
        f"(default {MIN_ARM_SIZE}) units is not exported (its status says why) unless "
        "--allow-small is given.",
    )
    _add_data_arguments(summarize)
    _add_estimation_options(summarize)
    summarize.add_argument(
        "--min-arm-size",
        type=int,
        default=MIN_ARM_SIZE,
        metavar="N",
        help="smallest arm a task may export",
    )
    summarize.add_argument(
        "--allow-small", action="store_true", help="export tasks under --min-arm-size too"
    )
    summarize.add_argument("--out", type=Path, required=True, help="summary file to write")
    summarize.set_defaults(func=_cmd_summarize)

    fuse = sub.add_parser(
        "fuse",
        help="fuse summary files from several sites (or CSVs of univariate summaries)",
        description="Fuse task summaries without seeing any row: JSON files written by "
        "'latefusion summarize' or 'run', or CSV files with the columns "
        "task,coef,estimate,std_error.",
    )
    fuse.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="summary files")
    fuse.add_argument(
        "--project-psd",
        action="store_true",
        help="project a covariance that is not positive definite instead of "
        "refusing it (recorded in the task's diagnostics)",
    )
    fuse.add_argument(
        "--assume-independent",
        action="store_true",
        help="CSV inputs with several coefficients per task and no cov_*/corr_* columns: "
        "treat the coefficients as uncorrelated (otherwise an error)",
    )
    fuse.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    _add_fusion_options(fuse, model_alias=True)
    fuse.add_argument("--out", type=Path, required=True, help="output directory")
    fuse.set_defaults(func=_cmd_fuse)

    demo = sub.add_parser(
        "demo",
        help="run on Project STAR kindergarten (79 schools as tasks)",
        description="The effect of small classes on kindergarten reading + math scores, "
        "estimated within each of the 79 Project STAR schools (randomised within school) and "
        "fused across schools. Needs the 'data' extra (pip install 'latefusion[data]').",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="output directory (default demo-output)",
    )
    demo.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    demo.add_argument("--jobs", type=jobs, default=-1, help="tasks in parallel (default: all)")
    _add_fusion_options(demo)
    demo.set_defaults(func=_cmd_demo)

    from latefusion.sensitivity_cli import add_sensitivity_parser
    from latefusion.simulation.cli import add_simulate_parser

    add_sensitivity_parser(sub)
    add_simulate_parser(sub)
    return parser


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="CSV file, one row per unit")
    p.add_argument("--task", required=True, help="column naming the task (site, school)")
    p.add_argument("--treatment", required=True, help="treatment column")
    p.add_argument("--outcome", required=True, help="outcome column")


def _add_estimation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-task estimation")
    g.add_argument("--covariates", nargs="+", default=[], metavar="COL", help="confounders X")
    g.add_argument(
        "--modifiers",
        nargs="+",
        default=[],
        metavar="COL",
        help="effect modifiers z: estimate CATE(z) = z'theta, z = (1, modifiers)",
    )
    g.add_argument(
        "--model",
        choices=["plr", "irm"],
        default="irm",
        help="partially linear (plr) or interactive AIPW (irm, binary treatment; default)",
    )
    g.add_argument(
        "--estimand",
        choices=["ate", "att", "cate"],
        help="for irm (default: ate, or cate with --modifiers)",
    )
    g.add_argument("--treated", help="treatment value taken as treated (non-0/1 treatment)")
    g.add_argument("--control", help="treatment value taken as control (others dropped)")
    g.add_argument(
        "--propensity",
        default="estimate",
        metavar="estimate|design|COL",
        help="estimate the propensity (default), use the task's treated share "
        "(randomised tasks: 'design'), or read per-row design propensities",
    )
    g.add_argument(
        "--learner",
        choices=["default", "linear", "forest", "boosting"],
        default="default",
        help="nuisance learners (default: by task size)",
    )
    g.add_argument(
        "--n-folds", type=positive_int, default=5, help="cross-fitting folds (default 5)"
    )
    g.add_argument(
        "--n-rep", type=positive_int, default=1, help="repeated splits (median; default 1)"
    )
    g.add_argument(
        "--min-folds",
        type=int,
        help="reduce folds down to this for small tasks instead of excluding them",
    )
    g.add_argument("--clip", type=float, default=0.01, help="propensity clipping bound")
    g.add_argument("--cluster", metavar="COL", help="clusters within tasks (cluster-robust)")
    g.add_argument("--dropna", action="store_true", help="drop rows with missing values")
    g.add_argument(
        "--nuisance",
        choices=["task", "multitask"],
        default="task",
        help="nuisance learning per task (default), or shared across tasks with "
        "task-specific deviations (rows of all tasks used together)",
    )
    g.add_argument("--jobs", type=jobs, default=-1, help="tasks in parallel (default: all)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")


def _add_fusion_options(p: argparse.ArgumentParser, model_alias: bool = False) -> None:
    g = p.add_argument_group("fusion")
    g.add_argument(
        "--C",
        dest="C",
        default="sure_1se",
        help="adaptive aggregation constant: 'sure_1se' (default: the smallest C whose Stein "
        "unbiased risk estimate is within one standard error of its minimum), 'sure' (the "
        "minimum), 'theory' (sqrt(1 + log(K) / p)) or a number",
    )
    g.add_argument(
        "--knapp-hartung",
        action="store_true",
        help="random-effects intervals with the Knapp-Hartung adjustment (t with K - 1 "
        "degrees of freedom) instead of normal ones",
    )
    names = ["--bayes-model", "--model"] if model_alias else ["--bayes-model"]
    g.add_argument(
        *names,
        dest="bayes_model",
        default="horseshoe",
        metavar="NAME|PATH",
        help="Bayesian model: a catalogue name or a .toml spec file",
    )
    g.add_argument("--no-bayes", action="store_true", help="skip the Bayesian model")
    add_sampling_options(g, draws=1000, tune=1000, chains=4)


# Commands -------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_bayes_model(args)  # before any estimation
    summaries = _estimate(_read_csv(args.data, args.task), args)
    return _fuse_and_write(summaries, args, started)


def _cmd_demo(args: argparse.Namespace) -> int:
    from latefusion.datasets import STAR_COVARIATES, load_star

    started = time.perf_counter()
    _check_bayes_model(args)  # before any estimation
    data = load_star()
    print(
        f"Project STAR kindergarten: {len(data)} pupils in {data['school'].nunique()} schools; "
        "effect of a small class on reading + math score, randomised within school "
        "(design propensity).",
        file=sys.stderr,
    )
    args.task, args.treatment, args.outcome = "school", "treatment", "score"
    args.covariates, args.modifiers = list(STAR_COVARIATES), []
    args.model, args.estimand, args.treated, args.control = "irm", "ate", None, None
    args.propensity, args.learner, args.n_folds, args.n_rep = "design", "default", 5, 1
    args.min_folds, args.clip, args.cluster, args.dropna = None, 0.01, None, False
    args.nuisance = "task"
    return _fuse_and_write(_estimate(data, args), args, started)


def _cmd_summarize(args: argparse.Namespace) -> int:
    from latefusion.summaries import SummarySet, TaskSummary

    summaries = _estimate(_read_csv(args.data, args.task), args)
    kept = []
    for s in summaries:
        smaller = min(s.diagnostics.get("n_treated", s.n), s.diagnostics.get("n_control", s.n))
        if s.ok and smaller < args.min_arm_size and not args.allow_small:
            reason = (
                f"not exported: smaller arm has {smaller} units, under the minimum of "
                f"{args.min_arm_size} (see --min-arm-size, --allow-small)"
            )
            s = TaskSummary.excluded(s.task, s.estimand, s.coef_names, s.n, reason)
        kept.append(s)
    meta = {**summaries.meta, "min_arm_size": None if args.allow_small else args.min_arm_size}
    summaries = SummarySet(kept, meta=meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summaries.to_json(args.out)
    n_ok = len(summaries.usable())
    print(f"Tasks: {len(summaries)} ({n_ok} exported, {len(summaries) - n_ok} not)")
    for ex in summaries.excluded():
        print(f"  {ex.task}: {ex.reason}")
    print(f"Wrote {args.out} (summaries only, no rows).")
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from latefusion.summaries import read_summary_files

    started = time.perf_counter()
    _check_bayes_model(args)  # before any estimation
    summaries = read_summary_files(
        args.inputs, project_psd=args.project_psd, assume_independent=args.assume_independent
    )
    return _fuse_and_write(summaries, args, started)


# Shared steps ---------------------------------------------------------------------------------


def _read_csv(path: Path, task_col: str) -> pd.DataFrame:
    """Read the rows; task labels stay text, so "1", "1.0" and "01" remain three tasks."""
    from latefusion._csv import read_labelled_csv

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return read_labelled_csv(path, [task_col])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable CSV file: {exc}") from None


def _estimate(data: pd.DataFrame, args: argparse.Namespace):
    from latefusion.dml import DMLSettings
    from latefusion.dml.learners import learner_preset
    from latefusion.dml.multitask import estimate_tasks_with

    propensity, propensity_col = args.propensity, None
    if propensity not in ("estimate", "design"):
        propensity, propensity_col = "design", args.propensity
    ml_outcome, ml_treatment = learner_preset(args.learner)
    if (
        args.model == "plr"
        and args.treated is None
        and ml_treatment is not None
        and args.treatment in data.columns  # a missing column is reported by prepare_data
    ):
        a = pd.to_numeric(data[args.treatment], errors="coerce").dropna()
        if not a.isin([0, 1]).all():  # a continuous treatment: E[A|X] is a regression
            ml_treatment = ml_outcome
    settings = DMLSettings(
        model=args.model,
        estimand=args.estimand,
        ml_outcome=ml_outcome,
        ml_treatment=ml_treatment,
        n_folds=args.n_folds,
        n_rep=args.n_rep,
        min_folds=args.min_folds,
        propensity=propensity,
        clip=args.clip,
        seed=args.seed,
    )
    return estimate_tasks_with(
        args.nuisance,
        data,
        args.task,
        args.treatment,
        args.outcome,
        args.covariates,
        args.modifiers,
        settings,
        treated=args.treated,
        control=args.control,
        propensity_col=propensity_col,
        cluster_col=args.cluster,
        dropna=args.dropna,
        n_jobs=args.jobs,
        progress=True,
    )


def _check_bayes_model(args: argparse.Namespace) -> None:
    """An unknown model name or a bad spec file is an error at once, not after the estimation."""
    if args.no_bayes:
        if args.bayes_model != "horseshoe":
            raise ValueError(f"--bayes-model {args.bayes_model} has no effect with --no-bayes")
        return
    from latefusion.bayes import load_spec

    load_spec(args.bayes_model)


def _fuse_and_write(summaries: Any, args: argparse.Namespace, started: float) -> int:
    from latefusion.workflow import fuse_summaries

    if not summaries.usable():
        reasons = "\n".join(f"  {s.task}: {s.reason}" for s in summaries.excluded())
        raise ValueError("every task is excluded; nothing to fuse:\n" + reasons)
    C = args.C
    try:
        C = float(C)
    except ValueError:
        pass
    run = fuse_summaries(
        summaries,
        C=C,
        bayes_model=args.bayes_model,
        bayes=not args.no_bayes,
        bayes_options={
            "draws": args.draws,
            "tune": args.tune,
            "chains": args.chains,
            "sampler": args.sampler,
        },
        seed=args.seed,
        knapp_hartung=args.knapp_hartung,
    )
    paths = run.write(args.out)
    _print_summary(run, args.out, paths, time.perf_counter() - started)
    return 0


def _print_summary(run: Any, out: Path, paths: dict[str, Path], seconds: float) -> None:
    s = run.summaries
    n_ok = len(s.usable())
    print()
    print(f"Tasks: {len(s)} ({n_ok} used in fusion, {len(s) - n_ok} excluded)")
    for ex in s.excluded():
        print(f"  excluded {ex.task}: {ex.reason}")
    print()
    print("Pooled estimates (95% intervals):")
    print(run.pooled().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    adaptive = next((r for r in run.results if r.method == "adaptive"), None)
    if adaptive is not None:
        fused = adaptive.info.get("fused", [])
        print(
            f"\nadaptive: C = {adaptive.info['C']:.3g} ({adaptive.info.get('C_rule', '')}), "
            f"{sum(fused)} of {len(fused)} tasks fused with the centre"
        )
    if n_ok == 1:
        print("One usable task: its own estimate is returned; heterogeneity is not estimable.")
    elif n_ok == 2:
        print("Two usable tasks: heterogeneity between tasks is barely estimable.")
    if "bayes_skipped" in run.settings:
        print(f"Bayesian model not fitted: {run.settings['bayes_skipped']}.")
    if run.bayes is not None:
        d = run.bayes.diagnostics
        print(
            f"{run.bayes.result.method}: {d['divergences']} divergences, max R-hat "
            f"{d['max_rhat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}, min tail ESS "
            f"{d['min_ess_tail']:.0f}"
        )
    print(f"\nWrote {', '.join(p.name for p in paths.values())} to {out}")
    print(f"Done in {seconds:.0f} s.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
