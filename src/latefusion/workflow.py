"""Fusion of task summaries by every method, and the files a run writes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latefusion._outdir import write_outputs
from latefusion._version import __version__
from latefusion.fusion import adaptive, fixed_effect, itl, random_effects
from latefusion.report import estimates_table, forest_plot, status_table
from latefusion.results import FusionResult
from latefusion.summaries import SummarySet

__all__ = ["OUTPUT_FILES", "FusionRun", "fuse_summaries"]

log = logging.getLogger(__name__)

#: The files a run writes into its output directory (a public interface).
OUTPUT_FILES = (
    "summaries.json",
    "estimates.csv",
    "heterogeneity.csv",
    "posterior.nc",
    "forest.png",
    "report.md",
)

#: Columns of ``heterogeneity.csv`` (a public interface: extend, never rename).
HETEROGENEITY_COLUMNS = [
    "coef", "method", "tau2", "tau2_lower", "tau2_upper", "Q", "Q_pvalue", "I2", "note",
]  # fmt: skip


@dataclass
class FusionRun:
    """Every method's fusion of one set of summaries.

    Attributes
    ----------
    summaries : SummarySet
    results : list of FusionResult
        In the order ITL, fixed effect, adaptive, Bayesian.
    bayes : latefusion.bayes.BayesFit or None
    settings : dict
        What was run (fusion and sampling settings, timings).
    """

    summaries: SummarySet
    results: list[FusionResult]
    bayes: Any = None
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """The tidy table of every method (columns of ``estimates.csv``)."""
        return estimates_table(self.results)

    def result(self, method: str) -> FusionResult:
        """The result of one method by name (``"adaptive"``, ``"bayes_horseshoe"``, ...)."""
        for r in self.results:
            if r.method == method:
                return r
        raise KeyError(f"no method {method!r}; this run has {[r.method for r in self.results]}")

    def fused_tasks(self) -> pd.Series:
        """Whether the adaptive fit fused each usable task exactly with the centre (by task)."""
        fused = self.result("adaptive").info["fused"]
        return pd.Series(fused, index=[s.task for s in self.summaries.usable()], name="fused")

    def heterogeneity(self) -> pd.DataFrame:
        """Between-task heterogeneity per coefficient and random-effects method.

        Columns :data:`HETEROGENEITY_COLUMNS`: tau^2 (clipped at 0) with its Q-profile
        confidence interval, Cochran's Q and its p-value, I^2 (in percent), and a note where a
        quantity is not estimable.
        """
        rows = []
        for r in self.results:
            for h in r.info.get("heterogeneity", []):
                row = {"method": r.method, **h}
                note = r.info.get("heterogeneity_note", "")
                row["note"] = note
                rows.append(row)
        return pd.DataFrame(rows).reindex(columns=HETEROGENEITY_COLUMNS)

    def pooled(self) -> pd.DataFrame:
        """The pooled (centre) rows only."""
        t = self.table()
        return t[t["level"] == "pooled"].drop(columns=["level", "task"]).reset_index(drop=True)

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the outputs (:data:`OUTPUT_FILES`) into ``out_dir`` (created if needed).

        Every file is written to a staging directory first and moved into place only when all
        of them are complete, so an error never leaves a half-written output; an earlier run's
        file that this run does not make (``posterior.nc`` after ``--no-bayes``) is removed.
        """
        return write_outputs(out_dir, OUTPUT_FILES, self._write_all)

    def _write_all(self, d: Path) -> None:
        import matplotlib.pyplot as plt

        self.summaries.to_json(d / "summaries.json")
        table = self.table()
        table.to_csv(d / "estimates.csv", index=False, float_format="%.15g")
        self.heterogeneity().to_csv(d / "heterogeneity.csv", index=False, float_format="%.15g")
        if self.bayes is not None:
            self.bayes.datatree.to_netcdf(d / "posterior.nc", engine="h5netcdf")
        fig = forest_plot(table)
        fig.savefig(d / "forest.png", dpi=110)
        plt.close(fig)
        (d / "report.md").write_text(self.markdown(), encoding="utf-8")

    def markdown(self) -> str:
        """The report: what was run, its settings, per-task status and the estimates."""
        s = self.summaries
        status = status_table(s)
        n_ok, n_all = len(s.usable()), len(s)
        lines = [
            "# latefusion report",
            "",
            f"latefusion {__version__}. {n_all} tasks, {n_ok} used in fusion"
            + (f", {n_all - n_ok} excluded (reasons below)." if n_ok < n_all else "."),
            f"Estimand: `{s.estimand}`; coefficients: {', '.join(s.coef_names)}.",
            "",
            "## Settings",
            "",
            "```",
            *_settings_lines({"per-task estimation": s.meta, "fusion": self.settings}),
            "```",
            "",
            "## Pooled estimates",
            "",
            _md(self.pooled(), index=False, floatfmt=".4g"),
            "",
            "## Heterogeneity between tasks",
            "",
            _md(self.heterogeneity(), index=False, floatfmt=".4g"),
            "",
        ]
        if n_ok == 1:
            lines += [
                "Only one task is usable: every method returns its own estimate, and nothing "
                "about heterogeneity between tasks can be estimated.",
                "",
            ]
        if "bayes_skipped" in self.settings:
            lines += [f"Bayesian model not fitted: {self.settings['bayes_skipped']}.", ""]
        adaptive_res = next((r for r in self.results if r.method == "adaptive"), None)
        if adaptive_res is not None:
            fused = adaptive_res.info.get("fused", [])
            C = adaptive_res.info.get("C")
            lines += [
                "## Adaptive aggregation",
                "",
                f"C = {C:.4g} ({adaptive_res.info.get('C_rule', '')}); {sum(fused)} of "
                f"{len(fused)} tasks fused exactly with the centre; the others keep their own "
                "estimate, moved towards the centre by about C of their standard errors.",
                "",
            ]
        if self.bayes is not None:
            dg = self.bayes.diagnostics
            lines += [
                f"## Bayesian model `{self.bayes.spec.name}`",
                "",
                self.bayes.spec.description.strip(),
                "",
                "| divergences | max R-hat | min bulk ESS | min tail ESS | min E-BFMI | "
                "target_accept | retried |",
                "|---|---|---|---|---|---|---|",
                f"| {dg.get('divergences')} | {dg.get('max_rhat', float('nan')):.3f} | "
                f"{dg.get('min_ess_bulk', float('nan')):.0f} | "
                f"{dg.get('min_ess_tail', float('nan')):.0f} | "
                f"{dg.get('min_bfmi', float('nan')):.2f} | {dg.get('target_accept')} | "
                f"{dg.get('retried')} |",
                "",
            ]
            if dg.get("problems"):
                lines += ["**Sampling problems:** " + "; ".join(dg["problems"]), ""]
        lines += [
            "## Tasks",
            "",
            _md(status, index=False, floatfmt=".3g"),
            "",
            "## All estimates",
            "",
            "Rows as in `estimates.csv`; intervals are 95%.",
            "",
            _md(self.table(), index=False, floatfmt=".4g"),
            "",
        ]
        return "\n".join(lines)


