"""Divergence checks of the default Bayesian fusion model (issue 5).

(a) STAR: the 78 school summaries of ``latefusion demo`` (Project STAR, kindergarten reading +
    math, small class against regular), fitted with ``fit_bayes`` at its defaults for 5 seeds;
    zero divergences required. Beside it a plain hand-written non-centred horseshoe with the same
    priors, sampled by ``pm.sample`` at target_accept 0.8 (PyMC's default) and 0.95, with each
    backend, 2 seeds each: it diverges.
(b) Simulation: ``latefusion.simulation`` design with K = 50 tasks, p = 3 coefficients, sizes
    from 100 to 400 rows (n_ratio 4, so V_k = 4 / n_k I differ), a tenth of the tasks outliers,
    heterogeneity eta = 0 and 0.3; 20 seeds each at ``fit_bayes`` defaults. Required: zero
    divergences in at least 19 of 20 seeds.

Run: ``.venv/bin/python benchmarks/bayes_divergences.py [--star PATH] [--json OUT]``; without
``--star`` the STAR summaries are made by ``latefusion demo --no-bayes`` in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pymc as pm

from latefusion import SummarySet
from latefusion.bayes import fit_bayes, nutpie_available
from latefusion.simulation import Design, draw_summaries
from latefusion.warnings import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bayes import plain_noncentered


def star_summaries(path: str | None) -> SummarySet:
    if path is not None:
        return SummarySet.read_json(path)
    out = Path(tempfile.mkdtemp(prefix="star_")) / "demo"
    cli = Path(sys.executable).parent / "latefusion"
    subprocess.run([str(cli), "demo", "--no-bayes", "--out", str(out)], check=True)
    return SummarySet.read_json(out / "summaries.json")


def fit_default(summaries: SummarySet, seed: int) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fit = fit_bayes(summaries, seed=seed)
    d = fit.diagnostics
    return {
        "seed": seed,
        "sampler": d["sampler"],
        "divergences_first_run": d["divergences_first_run"],
        "divergences": d["divergences"],
        "retried": d["retried"],
        "max_rhat": d["max_rhat"],
        "min_ess_bulk": d["min_ess_bulk"],
        "warned": bool(caught),
        "seconds": time.perf_counter() - start,
    }


def fit_plain(summaries: SummarySet, sampler: str, target_accept: float, seed: int) -> dict:
    start = time.perf_counter()
    dt = pm.sample(
        model=plain_noncentered(summaries),
        nuts_sampler=sampler,
        cores=1 if sampler == "pymc" else None,
        target_accept=target_accept,
        random_seed=seed,
        progressbar=False,
        compute_convergence_checks=False,
    )
    return {
        "sampler": sampler,
        "target_accept": target_accept,
        "seed": seed,
        "divergences": int(dt.sample_stats["diverging"].sum()),
        "seconds": time.perf_counter() - start,
    }


def star(path: str | None) -> dict:
    summaries = star_summaries(path)
    K = len(summaries.usable())
    print(f"(a) STAR, K = {K} schools, p = {len(summaries.coef_names)}")
    default = [fit_default(summaries, seed) for seed in range(5)]
    for r in default:
        print(f"  default model ({r['sampler']}), seed {r['seed']}: divergences "
              f"{r['divergences_first_run']} (first run), retried {r['retried']}, "
              f"R-hat {r['max_rhat']:.3f}, bulk ESS {r['min_ess_bulk']:.0f}, "
              f"{r['seconds']:.0f} s")  # fmt: skip
    backends = ["pymc", "nutpie"] if nutpie_available() else ["pymc"]
    plain = [
        fit_plain(summaries, backend, accept, seed)
        for backend in backends
        for accept in (0.8, 0.95)
        for seed in range(2)
    ]
    for r in plain:
        print(f"  plain non-centred ({r['sampler']}, target_accept {r['target_accept']}), "
              f"seed {r['seed']}: divergences {r['divergences']}")  # fmt: skip
    return {
        "K": K,
        "default": default,
        "plain_noncentered": plain,
        "default_zero_divergences": all(r["divergences_first_run"] == 0 for r in default),
        "plain_diverges": all(r["divergences"] > 0 for r in plain),
    }


def simulation(etas: tuple[float, ...], n_seeds: int) -> dict:
    out = {}
    for eta in etas:
        runs = []
        for seed in range(n_seeds):
            design = Design(
                n_tasks=50, p=3, n=200, n_ratio=4.0, eta=eta, outlier_share=0.1, seed=seed
            )
            summaries, _ = draw_summaries(design, seed=seed)
            runs.append(fit_default(summaries, seed))
        clean = sum(r["divergences_first_run"] == 0 for r in runs)
        clean_final = sum(r["divergences"] == 0 for r in runs)
        print(f"(b) K = 50, p = 3, eta = {eta}: zero divergences in {clean} of {n_seeds} seeds "
              f"(first run), {clean_final} of {n_seeds} after the retry; divergences per seed "
              f"{[r['divergences_first_run'] for r in runs]}; median "
              f"{np.median([r['seconds'] for r in runs]):.0f} s per fit")  # fmt: skip
        out[f"eta={eta}"] = {
            "runs": runs,
            "seeds_without_divergences": clean,
            "seeds_without_divergences_after_retry": clean_final,
            "passed": clean >= n_seeds - 1,
        }
    return out


def main(star_path: str | None = None, n_seeds: int = 20) -> dict:
    logging.getLogger("pymc").setLevel(logging.WARNING)
    return {
        "benchmark": "bayes_divergences",
        "star": star(star_path),
        "simulation": simulation((0.0, 0.3), n_seeds),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--star", help="summaries.json of `latefusion demo` (default: make it)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args()
    res = main(a.star, a.seeds)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
