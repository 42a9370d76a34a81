"""argparse value types shared by the command-line entry points."""

from __future__ import annotations

import argparse

__all__ = ["add_sampling_options", "jobs", "non_negative_int", "positive_int", "probability"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, tuning steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def add_sampling_options(
    group: argparse._ArgumentGroup | argparse.ArgumentParser, draws: int, tune: int, chains: int
) -> None:
    """``--draws``, ``--tune``, ``--chains`` and ``--sampler`` with the command's defaults."""
    group.add_argument(
        "--draws", type=positive_int, default=draws, help=f"draws per chain (default {draws})"
    )
    group.add_argument(
        "--tune",
        type=non_negative_int,
        default=tune,
        help=f"tuning steps per chain (default {tune})",
    )
    group.add_argument(
        "--chains", type=positive_int, default=chains, help=f"MCMC chains (default {chains})"
    )
    group.add_argument(
        "--sampler",
        choices=["auto", "pymc", "nutpie"],
        default="auto",
        help="NUTS implementation: 'auto' (default) is nutpie when it is installed (the 'fast' "
        "and 'dev' extras), else PyMC's; the two give different draws from the same seed",
    )


def jobs(text: str) -> int:
    """A number of worker processes: positive, or negative as joblib counts (-1: every core)."""
    value = int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a number of processes, or -1 for every core")
    return value
