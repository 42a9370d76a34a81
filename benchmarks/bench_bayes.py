"""Bayesian fusion: nutpie against PyMC's sampler, and effective samples per second.

Two tables (issue 5):

1. ``samplers``: wall time of ``fit_bayes`` sampling (compilation included) and of the draw loop
   alone, for the default model with each NUTS backend, on eight schools, a STAR-sized K = 78
   and K = 500 (p = 1). It chose ``sampler="auto"`` (nutpie when installed).
2. ``ess``: bulk ESS per second of beta and of tau for the default model (marginalised
   task-level horseshoe, ``fit_bayes`` defaults) against a plain hand-written non-centred
   horseshoe with the same priors, sampled with ``pm.sample`` at PyMC's defaults (target_accept
   0.8) by each backend, at K = 50 and K = 500. Target: a ratio of at least 3.

Both report medians over repetitions (seeds: 3 in the first table, 2 at K = 50 and 1 at K = 500
in the second). The machine is shared: timings are noisy.

Run: ``.venv/bin/python benchmarks/run.py --only bayes [--quick]``; last output in
``benchmarks/results/bayes.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import arviz_stats as azs
import numpy as np
import pymc as pm

from latefusion import SummarySet, TaskSummary
from latefusion.bayes import coef_scales, fit_bayes, nutpie_available
from latefusion.warnings import ConvergenceWarning

EIGHT_SCHOOLS = (
    [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
)


def eight_schools() -> SummarySet:
    y, se = EIGHT_SCHOOLS
    return SummarySet(
        [
            TaskSummary(f"school_{c}", "ate", ("effect",), [y[k]], [[se[k] ** 2]], 30)
            for k, c in enumerate("ABCDEFGH")
        ]
    )


def sparse_tasks(K: int, seed: int) -> SummarySet:
    """K tasks, p = 1: most near the centre 1 (sd 0.2), a tenth shifted by 3; se in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    se = rng.uniform(0.5, 1.5, K)
    theta = 1.0 + 0.2 * rng.standard_normal(K) + 3.0 * (rng.random(K) < 0.1)
    y = theta + se * rng.standard_normal(K)
    return SummarySet(
        [
            TaskSummary(f"task{k:03d}", "ate", ("effect",), [y[k]], [[se[k] ** 2]], 200)
            for k in range(K)
        ]
    )


def plain_noncentered(summaries: SummarySet) -> pm.Model:
    """The horseshoe as one would write it by hand: non-centred, the same priors as the default."""
    theta_hat, V, _ = summaries.arrays()
    s = float(coef_scales(V)[0])
    K = theta_hat.shape[0]
    with pm.Model() as model:
        beta = pm.Normal("beta", 0.0, 10.0 * s)
        tau = pm.HalfCauchy("tau", 1.0)
        lam = pm.HalfCauchy("lam", 1.0, shape=K)
        z = pm.Normal("z", 0.0, 1.0, shape=K)
        theta = beta + tau * lam * s * z
        pm.Normal("y", theta, np.sqrt(V[:, 0, 0]), observed=theta_hat[:, 0])
    return model


def run_default(summaries: SummarySet, sampler: str, seed: int) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = fit_bayes(summaries, sampler=sampler, seed=seed)
    total = time.perf_counter() - start
    d = fit.diagnostics
    post = fit.datatree.posterior
    return {
        "sampler": d["sampler"],
        "fit_s": total,
        "sample_s": d["sampling_seconds"],
        "draw_s": d["draw_seconds"],
        "divergences": d["divergences_first_run"],
        "retried": d["retried"],
        "ess_beta": float(azs.ess(post["beta"], method="bulk").min()),
        "ess_tau": float(azs.ess(post["tau"], method="bulk")),
    }


def run_plain(summaries: SummarySet, sampler: str, seed: int) -> dict:
    model = plain_noncentered(summaries)
    start = time.perf_counter()
    cores = 1 if sampler == "pymc" else None  # no fork (see fit_bayes, Notes)
    dt = pm.sample(
        model=model,
        nuts_sampler=sampler,
        chains=4,
        cores=cores,
        random_seed=seed,
        progressbar=False,
        compute_convergence_checks=False,
    )
    total = time.perf_counter() - start
    return {
        "sampler": sampler,
        "fit_s": total,
        "sample_s": total,
        "draw_s": float(dt.posterior.attrs.get("sampling_time", np.nan)),
        "divergences": int(dt.sample_stats["diverging"].sum()),
        "retried": False,
        "ess_beta": float(azs.ess(dt.posterior["beta"], method="bulk")),
        "ess_tau": float(azs.ess(dt.posterior["tau"], method="bulk")),
    }


