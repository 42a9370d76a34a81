"""Per-task double machine learning (METHOD.md section 1)."""

from latefusion.dml.pipeline import estimate_tasks, prepare_data
from latefusion.dml.task import DMLSettings, estimate_task

__all__ = ["DMLSettings", "estimate_task", "estimate_tasks", "prepare_data"]
