"""Cross-fitting splits."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

__all__ = ["make_folds"]

Split = list[tuple[np.ndarray, np.ndarray]]


def make_folds(
    a: np.ndarray,
    n_folds: int,
    n_rep: int,
    seed: int,
    stratify: bool,
    groups: np.ndarray | None = None,
) -> list[Split]:
    """Index splits for ``n_rep`` repetitions of ``n_folds``-fold cross-fitting.

    Parameters
    ----------
    a : ndarray of shape (n,)
        Treatment; folds are stratified on it when ``stratify`` (binary treatment).
    n_folds, n_rep : int
    seed : int
        Repetition r uses the seed ``seed + r``.
    stratify : bool
    groups : ndarray of shape (n,), optional
        Cluster labels: a cluster never straddles a training and a test fold.

    Returns
    -------
    list of length n_rep of lists of (train_idx, test_idx)
    """
    n = len(a)
    splits = []
    for r in range(n_rep):
        rs = np.random.RandomState(np.uint32(seed + r))
        if groups is not None:
            if stratify:
                cv = StratifiedGroupKFold(n_folds, shuffle=True, random_state=rs)
            else:
                # GroupKFold shuffles only through a permutation of the group labels.
                cv = GroupKFold(n_folds, shuffle=True, random_state=rs)
            it = cv.split(np.zeros(n), a if stratify else None, groups)
        elif stratify:
            it = StratifiedKFold(n_folds, shuffle=True, random_state=rs).split(np.zeros(n), a)
        else:
            it = KFold(n_folds, shuffle=True, random_state=rs).split(np.zeros(n))
        splits.append([(train, test) for train, test in it])
    return splits
