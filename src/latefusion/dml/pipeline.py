"""Estimate every task of a data frame: validation, encoding, parallel tasks, summaries."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, parallel_config

from latefusion._version import __version__
from latefusion.dml.task import DMLSettings, estimate_task, task_seeds
from latefusion.summaries import SummarySet, TaskSummary
from latefusion.warnings import LateFusionWarning, TaskExcludedWarning

__all__ = ["estimate_tasks", "prepare_data"]

log = logging.getLogger(__name__)


def estimate_tasks(
    data: pd.DataFrame,
    task_col: str,
    treatment: str,
    outcome: str,
    covariates: Sequence[str] = (),
    modifiers: Sequence[str] = (),
    settings: DMLSettings | None = None,
    *,
    treated: Any = None,
    control: Any = None,
    propensity_col: str | None = None,
    cluster_col: str | None = None,
    dropna: bool = False,
    n_jobs: int = -1,
    progress: bool = False,
    scheduler: str | None = None,
) -> SummarySet:
    """Run double machine learning in every task and collect the summaries.

    Parameters
    ----------
    data : DataFrame
        One row per unit, with the task label in ``task_col``.
    task_col, treatment, outcome : str
        Column names.
    covariates : sequence of str
        Confounders X; categorical columns are one-hot encoded (first level dropped).
    modifiers : sequence of str
        Effect modifiers z: the target becomes the coefficients of ``CATE(z) = z'theta`` with
        ``z = (1, modifiers)``. Uncentred: centre them first if the intercept should be the
        average effect. A modifier is also a covariate of the nuisance models, whether or not
        it is listed in ``covariates``: a variable that modifies the effect usually also
        predicts the outcome, and leaving it out of the nuisances would leave it unadjusted.
    settings : DMLSettings, optional
        Model, learners, folds, propensity; defaults to ``DMLSettings()``.
    treated, control : scalar, optional
        Treatment values taken as 1 and 0 when the treatment column is not coded 0/1. With only
        ``treated``, every other value is control; with both, rows with other values are
        dropped (counted per task in the diagnostics).
    propensity_col : str, optional
        Per-row design propensity (with ``settings.propensity == "design"``).
    cluster_col : str, optional
        Clusters within tasks (classrooms in a school): grouped folds, cluster-robust sandwich.
    dropna : bool, default=False
        Drop rows with missing values in the used columns (counted per task) instead of
        raising.
    n_jobs : int, default=-1
        Tasks estimated in parallel by joblib processes; -1 uses every core, 1 runs in this
        process. Results do not depend on it: every task's seed is derived from
        ``settings.seed`` and the task's name. A single task always runs in this process.
    progress : bool, default=False
        Show a progress bar over tasks (on stderr).
    scheduler : str, optional
        Address of a running Dask distributed scheduler (``"tcp://host:8786"``): the tasks run
        on that cluster's workers through joblib's Dask backend instead of local processes,
        with identical results. Needs the ``cluster`` extra (``pip install
        "latefusion[cluster]"``), and latefusion installed on the workers. Each task's rows are
        sent to the worker that estimates it; ``n_jobs`` is then ignored. Within a task,
        joblib runs sequentially on its worker (as it does in a local worker process): the
        learners' own ``n_jobs`` and scikit-learn's internal cross-validation do not send
        sub-tasks back to the cluster.

    Returns
    -------
    SummarySet
        One summary per task, in order of first appearance; tasks that could not be estimated
        have status ``"excluded"`` with the reason.
    """
    settings = settings or DMLSettings()
    frame, X_cols, Z_cols, dropped = prepare_data(
        data,
        task_col,
        treatment,
        outcome,
        covariates,
        modifiers,
        treated=treated,
        control=control,
        propensity_col=propensity_col,
        cluster_col=cluster_col,
        dropna=dropna,
    )
    settings.resolved_estimand(bool(Z_cols))  # an impossible estimand fails before any task
    tasks = list(pd.unique(data[task_col]))  # order of first appearance
    seeds = task_seeds(settings.seed, tasks)
    rows_of = frame.groupby(task_col, sort=False).indices
    columns = _TaskColumns(outcome, treatment, X_cols, Z_cols, propensity_col, cluster_col)

    def jobs():
        # Each job carries its own task's arrays only, built when the job is dispatched.
        for i, task in enumerate(tasks):
            arrays = columns.take(frame, rows_of[task]) if task in rows_of else None
            yield delayed(_estimate_one)(
                task, arrays, settings, columns, int(seeds[i]), dropped.get(task, 0)
            )

    summaries = []
    for summary, caught in _run(jobs(), len(tasks), n_jobs, scheduler, progress):
        for w in caught:  # re-raise warnings from workers in the caller's process
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        summaries.append(summary)

    warn_excluded(summaries, stacklevel=2)
    meta = {
        "latefusion_version": __version__,
        "dml": settings.describe(),
        "columns": {
            "task": task_col,
            "treatment": treatment,
            "outcome": outcome,
            "covariates": list(covariates),
            "covariates_encoded": X_cols,
            "modifiers": list(modifiers),
            "modifiers_encoded": Z_cols,
            "propensity": propensity_col,
            "cluster": cluster_col,
            "treated": None if treated is None else str(treated),
            "control": None if control is None else str(control),
        },
        "dropna": dropna,
    }
    return SummarySet(summaries, meta=meta)


@dataclass(frozen=True)
class _TaskColumns:
    """Which columns of the prepared frame feed :func:`estimate_task`."""

    outcome: str
    treatment: str
    X_cols: list[str]
    Z_cols: list[str]
    propensity_col: str | None
    cluster_col: str | None

    def take(self, frame: pd.DataFrame, rows: np.ndarray) -> dict[str, np.ndarray | None]:
        """One task's arrays, each copied once from the frame's columns (row-major ``X``)."""
        everything = len(rows) == len(frame)

        def column(c: str, dtype: Any = float) -> np.ndarray:
            values = frame[c].to_numpy(dtype=dtype)
            return values.copy() if everything else values[rows]

        def block(cols: list[str]) -> np.ndarray:
            out = np.empty((len(rows), len(cols)))
            for j, c in enumerate(cols):
                values = frame[c].to_numpy(dtype=float)
                out[:, j] = values if everything else values[rows]
            return out

        return {
            "y": column(self.outcome),
            "a": column(self.treatment),
            "X": block(self.X_cols),
            "Z": block(self.Z_cols) if self.Z_cols else None,
            "propensity": column(self.propensity_col) if self.propensity_col else None,
            "groups": column(self.cluster_col, None) if self.cluster_col else None,
        }


def _estimate_one(
    task: Any,
    arrays: dict[str, np.ndarray | None] | None,
    settings: DMLSettings,
    columns: _TaskColumns,
    seed: int,
    dropped: int,
) -> tuple[TaskSummary, list[warnings.WarningMessage]]:
    """One task, in whichever process runs it; warnings are returned, not raised."""
    Z_cols = columns.Z_cols
    if arrays is None:
        estimand = settings.resolved_estimand(bool(Z_cols))
        names = ("intercept", *Z_cols) if Z_cols else ("effect",)
        reason = f"no rows left after dropping {dropped} (missing values)"
        return TaskSummary.excluded(str(task), estimand, names, 0, reason), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = estimate_task(
            str(task),
            settings=settings,
            covariate_names=columns.X_cols,
            modifier_names=Z_cols,
            seed=seed,
            **arrays,
        )
    return _with_dropped(summary, dropped), caught


def _run(jobs, n_tasks: int, n_jobs: int, scheduler: str | None, progress: bool):
    """Results of the jobs, in order: serially, in local processes, or on a Dask cluster."""
    if scheduler is not None:
        try:
            from distributed import Client
        except ImportError:
            raise ImportError(
                "scheduler=... needs Dask distributed: pip install 'latefusion[cluster]'"
            ) from None
        # Inside a Dask worker joblib's default backend is Dask again, so scikit-learn's inner
        # loops (LogisticRegressionCV's folds x penalties) would go back through the scheduler
        # as hundreds of tiny tasks; measured on 50 tasks of 400 rows, 2 workers, that made the
        # cluster slower than one process.
        jobs = (delayed(_sequential_inside)(f, *a, **kw) for f, a, kw in jobs)
        with Client(scheduler) as client, parallel_config("dask"):
            log.info("estimating %d tasks on the Dask cluster at %s", n_tasks, client.scheduler)
            yield from _progress(
                Parallel(n_jobs=-1, return_as="generator")(jobs), n_tasks, progress
            )
        return
    if n_tasks <= 1:
        n_jobs = 1  # starting worker processes costs more than one task gains
    elif n_jobs > n_tasks:
        n_jobs = n_tasks  # more workers than tasks only cost start-up time
    runner = Parallel(n_jobs=n_jobs, return_as="generator")
    yield from _progress(runner(jobs), n_tasks, progress)


def _sequential_inside(func, *args, **kwargs):
    """``func(*args, **kwargs)`` with joblib sequential within it (runs on a cluster worker)."""
    with parallel_config(backend="sequential"):
        return func(*args, **kwargs)


def _progress(results, n_tasks: int, progress: bool):
    if not progress:
        return results
    from tqdm.auto import tqdm

    return tqdm(results, total=n_tasks, desc="tasks", unit="task")


def warn_excluded(summaries: Sequence[TaskSummary], stacklevel: int = 2) -> None:
    """One :class:`TaskExcludedWarning` listing the excluded tasks (the first five) and why."""
    excluded = [s for s in summaries if not s.ok]
    if excluded:
        warnings.warn(
            f"{len(excluded)} of {len(summaries)} tasks excluded, no usable estimate: "
            + "; ".join(f"{s.task}: {s.reason}" for s in excluded[:5])
            + (" ..." if len(excluded) > 5 else ""),
            TaskExcludedWarning,
            stacklevel=stacklevel + 1,
        )


#: Largest magnitude accepted in a numeric column (squares and sums of squares must stay finite).
_HUGE = 1e100


def prepare_data(
    data: pd.DataFrame,
    task_col: str,
    treatment: str,
    outcome: str,
    covariates: Sequence[str] = (),
    modifiers: Sequence[str] = (),
    *,
    treated: Any = None,
    control: Any = None,
    propensity_col: str | None = None,
    cluster_col: str | None = None,
    dropna: bool = False,
) -> tuple[pd.DataFrame, list[str], list[str], dict[Any, int]]:
    """Validate and encode the columns used.

    Returns
    -------
    frame : DataFrame
        Task, 0/1 treatment, outcome, encoded covariates and modifiers, optional columns.
    X_cols, Z_cols : list of str
        Encoded covariate and modifier column names.
    dropped : dict
        Rows dropped per task (missing values with ``dropna``, other treatment values).
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    for name, value in (("covariates", covariates), ("modifiers", modifiers)):
        if isinstance(value, str):  # list("x1") would be the columns "x" and "1"
            raise TypeError(f"{name} must be a list of column names, not the string {value!r}")
    # Modifiers are nuisance covariates too (see estimate_tasks).
    added = [m for m in modifiers if m not in covariates]
    if added:
        log.info("modifier(s) %s also used as covariates of the nuisance models", added)
    covariates = [*covariates, *added]
    used = [task_col, treatment, outcome, *covariates, *modifiers]
    used += [c for c in (propensity_col, cluster_col) if c is not None]
    missing = [c for c in dict.fromkeys(used) if c not in data.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found; the data has columns {list(data.columns)}"
        )
    roles = {task_col: "the task", treatment: "the treatment", outcome: "the outcome"}
    for col in dict.fromkeys([*covariates, *modifiers]):
        if col in roles:
            raise ValueError(
                f"column {col!r} is {roles[col]} and cannot also be a covariate or modifier"
            )
    if not covariates and not modifiers:
        log.info("no covariates given: nuisance functions are constants within each task")
    df = data[list(dict.fromkeys(used))].copy()

    # Missing task labels are never silently dropped
    if df[task_col].isna().any():
        raise ValueError(
            f"column {task_col!r} (the task) has {df[task_col].isna().sum()} missing values"
        )
    dropped: dict[Any, int] = {}

    # Missing and infinite values
    cols = [c for c in dict.fromkeys(used) if c != task_col]
    bad = df[cols].isna()
    numeric = df[cols].select_dtypes("number")
    inf = pd.DataFrame(np.isinf(numeric.to_numpy(float)), index=df.index, columns=numeric.columns)
    for col in inf.columns[inf.any().to_numpy()]:
        tasks = sorted(map(str, df.loc[inf[col], task_col].unique()))
        raise ValueError(f"column {col!r} has infinite values in task(s) {_few(tasks)}")
    # Finite but so large that learners' sums of squares overflow to inf and then NaN.
    huge = numeric.abs() > _HUGE
    for col in huge.columns[huge.any().to_numpy()]:
        tasks = sorted(map(str, df.loc[huge[col], task_col].unique()))
        raise ValueError(
            f"column {col!r} has values of magnitude {numeric[col].abs().max():.3g} in task(s) "
            f"{_few(tasks)}; values beyond {_HUGE:.0e} overflow in the learners: rescale it"
        )
    if bad.any().any():
        if not dropna:
            col = bad.columns[bad.any().to_numpy()][0]
            tasks = sorted(map(str, df.loc[bad[col], task_col].unique()))
            cols_bad = list(bad.columns[bad.any().to_numpy()])
            raise ValueError(
                f"column {col!r} has {int(bad[col].sum())} missing values in task(s) "
                f"{_few(tasks)} (columns with missing values: {cols_bad}); pass dropna=True "
                "(--dropna) to drop those rows"
            )
        rows = bad.any(axis=1)
        dropped = df.loc[rows, task_col].value_counts().to_dict()
        df = df.loc[~rows]

    # Treatment coded 0/1
    df, other = _code_treatment(df, treatment, task_col, treated, control)
    for t, k in other.items():
        dropped[t] = dropped.get(t, 0) + k

    # Outcome numeric
    if not pd.api.types.is_numeric_dtype(df[outcome]) or pd.api.types.is_bool_dtype(df[outcome]):
        values = pd.unique(df[outcome])
        if not pd.api.types.is_bool_dtype(df[outcome]):
            advice = "code it 0/1 first" if len(values) == 2 else "convert it to numbers first"
            shown = sorted(map(str, values))
            raise ValueError(
                f"outcome column {outcome!r} is not numeric (values {_few(shown)}); {advice}"
            )
        df[outcome] = df[outcome].astype(float)

    X, X_cols = _encode(df, covariates, "covariate")
    Z, Z_cols = _encode(df, modifiers, "modifier")
    if "intercept" in Z_cols:
        raise ValueError(
            "a modifier column named 'intercept' would share its name with the conditional "
            "effect's intercept coefficient; rename the column"
        )
    frame = pd.concat(
        [df[[task_col, treatment, outcome]], X, Z.drop(columns=X_cols, errors="ignore")]
        + [df[[c]] for c in (propensity_col, cluster_col) if c is not None and c not in X],
        axis=1,
    )
    frame = frame.loc[:, ~frame.columns.duplicated()]
    if propensity_col is not None:
        p = frame[propensity_col].astype(float)
        if ((p <= 0) | (p >= 1)).any():
            tasks = sorted(map(str, frame.loc[(p <= 0) | (p >= 1), task_col].unique()))
            raise ValueError(
                f"column {propensity_col!r} (design propensity) has values outside (0, 1) in "
                f"task(s) {_few(tasks)}"
            )
    return frame, X_cols, Z_cols, dropped


