"""Step two, frequentist: fuse task summaries.

``itl`` and ``fixed_effect`` are the two ends (no pooling, full pooling); ``adaptive`` is the
adaptive robust aggregation of METHOD.md section 2; ``random_effects`` the classical
DerSimonian-Laird and REML baselines. Each returns a :class:`~latefusion.results.FusionResult`.
"""

from latefusion.fusion._armul import check_optimality
from latefusion.fusion.adaptive import adaptive, sure_path
from latefusion.fusion.baselines import fixed_effect, itl
from latefusion.fusion.random_effects import random_effects

__all__ = [
    "adaptive",
    "check_optimality",
    "fixed_effect",
    "itl",
    "random_effects",
    "sure_path",
]
