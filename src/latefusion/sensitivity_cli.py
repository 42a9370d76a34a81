"""The ``latefusion sensitivity`` command: a prior sensitivity study from summary files.

Wired into :mod:`latefusion.cli` by :func:`add_sensitivity_parser`; like the other commands, its
options and the names and columns of the files it writes are a public interface.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from latefusion._argtypes import (
    add_sampling_options,
    non_negative_int,
    positive_int,
    probability,
)
from latefusion.sensitivity import DEFAULT_GLOBAL_SCALES, DEFAULT_MODELS
from latefusion.summaries import read_summary_files

__all__ = ["add_sensitivity_parser", "cmd_sensitivity"]


def add_sensitivity_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sensitivity`` command to the ``latefusion`` sub-command parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The new sub-parser, its ``func`` set to :func:`cmd_sensitivity`.
    """
    p = subparsers.add_parser(
        "sensitivity",
        help="prior sensitivity of the Bayesian fusion of summary files",
        description="Refit the Bayesian fusion model for every named model and global scale "
        "tau_0 and tabulate how beta, tau, each theta_k and a new task move against a "
        "reference fit; add the power-scaling sensitivity of prior and likelihood of every "
        "fit. Inputs are JSON files written by 'latefusion summarize' or 'run', or CSV files "
        "with the columns task,coef,estimate,std_error. Writes sensitivity.csv, "
        "power_scaling.csv, diagnostics.csv, three PNG plots and report.md into --out.",
    )
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="summary files")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="NAME|PATH",
        help=f"catalogue models or .toml spec files (default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--global-scales",
        nargs="+",
        type=float,
        default=list(DEFAULT_GLOBAL_SCALES),
        metavar="X",
        help="global scales tau_0 of tau ~ HalfCauchy(tau_0), in standard errors (default: "
        f"{' '.join(f'{g:g}' for g in DEFAULT_GLOBAL_SCALES)})",
    )
    p.add_argument(
        "--reference",
        metavar="NAME",
        help="model the shifts are measured against, at the grid scale nearest its own "
        "(default: the first of --models)",
    )
    p.add_argument(
        "--no-power-scaling",
        action="store_true",
        help="skip the power-scaling diagnostics",
    )
    p.add_argument(
        "--project-psd",
        action="store_true",
        help="project a covariance that is not positive definite instead of refusing it",
    )
    g = p.add_argument_group("sampling")
    add_sampling_options(g, draws=1000, tune=1000, chains=4)
    g.add_argument("--cores", type=positive_int, help="processes to sample in (default: PyMC's)")
    g.add_argument("--target-accept", type=probability, default=0.95, help="NUTS target acceptance")
    g.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_sensitivity)
    return p


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Run the ``sensitivity`` command; returns the exit code (0)."""
    from latefusion.sensitivity import prior_sensitivity

    started = time.perf_counter()
    summaries = read_summary_files(args.inputs, project_psd=args.project_psd)
    if not summaries.usable():
        reasons = "\n".join(f"  {s.task}: {s.reason}" for s in summaries.excluded())
        raise ValueError("every task is excluded; nothing to fuse:\n" + reasons)
    n_fits = len(args.models) * len(args.global_scales)
    print(
        f"Tasks: {len(summaries)} ({len(summaries.usable())} fused). Fitting {n_fits} models: "
        f"{', '.join(args.models)} at tau_0 = "
        f"{', '.join(f'{g:g}' for g in args.global_scales)}.",
        file=sys.stderr,
    )
    result = prior_sensitivity(
        summaries,
        models=args.models,
        global_scales=args.global_scales,
        reference=args.reference,
        power_scaling_vars=None if args.no_power_scaling else ("beta", "tau", "theta"),
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        sampler=args.sampler,
        cores=args.cores,
        target_accept=args.target_accept,
        seed=args.seed,
    )
    paths = result.write(args.out)
    _print_summary(result)
    print(f"\nWrote {', '.join(p.name for p in paths.values())} to {args.out}")
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


def _print_summary(result: Any) -> None:
    ref_model, ref_scale = result.reference
    t = result.table
    head = t[t["quantity"].isin(["beta", "tau"])]
    cols = ["model", "global_scale", "quantity", "coef", "mean", "lower", "upper", "shift_sd"]
    print(f"\nCentre and between-task scale (shifts against {ref_model} at {ref_scale:g}):")
    print(head[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    moved = result.largest_shifts(5)
    if len(moved):
        print("\nTasks that move most (shift in reference posterior sds):")
        print(
            moved[["model", "global_scale", "task", "coef", "mean", "shift_sd"]].to_string(
                index=False, float_format=lambda x: f"{x:.3f}"
            )
        )
    d = result.diagnostics
    bad = d[d["problems"] != ""]
    if len(bad):
        print(f"\nSampling problems in {len(bad)} of {len(d)} fits (see report.md):")
        for row in bad.itertuples(index=False):
            print(f"  {row.model} at {row.global_scale:g}: {row.problems}")
    ps = result.power_scaling
    if len(ps):
        flagged = ps[ps["diagnosis"] != "ok"]
        print(
            f"\nPower scaling: {len(flagged)} of {len(ps)} (fit, quantity) rows flagged "
            "(power_scaling.csv)."
        )