def _code_treatment(df, treatment, task_col, treated, control):
    a = df[treatment]
    other: dict[Any, int] = {}
    if treated is None:
        if pd.api.types.is_bool_dtype(a):
            df[treatment] = a.astype(float)
            return df, other
        if not pd.api.types.is_numeric_dtype(a):
            raise ValueError(
                f"treatment column {treatment!r} is not numeric (values "
                f"{_few(sorted(map(str, pd.unique(a))))}); say which value is treated "
                "(treated=..., --treated VALUE)"
            )
        return df, other
    values = set(pd.unique(a))
    cast = type(next(iter(values)))
    if treated not in values:
        try:
            treated = cast(treated)
            control = None if control is None else cast(control)
        except (TypeError, ValueError):
            pass
    if treated not in values:
        raise ValueError(
            f"treated value {treated!r} not found in column {treatment!r} (values "
            f"{_few(sorted(map(str, values)))})"
        )
    if control is None and len(values) > 2:
        controls = sorted(map(str, values - {treated}))
        warnings.warn(
            f"treatment column {treatment!r} has {len(values)} values: with treated={treated!r} "
            f"alone, the values {_few(controls)} are all taken as control; give the control "
            "value (control=..., --control VALUE) to compare two of them",
            LateFusionWarning,
            stacklevel=2,
        )
    if control is not None:
        if control == treated:
            raise ValueError(f"the treated and control values are both {treated!r}")
        if control not in values:
            raise ValueError(f"control value {control!r} not found in column {treatment!r}")
        keep = a.isin([treated, control])
        other = df.loc[~keep, task_col].value_counts().to_dict()
        df = df.loc[keep].copy()
    df[treatment] = (df[treatment] == treated).astype(float)
    return df, other


