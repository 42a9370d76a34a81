"""The ``latefusion`` command line.

The commands, their options, and the names and columns of the files they write are a public
interface: extend them, never rename them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from latefusion._version import __version__

log = logging.getLogger("latefusion")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``latefusion`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"latefusion: error: {exc}", file=sys.stderr)
        return 2


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
        "by individual-task learning, fixed effect, adaptive robust aggregation and a "
        "Bayesian shrinkage model.",
    )
    run.add_argument("data", type=Path, help="CSV file, one row per unit")
    run.add_argument("--task", required=True, help="column naming the task (site, school)")
    run.add_argument("--treatment", required=True, help="treatment column")
    run.add_argument("--outcome", required=True, help="outcome column")
    _add_estimation_options(run)
    _add_fusion_options(run)
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="run on Project STAR kindergarten (79 schools as tasks)",
        description="The effect of small classes on kindergarten reading + math scores, "
        "estimated within each of the 79 Project STAR schools (randomised within school) and "
        "fused across schools. Needs the 'data' extra (pip install 'latefusion[data]').",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--jobs", type=int, default=-1, help="tasks in parallel (default: all cores)")
    _add_fusion_options(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _add_estimation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-task estimation")
    g.add_argument("--covariates", nargs="+", default=[], metavar="COL", help="confounders X")
    g.add_argument(
        "--modifiers",
        nargs="+",
        default=[],
        metavar="COL",
        help="effect modifiers z: estimate CATE(z) = z'theta with z = (1, modifiers)",
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
        help="estimate the propensity (default), use the task's treated share (randomised "
        "tasks: 'design'), or read per-row design propensities from a column",
    )
    g.add_argument(
        "--learner",
        choices=["default", "linear", "forest", "boosting"],
        default="default",
        help="nuisance learners (default: by task size)",
    )
    g.add_argument("--n-folds", type=int, default=5, help="cross-fitting folds (default 5)")
    g.add_argument("--n-rep", type=int, default=1, help="repeated splits (median; default 1)")
    g.add_argument(
        "--min-folds",
        type=int,
        help="reduce folds down to this for small tasks instead of excluding them",
    )
    g.add_argument("--clip", type=float, default=0.01, help="propensity clipping bound")
    g.add_argument("--cluster", metavar="COL", help="clusters within tasks (cluster-robust)")
    g.add_argument("--dropna", action="store_true", help="drop rows with missing values")
    g.add_argument("--jobs", type=int, default=-1, help="tasks in parallel (default: all cores)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_fusion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion")
    g.add_argument(
        "--C",
        dest="C",
        default="theory",
        help="adaptive aggregation constant: 'theory' (default) or a number",
    )
    g.add_argument(
        "--bayes-model",
        default="horseshoe",
        metavar="NAME|PATH",
        help="Bayesian model: a catalogue name or a .toml spec file",
    )
    g.add_argument("--no-bayes", action="store_true", help="skip the Bayesian model")
    g.add_argument("--draws", type=int, default=1000, help="posterior draws per chain")
    g.add_argument("--tune", type=int, default=1000, help="tuning steps per chain")
    g.add_argument("--chains", type=int, default=4, help="MCMC chains")


# Commands -------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.data.exists():
        raise FileNotFoundError(f"no such file: {args.data}")
    data = pd.read_csv(args.data)
    return _estimate_and_fuse(data, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from latefusion.datasets import STAR_COVARIATES, load_star

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
    return _estimate_and_fuse(data, args)


def _estimate_and_fuse(data: pd.DataFrame, args: argparse.Namespace) -> int:
    from latefusion.dml import DMLSettings, estimate_tasks
    from latefusion.dml.learners import learner_preset
    from latefusion.workflow import fuse_summaries

    started = time.perf_counter()
    propensity, propensity_col = args.propensity, None
    if propensity not in ("estimate", "design"):
        propensity, propensity_col = "design", args.propensity
    ml_outcome, ml_treatment = learner_preset(args.learner)
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
    summaries = estimate_tasks(
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
    dml_seconds = time.perf_counter() - started
    if not summaries.usable():
        raise ValueError("every task was excluded; nothing to fuse:\n" + _reasons(summaries))
    run = fuse_summaries(
        summaries,
        C=_parse_C(args.C),
        bayes_model=args.bayes_model,
        bayes=not args.no_bayes,
        bayes_options={"draws": args.draws, "tune": args.tune, "chains": args.chains},
        seed=args.seed,
    )
    run.settings["dml_seconds"] = round(dml_seconds, 2)
    paths = run.write(args.out)
    _print_summary(run, paths, time.perf_counter() - started)
    return 0


def _parse_C(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _reasons(summaries) -> str:
    return "\n".join(f"  {s.task}: {s.reason}" for s in summaries.excluded())


def _print_summary(run: Any, paths: dict[str, Path], seconds: float) -> None:
    s = run.summaries
    print()
    print(f"Tasks: {len(s)} ({len(s.usable())} fused, {len(s.excluded())} excluded)")
    for ex in s.excluded():
        print(f"  excluded {ex.task}: {ex.reason}")
    print()
    print("Pooled estimates (95% intervals):")
    print(run.pooled().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    adaptive = next((r for r in run.results if r.method == "adaptive"), None)
    if adaptive is not None:
        fused = adaptive.info.get("fused", [])
        print(
            f"\nadaptive: C = {adaptive.info['C']:.3f}, {sum(fused)} of {len(fused)} tasks "
            "fused with the centre"
        )
    if run.bayes is not None:
        d = run.bayes.diagnostics
        print(
            f"{run.bayes.result.method}: {d['divergences']} divergences, max R-hat "
            f"{d['max_rhat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}, min tail ESS "
            f"{d['min_ess_tail']:.0f}"
        )
    print(f"\nWrote {', '.join(p.name for p in paths.values())} to {Path(args_out(paths))}")
    print(f"Done in {seconds:.0f} s.")


def args_out(paths: dict[str, Path]) -> Path:
    return next(iter(paths.values())).parent


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
