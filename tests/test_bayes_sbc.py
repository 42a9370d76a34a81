"""Simulation-based calibration: the NumPy prior against PyMC's, the rank test, a small SBC run.

The full run (100 replications) is ``benchmarks/sbc.py``; its output is committed in
``benchmarks/results/sbc.txt``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from latefusion import SummarySet, TaskSummary
from latefusion.bayes import load_spec, sample_prior
from latefusion.bayes.sbc import SBCResult, draw_prior, simulation_based_calibration
from latefusion.bayes.spec import DEVIATIONS

SE = np.array([0.5, 0.8, 1.0, 1.2, 1.5])


def tasks_with(V: np.ndarray) -> SummarySet:
    p = V.shape[1]
    coefs = ("effect",) if p == 1 else tuple(f"c{j}" for j in range(p))
    return SummarySet(
        [TaskSummary(f"task{k}", "ate", coefs, np.zeros(p), V[k], 100) for k in range(len(V))]
    )


@pytest.mark.parametrize("deviation", list(DEVIATIONS))
def test_numpy_prior_matches_pymc_prior(rng, deviation: str) -> None:
    """draw_prior states the prior apart from PyMC; both must give the same laws."""
    A = rng.normal(size=(4, 2, 2))
    V = A @ A.transpose(0, 2, 1) + 0.5 * np.eye(2)
    spec = load_spec("horseshoe").replace(name=deviation, deviation=deviation)
    n = 3000
    ours = [draw_prior(spec, V, rng) for _ in range(n)]
    pymc = sample_prior(tasks_with(V), spec, draws=n, seed=11)

    def pymc_values(group: str, name: str) -> np.ndarray:
        return pymc[group][name].values.reshape(n, -1)

    pairs = {
        "tau": (np.array([d["tau"] for d in ours]), pymc_values("prior", "tau")[:, 0]),
        "beta_1": (np.array([d["beta"][1] for d in ours]), pymc_values("prior", "beta")[:, 1]),
        "delta_2_0": (
            np.array([d["delta"][2, 0] for d in ours]),
            pymc_values("prior", "delta")[:, 4],
        ),
        "theta_hat_3_1": (
            np.array([d["theta_hat"][3, 1] for d in ours]),
            pymc_values("prior_predictive", "theta_hat")[:, 7],
        ),
    }
    for name, (a, b) in pairs.items():
        # Two-sample KS on 3000 + 3000 draws: p < 1e-4 would be a real difference in law
        # (a false alarm has probability 1e-4 per comparison, 2.4e-3 over this test).
        p_value = stats.ks_2samp(a, b).pvalue
        assert p_value > 1e-4, (deviation, name, p_value)


def test_uniformity_test_accepts_uniform_and_rejects_skewed_ranks(rng) -> None:
    L, n = 99, 400
    ranks = pd.DataFrame(
        {
            "uniform": rng.integers(0, L + 1, n),
            # An overdispersed posterior puts the truth near the middle of the draws.
            "too_wide": np.clip(np.round(rng.normal(50, 12, n)), 0, L).astype(int),
            "biased": rng.integers(0, 40, n),
        }
    )
    table = SBCResult(ranks, L, np.zeros(n, dtype=int), 0.0).uniformity(bins=10)

    assert [sum(c) for c in table["counts"]] == [n] * 3
    assert table.loc["uniform", "df"] == 9
    # p-values: a uniform sample fails at 1e-3 once in a thousand seeds; the skewed ones have
    # chi-square statistics in the hundreds.
    assert table.loc["uniform", "p_value"] > 1e-3
    assert table.loc["too_wide", "p_value"] < 1e-10
    assert table.loc["biased", "p_value"] < 1e-10


def test_sbc_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="fewer than n_draws"):
        simulation_based_calibration(SE[:, None, None] ** 2, n_reps=1, n_draws=99, draws=40)


@pytest.mark.slow
def test_small_sbc_of_the_default_model() -> None:
    """A smoke run of 8 replications: the whole pipeline, and no rank piled up at one end.

    It has no power against mild miscalibration; benchmarks/sbc.py runs 100 replications and
    tests uniformity.
    """
    L = 39
    result = simulation_based_calibration(
        SE[:, None, None] ** 2, n_reps=8, n_draws=L, draws=100, tune=200, seed=7
    )
    ranks = result.ranks
    assert list(ranks.columns) == ["beta[effect]", "theta[task0,effect]", "tau"]
    assert ranks.shape == (8, 3)
    assert np.all(result.divergences == 0)
    # Uniform ranks fall all in one half with probability 2 * 0.5**8 = 0.008 per quantity; a
    # sampler or conditioning bug (truth always in a tail of the posterior) does so every time.
    assert (ranks.min() < L / 2).all() and (ranks.max() > L / 2).all(), ranks
    assert ranks.to_numpy().min() >= 0 and ranks.to_numpy().max() <= L
