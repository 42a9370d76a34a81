"""Simulation studies: methods over heterogeneity eta and repetitions (METHOD.md section 6).

:func:`run_study` runs a :class:`~latefusion.simulation.designs.Design` at every eta of a list,
``n_reps`` times, and fuses each repetition's task summaries by every method. Each finished
repetition is written at once to its own small file (``reps/eta=<eta>/rep=<r>.csv``) and is
skipped when the study is run again, so an interrupted study loses no finished repetition and
can also be extended with more repetitions or eta values. :func:`summarise` turns the
per-repetition, per-task errors into the table the paper reports, and :func:`plot_mse` draws it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latefusion._version import __version__
from latefusion.simulation.designs import Design, draw_summaries, generate
from latefusion.simulation.methods import FREQUENTIST_METHODS, available_methods, run_method
from latefusion.summaries import SummarySet, atomic_write_text

__all__ = [
    "ERROR_COLUMNS",
    "NUISANCE_MODES",
    "SUMMARY_COLUMNS",
    "StudyResult",
    "StudySettings",
    "plot_mse",
    "read_errors",
    "run_repetition",
    "run_study",
    "summarise",
]

log = logging.getLogger(__name__)

#: How the nuisance functions are learnt: each task alone, or with the rows of every task
#: (:func:`latefusion.dml.multitask.estimate_tasks_multitask`). ``"summaries"`` skips the rows.
NUISANCE_MODES = ("task", "multitask")

#: Columns of the per-repetition, per-task error files.
ERROR_COLUMNS = [
    "eta",
    "rep",
    "nuisance",
    "method",
    "task",
    "coef",
    "truth",
    "estimate",
    "std_error",
    "lower",
    "upper",
    "seconds",
    "fusion_seconds",
    "divergences",
    "n_warnings",
    "error",
]

#: Columns of ``summary.csv`` (the first seven are the public minimum).
SUMMARY_COLUMNS = [
    "eta",
    "method",
    "avg_mse",
    "max_mse",
    "coverage",
    "width",
    "seconds",
    "nuisance",
    "avg_mse_mcse",
    "avg_ratio_itl",
    "max_ratio_itl",
    "worst_task",
    "min_task_coverage",
    "n_reps",
    "n_failed",
    "n_missing",
    "divergences",
]

DEFAULT_METHODS = (
    "itl",
    "fixed_effect",
    "random_effects",
    "adaptive",
    "adaptive_theory",
    "bayes_horseshoe",
)

_STUDY_FILE = "study.json"


@dataclass(frozen=True)
class StudySettings:
    """What a study runs on each repetition.

    Parameters
    ----------
    methods : tuple of str
        Fusion methods (:func:`latefusion.simulation.methods.available_methods`).
    nuisance : tuple of {"task", "multitask"}, default=("task",)
        Nuisance learning variants; every method is run on the summaries of each.
    level : {"rows", "summaries"}, default="rows"
        ``"rows"``: generate rows and estimate each task by double machine learning (the
        paper's setup); ``"summaries"``: draw ``theta_hat_k ~ N(theta_k, V_k)`` directly
        (:func:`~latefusion.simulation.designs.draw_summaries`), for fast studies of fusion.
    model : {"irm", "plr"}, default="irm"
        Per-task DML model.
    learner : str, default="linear"
        Nuisance learner preset (:func:`latefusion.dml.learners.learner_preset`).
    ml_outcome, ml_treatment : scikit-learn estimators, optional
        Override the preset's learners (also the shared learners of multi-task nuisance
        learning); recorded in ``study.json`` by their repr.
    propensity : {"auto", "design", "estimate"}, default="auto"
        ``"auto"``: the design propensity (treated share) in randomised designs, estimated
        otherwise.
    n_folds : int, default=5
    n_boot : int, default=200
        Bootstrap replicates of the adaptive estimator.
    draws, tune, chains : int, default=500, 500, 2
        MCMC settings of the Bayesian methods (sampled in one process per repetition).
    sampler : {"auto", "pymc", "nutpie"}, default="auto"
        NUTS implementation (:func:`latefusion.bayes.fit_bayes`); pin it for a long study,
        since ``"auto"`` changes with what is installed.
    seed : int, default=0
        Seed of the study: repetition r uses the same rows at every eta (common random
        numbers), so differences between eta values are not blurred by different draws.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    nuisance: tuple[str, ...] = ("task",)
    level: str = "rows"
    model: str = "irm"
    learner: str = "linear"
    ml_outcome: Any = None
    ml_treatment: Any = None
    propensity: str = "auto"
    n_folds: int = 5
    n_boot: int = 200
    draws: int = 500
    tune: int = 500
    chains: int = 2
    sampler: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "nuisance", tuple(self.nuisance))
        # The Bayesian catalogue (and so PyMC) is consulted only when a Bayesian method is asked.
        known = list(FREQUENTIST_METHODS)
        if any(m.startswith("bayes_") for m in self.methods):
            known = available_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {known}")
        if not self.methods:
            raise ValueError("a study needs at least one method")
        bad = [m for m in self.nuisance if m not in NUISANCE_MODES]
        if bad or not self.nuisance:
            raise ValueError(f"nuisance must be a non-empty subset of {NUISANCE_MODES}")
        if self.level not in ("rows", "summaries"):
            raise ValueError(f"level must be 'rows' or 'summaries', got {self.level!r}")
        if self.propensity not in ("auto", "design", "estimate"):
            raise ValueError(f"propensity must be auto, design or estimate: {self.propensity!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("ml_outcome", "ml_treatment"):
            d[key] = None if d[key] is None else repr(d[key])
        d["methods"], d["nuisance"] = list(self.methods), list(self.nuisance)
        return d


@dataclass
class StudyResult:
    """What :func:`run_study` produced.

    Attributes
    ----------
    summary : DataFrame
        Columns :data:`SUMMARY_COLUMNS`, one row per (eta, nuisance, method).
    errors : DataFrame
        Columns :data:`ERROR_COLUMNS`, one row per (eta, rep, nuisance, method, task, coef).
    paths : dict of str to Path
        ``summary.csv``, ``errors.csv.gz``, ``mse.png`` (if plotted), ``study.json``.
    n_run, n_skipped : int
        Repetitions run now, and found finished from an earlier run.
    """

    summary: pd.DataFrame
    errors: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    n_run: int = 0
    n_skipped: int = 0


def run_study(
    design: Design,
    etas: Sequence[float],
    n_reps: int,
    out_dir: str | os.PathLike[str],
    settings: StudySettings | None = None,
    n_jobs: int = 1,
    progress: bool = False,
    plot: bool = True,
) -> StudyResult:
    """Run a design over eta values and repetitions; resumable.

    Parameters
    ----------
    design : Design
        Its ``eta`` is replaced by each value of ``etas``.
    etas : sequence of float
    n_reps : int
        Repetitions per eta (0 .. n_reps - 1; earlier repetitions found on disk are kept).
    out_dir : path
        Created if needed. Holds ``study.json`` (design and settings, checked on resume),
        ``reps/`` (one CSV per finished repetition), and the outputs.
    settings : StudySettings, optional
    n_jobs : int, default=1
        Repetitions in parallel (joblib processes; -1 for every core). Results do not
        depend on it.
    progress : bool, default=False
        A progress bar over repetitions (tqdm, on stderr).
    plot : bool, default=True
        Write ``mse.png``.

    Returns
    -------
    StudyResult

    Raises
    ------
    ValueError
        If ``out_dir`` holds a study with another design or other settings: mixing them would
        silently average different experiments.
    """
    settings = settings or StudySettings()
    etas = [float(e) for e in etas]
    if n_reps < 1 or not etas:
        raise ValueError("a study needs at least one eta and one repetition")
    out = Path(out_dir)
    (out / "reps").mkdir(parents=True, exist_ok=True)
    _check_or_write_config(out, design, settings)

    # Only the repetitions not yet on disk are run.
    # Repetition-major order: a study stopped early has every eta equally far along.
    todo = [(e, r) for r in range(n_reps) for e in etas if not _rep_path(out, e, r).exists()]
    n_skipped = len(etas) * n_reps - len(todo)
    if n_skipped:
        log.info("%d of %d repetitions already finished; skipped", n_skipped, len(etas) * n_reps)
    if todo:
        _run_pending(design, settings, out, todo, n_jobs, progress)

    # Outputs from every finished repetition of the requested grid.
    errors = read_errors(out, etas, n_reps)
    summary = summarise(errors)
    paths = {"study.json": out / _STUDY_FILE}
    paths["summary.csv"] = atomic_write_text(
        out / "summary.csv", summary.to_csv(index=False, float_format="%.6g")
    )
    errors_path = out / "errors.csv.gz"
    tmp = out / ".errors.csv.gz.tmp"
    errors.to_csv(tmp, index=False, float_format="%.8g", compression="gzip")
    os.replace(tmp, errors_path)
    paths["errors.csv.gz"] = errors_path
    if plot:
        import matplotlib.pyplot as plt

        fig = plot_mse(summary, title=_title(design, settings, n_reps))
        tmp_png = out / ".mse.png.tmp.png"
        fig.savefig(tmp_png, dpi=120)
        plt.close(fig)
        os.replace(tmp_png, out / "mse.png")
        paths["mse.png"] = out / "mse.png"
    return StudyResult(summary, errors, paths, n_run=len(todo), n_skipped=n_skipped)


def run_repetition(design: Design, eta: float, rep: int, settings: StudySettings) -> pd.DataFrame:
    """One repetition at one eta: data, per-task summaries, every method; the error rows.

    Warnings raised inside (clipped propensities, MCMC diagnostics) are counted in
    ``n_warnings`` and logged, not raised; a method that fails gets rows with NaN estimates
    and its error message, so one bad fit never stops a study.
    """
    d = design.with_eta(eta)
    row_seed = int(np.random.SeedSequence([settings.seed, 1, rep]).generate_state(1)[0])
    method_seed = int(np.random.SeedSequence([settings.seed, 2, rep]).generate_state(1)[0])
    bayes_options = {
        "draws": settings.draws,
        "tune": settings.tune,
        "chains": settings.chains,
        "sampler": settings.sampler,
    }
    frames = []

    # Step one: per-task summaries for each nuisance variant.
    if settings.level == "summaries":
        summaries, theta = draw_summaries(d, row_seed)
        variants = [("summaries", summaries, 0.0, 0)]
    else:
        sim = generate(d, row_seed)
        theta = sim.theta
        variants = []
        for mode in settings.nuisance:
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                summaries = _estimate(sim, mode, settings, row_seed)
            _log_warnings(caught, f"eta={eta:g} rep={rep} nuisance={mode}")
            variants.append((mode, summaries, time.perf_counter() - started, len(caught)))

    # Step two: every method on each variant's summaries.
    for mode, summaries, dml_seconds, dml_warnings in variants:
        for method in settings.methods:
            started = time.perf_counter()
            error, out = "", None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = run_method(method, summaries, method_seed, settings.n_boot, bayes_options)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("eta=%g rep=%d %s failed: %s", eta, rep, method, error)
            _log_warnings(caught, f"eta={eta:g} rep={rep} {method}")
            fusion_seconds = time.perf_counter() - started
            frames.append(
                _error_rows(
                    d,
                    theta,
                    summaries,
                    out,
                    eta=eta,
                    rep=rep,
                    nuisance=mode,
                    method=method,
                    seconds=fusion_seconds + dml_seconds,
                    fusion_seconds=fusion_seconds,
                    n_warnings=len(caught) + dml_warnings,
                    error=error,
                )
            )
    return pd.concat(frames, ignore_index=True)[ERROR_COLUMNS]


def summarise(errors: pd.DataFrame) -> pd.DataFrame:
    """The study table from per-repetition, per-task errors.

    For each (eta, nuisance, method): a task's MSE is the mean over repetitions of
    ``||theta_est_k - theta_k||^2`` (summed over coefficients); ``avg_mse`` and ``max_mse`` are
    its mean and maximum over tasks (``worst_task`` is the arg max); ``coverage`` and ``width``
    are the mean over tasks, coefficients and repetitions of the 95% intervals' coverage and
    width (``min_task_coverage``: the worst task's); ``seconds`` is the mean time per
    repetition of the method, including the per-task DML step it relied on. ``avg_mse_mcse``
    is the Monte Carlo standard error of ``avg_mse``; ``avg_ratio_itl`` and ``max_ratio_itl``
    divide by ITL's values at the same eta and nuisance variant (NaN without ITL).
    ``n_missing`` counts task estimates missing (tasks excluded by DML, failed methods).
    """
    if errors.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    e = errors.copy()
    e["sq"] = (e["estimate"] - e["truth"]) ** 2
    e["covered"] = ((e["lower"] <= e["truth"]) & (e["truth"] <= e["upper"])).astype(float)
    e.loc[e["lower"].isna() | e["upper"].isna(), "covered"] = np.nan
    e["width"] = e["upper"] - e["lower"]
    keys = ["eta", "nuisance", "method"]
    rows = []
    for key, g in e.groupby(keys, sort=False):
        # Per task and repetition: squared error summed over coefficients.
        per_task_rep = g.groupby(["task", "rep"], sort=False)["sq"].sum(min_count=1)
        task_mse = per_task_rep.groupby(level="task", sort=False).mean()
        rep_avg = per_task_rep.groupby(level="rep", sort=False).mean()
        task_cov = g.groupby("task", sort=False)["covered"].mean()
        per_rep = g.groupby("rep", sort=False).agg(
            seconds=("seconds", "first"),
            failed=("error", lambda s: bool(s.fillna("").astype(bool).any())),
            divergences=("divergences", "first"),
        )
        n_reps = len(per_rep)
        rows.append(
            {
                "eta": key[0],
                "nuisance": key[1],
                "method": key[2],
                "avg_mse": float(task_mse.mean()),
                "max_mse": float(task_mse.max()),
                "coverage": float(g["covered"].mean()),
                "width": float(g["width"].mean()),
                "seconds": float(per_rep["seconds"].mean()),
                "avg_mse_mcse": float(rep_avg.std(ddof=1) / np.sqrt(len(rep_avg)))
                if len(rep_avg) > 1
                else np.nan,
                "worst_task": str(task_mse.idxmax()) if task_mse.notna().any() else "",
                "min_task_coverage": float(task_cov.min()),
                "n_reps": int(n_reps),
                "n_failed": int(per_rep["failed"].sum()),
                "n_missing": int(g["estimate"].isna().sum()),
                "divergences": float(per_rep["divergences"].sum()),
            }
        )
    out = pd.DataFrame(rows)
    itl = out[out["method"] == "itl"].set_index(["eta", "nuisance"])
    idx = pd.MultiIndex.from_frame(out[["eta", "nuisance"]])
    for col in ("avg", "max"):
        ref = itl[f"{col}_mse"].reindex(idx).to_numpy() if len(itl) else np.nan
        out[f"{col}_ratio_itl"] = out[f"{col}_mse"].to_numpy() / ref
    out = out.sort_values(["nuisance", "method", "eta"], kind="stable").reset_index(drop=True)
    return out[SUMMARY_COLUMNS]


def plot_mse(summary: pd.DataFrame, title: str = ""):
    """Average and maximum MSE against eta, one line per method (and nuisance variant).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    variants = list(dict.fromkeys(summary["nuisance"]))
    styles = ["-", "--", ":", "-."]
    methods = list(dict.fromkeys(summary["method"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(methods) > len(colours):
        colours = [plt.get_cmap("tab20")(i % 20) for i in range(len(methods))]
    for ax, col, name in zip(axes, ("avg_mse", "max_mse"), ("average", "maximum"), strict=True):
        for i, method in enumerate(methods):
            for j, variant in enumerate(variants):
                g = summary[(summary["method"] == method) & (summary["nuisance"] == variant)]
                if g.empty:
                    continue
                g = g.sort_values("eta")
                label = method if len(variants) == 1 else f"{method} ({variant})"
                ax.plot(
                    g["eta"],
                    g[col],
                    styles[j % len(styles)],
                    marker="o",
                    ms=3,
                    color=colours[i % len(colours)],
                    label=label,
                )
        ax.set_xlabel("heterogeneity eta")
        ax.set_ylabel(f"{name} over tasks of the task's MSE")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def read_errors(
    out_dir: str | os.PathLike[str],
    etas: Iterable[float] | None = None,
    n_reps: int | None = None,
) -> pd.DataFrame:
    """Per-task errors of the finished repetitions in ``out_dir`` (optionally a sub-grid)."""
    out = Path(out_dir)
    if etas is None:
        paths = sorted((out / "reps").glob("eta=*/rep=*.csv"))
    else:
        reps = range(n_reps) if n_reps is not None else None
        paths = []
        for e in etas:
            if reps is None:
                paths += sorted(_rep_path(out, e, 0).parent.glob("rep=*.csv"))
            else:
                paths += [p for r in reps if (p := _rep_path(out, e, r)).exists()]
    if not paths:
        return pd.DataFrame(columns=ERROR_COLUMNS)
    dtypes = {"task": str, "error": str, "nuisance": str, "method": str}
    frames = [pd.read_csv(p, dtype=dtypes) for p in paths]
    errors = pd.concat(frames, ignore_index=True)
    errors["error"] = errors["error"].fillna("")
    return errors[ERROR_COLUMNS]


# Helpers ----------------------------------------------------------------------------------------


def _run_pending(design, settings, out, todo, n_jobs, progress) -> None:
    from joblib import Parallel, delayed

    def job(eta: float, rep: int) -> tuple[float, int]:
        rows = run_repetition(design, eta, rep, settings)
        atomic_write_text(_rep_path(out, eta, rep), rows.to_csv(index=False, float_format="%.10g"))
        return eta, rep

    for e in {e for e, _ in todo}:
        _rep_path(out, e, 0).parent.mkdir(parents=True, exist_ok=True)
    runner = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    results = runner(delayed(job)(e, r) for e, r in todo)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(todo), desc="repetitions", unit="rep")
    for eta, rep in results:
        log.debug("finished eta=%g rep=%d", eta, rep)


def _estimate(sim, mode: str, settings: StudySettings, seed: int) -> SummarySet:
    from latefusion.dml import DMLSettings, estimate_tasks
    from latefusion.dml.learners import learner_preset

    d = sim.design
    propensity = settings.propensity
    if propensity == "auto":
        propensity = "design" if d.treatment == "randomised" else "estimate"
    ml_outcome, ml_treatment = learner_preset(settings.learner)
    ml_outcome = settings.ml_outcome if settings.ml_outcome is not None else ml_outcome
    ml_treatment = settings.ml_treatment if settings.ml_treatment is not None else ml_treatment
    dml = DMLSettings(
        model=settings.model,
        ml_outcome=ml_outcome,
        ml_treatment=ml_treatment,
        n_folds=settings.n_folds,
        propensity=propensity,
        seed=seed % (2**31),
    )
    args = (sim.data, "task", "A", "Y", d.covariates, d.modifiers, dml)
    # One process per repetition: parallelism is over repetitions, never nested inside one.
    if mode == "multitask":
        from latefusion.dml.multitask import estimate_tasks_multitask

        return estimate_tasks_multitask(*args, n_jobs=1)
    return estimate_tasks(*args, n_jobs=1)


def _error_rows(
    design,
    theta,
    summaries,
    out,
    *,
    eta,
    rep,
    nuisance,
    method,
    seconds,
    fusion_seconds,
    n_warnings,
    error,
) -> pd.DataFrame:
    K, p = theta.shape
    names = design.task_names
    est = np.full((K, p), np.nan)
    se, lo, hi = est.copy(), est.copy(), est.copy()
    if out is not None:
        pos = {t: k for k, t in enumerate(names)}
        for i, task in enumerate(summaries.task_names):
            k = pos[task]
            est[k], se[k], lo[k] = out.estimate[i], out.std_error[i], out.lower[i]
            hi[k] = out.upper[i]
    divergences = np.nan if out is None else out.info.get("divergences", np.nan)
    return pd.DataFrame(
        {
            "eta": eta,
            "rep": rep,
            "nuisance": nuisance,
            "method": method,
            "task": np.repeat(names, p),
            "coef": np.tile(design.coef_names, K),
            "truth": theta.ravel(),
            "estimate": est.ravel(),
            "std_error": se.ravel(),
            "lower": lo.ravel(),
            "upper": hi.ravel(),
            "seconds": seconds,
            "fusion_seconds": fusion_seconds,
            "divergences": divergences,
            "n_warnings": n_warnings,
            "error": error,
        }
    )


def _log_warnings(caught: list, where: str) -> None:
    for w in caught:
        log.info("%s: %s: %s", where, w.category.__name__, w.message)


def _rep_path(out: Path, eta: float, rep: int) -> Path:
    return out / "reps" / f"eta={eta:.6g}" / f"rep={rep:04d}.csv"


def _check_or_write_config(out: Path, design: Design, settings: StudySettings) -> None:
    config = {"design": _without_eta(design.to_dict()), "settings": settings.to_dict()}
    path = out / _STUDY_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        old_config = {"design": old.get("design"), "settings": old.get("settings")}
        # Settings added to the library after a study was started are not compared.
        for part in ("design", "settings"):
            if isinstance(old_config[part], dict):
                config[part] = {k: v for k, v in config[part].items() if k in old_config[part]}
        if _canonical(old_config) != _canonical(config):
            raise ValueError(
                f"{out} holds a study with another design or other settings ({path}); use a "
                "new output directory, or delete it to start again"
            )
        return
    stamped = {"latefusion_version": __version__, **config}
    atomic_write_text(path, json.dumps(stamped, indent=2) + "\n")


def _without_eta(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "eta"}


def _canonical(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _title(design: Design, settings: StudySettings, n_reps: int) -> str:
    what = (
        "summaries drawn directly"
        if settings.level == "summaries"
        else (f"DML ({settings.model}, {settings.learner} learners)")
    )
    sizes = f"n={design.n}" + (f" (ratio {design.n_ratio:g})" if design.n_ratio > 1 else "")
    return (
        f"K={design.n_tasks}, {sizes}, p={design.p}, outliers {design.outlier_share:g}, "
        f"{design.outcome} outcome, {design.treatment}; {what}; {n_reps} repetitions"
    )
