"""The result container every fusion method returns, and its tidy table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ESTIMATE_COLUMNS", "FusionResult", "Interval"]

#: Columns of ``estimates.csv``, a public interface: extend, never rename.
ESTIMATE_COLUMNS = ["level", "task", "coef", "method", "estimate", "std_error", "lower", "upper"]


@dataclass(frozen=True)
class Interval:
    """Point estimate, standard error and interval bounds, arrays of one shape."""

    estimate: np.ndarray
    std_error: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def __post_init__(self) -> None:
        arrays = [np.asarray(getattr(self, f), dtype=float) for f in _FIELDS]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"Interval arrays differ in shape: {shapes}")
        for name, a in zip(_FIELDS, arrays, strict=True):
            object.__setattr__(self, name, a)

    @classmethod
    def normal(cls, estimate: np.ndarray, std_error: np.ndarray, level: float = 0.95) -> Interval:
        """Wald interval ``estimate +- z * std_error``."""
        from scipy.stats import norm

        z = norm.ppf(0.5 + level / 2)
        estimate = np.asarray(estimate, dtype=float)
        std_error = np.asarray(std_error, dtype=float)
        return cls(estimate, std_error, estimate - z * std_error, estimate + z * std_error)


_FIELDS = ("estimate", "std_error", "lower", "upper")


@dataclass(frozen=True)
class FusionResult:
    """Estimates of one fusion method.

    Parameters
    ----------
    method : str
        Method name as it appears in ``estimates.csv`` (``"itl"``, ``"adaptive"``, ...).
    task_names : sequence of str, length K
    coef_names : sequence of str, length p
    theta : Interval of shape (K, p) or None
        Per-task estimates; None for methods that estimate only the centre.
    beta : Interval of shape (p,) or None
        The common centre; None for methods without one (individual-task learning).
    new_task : Interval of shape (p,) or None
        Prediction for the parameter of a new task drawn from the same population.
    info : dict
        Method settings and by-products (the constant C, which tasks were fused, tau^2, ...).
    """

    method: str
    task_names: Sequence[str]
    coef_names: Sequence[str]
    theta: Interval | None = None
    beta: Interval | None = None
    new_task: Interval | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        K, p = len(self.task_names), len(self.coef_names)
        if self.theta is not None and self.theta.estimate.shape != (K, p):
            raise ValueError(f"{self.method}: theta has shape {self.theta.estimate.shape}")
        for name in ("beta", "new_task"):
            part = getattr(self, name)
            if part is not None and part.estimate.shape != (p,):
                raise ValueError(f"{self.method}: {name} has shape {part.estimate.shape}")

    def table(self) -> pd.DataFrame:
        """Tidy rows with the columns :data:`ESTIMATE_COLUMNS`."""
        rows: list[dict[str, Any]] = []
        if self.theta is not None:
            for k, task in enumerate(self.task_names):
                for j, coef in enumerate(self.coef_names):
                    rows.append(_row("task", task, coef, self.method, self.theta, (k, j)))
        for level, part in (("pooled", self.beta), ("new_task", self.new_task)):
            if part is not None:
                for j, coef in enumerate(self.coef_names):
                    rows.append(_row(level, "", coef, self.method, part, (j,)))
        return pd.DataFrame(rows, columns=ESTIMATE_COLUMNS)


def _row(level: str, task: str, coef: str, method: str, part: Interval, idx: tuple) -> dict:
    return {
        "level": level,
        "task": task,
        "coef": coef,
        "method": method,
        **{f: float(getattr(part, f)[idx]) for f in _FIELDS},
    }
