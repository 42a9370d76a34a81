"""Simulation designs and studies (METHOD.md section 6).

``designs`` holds :class:`Design` and its seeded generators (rows, or summaries directly),
``methods`` runs a fusion method by name, ``study`` runs methods over heterogeneity eta and
repetitions (resumable, parallel) and tabulates and plots the average and maximum MSE, and
``cli`` the ``latefusion simulate`` command.
"""

from latefusion.simulation.designs import Design, SimData, draw_summaries, generate, task_parameters
from latefusion.simulation.methods import available_methods, run_method
from latefusion.simulation.study import (
    StudyResult,
    StudySettings,
    plot_mse,
    read_errors,
    run_repetition,
    run_study,
    summarise,
)

__all__ = [
    "Design",
    "SimData",
    "StudyResult",
    "StudySettings",
    "available_methods",
    "draw_summaries",
    "generate",
    "plot_mse",
    "read_errors",
    "run_method",
    "run_repetition",
    "run_study",
    "summarise",
    "task_parameters",
]