def _encode(df: pd.DataFrame, cols: Sequence[str], what: str) -> tuple[pd.DataFrame, list[str]]:
    """Numeric columns as they are; categorical ones one-hot with the first level dropped."""
    parts, names = [], []
    for c in cols:
        s = df[c]
        if pd.api.types.is_bool_dtype(s):
            parts.append(s.astype(float).rename(c))
            names.append(c)
        elif pd.api.types.is_numeric_dtype(s):
            parts.append(s.astype(float))
            names.append(c)
        else:
            levels = sorted(map(str, pd.unique(s)))
            if len(levels) > 50:
                raise ValueError(
                    f"{what} column {c!r} has {len(levels)} categories; too many "
                    "to one-hot encode (is it an identifier?)"
                )
            for lev in levels[1:]:
                name = f"{c}[{lev}]"
                parts.append((s.astype(str) == lev).astype(float).rename(name))
                names.append(name)
    if not parts:
        return pd.DataFrame(index=df.index), []
    return pd.concat(parts, axis=1), names


def _with_dropped(summary: TaskSummary, k: int) -> TaskSummary:
    if not k:
        return summary
    diag = {**summary.diagnostics, "rows_dropped": int(k)}
    return TaskSummary(
        summary.task,
        summary.estimand,
        summary.coef_names,
        summary.theta_hat,
        summary.V,
        summary.n,
        summary.status,
        summary.reason,
        diag,
    )


def _few(items: Sequence[str], k: int = 10) -> str:
    items = list(items)
    return str(items[:k])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > k else "]")
