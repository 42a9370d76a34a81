"""A stand-in for ``pm.sample`` shared by the compare and sensitivity tests.

It returns prior draws shaped as a posterior, with the observed data as ``pm.sample`` stores
them (so every group that ``fit_bayes`` derives has its real structure) and no divergences;
2 x 400 independent draws give effective sample sizes near 800, above the convergence
warning's threshold of 400.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import xarray as xr

from latefusion import SummarySet, TaskSummary

#: Sampling options for mocked fits.
MOCK = {"draws": 400, "tune": 10, "chains": 2, "seed": 3}


class FakeSampler:
    """Call-compatible with ``pm.sample``; records the calls.

    ``divergences`` gives the number of divergent draws of the first, second, ... call (the
    last entry repeats), to exercise the retry and the warnings.
    """

    def __init__(self, divergences: tuple[int, ...] = (0,)) -> None:
        self.divergences = list(divergences)
        self.calls: list[dict] = []

    def __call__(self, draws=1000, *, tune=None, chains=None, model=None, **kwargs) -> xr.DataTree:
        self.calls.append(
            {"draws": draws, "tune": tune, "chains": chains, "model": model, **kwargs}
        )
        n_div = self.divergences[min(len(self.calls), len(self.divergences)) - 1]
        seed = kwargs["random_seed"]
        prior = pm.sample_prior_predictive(
            draws=draws * chains,
            model=model,
            random_seed=seed,
            compile_kwargs={"mode": "FAST_COMPILE"},
        ).prior.to_dataset()
        posterior = xr.Dataset(
            {name: _as_chains(da, chains, draws) for name, da in prior.data_vars.items()}
        )
        rng = np.random.default_rng(seed)
        diverging = np.zeros(chains * draws, dtype=bool)
        diverging[rng.choice(chains * draws, size=n_div, replace=False)] = True
        stats = xr.Dataset(
            {
                "diverging": (("chain", "draw"), diverging.reshape(chains, draws)),
                "energy": (("chain", "draw"), rng.normal(size=(chains, draws))),
            },
            coords={"chain": np.arange(chains), "draw": np.arange(draws)},
        )
        observed = xr.Dataset(
            {
                rv.name: (model.named_vars_to_dims[rv.name], model.rvs_to_values[rv].data)
                for rv in model.observed_RVs
            },
            coords={d: list(v) for d, v in model.coords.items()},
        )
        return xr.DataTree.from_dict(
            {"posterior": posterior, "sample_stats": stats, "observed_data": observed}
        )


def _as_chains(da: xr.DataArray, chains: int, draws: int) -> xr.DataArray:
    da = da.isel(chain=0, drop=True).drop_vars("draw")
    values = da.values.reshape(chains, draws, *da.shape[1:])
    coords = {d: da.coords[d] for d in da.dims[1:] if d in da.coords}
    coords |= {"chain": np.arange(chains), "draw": np.arange(draws)}
    return xr.DataArray(values, dims=("chain", "draw", *da.dims[1:]), coords=coords)


def make_summaries(rng: np.random.Generator, K: int, p: int, excluded: int = 0) -> SummarySet:
    """K tasks around beta = (1, ..., 2), standard errors between 0.5 and 1.5."""
    names = ("effect",) if p == 1 else ("intercept", *(f"z{j}" for j in range(1, p)))
    beta = np.linspace(1.0, 2.0, p)
    tasks = []
    for k in range(K):
        se = rng.uniform(0.5, 1.5, size=p)
        V = (np.full((p, p), 0.3) + 0.7 * np.eye(p)) * np.outer(se, se)
        theta_hat = rng.multivariate_normal(beta + 0.5 * rng.normal(size=p), V)
        tasks.append(TaskSummary(f"site{k:02d}", "cate", names, theta_hat, V, 200))
    for k in range(excluded):
        tasks.append(TaskSummary.excluded(f"gone{k}", "cate", names, 15, "one arm is empty"))
    return SummarySet(tasks)