def median_row(runs: list[dict]) -> dict:
    keys = ("fit_s", "sample_s", "draw_s", "ess_beta", "ess_tau")
    row = {k: float(np.median([r[k] for r in runs])) for k in keys}
    row["divergences"] = [r["divergences"] for r in runs]
    row["first_call_sample_s"] = runs[0]["sample_s"]
    for q in ("beta", "tau"):
        row[f"ess_{q}_per_s"] = float(np.median([r[f"ess_{q}"] / r["sample_s"] for r in runs]))
        row[f"ess_{q}_per_draw_s"] = float(np.median([r[f"ess_{q}"] / r["draw_s"] for r in runs]))
    return row


def samplers_table(quick: bool) -> list[dict]:
    cases = {"eight schools": eight_schools(), "K=78 (STAR-sized)": sparse_tasks(78, seed=78)}
    if not quick:
        cases["K=500"] = sparse_tasks(500, seed=500)
    backends = ["pymc", "nutpie"] if nutpie_available() else ["pymc"]
    reps = 1 if quick else 3
    rows = []
    print(f"{'case':<18} {'sampler':<7} {'sample s':>9} {'draw s':>7} {'1st call s':>10} "
          f"{'divergences':>12}")  # fmt: skip
    for name, summaries in cases.items():
        for backend in backends:
            runs = [run_default(summaries, backend, seed) for seed in range(reps)]
            row = {"case": name, "K": len(summaries.usable()), **median_row(runs)}
            row["sampler"] = backend
            rows.append(row)
            print(f"{name:<18} {backend:<7} {row['sample_s']:>9.1f} {row['draw_s']:>7.2f} "
                  f"{row['first_call_sample_s']:>10.1f} {row['divergences']!s:>12}")  # fmt: skip
    return rows


def ess_table(quick: bool, sizes: list[int] | None = None) -> list[dict]:
    sizes = sizes or ([50] if quick else [50, 500])
    backends = ["pymc", "nutpie"] if nutpie_available() else ["pymc"]
    rows = []
    print(f"{'K':>4} {'model':<22} {'sample s':>9} {'draw s':>7} {'ESS beta/s':>11} "
          f"{'ESS tau/s':>10} {'(draw only)':>12} {'div':>8}")  # fmt: skip
    for K in sizes:
        reps = 1 if quick or K > 50 else 2  # the plain model with PyMC at K = 500 takes minutes
        summaries = sparse_tasks(K, seed=K)
        default = median_row([run_default(summaries, "auto", seed) for seed in range(reps)])
        candidates = {"default (fit_bayes)": default}
        for backend in backends:
            runs = [run_plain(summaries, backend, seed) for seed in range(reps)]
            candidates[f"plain NCP ({backend})"] = median_row(runs)
        for label, row in candidates.items():
            rows.append({"K": K, "model": label, **row})
            print(f"{K:>4} {label:<22} {row['sample_s']:>9.1f} {row['draw_s']:>7.2f} "
                  f"{row['ess_beta_per_s']:>11.1f} {row['ess_tau_per_s']:>10.1f} "
                  f"{row['ess_tau_per_draw_s']:>12.1f} {sum(row['divergences']):>8}")  # fmt: skip
        for backend in backends:
            base = candidates[f"plain NCP ({backend})"]
            ratio = {q: default[f"ess_{q}_per_s"] / base[f"ess_{q}_per_s"] for q in ("beta", "tau")}
            rows.append({"K": K, "ratio_vs": f"plain NCP ({backend})", **ratio})
            print(f"{K:>4} ratio default / plain NCP ({backend}): beta {ratio['beta']:.1f}, "
                  f"tau {ratio['tau']:.1f} (target >= 3)")  # fmt: skip
    return rows


def main(quick: bool = False) -> dict:
    """Print both tables and return their figures."""
    logging.getLogger("pymc").setLevel(logging.WARNING)
    print("-- NUTS backends, default model (4 chains x 1000 tune + 1000 draws)")
    samplers = samplers_table(quick)
    print("\n-- ESS per second: default model against a plain non-centred horseshoe")
    ess = ess_table(quick)
    return {"benchmark": "bayes", "samplers": samplers, "ess": ess}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    res = main(a.quick)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
