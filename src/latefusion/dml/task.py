"""Double machine learning for one task, from arrays, with a status instead of a crash."""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latefusion.dml import _scores
from latefusion.dml._folds import make_folds
from latefusion.dml.learners import default_classifier, prepare_learner
from latefusion.summaries import TaskSummary
from latefusion.warnings import ClippedPropensityWarning

__all__ = ["DMLSettings", "estimate_task", "task_seeds"]

log = logging.getLogger(__name__)

MODELS = ("plr", "irm")
ESTIMANDS = {"plr": ("plr",), "irm": ("ate", "att", "cate")}


@dataclass(frozen=True)
class DMLSettings:
    """How each task is estimated (METHOD.md section 1).

    Parameters
    ----------
    model : {"plr", "irm"}, default="irm"
        Partially linear model, or the interactive model (AIPW) for a binary treatment.
    estimand : {"ate", "att", "cate"} or None, default=None
        For ``"irm"``: ``"ate"`` without modifiers, ``"cate"`` (best linear projection of the
        conditional effect on ``(1, modifiers)``) with them; ``"att"``. Ignored for ``"plr"``.
    ml_outcome, ml_treatment : scikit-learn estimators or None
        Learners of ``E[Y|X]`` (PLR) or ``E[Y|A=a,X]`` (IRM), and of ``E[A|X]``. None picks the
        size-dependent defaults of :mod:`latefusion.dml.learners`.
    n_folds : int, default=5
        Cross-fitting folds, stratified on a binary treatment.
    n_rep : int, default=1
        Repetitions of the split; the estimate is the median over repetitions.
    min_folds : int or None, default=None
        A task whose smaller arm has fewer units than ``n_folds`` is excluded, unless
        ``min_folds`` is set: then it is fitted with as many folds as its smaller arm has units,
        if that is at least ``min_folds`` (recorded in its diagnostics).
    propensity : {"estimate", "design"}, default="estimate"
        ``"design"``: the treatment was randomised within the task, and the propensity is the
        task's share of treated units (or per-row values supplied by the caller); no learner.
    clip : float, default=0.01
        Estimated propensities are clipped to ``[clip, 1 - clip]``; the units clipped in each arm
        are counted in the diagnostics.
    seed : int, default=0
    """

    model: str = "irm"
    estimand: str | None = None
    ml_outcome: Any = None
    ml_treatment: Any = None
    n_folds: int = 5
    n_rep: int = 1
    min_folds: int | None = None
    propensity: str = "estimate"
    clip: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "plr" and self.estimand not in (None, "plr"):
            raise ValueError(
                f"estimand {self.estimand!r} belongs to the interactive model (model='irm'); "
                "the partially linear model estimates its coefficients"
            )
        if self.model == "irm" and self.estimand not in (None, *ESTIMANDS["irm"]):
            raise ValueError(f"estimand must be one of {ESTIMANDS['irm']}, got {self.estimand!r}")
        if self.n_folds < 2 or self.n_rep < 1:
            raise ValueError("n_folds must be at least 2 and n_rep at least 1")
        if self.min_folds is not None and not 2 <= self.min_folds <= self.n_folds:
            raise ValueError(
                f"min_folds must be between 2 and n_folds ({self.n_folds}), got {self.min_folds}"
            )
        if self.propensity not in ("estimate", "design"):
            raise ValueError(f"propensity must be 'estimate' or 'design', got {self.propensity!r}")
        if not 0 <= self.clip < 0.5:
            raise ValueError(f"clip must be in [0, 0.5), got {self.clip}")

    def resolved_estimand(self, has_modifiers: bool) -> str:
        if self.model == "plr":
            return "plr"
        if self.estimand is None:
            return "cate" if has_modifiers else "ate"
        if self.estimand != "cate" and has_modifiers:
            raise ValueError(f"estimand {self.estimand!r} takes no effect modifiers")
        if self.estimand == "cate" and not has_modifiers:
            raise ValueError(
                "estimand 'cate' needs effect modifiers (modifiers=..., --modifiers); without "
                "them the target is the ATE"
            )
        return self.estimand

    def describe(self) -> dict[str, Any]:
        """JSON-able settings, for the summaries file and the report."""
        return {
            "model": self.model,
            "estimand": self.estimand,
            "ml_outcome": _learner_name(self.ml_outcome),
            "ml_treatment": _learner_name(self.ml_treatment),
            "n_folds": self.n_folds,
            "n_rep": self.n_rep,
            "min_folds": self.min_folds,
            "propensity": self.propensity,
            "clip": self.clip,
            "seed": self.seed,
        }


