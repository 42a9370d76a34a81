"""Multi-task nuisance learning: a shared model plus task-specific deviations (METHOD.md s. 5).

When the rows of several tasks may be used together, each nuisance function (outcome
regressions, propensity) is learnt as a model shared by all tasks plus a small, penalised
deviation per task, and every task is still cross-fitted: a row's nuisance prediction comes
only from models that never saw that row. The scores, the sandwich and the summaries are those
of per-task double machine learning (:mod:`latefusion.dml._scores`), so the output can be fused
exactly like that of :func:`latefusion.dml.estimate_tasks`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from latefusion._version import __version__
from latefusion.dml import _scores
from latefusion.dml._folds import make_folds
from latefusion.dml.learners import prepare_learner
from latefusion.dml.pipeline import _with_dropped, prepare_data, warn_excluded
from latefusion.dml.task import (
    DMLSettings,
    _clip,
    _merge,
    _nuisance_fit,
    _wants_classifier,
    task_seeds,
)
from latefusion.summaries import SummarySet, TaskSummary
from latefusion.warnings import ClippedPropensityWarning

__all__ = ["DEVIATIONS", "estimate_tasks_multitask", "estimate_tasks_with"]

log = logging.getLogger(__name__)

DEVIATIONS = ("ridge", "none")

#: Penalties tried for a task's deviation (in units of rows: the penalty of a deviation fitted
#: on n rows is ``alpha``, against a squared-error or log-loss sum over the n rows).
_ALPHAS = np.logspace(-1, 5, 13)
_INNER_FOLDS = 3
_EPS = 1e-6


def estimate_tasks_multitask(
    data: pd.DataFrame,
    task_col: str,
    treatment: str,
    outcome: str,
    covariates: Sequence[str] = (),
    modifiers: Sequence[str] = (),
    settings: DMLSettings | None = None,
    *,
    deviation: str = "ridge",
    task_features: bool = False,
    select: str = "oof",
    treated: Any = None,
    control: Any = None,
    propensity_col: str | None = None,
    cluster_col: str | None = None,
    dropna: bool = False,
    n_jobs: int = 1,
    progress: bool = False,
) -> SummarySet:
    """Double machine learning in every task, with nuisances learnt across tasks.

    Same arguments and output contract as :func:`latefusion.dml.estimate_tasks`; the
    difference is how the nuisance functions are fitted (see Notes).

    Parameters
    ----------
    data, task_col, treatment, outcome, covariates, modifiers :
        As in :func:`latefusion.dml.estimate_tasks`.
    settings : DMLSettings, optional
        ``ml_outcome`` and ``ml_treatment`` are the *shared* learners (None: the
        size-dependent defaults for the pooled training size). ``min_folds`` is not supported.
    deviation : {"ridge", "none"}, default="ridge"
        Task-specific deviation from the shared model: ridge (regressions) or L2-penalised
        logistic regression with the shared logit as offset (probabilities), on
        ``(1, standardised covariates)``, penalty chosen per task by inner cross-validation on
        the task's training rows; ``"none"``: the shared model alone.
    task_features : bool, default=False
        Give the shared learner one-hot task indicators besides the covariates (the deviation
        already has a task intercept; useful with ``deviation="none"``).
    select : {"oof", "none"}, default="oof"
        ``"oof"``: also cross-fit each task's own learner on the same folds, and use, per task
        and nuisance, whichever predictions have the lower out-of-fold loss (see Notes);
        ``"none"``: always the multi-task predictions.
    treated, control, propensity_col, dropna :
        As in :func:`latefusion.dml.estimate_tasks`.
    cluster_col : None
        Not supported yet (raises NotImplementedError).
    n_jobs : int, default=1
        Folds fitted in parallel (joblib).
    progress : bool, default=False
        Accepted for symmetry with :func:`~latefusion.dml.estimate_tasks`; unused.

    Returns
    -------
    SummarySet
        One summary per task in order of first appearance; ``diagnostics["nuisance"]`` is
        ``"multitask"``. Tasks that cannot be estimated are excluded with a reason.

    Notes
    -----
    **Folds.** Each task's rows are split into F folds exactly as per-task DML splits them
    (stratified on treatment, the same per-task seeds as :func:`estimate_tasks`, so the two are
    paired). Fold f of the whole data is the union of every task's fold f.

    **Fit.** For each fold f and nuisance ``eta`` (``l``, ``m`` for PLR; ``g0``, ``g1``, ``m``
    for the interactive model), the shared model ``h`` is fitted on the training rows of every
    task (all rows outside fold f, in the right treatment arm for ``g_a``), with features
    ``(X, 1{task = k})``. Then for each task k a deviation ``d_k(X) = (1, X_std)' b_k`` is
    fitted on task k's training rows only::

        regression:  b_k = argmin  sum_i (y_i - h(x_i) - (1, x_i)' b)^2 + alpha_k ||b||^2
        probability: b_k = argmin  sum_i logloss(y_i, expit(logit h(x_i) + (1, x_i)' b))
                                    + alpha_k / 2 ||b||^2

    and task k's fold-f rows are predicted by ``h + d_k`` (or ``expit(logit h + d_k)``). The
    intercept is penalised too, so a large ``alpha_k`` returns the shared model exactly:
    ``alpha_k`` is chosen from ``logspace(-1, 5, 13)`` by 3-fold cross-validation within the
    task's training rows (generalised cross-validation for ridge). When tasks share their
    nuisance functions the deviations vanish and each task borrows the pooled rows; when they
    differ, the deviations recover the task's own linear trend.

    **Why cross-fitting stays valid.** Neither ``h`` nor ``d_k`` used for a row in fold f saw
    any row of fold f, of any task: the estimate of ``theta_k`` has the same sample-splitting
    structure as per-task DML, with nuisance estimates that are independent of the rows they
    are evaluated on. Rows of other tasks enter only as extra training data.

    **Selection.** Shared functions help only when tasks share them. With ``select="oof"``
    each task's own learner is also cross-fitted on the same folds, and for each task and
    nuisance the candidate (multi-task or own) with the lower out-of-fold loss on the task's
    rows is used (``diagnostics["multitask_share_<key>"]``: the share of repetitions in which
    the multi-task one won). Each candidate's predictions are cross-fitted; the choice between
    two of them uses the task's rows, as does choosing a learner by cross-fitted loss in
    per-task DML, and its effect vanishes asymptotically. This is what keeps multi-task
    learning from doing harm when the tasks' nuisance functions differ in ways the linear
    deviation cannot capture.

    This is the "shared model plus task-specific deviation" form of METHOD.md section 5; it
    was chosen over the augmented-feature (data-shared lasso) approach because it accepts any
    scikit-learn learner for the shared part (forests, boosting), while the deviation stays a
    penalised linear model that can only shrink towards the shared fit. A caveat: the
    deviation is fitted on the shared model's *in-sample* residuals; with a learner that
    interpolates its training data those residuals understate the task's difference, and the
    deviation is shrunk more than it should be (efficiency, not validity, is affected).
    """
    settings = settings or DMLSettings()
    if cluster_col is not None:
        raise NotImplementedError("multi-task nuisance learning with clusters (cluster_col)")
    if settings.min_folds is not None:
        raise NotImplementedError("multi-task nuisance learning with reduced folds (min_folds)")
    if select not in ("oof", "none"):
        raise ValueError(f"select must be 'oof' or 'none', got {select!r}")
    if deviation not in DEVIATIONS:
        raise ValueError(f"deviation must be one of {DEVIATIONS}, got {deviation!r}")
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
        dropna=dropna,
    )
    tasks = list(dict.fromkeys(data[task_col]))
    seeds = task_seeds(settings.seed, tasks)
    estimand = settings.resolved_estimand(bool(Z_cols))
    coef_names = ("intercept", *Z_cols) if Z_cols else ("effect",)

    # Per-task arrays and the checks that exclude a task.
    units, summaries = [], {}
    for i, task in enumerate(tasks):
        g = frame[frame[task_col] == task]
        unit = _Unit.from_frame(str(task), g, treatment, outcome, X_cols, Z_cols, propensity_col)
        reason = unit.check(settings)
        if reason:
            log.info("task %s excluded: %s", task, reason)
            summaries[str(task)] = TaskSummary.excluded(
                str(task), estimand, coef_names, len(g), reason, {"n": len(g)}
            )
        else:
            unit.seed = int(seeds[i])
            units.append(unit)

    # Cross-fitting over the pooled rows, then each task's scores.
    if units:
        preds = _cross_fit_all(units, settings, deviation, task_features, select, n_jobs)
        for unit, pred_reps in zip(units, preds, strict=True):
            summaries[unit.task] = _summarise_unit(unit, pred_reps, settings, estimand, coef_names)
    ordered = [summaries[str(t)] for t in tasks]
    ordered = [_with_dropped(s, dropped.get(t, 0)) for s, t in zip(ordered, tasks, strict=True)]

    warn_excluded(ordered, stacklevel=2)
    meta = {
        "latefusion_version": __version__,
        "dml": settings.describe(),
        "nuisance": {
            "kind": "multitask",
            "deviation": deviation,
            "task_features": task_features,
            "select": select,
            "alphas": _ALPHAS.tolist(),
        },
        "columns": {
            "task": task_col,
            "treatment": treatment,
            "outcome": outcome,
            "covariates": list(covariates),
            "covariates_encoded": X_cols,
            "modifiers": list(modifiers),
            "modifiers_encoded": Z_cols,
            "propensity": propensity_col,
        },
        "dropna": dropna,
    }
    return SummarySet(ordered, meta=meta)


def estimate_tasks_with(nuisance: str, *args: Any, **kwargs: Any) -> SummarySet:
    """Per-task (``nuisance="task"``) or multi-task (``"multitask"``) estimation of every task.

    The entry point for ``latefusion run --nuisance task|multitask``: the remaining arguments
    are those of :func:`latefusion.dml.estimate_tasks`.
    """
    if nuisance == "task":
        from latefusion.dml.pipeline import estimate_tasks

        return estimate_tasks(*args, **kwargs)
    if nuisance == "multitask":
        return estimate_tasks_multitask(*args, **kwargs)
    raise ValueError(f"nuisance must be 'task' or 'multitask', got {nuisance!r}")


# One task's data --------------------------------------------------------------------------------


class _Unit:
    """The arrays of one task."""

    def __init__(self, task, y, a, X, Z, propensity):
        self.task, self.y, self.a, self.X, self.Z = task, y, a, X, Z
        self.propensity = propensity
        self.n = len(y)
        self.seed = 0
        self.binary_a = bool(np.all(np.isin(a, (0, 1))))
        self.binary_y = bool(np.all(np.isin(y, (0, 1))))

    @classmethod
    def from_frame(cls, task, g, treatment, outcome, X_cols, Z_cols, propensity_col):
        n = len(g)
        X = g[X_cols].to_numpy(float) if X_cols else np.zeros((n, 0))
        Z = g[Z_cols].to_numpy(float) if Z_cols else np.zeros((n, 0))
        prop = g[propensity_col].to_numpy(float) if propensity_col else None
        return cls(task, g[outcome].to_numpy(float), g[treatment].to_numpy(float), X, Z, prop)

    def check(self, settings: DMLSettings) -> str:
        """Why the task cannot be estimated, or an empty string."""
        if self.n == 0:
            return "no rows"
        if settings.model == "irm" and not self.binary_a:
            raise ValueError(f"task {self.task!r}: the interactive model needs a 0/1 treatment")
        if self.binary_a:
            n1 = int(self.a.sum())
            n0 = self.n - n1
            if min(n0, n1) == 0:
                return f"only one treatment arm: no {'treated' if n1 == 0 else 'control'} units"
            if min(n0, n1) < settings.n_folds:
                arm = "treated" if n1 < n0 else "control"
                return (
                    f"{min(n0, n1)} {arm} units, fewer than the {settings.n_folds} "
                    "cross-fitting folds"
                )
        if self.Z.shape[1]:
            Z1 = np.column_stack([np.ones(self.n), self.Z])
            if np.linalg.matrix_rank(Z1) < Z1.shape[1]:
                return "effect modifiers not estimable: constant or collinear modifiers"
        return ""


# Cross-fitting over all tasks -------------------------------------------------------------------


def _cross_fit_all(units, settings, deviation, task_features, select, n_jobs):
    """Out-of-fold predictions of every nuisance, per task and repetition.

    Returns a list (per task) of lists (per repetition) of dicts: key -> ndarray (n_k,) of
    the multi-task predictions, and ``"local:" + key`` -> the per-task learner's predictions
    on the same folds (when ``select == "oof"``).
    """
    from joblib import Parallel, delayed

    K = len(units)
    offsets = np.cumsum([0] + [u.n for u in units])
    N = int(offsets[-1])
    X = np.vstack([u.X for u in units])
    if X.shape[1] == 0:
        X = np.zeros((N, 1))
    y = np.concatenate([u.y for u in units])
    a = np.concatenate([u.a for u in units])
    t = np.repeat(np.arange(K), [u.n for u in units])
    onehot = np.eye(K)[t] if task_features and K > 1 else np.zeros((N, 0))
    F = np.column_stack([X, onehot])
    binary_a = all(u.binary_a for u in units)
    binary_y = all(u.binary_y for u in units)

    keys = ["l"] if settings.model == "plr" else ["g0", "g1"]
    if settings.propensity != "design":
        keys.append("m")
    y_kind = "classifier" if binary_y and _wants_classifier(settings.ml_outcome) else "regressor"
    a_kind = "classifier" if binary_a else "regressor"

    out: list[list[dict[str, np.ndarray]]] = [[] for _ in units]
    for r in range(settings.n_rep):
        fold = np.empty(N, dtype=int)
        for k, u in enumerate(units):
            split = make_folds(u.a, settings.n_folds, 1, u.seed + r, u.binary_a)[0]
            for f, (_, test) in enumerate(split):
                fold[offsets[k] + test] = f
        pred = {key: np.full(N, np.nan) for key in keys}
        if select == "oof":
            pred |= {f"local:{key}": np.full(N, np.nan) for key in keys}

        def job(f, key, r=r, fold=fold):
            if key == "m":
                target, kind, learner, arm = a, a_kind, settings.ml_treatment, None
            else:
                target, kind, learner = y, y_kind, settings.ml_outcome
                arm = None if key == "l" else int(key[1])
            train = fold != f
            if arm is not None:
                train &= a == arm
            test = fold == f
            seed = (settings.seed + 7919 * r + 104729 * f) % (2**31)
            fitted = _fit_predict_fold(
                learner, key, kind, F, X, target, t, train, test, K, deviation, select, seed
            )
            return key, test, fitted

        jobs = [delayed(job)(f, key) for f in range(settings.n_folds) for key in keys]
        for key, test, (shared, local) in Parallel(n_jobs=n_jobs)(jobs):
            pred[key][test] = shared
            if local is not None:
                pred[f"local:{key}"][test] = local
        for k, u in enumerate(units):
            sl = slice(offsets[k], offsets[k + 1])
            p = {key: v[sl] for key, v in pred.items()}
            if settings.propensity == "design":
                p["m"] = u.propensity if u.propensity is not None else np.full(u.n, u.a.mean())
            out[k].append(p)
    return out


def _fit_predict_fold(learner, key, kind, F, X, target, t, train, test, K, deviation, select, seed):
    """One fold and nuisance: shared model on every task's ``train`` rows plus each task's
    deviation, and (with ``select == "oof"``) each task's own learner; predictions for the
    ``test`` rows, in row order, shape ``(test.sum(),)`` each (local is None otherwise).
    """
    n_test = int(test.sum())
    shared_pred = np.full(n_test, np.nan)
    local_pred = np.full(n_test, np.nan) if select == "oof" else None
    test_idx = np.flatnonzero(test)

    # Shared part, fitted on the training rows of every task.
    est = prepare_learner(learner, kind, f"shared learner of {key}", int(train.sum()), seed)
    # In-sample on the training rows (the deviations are fitted to those residuals), out of
    # sample on the test rows.
    shared = np.full(len(train), np.nan)
    shared[test] = _fit_predict(est, kind, F[train], target[train], F[test])
    if deviation != "none" and not (kind == "classifier" and len(np.unique(target[train])) < 2):
        shared[train] = _predict(est, kind, F[train])

    for k in range(K):
        tr = np.flatnonzero(train & (t == k))
        te = np.flatnonzero(test & (t == k))
        if len(te) == 0:
            continue
        at = np.searchsorted(test_idx, te)

        # Task k's deviation from the shared model, from task k's training rows only.
        if deviation == "none" or len(tr) < 2 * _INNER_FOLDS:
            shared_pred[at] = shared[te]
        else:
            dev = _fit_deviation(kind, X[tr], target[tr], shared[tr], seed + k)
            shared_pred[at] = _predict_deviation(dev, kind, X[te], shared[te])

        # Task k's own learner, for the out-of-fold comparison.
        if local_pred is not None:
            own = prepare_learner(learner, kind, f"learner of {key}", len(tr), seed + k)
            local_pred[at] = _fit_predict(own, kind, X[tr], target[tr], X[te])
    return shared_pred, local_pred


def _fit_predict(est, kind, X_train, y_train, X_test):
    if kind == "classifier":
        classes = np.unique(y_train)
        if len(classes) == 1:
            return np.full(len(X_test), float(classes[0]))
        est.fit(X_train, y_train.astype(int))
    else:
        est.fit(X_train, y_train)
    return _predict(est, kind, X_test)


def _predict(est, kind, X):
    if kind == "classifier":
        return est.predict_proba(X)[:, list(est.classes_).index(1)]
    return est.predict(X)


def _choose(pred: dict[str, np.ndarray], y, a, binary_y, binary_a) -> tuple[dict, dict]:
    """Per nuisance, the multi-task or the local predictions, whichever has the lower
    out-of-fold loss on the task's rows (squared error, or log loss for probabilities)."""
    chosen, which = {}, {}
    for key, values in pred.items():
        if key.startswith("local:"):
            continue
        local = pred.get(f"local:{key}")
        if local is None:
            chosen[key] = values
            continue
        target = a if key == "m" else y
        mask = slice(None) if key in ("l", "m") else a == int(key[1])
        binary = binary_a if key == "m" else binary_y
        loss_mt = _loss(target[mask], values[mask], binary)
        loss_local = _loss(target[mask], local[mask], binary)
        use_mt = bool(loss_mt <= loss_local)
        chosen[key] = values if use_mt else local
        which[key] = use_mt
    return chosen, which


def _loss(t, p, binary):
    if binary and p.min() >= 0 and p.max() <= 1:
        q = np.clip(p, _EPS, 1 - _EPS)
        return -np.mean(t * np.log(q) + (1 - t) * np.log(1 - q))
    return np.mean((t - p) ** 2)


# Deviations -------------------------------------------------------------------------------------


def _fit_deviation(kind, X, y, h, seed):
    """Penalised linear deviation of one task from the shared prediction ``h``."""
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    D = np.column_stack([np.ones(len(X)), (X - mu) / sd])
    if kind == "regressor":
        b = _ridge_gcv(D, y - h)
    else:
        b = _logistic_cv(D, y, _logit(h), seed)
    return {"mu": mu, "sd": sd, "b": b}


def _predict_deviation(dev, kind, X, h):
    D = np.column_stack([np.ones(len(X)), (X - dev["mu"]) / dev["sd"]])
    if kind == "regressor":
        return h + D @ dev["b"]
    return expit(_logit(h) + D @ dev["b"])


def _ridge_gcv(D, r):
    """Ridge of ``r`` on ``D`` (no unpenalised intercept), penalty by generalised CV."""
    n = len(r)
    U, s, Vt = np.linalg.svd(D, full_matrices=False)
    Ur = U.T @ r
    best, best_b = np.inf, np.zeros(D.shape[1])
    for alpha in _ALPHAS:
        shrink = s**2 / (s**2 + alpha)
        fitted = U @ (shrink * Ur)
        dof = shrink.sum()
        gcv = np.sum((r - fitted) ** 2) / max(n - dof, 1e-8) ** 2
        if gcv < best:
            best = gcv
            best_b = Vt.T @ (s / (s**2 + alpha) * Ur)
    return best_b


def _logistic_cv(D, y, offset, seed):
    """Offset logistic regression with an L2 penalty chosen by inner cross-validation."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % _INNER_FOLDS
    loss = np.zeros(len(_ALPHAS))
    for f in range(_INNER_FOLDS):
        tr, te = fold != f, fold == f
        for i, alpha in enumerate(_ALPHAS):
            b = _logistic_newton(D[tr], y[tr], offset[tr], alpha)
            p = np.clip(expit(offset[te] + D[te] @ b), _EPS, 1 - _EPS)
            loss[i] -= np.sum(y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p))
    return _logistic_newton(D, y, offset, float(_ALPHAS[np.argmin(loss)]))


def _logistic_newton(D, y, offset, alpha, max_iter=50, tol=1e-10):
    b = np.zeros(D.shape[1])
    for _ in range(max_iter):
        p = expit(offset + D @ b)
        grad = D.T @ (p - y) + alpha * b
        H = (D * (p * (1 - p))[:, None]).T @ D + alpha * np.eye(D.shape[1])
        step = np.linalg.solve(H, grad)
        b -= step
        if np.max(np.abs(step)) < tol:
            break
    return b


def _logit(p):
    return logit(np.clip(p, _EPS, 1 - _EPS))


# Scores -----------------------------------------------------------------------------------------


def _summarise_unit(unit, pred_reps, settings, estimand, coef_names) -> TaskSummary:
    n = unit.n
    Z1 = np.column_stack([np.ones(n), unit.Z])
    y, a = unit.y, unit.a
    fits, nuis = [], []
    diag: dict[str, Any] = {"n": n, "n_folds": settings.n_folds, "n_rep": settings.n_rep}
    if unit.binary_a:
        diag.update(n_treated=int(a.sum()), n_control=int(n - a.sum()))
    chosen_mt = []
    for raw in pred_reps:
        pred, which = _choose(raw, y, a, unit.binary_y, unit.binary_a)
        chosen_mt.append(which)
        e = pred["m"]
        if unit.binary_a:
            e, clip_diag = _clip(e, a, settings.clip)
            nuis.append(clip_diag)
        nuis.append(_nuisance_fit(pred, y, a, unit.binary_a, unit.binary_y))
        if settings.model == "plr":
            fits.append(_scores.plr(y - pred["l"], a - e, Z1))
        elif estimand == "att":
            fits.append(_scores.att(y, a, pred["g0"], e))
        else:
            g0, g1 = pred["g0"], pred["g1"]
            phi = g1 - g0 + a * (y - g1) / e - (1 - a) * (y - g0) / (1 - e)
            fits.append(_scores.aipw(phi, Z1))
    theta, V = _scores.aggregate_repetitions(fits)
    diag.update(_merge(nuis))
    diag["nuisance"] = "multitask"
    for key in chosen_mt[0] if chosen_mt else ():
        diag[f"multitask_share_{key}"] = float(np.mean([w[key] for w in chosen_mt]))
    if diag.get("clipped_treated", 0) + diag.get("clipped_control", 0) > 0:
        warnings.warn(
            f"task {unit.task!r}: {diag['clipped_treated']} treated and "
            f"{diag['clipped_control']} control propensities clipped to "
            f"[{settings.clip}, {1 - settings.clip}]",
            ClippedPropensityWarning,
            stacklevel=3,
        )
    se = np.sqrt(np.clip(np.diag(V), 0, None))
    scale = max(np.std(y), np.finfo(float).tiny)
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(V))):
        return TaskSummary.excluded(
            unit.task, estimand, coef_names, n, "non-finite estimate or covariance", diag
        )
    if np.any(se <= 1e-10 * scale):
        return TaskSummary.excluded(unit.task, estimand, coef_names, n, "zero standard error", diag)
    return TaskSummary(unit.task, estimand, coef_names, theta, V, n, diagnostics=diag)