def fuse_summaries(
    summaries: SummarySet,
    C: float | str = "sure_1se",
    bayes_model: Any = "horseshoe",
    bayes: bool = True,
    bayes_options: Mapping[str, Any] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    knapp_hartung: bool = False,
) -> FusionRun:
    """Fuse summaries by every method: ITL, fixed effect, random effects (DerSimonian-Laird and
    REML), adaptive aggregation and the Bayesian model.

    Parameters
    ----------
    summaries : SummarySet
        Excluded tasks are carried along (and reported) but not fused.
    C : float or str, default="sure_1se"
        Constant of the adaptive aggregator (see :func:`latefusion.fusion.adaptive`).
    bayes_model : str, path or ModelSpec, default="horseshoe"
        A catalogue name or a spec file.
    bayes : bool, default=True
        Fit the Bayesian model (the slowest step).
    bayes_options : dict, optional
        Passed to :func:`latefusion.bayes.fit_bayes` (draws, tune, chains, target_accept, ...).
    n_boot : int, default=200
        Parametric bootstrap draws for the adaptive estimator's uncertainty.
    seed : int, default=0
    knapp_hartung : bool, default=False
        Random-effects intervals of the centre and the new task with the Knapp-Hartung
        adjustment (t with K - 1 degrees of freedom, scaled variance) instead of normal ones.
    """
    if not isinstance(summaries, SummarySet):
        raise TypeError(
            f"summaries must be a SummarySet (estimate_tasks, SummarySet.read_json), got "
            f"{type(summaries).__name__}"
        )
    started = time.perf_counter()
    results = [
        itl(summaries),
        fixed_effect(summaries),
        random_effects(summaries, method="DL", knapp_hartung=knapp_hartung),
        random_effects(summaries, method="REML", knapp_hartung=knapp_hartung),
        adaptive(summaries, C=C, n_boot=n_boot, seed=seed),
    ]
    settings: dict[str, Any] = {"C": C, "n_boot": n_boot, "seed": seed}
    if knapp_hartung:
        settings["knapp_hartung"] = True
    fit = None
    if bayes and len(summaries.usable()) < 2:
        settings["bayes_skipped"] = "one usable task, nothing to fuse"
    elif bayes:
        from latefusion.bayes import fit_bayes

        options = {"seed": seed, **(bayes_options or {})}
        fit = fit_bayes(summaries, model=bayes_model, **options)
        results.append(fit.result)
        # The sampler that ran ("auto" resolves to nutpie or PyMC): draws differ between them.
        used = fit.diagnostics.get("sampler")
        settings["bayes"] = {"model": fit.spec.name, **_plain(options), "sampler": used}
    settings["seconds"] = round(time.perf_counter() - started, 2)
    _check_finite(results)
    return FusionRun(summaries, results, fit, settings)


def _check_finite(results: list[FusionResult]) -> None:
    """Never pass on a silent NaN: a method that produced one is an error naming it."""
    for r in results:
        t = r.table()
        # std_error is NaN by request when the adaptive bootstrap is switched off (n_boot=0)
        cols = ["estimate", "std_error"] if r.info.get("n_boot", 1) else ["estimate"]
        bad = t[~np.isfinite(t[cols]).all(axis=1)]
        if len(bad):
            where = sorted({f"{row.level} {row.task}".strip() for row in bad.itertuples()})
            raise ValueError(
                f"{r.method} produced non-finite estimates for {where[:5]}; the summaries' "
                "scales may be outside what it handles (rescale the outcome)"
            )


def _md(table: pd.DataFrame, **kwargs: Any) -> str:
    """A markdown table whose text cells cannot break its rows (newlines, pipes in names)."""
    text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    clean = table.copy()
    for col in text:
        clean[col] = clean[col].map(
            lambda v: (
                v.replace("\r", " ").replace("\n", " ").replace("|", "\\|")
                if isinstance(v, str)
                else v
            )
        )
    return clean.to_markdown(**kwargs)


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, int | float | str | bool | None) else repr(v) for k, v in d.items()
    }


def _settings_lines(d: Mapping[str, Any], indent: str = "") -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            lines.append(f"{indent}{k}:")
            lines += _settings_lines(v, indent + "  ")
        else:
            lines.append(f"{indent}{k}: {v}")
    return lines