def task_seeds(seed: int, tasks: Sequence[Any]) -> list[int]:
    """A seed per task from the run's seed and the task's name (not its position).

    A task gets the same folds, and so the same summary, whether it is estimated with the other
    tasks (``latefusion run``) or alone at its site (``latefusion summarize``).
    """
    out = []
    for task in tasks:
        name = zlib.crc32(str(task).encode("utf-8"))
        out.append(int(np.random.SeedSequence([int(seed) % 2**32, name]).generate_state(1)[0]))
    return out


def estimate_task(
    task: str,
    y: np.ndarray,
    a: np.ndarray,
    X: np.ndarray,
    settings: DMLSettings,
    Z: np.ndarray | None = None,
    covariate_names: Sequence[str] = (),
    modifier_names: Sequence[str] = (),
    propensity: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    seed: int | None = None,
) -> TaskSummary:
    """Estimate one task and return its summary.

    A task that cannot be estimated (one treatment arm, too few units per fold, an effect
    modifier with no variation, a zero standard error) is returned with status ``"excluded"``
    and the reason, never raised, so the other tasks are unaffected.

    Parameters
    ----------
    task : str
    y : ndarray of shape (n,)
        Outcome. A 0/1 outcome gets classifier nuisances by default.
    a : ndarray of shape (n,)
        Treatment: 0/1 for ``"irm"``; 0/1 or continuous for ``"plr"``.
    X : ndarray of shape (n, q)
        Covariates (numeric, already encoded).
    settings : DMLSettings
    Z : ndarray of shape (n, m), optional
        Effect modifiers (without the intercept, which is added).
    covariate_names, modifier_names : sequence of str
    propensity : ndarray of shape (n,), optional
        Per-row design propensity (with ``settings.propensity == "design"``).
    groups : ndarray of shape (n,), optional
        Cluster labels: grouped folds and a cluster-robust sandwich.
    seed : int, optional
        Overrides ``settings.seed`` (the pipeline gives each task its own).
    """
    seed = settings.seed if seed is None else seed
    n = len(y)
    Z = np.empty((n, 0)) if Z is None else np.asarray(Z, dtype=float).reshape(n, -1)
    has_mod = Z.shape[1] > 0
    estimand = settings.resolved_estimand(has_mod)
    coef_names = ("intercept", *modifier_names) if has_mod else ("effect",)
    Z1 = np.column_stack([np.ones(n), Z])

    def excluded(reason: str, **diag: Any) -> TaskSummary:
        log.info("task %s excluded: %s", task, reason)
        return TaskSummary.excluded(task, estimand, coef_names, n, reason, diag)

    # Arms and folds
    binary_a = bool(np.all(np.isin(a, (0, 1))))
    if settings.model == "irm" and not binary_a:
        raise ValueError(f"task {task!r}: the interactive model needs a 0/1 treatment")
    diag: dict[str, Any] = {"n": n}
    n_folds = settings.n_folds
    if binary_a:
        n1 = int(a.sum())
        n0 = n - n1
        diag.update(n_treated=n1, n_control=n0)
        if min(n0, n1) == 0:
            arm = "treated" if n1 == 0 else "control"
            return excluded(f"only one treatment arm: no {arm} units", **diag)
        smaller = min(n0, n1)
        if smaller < n_folds:
            if settings.min_folds is None or smaller < max(settings.min_folds, 2):
                arm = "treated" if n1 < n0 else "control"
                return excluded(
                    f"{smaller} {arm} units, fewer than the {n_folds} cross-fitting folds",
                    **diag,
                )
            diag["folds_reduced"] = f"{n_folds} -> {smaller}: only {smaller} units in an arm"
            n_folds = smaller
    diag["n_folds"] = n_folds
    diag["n_rep"] = settings.n_rep

    # Columns: drop covariates with no variation in this task
    X = np.asarray(X, dtype=float).reshape(n, -1)
    names = list(covariate_names) or [f"x{j}" for j in range(X.shape[1])]
    const = np.ptp(X, axis=0) == 0 if X.shape[1] else np.zeros(0, bool)
    if const.any():
        diag["dropped_constant"] = [c for c, k in zip(names, const, strict=True) if k]
        X = X[:, ~const]
        names = [c for c, k in zip(names, const, strict=True) if not k]
    if binary_a and X.shape[1]:
        flat_0, flat_1 = (np.ptp(X[a == arm], axis=0) == 0 for arm in (0, 1))
        in_arm = [c for c, f0, f1 in zip(names, flat_0, flat_1, strict=True) if f0 or f1]
        if in_arm:
            diag["constant_within_arm"] = in_arm
    if X.shape[1] == 0:
        X = np.zeros((n, 1))  # no covariates left: the learners fit a constant
    diag["covariates_used"] = names

    if has_mod:
        rank = np.linalg.matrix_rank(Z1)
        if rank < Z1.shape[1]:
            flat = [m for j, m in enumerate(modifier_names) if np.ptp(Z[:, j]) == 0]
            what = f"modifier(s) {flat} constant in this task" if flat else "collinear modifiers"
            return excluded(f"effect modifiers not estimable: {what}", **diag)

    # Cross-fitting
    binary_y = bool(np.all(np.isin(y, (0, 1))))
    stratify = binary_a
    if groups is not None:
        n_clusters = len(np.unique(groups))
        diag["n_clusters"] = n_clusters
        if n_clusters < n_folds:
            return excluded(
                f"{n_clusters} clusters, fewer than the {n_folds} cross-fitting folds "
                "(a cluster is never split between folds)",
                **diag,
            )
    splits = make_folds(a, n_folds, settings.n_rep, seed, stratify, groups)
    if settings.propensity == "design":
        if propensity is None:
            propensity = np.full(n, a.mean())
        if not binary_a:
            raise ValueError(f"task {task!r}: a design propensity needs a 0/1 treatment")

    fits, nuis = [], []
    for r, split in enumerate(splits):
        pred = _cross_fit(y, a, X, split, settings, binary_a, binary_y, propensity, seed + r)
        e_raw = pred.get("m")
        if binary_a and e_raw is not None:
            e, clip_diag = _clip(e_raw, a, settings.clip)
            nuis.append(clip_diag)
        else:
            e = e_raw
        nuis.append(_nuisance_fit(pred, y, a, binary_a, binary_y))
        if settings.model == "plr":
            fits.append(_scores.plr(y - pred["l"], a - e, Z1, groups))
        elif estimand == "att":
            fits.append(_scores.att(y, a, pred["g0"], e))
        else:
            phi = (
                pred["g1"]
                - pred["g0"]
                + a * (y - pred["g1"]) / e
                - (1 - a) * (y - pred["g0"]) / (1 - e)
            )
            fits.append(_scores.aipw(phi, Z1, groups))
    theta, V = _scores.aggregate_repetitions(fits)
    diag.update(_merge(nuis))
    if diag.get("clipped_treated", 0) + diag.get("clipped_control", 0) > 0:
        warnings.warn(
            f"task {task!r}: {diag['clipped_treated']} treated and {diag['clipped_control']} "
            f"control propensities clipped to [{settings.clip}, {1 - settings.clip}]",
            ClippedPropensityWarning,
            stacklevel=2,
        )

    # A zero or non-finite standard error is never passed on
    se = np.sqrt(np.clip(np.diag(V), 0, None))
    scale = max(np.std(y), np.finfo(float).tiny)
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(V))):
        return excluded("non-finite estimate or covariance", **diag)
    if np.any(se <= 1e-10 * scale):
        why = "zero standard error (is the outcome constant within an arm?)"
        return excluded(why, **diag)
    return TaskSummary(task, estimand, coef_names, theta, V, n, diagnostics=diag)


