"""The fusion methods a simulation study compares, by name.

Every method takes a :class:`~latefusion.summaries.SummarySet` and returns per-task estimates
with 95% intervals. Names: ``itl``, ``fixed_effect``, ``random_effects`` (DerSimonian-Laird),
``random_effects_reml``, ``adaptive`` (the library's default C, ``"sure_1se"``),
``adaptive_sure`` (C minimising SURE), ``adaptive_theory`` (the theory C) and
``bayes_<model>`` for every model of the Bayesian catalogue (``bayes_horseshoe``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latefusion.results import FusionResult
from latefusion.summaries import SummarySet

__all__ = ["FREQUENTIST_METHODS", "MethodOutput", "available_methods", "run_method"]

FREQUENTIST_METHODS = (
    "itl",
    "fixed_effect",
    "random_effects",
    "random_effects_reml",
    "adaptive",
    "adaptive_sure",
    "adaptive_theory",
)


@dataclass(frozen=True)
class MethodOutput:
    """Per-task estimates of one method on one set of summaries.

    Attributes
    ----------
    estimate, std_error, lower, upper : ndarray of shape (K, p)
        In the order of ``summaries.task_names``; a method with a centre only (the fixed
        effect) gives every task the centre and its interval.
    info : dict
        By-products worth tabulating (``C``, ``divergences``, ...).
    """

    estimate: np.ndarray
    std_error: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)


def available_methods() -> list[str]:
    """Names of every method :func:`run_method` knows."""
    from latefusion.bayes import list_models

    return [*FREQUENTIST_METHODS, *(f"bayes_{m}" for m in list_models())]


def run_method(
    name: str,
    summaries: SummarySet,
    seed: int,
    n_boot: int = 200,
    bayes_options: Mapping[str, Any] | None = None,
) -> MethodOutput:
    """Fuse ``summaries`` by the method called ``name``.

    Parameters
    ----------
    name : str
        One of :func:`available_methods`.
    summaries : SummarySet
    seed : int
        Seeds the bootstrap of the adaptive estimator and the sampler.
    n_boot : int, default=200
        Bootstrap replicates of the adaptive estimator's intervals.
    bayes_options : dict, optional
        Passed to :func:`latefusion.bayes.fit_bayes` (draws, tune, chains, cores, ...).
    """
    from latefusion import fusion

    info: dict[str, Any] = {}
    if name == "itl":
        res = fusion.itl(summaries)
    elif name == "fixed_effect":
        res = fusion.fixed_effect(summaries)
    elif name == "random_effects":
        res = fusion.random_effects(summaries, method="DL")
    elif name == "random_effects_reml":
        res = fusion.random_effects(summaries, method="REML")
    elif name in ("adaptive", "adaptive_sure", "adaptive_theory"):
        C = {"adaptive": "sure_1se", "adaptive_sure": "sure", "adaptive_theory": "theory"}[name]
        res = fusion.adaptive(summaries, C=C, n_boot=n_boot, seed=seed)
        info = {"C": res.info["C"], "n_fused": int(np.sum(res.info["fused"]))}
    elif name.startswith("bayes_"):
        from latefusion.bayes import fit_bayes

        options = {"cores": 1, **(bayes_options or {}), "seed": seed}
        fit = fit_bayes(summaries, model=name.removeprefix("bayes_"), **options)
        res = fit.result
        info = {
            "divergences": int(fit.diagnostics["divergences"]),
            "max_rhat": float(fit.diagnostics["max_rhat"]),
        }
    else:
        raise ValueError(f"unknown method {name!r}; known: {available_methods()}")
    return _per_task(res, len(summaries.task_names), info)


def _per_task(res: FusionResult, K: int, info: dict[str, Any]) -> MethodOutput:
    part = res.theta if res.theta is not None else res.beta
    if part is None:
        raise ValueError(f"method {res.method} returned neither task estimates nor a centre")
    arrays = [np.asarray(getattr(part, f), dtype=float) for f in _FIELDS]
    if res.theta is None:
        arrays = [np.broadcast_to(a, (K, a.shape[-1])).copy() for a in arrays]
    return MethodOutput(*arrays, info=info)


_FIELDS = ("estimate", "std_error", "lower", "upper")
