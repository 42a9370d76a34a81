"""Nuisance learners: defaults by task size, and checks on what the user passes."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone, is_classifier, is_regressor
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "SMALL_TASK_ROWS",
    "best_of",
    "default_classifier",
    "default_regressor",
    "learner_preset",
    "prepare_learner",
]

#: Below this many rows a task gets regularised linear learners by default; flexible learners
#: fitted on a few dozen rows overfit, and their out-of-fold predictions are noise.
SMALL_TASK_ROWS = 1000

_ALPHAS = np.logspace(-3, 3, 13)


def default_regressor(n: int) -> BaseEstimator:
    """Default outcome (and continuous-treatment) learner for a task of ``n`` rows.

    Standardised ridge regression with the penalty chosen by leave-one-out over
    ``logspace(-3, 3, 13)`` below :data:`SMALL_TASK_ROWS` rows; histogram gradient boosting
    (early stopping on a validation split) above.
    """
    if n < SMALL_TASK_ROWS:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=_ALPHAS))
    return HistGradientBoostingRegressor(max_iter=200, early_stopping=True)


def default_classifier(n: int, cv: bool = True) -> BaseEstimator:
    """Default propensity (and binary-outcome) learner for a task of ``n`` rows.

    Standardised L2 logistic regression with the penalty chosen by 3-fold cross-validated log
    loss below :data:`SMALL_TASK_ROWS` rows; histogram gradient boosting above. With
    ``cv=False`` (a class with fewer than 3 members in the training fold) the penalty is fixed
    at ``C = 1``.
    """
    if not cv:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if n < SMALL_TASK_ROWS:
        return make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=np.logspace(-3, 3, 7),
                l1_ratios=(0.0,),
                cv=3,
                scoring="neg_log_loss",
                max_iter=1000,
                use_legacy_attributes=False,
            ),
        )
    return HistGradientBoostingClassifier(max_iter=200, early_stopping=True)


def prepare_learner(learner: Any, kind: str, role: str, n: int, seed: int) -> BaseEstimator:
    """A fresh, seeded copy of the learner for one nuisance.

    Parameters
    ----------
    learner : scikit-learn estimator or None
        None selects the default for ``kind`` and ``n``.
    kind : {"regressor", "classifier"}
        What the nuisance needs: a classifier for a propensity or a binary outcome (its
        ``predict_proba`` is used, never its labels).
    role : str
        Name of the nuisance, for error messages (``"ml_m"``, ``"ml_g"``, ...).
    n : int
        Rows in the task, for the default.
    seed : int
        Set as ``random_state`` where the learner has one left at None.
    """
    if learner is None:
        est = default_classifier(n) if kind == "classifier" else default_regressor(n)
    else:
        if not hasattr(learner, "fit") or not hasattr(learner, "get_params"):
            raise TypeError(f"{role}: {learner!r} is not a scikit-learn estimator")
        if kind == "classifier" and not (
            is_classifier(learner) and hasattr(learner, "predict_proba")
        ):
            raise TypeError(
                f"{role} must be a classifier with predict_proba (it predicts a probability), "
                f"got {type(learner).__name__}"
            )
        if kind == "regressor" and not is_regressor(learner):
            raise TypeError(f"{role} must be a regressor, got {type(learner).__name__}")
        est = clone(learner)
    params = est.get_params(deep=True)
    seeded = {k: seed for k, v in params.items() if k.endswith("random_state") and v is None}
    if seeded:
        est.set_params(**seeded)
    return est


def learner_preset(name: str) -> tuple[BaseEstimator | None, BaseEstimator | None]:
    """Outcome and treatment learners by name, for the command line.

    ``"default"`` (None, None: size-dependent defaults), ``"linear"`` (standardised ridge and
    logistic regression with cross-validated penalties), ``"forest"`` (random forests of 200
    trees, at least 5 rows per leaf), ``"boosting"`` (histogram gradient boosting).
    """
    if name == "default":
        return None, None
    if name == "linear":
        return default_regressor(0), default_classifier(0)
    if name == "forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        return (
            RandomForestRegressor(n_estimators=200, min_samples_leaf=5),
            RandomForestClassifier(n_estimators=200, min_samples_leaf=5),
        )
    if name == "boosting":
        big = SMALL_TASK_ROWS
        return default_regressor(big), default_classifier(big)
    raise ValueError(f"unknown learner preset {name!r}: default, linear, forest or boosting")


def best_of(candidates: list[BaseEstimator], cv: int = 3) -> BaseEstimator:
    """A learner that picks, each time it is fitted, the best of ``candidates`` by CV loss.

    Fitted inside each cross-fitting training fold, the choice never sees the held-out fold, so
    cross-fitting stays valid (nested cross-validation). Loss: mean squared error for
    regressors, log loss for classifiers. Built on :class:`sklearn.model_selection.GridSearchCV`
    (the selected learner is its ``best_params_["learner"]``).

    Parameters
    ----------
    candidates : list of scikit-learn estimators
        All regressors or all classifiers (with ``predict_proba``).
    cv : int, default=3
        Inner folds.
    """
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    if len(candidates) < 1:
        raise ValueError("best_of needs at least one candidate learner")
    kinds = {is_classifier(c) for c in candidates}
    if len(kinds) != 1:
        raise TypeError("best_of candidates must be all regressors or all classifiers")
    classifier = kinds.pop()
    scoring = "neg_log_loss" if classifier else "neg_mean_squared_error"
    pipe = Pipeline([("learner", candidates[0])])
    return GridSearchCV(pipe, {"learner": list(candidates)}, cv=cv, scoring=scoring)