def _cross_fit(y, a, X, split, settings, binary_a, binary_y, propensity, seed):
    """Out-of-fold predictions of every nuisance for one repetition."""
    n = len(y)
    out: dict[str, np.ndarray] = {}
    y_kind = "classifier" if binary_y and _wants_classifier(settings.ml_outcome) else "regressor"
    a_kind = "classifier" if binary_a else "regressor"
    keys = ["l"] if settings.model == "plr" else ["g0", "g1"]
    if settings.propensity == "design":
        out["m"] = np.asarray(propensity, dtype=float)
    else:
        keys.append("m")
    for key in keys:
        out[key] = np.full(n, np.nan)
    for train, test in split:
        X_test = X[test]
        X_train = X[train] if {"l", "m"} & set(keys) else None  # one copy for both nuisances
        a_train = a[train]
        for key in keys:
            if key == "m":
                target, kind, learner = a_train, a_kind, settings.ml_treatment
                X_fit = X_train
            else:
                learner, kind = settings.ml_outcome, y_kind
                if key == "l":
                    X_fit, target = X_train, y[train]
                else:
                    rows = train[a_train == int(key[1])]
                    X_fit, target = X[rows], y[rows]
            est = prepare_learner(learner, kind, f"learner of {key}", n, seed)
            out[key][test] = _fit_predict(est, kind, X_fit, target, X_test)
    return out


