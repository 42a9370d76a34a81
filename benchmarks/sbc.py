"""Simulation-based calibration of the default Bayesian fusion model (issue 5).

K = 5 tasks with p = 1 and standard errors 0.5, 0.8, 1.0, 1.2, 1.5; parameters drawn from the
prior of the default model (task-level horseshoe, marginalised), summaries simulated from them,
each replication fitted by ``fit_bayes`` (2 chains x 200 draws after 300 tuning steps, thinned
to L = 99 draws), ranks of beta, tau and theta of task 0 among the draws. Calibrated ranks are
uniform on 0..99: a chi-square test over 10 bins per quantity (5 bins below 100 replications),
at the 1% level after a Bonferroni correction over the 3 quantities (p > 0.0033 passes).

Run: ``.venv/bin/python benchmarks/sbc.py [--reps 100] [--json benchmarks/results/sbc.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from latefusion.bayes.sbc import simulation_based_calibration

SE = np.array([0.5, 0.8, 1.0, 1.2, 1.5])
LEVEL = 0.01


def main(reps: int = 100, seed: int = 2024) -> dict:
    logging.getLogger("pymc").setLevel(logging.WARNING)
    V = SE[:, None, None] ** 2
    result = simulation_based_calibration(V, "horseshoe", n_reps=reps, seed=seed)
    bins = 10 if reps >= 100 else 5  # at least about 8 expected ranks per bin
    table = result.uniformity(bins=bins)
    threshold = LEVEL / len(table)
    print(f"SBC, default model, K = 5, p = 1: {reps} replications, L = {result.n_draws}, "
          f"{result.seconds:.0f} s ({result.seconds / reps:.1f} s per fit)")  # fmt: skip
    print(f"{'quantity':<22} {'chi2':>7} {'p':>7}  bin counts (expected {reps / bins:.0f} each)")
    for name, row in table.iterrows():
        print(f"{name:<22} {row['chi2']:>7.2f} {row['p_value']:>7.3f}  {row['counts']}")
    passed = bool((table["p_value"] > threshold).all())
    print(f"uniform at the {LEVEL:.0%} level (Bonferroni, p > {threshold:.4f}): {passed}")
    print(f"fits with divergences left after the retry: {int(np.sum(result.divergences > 0))}")
    return {
        "benchmark": "sbc",
        "design": dict(
            K=5,
            p=1,
            se=SE.tolist(),
            model="horseshoe",
            draws=200,
            tune=300,
            chains=2,
            L=result.n_draws,
            seed=seed,
        ),
        "replications": reps,
        "seconds": result.seconds,
        "seconds_per_fit": result.seconds / reps,
        "bins": bins,
        "uniformity": {
            name: {"chi2": row["chi2"], "p_value": row["p_value"], "counts": row["counts"]}
            for name, row in table.iterrows()
        },
        "bonferroni_threshold": threshold,
        "passed": passed,
        "fits_with_divergences": int(np.sum(result.divergences > 0)),
        "ranks": result.ranks.to_dict(orient="list"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    res = main(a.reps)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2, default=int)
    sys.exit(0 if res["passed"] else 1)
