"""Warning classes for statistical caveats.

Every warning the library raises is a subclass of :class:`LateFusionWarning`, so that a user can
filter all of them, or one kind, with the standard :mod:`warnings` machinery.
"""

from __future__ import annotations

__all__ = [
    "ClippedPropensityWarning",
    "ConvergenceWarning",
    "FewTasksWarning",
    "LateFusionWarning",
    "TaskExcludedWarning",
]


class LateFusionWarning(UserWarning):
    """Base class of every warning raised by latefusion."""


class TaskExcludedWarning(LateFusionWarning):
    """A task could not be estimated and is left out of fusion (its status says why)."""


class ClippedPropensityWarning(LateFusionWarning):
    """Propensity scores of a task were clipped to keep the scores bounded."""


class ConvergenceWarning(LateFusionWarning):
    """An MCMC run shows divergences, high R-hat or low effective sample size."""


class FewTasksWarning(LateFusionWarning):
    """Too few tasks to learn between-task heterogeneity reliably."""
