"""latefusion: late-fusion multi-task causal inference.

Each task estimates its treatment effect by double machine learning and exports a summary
(estimate, sandwich covariance, size, diagnostics); the summaries are then fused across tasks by
an adaptive robust aggregator and by a hierarchical Bayesian model with shrinkage priors.

Typical use (``data`` is a DataFrame with one row per unit)::

    import latefusion as lf
    summaries = lf.estimate_tasks(data, "site", "treated", "outcome", ["age", "sex"])
    run = lf.fuse_summaries(summaries)
    run.table()
"""

from latefusion._version import __version__
from latefusion.dml import DMLSettings, estimate_tasks
from latefusion.results import FusionResult, Interval
from latefusion.summaries import SummarySet, TaskSummary
from latefusion.workflow import FusionRun, fuse_summaries

__all__ = [
    "DMLSettings",
    "FusionResult",
    "FusionRun",
    "Interval",
    "SummarySet",
    "TaskSummary",
    "__version__",
    "estimate_tasks",
    "fuse_summaries",
]
