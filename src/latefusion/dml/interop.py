"""Summaries from elsewhere: fitted DoubleML objects, and plain tables of estimates.

Fusion needs only ``(theta_hat_k, V_k, n_k)`` per task (METHOD.md section 0). A site that ran
its own DoubleML analysis, or a meta-analyst holding a table of published estimates, can enter
the pipeline here without rows.

Table format
------------
The long form has one row per task and coefficient::

    task,coef,estimate,std_error[,n][,estimand][,cov_<c> ...]

- ``task``, ``coef``: labels (read as text, so ``007`` stays ``007``).
- ``estimate``, ``std_error``: the coefficient and its standard error (finite, SE > 0).
- ``n`` (optional): rows behind the estimate, constant within a task; 0 when absent.
- ``estimand`` (optional): constant within a task and across tasks; else the ``estimand``
  argument.
- Covariances (needed when tasks have p > 1 coefficients): the row of coefficient ``a`` holds
  ``Cov(theta_a, theta_c)`` in column ``cov_<c>``, one column per coefficient name ``c`` (the
  full name after the prefix, so names containing underscores are unambiguous). Correlations
  may be given instead, in ``corr_<c>`` columns. An empty cell is filled from the mirror entry
  (row ``c``, column ``cov_<a>``), so one triangle suffices; a diagonal entry, if given, must
  equal ``std_error**2``.

A two-coefficient example::

    task,coef,estimate,std_error,cov_intercept,cov_age
    A,intercept,0.41,0.10,0.0100,-0.0012
    A,age,0.05,0.02,,0.0004
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latefusion._version import __version__
from latefusion.summaries import (
    EIGEN_TOL,
    SummarySet,
    TaskSummary,
    project_covariance,
    smallest_correlation_eigenvalue,
)

__all__ = [
    "summaries_from_doubleml",
    "summaries_from_table",
    "summaries_to_table",
    "summary_from_doubleml",
]

#: Relative disagreement accepted between a stated variance (``cov_<a>`` in the row of ``a``)
#: and ``std_error**2``, or between the two mirror entries of a covariance: rounding in a
#: table printed to 6 significant digits, not a different number.
TABLE_RTOL = 1e-5

_SUPPORTED = ("DoubleMLPLR", "DoubleMLIRM", "DoubleMLBLP")


# DoubleML ------------------------------------------------------------------------------------


def summary_from_doubleml(
    obj: Any,
    task: str,
    *,
    coef_names: Sequence[str] | None = None,
    estimand: str | None = None,
) -> TaskSummary:
    """Summary of one task from a fitted DoubleML object.

    Parameters
    ----------
    obj : doubleml.DoubleMLPLR, doubleml.DoubleMLIRM or doubleml.DoubleMLBLP
        Fitted. A ``DoubleMLBLP`` is what ``DoubleMLIRM.cate(basis)`` returns: the best linear
        projection of the conditional effect on the basis, our ``"cate"`` when the basis is
        ``(1, modifiers)``. (``DoubleMLPLR.cate`` returns one too; it projects another signal,
        so name its estimand.)
    task : str
        Name of the task.
    coef_names : sequence of str, optional
        Names of the p coefficients. Default: ``("effect",)`` for one treatment (the name our
        own per-task DML uses, so that both kinds of summary can be fused together), the
        treatment columns for several, the basis columns for a ``DoubleMLBLP``.
    estimand : str, optional
        Default: from the class and score. ``DoubleMLPLR`` gives ``"plr"`` (either score);
        ``DoubleMLIRM`` with score ``"ATE"`` gives ``"ate"``, with ``"ATTE"`` ``"att"``;
        ``DoubleMLBLP`` gives ``"cate"``. Required for a callable (user-defined) score.

    Returns
    -------
    TaskSummary
        ``theta_hat`` is DoubleML's ``coef`` (the median over repetitions) and the standard
        errors are DoubleML's ``se`` exactly. ``diagnostics`` hold the class, score, folds,
        repetitions, learners, DoubleML's out-of-fold nuisance losses (RMSE, or log loss for a
        classifier) and, for the IRM, the propensity range and the units at the clipping bound.

    Raises
    ------
    TypeError
        Another class than the three above.
    ValueError
        The object is not fitted, or its score is user-defined and ``estimand`` is not given.
    NotImplementedError
        A weighted IRM score (a weighted ATE is another estimand), or the joint covariance of
        several coefficients of a clustered fit (see Notes).

    Notes
    -----
    Covariance. DoubleML reports standard errors only; the covariance of several coefficients
    (several treatments in a PLR, or a BLP basis) comes from the scores. For one repetition,
    ``V = S'S / n^2`` with ``S = psi / mean(psi_a)`` the scaled scores (shape (n, p)), whose
    diagonal is DoubleML's ``se**2``. For a BLP, ``V`` is its HC0 covariance ``blp_omega``.
    With ``n_rep > 1`` the correlation is taken from the element-wise median of
    ``V_r + (theta_r - theta)(theta_r - theta)'`` over repetitions and rescaled to DoubleML's
    aggregated standard errors, so the diagonal is DoubleML's own.

    For a clustered fit DoubleML's cluster-robust variance is its own computation, and the
    cross-covariance of two coefficients is not available: one coefficient is supported, and
    several raise ``NotImplementedError``.
    """
    cls = type(obj).__name__
    if cls not in _SUPPORTED and not any(c.__name__ in _SUPPORTED for c in type(obj).__mro__):
        raise TypeError(
            f"task {task!r}: cannot read a {cls}; supported: {', '.join(_SUPPORTED)} (fitted)"
        )
    coef = getattr(obj, "coef", None)
    if coef is None or np.all(np.isnan(np.asarray(coef, dtype=float))):
        raise ValueError(f"task {task!r}: the {cls} object is not fitted; call .fit() first")
    if _is_a(obj, "DoubleMLBLP"):
        return _from_blp(obj, task, coef_names, estimand)

    score = obj.score
    if estimand is None:
        estimand = _estimand_of(obj, task, cls, score)
    if _is_a(obj, "DoubleMLIRM"):
        w = getattr(obj, "weights", None)
        if w is not None and (len(w) > 1 or not np.all(np.asarray(w["weights"]) == 1)):
            raise NotImplementedError(
                f"task {task!r}: a weighted IRM score (weighted ATE) is not supported"
            )

    theta = np.asarray(obj.coef, dtype=float).reshape(-1)
    se = np.asarray(obj.se, dtype=float).reshape(-1)
    p = len(theta)
    treatments = _treatment_names(obj, p)
    names = _names(coef_names, ("effect",) if p == 1 else treatments, p, task)
    n = int(obj.n_obs)
    clustered = bool(getattr(obj, "_is_cluster_data", False))

    if p == 1:
        V = se.reshape(1, 1) ** 2
    elif clustered:
        raise NotImplementedError(
            f"task {task!r}: joint covariance of several coefficients of a clustered DoubleML "
            "fit (DoubleML reports only their standard errors); fit one treatment at a time"
        )
    else:
        psi = np.asarray(obj.psi, dtype=float)  # (n, n_rep, p)
        J = np.mean(np.asarray(obj.psi_deriv, dtype=float), axis=0)  # (n_rep, p)
        scaled = psi / J[None]
        per_rep = np.einsum("irp,irq->rpq", scaled, scaled) / n**2
        V = _rescaled(per_rep, np.asarray(obj.all_coef, dtype=float).T, theta, se)

    diag: dict[str, Any] = {
        "source": "doubleml",
        "doubleml_class": cls,
        "score": score if isinstance(score, str) else "callable",
        "n": n,
        "n_folds": int(obj.n_folds),
        "n_rep": int(obj.n_rep),
        "treatment": treatments if p > 1 else treatments[0],
        "clustered": clustered,
        "learners": {k: repr(v) for k, v in (obj.learner or {}).items()},
        "doubleml_version": _doubleml_version(),
    }
    for key, loss in (getattr(obj, "nuisance_loss", None) or {}).items():
        loss = np.asarray(loss, dtype=float)
        if loss.size and np.all(np.isfinite(loss)):
            diag[f"loss_{key}"] = float(np.mean(loss))
    if _is_a(obj, "DoubleMLIRM"):
        diag.update(_irm_propensity(obj))
    return TaskSummary(task, estimand, names, theta, V, n, diagnostics=diag)


def summaries_from_doubleml(
    objs: Mapping[str, Any], *, coef_names: Sequence[str] | None = None
) -> SummarySet:
    """Summaries of several tasks from fitted DoubleML objects, keyed by task name.

    See :func:`summary_from_doubleml`; every task must give the same estimand and coefficients.
    """
    summaries = [summary_from_doubleml(o, t, coef_names=coef_names) for t, o in objs.items()]
    meta = {"latefusion_version": __version__, "source": "doubleml"}
    return SummarySet(summaries, meta=meta)


def _is_a(obj: Any, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


def _estimand_of(obj: Any, task: str, cls: str, score: Any) -> str:
    if not isinstance(score, str):
        raise ValueError(
            f"task {task!r}: the {cls} object has a user-defined score; say what it estimates "
            "(estimand=...)"
        )
    if _is_a(obj, "DoubleMLPLR"):
        return "plr"
    return {"ATE": "ate", "ATTE": "att"}[score]


def _treatment_names(obj: Any, p: int) -> list[str]:
    data = getattr(obj, "_dml_data", None)
    names = list(getattr(data, "d_cols", []) or [])
    return names if len(names) == p else [f"d{j}" for j in range(p)]


def _names(given: Sequence[str] | None, default: Sequence[str], p: int, task: str) -> list[str]:
    names = list(default if given is None else given)
    if len(names) != p:
        raise ValueError(f"task {task!r}: {len(names)} coefficient names for {p} coefficients")
    return [str(c) for c in names]


def _rescaled(
    per_rep: np.ndarray, all_theta: np.ndarray, theta: np.ndarray, se: np.ndarray
) -> np.ndarray:
    """Covariance with DoubleML's standard errors and the correlation of the scores.

    per_rep : (n_rep, p, p) covariance of each repetition; all_theta : (n_rep, p).
    """
    if len(per_rep) == 1:
        V = per_rep[0]
    else:
        dev = all_theta - np.median(all_theta, axis=0)
        V = np.median(per_rep + dev[:, :, None] * dev[:, None, :], axis=0)
    s = np.sqrt(np.diag(V))
    R = V / np.outer(s, s)
    V = R * np.outer(se, se)
    return (V + V.T) / 2


def _from_blp(
    obj: Any, task: str, coef_names: Sequence[str] | None, estimand: str | None
) -> TaskSummary:
    theta = np.asarray(obj.coef, dtype=float).reshape(-1)
    se = np.asarray(obj.se, dtype=float).reshape(-1)
    p = len(theta)
    names = _names(coef_names, list(obj.basis.columns), p, task)
    omega = np.asarray(obj.blp_omega, dtype=float)  # (p, p, n_rep)
    per_rep = np.moveaxis(omega, 2, 0)
    V = _rescaled(per_rep, np.asarray(obj.all_coef, dtype=float).T, theta, se)
    n = int(np.asarray(obj.orth_signal).shape[0])
    diag = {
        "source": "doubleml",
        "doubleml_class": type(obj).__name__,
        "n": n,
        "n_rep": int(obj.n_rep),
        "doubleml_version": _doubleml_version(),
    }
    return TaskSummary(task, estimand or "cate", names, theta, V, n, diagnostics=diag)


def _irm_propensity(obj: Any) -> dict[str, Any]:
    """Propensity range and units at the clipping bound (DoubleML stores clipped values)."""
    preds = getattr(obj, "predictions", None)
    if not preds or preds.get("ml_m") is None:
        return {}
    m = np.asarray(preds["ml_m"], dtype=float)[:, :, 0]  # (n, n_rep)
    d = np.asarray(obj._dml_data.d, dtype=float).reshape(-1)
    out: dict[str, Any] = {
        "propensity_min": float(m.min()),
        "propensity_max": float(m.max()),
    }
    processor = getattr(obj, "_ps_processor", None)
    clip = getattr(processor, "clipping_threshold", None)
    if clip is not None:
        at_bound = (m <= clip) | (m >= 1 - clip)
        out["clip"] = float(clip)
        out["clipped_treated"] = int(at_bound[d == 1].sum(axis=0).max())
        out["clipped_control"] = int(at_bound[d == 0].sum(axis=0).max())
    return out


def _doubleml_version() -> str:
    import doubleml

    return str(getattr(doubleml, "__version__", "unknown"))


# Tables --------------------------------------------------------------------------------------


def summaries_from_table(
    table: pd.DataFrame | str | os.PathLike[str],
    *,
    estimand: str = "ate",
    task_col: str = "task",
    coef_col: str = "coef",
    estimate_col: str = "estimate",
    se_col: str = "std_error",
    n_col: str = "n",
    assume_independent: bool = False,
    project_psd: bool = False,
) -> SummarySet:
    """Summaries from a table of estimates (the long form described in the module docstring).

    Parameters
    ----------
    table : DataFrame, or path of a ``.csv`` / ``.tsv`` file (optionally ``.gz``)
        One row per (task, coefficient).
    estimand : str, default="ate"
        What the estimates are, used when the table has no ``estimand`` column. Tasks are
        fused only with tasks of the same estimand.
    task_col, coef_col, estimate_col, se_col, n_col : str
        Column names. ``n_col`` is optional in the table.
    assume_independent : bool, default=False
        With p > 1 coefficients and no ``cov_``/``corr_`` columns, take the coefficients of a
        task as uncorrelated (a diagonal ``V``). Off by default: that is rarely true (an
        intercept and a slope are usually correlated), so the table must say it.
    project_psd : bool, default=False
        Repair a covariance that is not positive definite (recorded in the task's
        ``diagnostics["covariance_projected"]``) instead of raising.

    Returns
    -------
    SummarySet
        Tasks in order of first appearance, coefficients in the order of the first task.

    Raises
    ------
    ValueError
        Naming the task and column: missing columns or labels, non-finite estimates, zero,
        negative or non-finite standard errors, duplicate (task, coefficient) rows, a task
        missing a coefficient, ``n`` or ``estimand`` varying within a task, covariance columns
        that are inconsistent (mirror entries or diagonal), not positive definite, or absent
        for p > 1.
    """
    source = ""
    if not isinstance(table, pd.DataFrame):
        source = str(table)
        table = _read_table(Path(table), task_col, coef_col)
    df = table
    where = f" in {source}" if source else ""

    required = [task_col, coef_col, estimate_col, se_col]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found{where}; the table has columns {list(df.columns)}"
        )
    for col in (task_col, coef_col):
        if df[col].isna().any():
            rows = [int(i) for i in np.flatnonzero(df[col].isna().to_numpy())[:5]]
            raise ValueError(f"column {col!r}{where} has missing labels (rows {rows})")
    df = df.reset_index(drop=True)  # positions and labels agree from here on
    df = df.assign(**{task_col: df[task_col].astype(str), coef_col: df[coef_col].astype(str)})

    dupes = df.duplicated([task_col, coef_col], keep=False)
    if dupes.any():
        dup = df.loc[dupes]
        pairs = list(dict.fromkeys(zip(dup[task_col], dup[coef_col], strict=True)))
        raise ValueError(f"duplicate (task, coef) rows{where}: {pairs[:10]}")

    est = _numeric(df, estimate_col, where)
    se = _numeric(df, se_col, where)
    for i in np.flatnonzero(~np.isfinite(est)):
        raise ValueError(_at(df, i, task_col, coef_col, estimate_col, where, est[i], "finite"))
    for i in np.flatnonzero(~(np.isfinite(se) & (se > 0))):
        raise ValueError(_at(df, i, task_col, coef_col, se_col, where, se[i], "finite and > 0"))

    coefs = list(dict.fromkeys(df[coef_col]))
    tasks = list(dict.fromkeys(df[task_col]))
    if not tasks:
        raise ValueError(f"the table{where} has no rows")
    first = df.loc[df[task_col] == tasks[0], coef_col].tolist()
    order = first + [c for c in coefs if c not in first]
    kind, cov_cols = _covariance_columns(df, order, where)
    if len(order) > 1 and kind is None and not assume_independent:
        raise ValueError(
            f"tasks{where} have {len(order)} coefficients {order} but the table gives no "
            f"covariance between them: add columns {[f'cov_{c}' for c in order]} (or corr_...), "
            "or, if they are uncorrelated, pass assume_independent=True (on the command "
            "line: latefusion fuse --assume-independent)"
        )

    summaries = []
    for task, rows in df.groupby(task_col, sort=False):
        have = rows[coef_col].tolist()
        lacking = [c for c in order if c not in have]
        if lacking:
            raise ValueError(
                f"task {task!r}{where} has no row for coefficient(s) {lacking} (column "
                f"{coef_col!r}); every task needs all of {order}"
            )
        by_coef = dict(zip(have, rows.index, strict=True))
        rows_in_order = [by_coef[c] for c in order]
        theta = est[rows_in_order]
        s = se[rows_in_order]
        V = _task_covariance(df, rows_in_order, order, s, kind, cov_cols, task, where)
        n = _constant(df, rows_in_order, n_col, task, where, default=0)
        task_estimand = _constant(df, rows_in_order, "estimand", task, where, default=estimand)
        diagnostics: dict[str, Any] = {"source": "table"}
        if project_psd and len(order) > 1:
            if smallest_correlation_eigenvalue(V) <= EIGEN_TOL:
                V, smallest = project_covariance(V)
                diagnostics["covariance_projected"] = smallest
        try:
            summaries.append(
                TaskSummary(
                    str(task), str(task_estimand), order, theta, V, int(n), diagnostics=diagnostics
                )
            )
        except ValueError as exc:
            cols = [f"{kind}_{c}" for c in order] if kind else [se_col]
            raise ValueError(f"{exc}{where} (columns {cols})") from None

    meta = {
        "latefusion_version": __version__,
        "source": "table",
        "path": source or None,
        "columns": {
            "task": task_col,
            "coef": coef_col,
            "estimate": estimate_col,
            "std_error": se_col,
            "covariance": kind,
        },
        "assume_independent": bool(assume_independent and kind is None and len(order) > 1),
    }
    return SummarySet(summaries, meta=meta)


def summaries_to_table(summaries: SummarySet, covariance: bool = True) -> pd.DataFrame:
    """The usable tasks as a long table that :func:`summaries_from_table` reads back.

    Columns ``task, coef, estimate, std_error, n, estimand`` and, with ``covariance`` and p > 1,
    ``cov_<c>`` for each coefficient ``c``.
    """
    rows = []
    for s in summaries.usable():
        for i, c in enumerate(s.coef_names):
            row = {
                "task": s.task,
                "coef": c,
                "estimate": s.theta_hat[i],
                "std_error": s.std_error[i],
                "n": s.n,
                "estimand": s.estimand,
            }
            if covariance and len(s.coef_names) > 1:
                row.update({f"cov_{d}": s.V[i, j] for j, d in enumerate(s.coef_names)})
            rows.append(row)
    return pd.DataFrame(rows)


def _read_table(path: Path, task_col: str, coef_col: str) -> pd.DataFrame:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"cannot read {path}: expected a .csv or .tsv file (optionally .gz)")
    sep = "\t" if ext == ".tsv" else ","
    # labels as text: task "007" must not become the number 7
    from latefusion._csv import read_labelled_csv

    return read_labelled_csv(path, [task_col, coef_col], sep=sep)


def _numeric(df: pd.DataFrame, col: str, where: str) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() & df[col].notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"column {col!r}{where} has a non-numeric value {df[col].iloc[i]!r}")
    return values.to_numpy(dtype=float)


def _at(df, i, task_col, coef_col, col, where, value, need) -> str:
    task, coef = df[task_col].iloc[i], df[coef_col].iloc[i]
    return f"task {task!r}, coefficient {coef!r}: column {col!r}{where} is {value}, must be {need}"


def _covariance_columns(
    df: pd.DataFrame, coefs: list[str], where: str
) -> tuple[str | None, dict[str, str]]:
    found = {}
    for kind in ("cov", "corr"):
        cols = {c: f"{kind}_{c}" for c in coefs if f"{kind}_{c}" in df.columns}
        if cols:
            found[kind] = cols
    if len(found) == 2:
        raise ValueError(f"the table{where} has both cov_ and corr_ columns; give one kind")
    if not found:
        return None, {}
    kind, cols = found.popitem()
    if len(coefs) > 1 and len(cols) < len(coefs):
        lacking = [f"{kind}_{c}" for c in coefs if c not in cols]
        raise ValueError(f"covariance column(s) {lacking} not found{where}")
    stray = [
        c
        for c in df.columns
        if str(c).startswith(f"{kind}_") and str(c)[len(kind) + 1 :] not in coefs
    ]
    if stray:
        raise ValueError(f"column(s) {stray}{where} name no coefficient; coefficients are {coefs}")
    return kind, cols


def _task_covariance(df, rows, order, s, kind, cov_cols, task, where) -> np.ndarray:
    p = len(order)
    if kind is None:
        return np.diag(s**2)
    raw = [[df[cov_cols[c]].iloc[r] for c in order] for r in rows]
    M = np.array([[pd.to_numeric(x, errors="coerce") for x in row] for row in raw], dtype=float)
    for i, j in zip(*np.nonzero(np.isnan(M)), strict=True):
        if not (pd.isna(raw[i][j]) or str(raw[i][j]).strip() == ""):
            raise ValueError(
                f"task {task!r}, coefficient {order[i]!r}{where}: column {cov_cols[order[j]]!r} "
                f"holds {raw[i][j]!r}, which is not a number"
            )
    if kind == "corr":
        diagonal = np.diag(M)
        if np.any(~np.isnan(diagonal) & ~np.isclose(diagonal, 1.0, rtol=0, atol=TABLE_RTOL)):
            raise ValueError(
                f"task {task!r}{where}: the corr_ columns give a coefficient a correlation "
                f"{diagonal.tolist()} with itself; it must be 1 (or left empty)"
            )
        if p == 1:
            return np.diag(s**2)
        M = M * np.outer(s, s)
    for i in range(p):
        if np.isnan(M[i, i]):
            M[i, i] = s[i] ** 2
        elif not np.isclose(M[i, i], s[i] ** 2, rtol=TABLE_RTOL, atol=0):
            raise ValueError(
                f"task {task!r}, coefficient {order[i]!r}{where}: column {cov_cols[order[i]]!r} "
                f"gives the variance {M[i, i]:.6g} but std_error**2 is {s[i] ** 2:.6g}"
            )
    for i in range(p):
        for j in range(i + 1, p):
            a, b = M[i, j], M[j, i]
            if np.isnan(a) and np.isnan(b):
                raise ValueError(
                    f"task {task!r}{where}: no covariance of {order[i]!r} and {order[j]!r} "
                    f"(columns {cov_cols[order[j]]!r} and {cov_cols[order[i]]!r} are empty)"
                )
            if np.isnan(a) or np.isnan(b):
                M[i, j] = M[j, i] = b if np.isnan(a) else a
            elif not np.isclose(a, b, rtol=TABLE_RTOL, atol=TABLE_RTOL * s[i] * s[j]):
                raise ValueError(
                    f"task {task!r}{where}: the covariance of {order[i]!r} and {order[j]!r} is "
                    f"{a:.6g} in column {cov_cols[order[j]]!r} but {b:.6g} in column "
                    f"{cov_cols[order[i]]!r}"
                )
    if not np.all(np.isfinite(M)):
        raise ValueError(f"task {task!r}{where}: non-finite value in the {kind}_ columns")
    return (M + M.T) / 2


def _constant(df, rows, col, task, where, default):
    if col not in df.columns:
        return default
    values = pd.unique(df[col].iloc[rows])
    if len(values) != 1:
        raise ValueError(
            f"task {task!r}{where}: column {col!r} takes several values {list(values)} within "
            "the task"
        )
    value = values[0]
    if pd.isna(value):
        return default
    if col == "estimand":
        return str(value)
    count = pd.to_numeric(value, errors="coerce")
    if not (np.isfinite(count) and float(count).is_integer() and count >= 0):
        raise ValueError(f"task {task!r}{where}: column {col!r} is {value!r}, must be a count")
    return int(count)
