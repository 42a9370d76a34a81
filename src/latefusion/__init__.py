"""latefusion: late-fusion multi-task causal inference.

Each task estimates its treatment effect by double machine learning and exports a summary
(estimate, sandwich covariance, size, diagnostics); the summaries are then fused across tasks by
an adaptive robust aggregator and by a hierarchical Bayesian model with shrinkage priors.
"""

from latefusion._version import __version__
from latefusion.results import FusionResult, Interval
from latefusion.summaries import SummarySet, TaskSummary

__all__ = ["FusionResult", "Interval", "SummarySet", "TaskSummary", "__version__"]