def _wants_classifier(learner: Any) -> bool:
    from sklearn.base import is_classifier

    return learner is None or is_classifier(learner)


def _fit_predict(est, kind, X_train, y_train, X_test) -> np.ndarray:
    if kind == "classifier":
        classes, counts = np.unique(y_train, return_counts=True)
        if len(classes) == 1:
            return np.full(len(X_test), float(classes[0]))
        if counts.min() < 3 and _is_default_cv_classifier(est):
            est = default_classifier(0, cv=False)
        est.fit(X_train, y_train.astype(int))
        proba = est.predict_proba(X_test)
        return proba[:, list(est.classes_).index(1)]
    est.fit(X_train, y_train)
    return est.predict(X_test)


def _is_default_cv_classifier(est) -> bool:
    from sklearn.linear_model import LogisticRegressionCV

    steps = getattr(est, "steps", [])
    return any(isinstance(s, LogisticRegressionCV) for _, s in steps)


def _clip(e: np.ndarray, a: np.ndarray, clip: float) -> tuple[np.ndarray, dict[str, Any]]:
    low, high = e < clip, e > 1 - clip
    diag = {
        "propensity_min": float(e.min()),
        "propensity_max": float(e.max()),
        "clipped_treated": int(np.sum((low | high) & (a == 1))),
        "clipped_control": int(np.sum((low | high) & (a == 0))),
    }
    return np.clip(e, clip, 1 - clip), diag


def _nuisance_fit(pred, y, a, binary_a, binary_y) -> dict[str, float]:
    """Out-of-fold fit of each nuisance: R^2 for regressions, log loss for probabilities."""
    fit = {}
    for key, target, mask in (
        ("l", y, slice(None)),
        ("g0", y, a == 0),
        ("g1", y, a == 1),
        ("m", a, slice(None)),
    ):
        if key not in pred:
            continue
        t, p = target[mask], pred[key][mask]
        if len(t) == 0 or t.min() == t.max():
            continue
        binary = binary_a if key == "m" else binary_y
        if binary and p.min() >= 0 and p.max() <= 1:
            # the log loss of sklearn.metrics.log_loss, without its input checks
            p = np.clip(p, 1e-12, 1 - 1e-12)
            fit[f"logloss_{key}"] = float(-np.mean(np.where(t == 1, np.log(p), np.log1p(-p))))
        else:
            resid = t - p
            fit[f"r2_{key}"] = float(1 - resid @ resid / np.sum((t - t.mean()) ** 2))
    return fit


def _merge(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-repetition diagnostics: extremes for ranges, maxima for counts, means else."""
    merged: dict[str, Any] = {}
    keys = {k for d in dicts for k in d}
    for k in sorted(keys):
        vals = [d[k] for d in dicts if k in d]
        if k == "propensity_min":
            merged[k] = min(vals)
        elif k in ("propensity_max", "clipped_treated", "clipped_control"):
            merged[k] = max(vals)
        else:
            merged[k] = float(np.mean(vals))
    return merged


def _learner_name(learner: Any) -> str:
    if learner is None:
        return "default"
    return repr(learner)
