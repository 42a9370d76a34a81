"""Multi-task against per-task nuisance learning, with similar and with different nuisances.

Two designs of K = 20 randomised tasks of 150 rows with a strong, nonlinear baseline outcome
(``signal = 3``): nuisance functions similar across tasks (``nuisance_spread = 0.1``) or
unrelated (``1.0``). Each task is estimated by double machine learning (interactive model,
AIPW, design propensity, 5 folds) with a quadratic ridge outcome learner, fitted either task by
task or by :func:`latefusion.dml.multitask.estimate_tasks_multitask` (shared model on every
task's training rows, a ridge deviation per task, and the per-task learner when it has the
lower out-of-fold loss). The summaries are fused by ITL, random effects and the adaptive
aggregator (SURE). Resumable; the designs are advanced in rounds of repetitions, so a run
stopped early has both designs equally far along.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multitask_study.py \
        --out benchmarks/multitask_study/run --reps 100 --jobs 2
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import RidgeCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import PolynomialFeatures, StandardScaler  # noqa: E402

from latefusion.simulation import Design, StudySettings, run_study  # noqa: E402

DESIGNS = {
    "similar": Design(n_tasks=20, n=150, nuisance_spread=0.1, signal=3.0, seed=5),
    "different": Design(n_tasks=20, n=150, nuisance_spread=1.0, signal=3.0, seed=5),
}
ETAS = (0.0, 0.4)
QUADRATIC_RIDGE = make_pipeline(
    StandardScaler(),
    PolynomialFeatures(2, include_bias=False),
    StandardScaler(),
    RidgeCV(alphas=np.logspace(-2, 4, 13)),
)
SETTINGS = StudySettings(
    methods=("itl", "random_effects", "adaptive_sure"),
    nuisance=("task", "multitask"),
    level="rows",
    model="irm",
    ml_outcome=QUADRATIC_RIDGE,
    propensity="auto",
    n_folds=5,
    n_boot=200,
    seed=3,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/multitask_study/run"))
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--round", type=int, default=10, help="repetitions per round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    rounds = [*range(args.round, args.reps, args.round), args.reps]
    for reps in rounds:
        tables = []
        for name, design in DESIGNS.items():
            res = run_study(design, ETAS, reps, args.out / name, SETTINGS, n_jobs=args.jobs)
            tables.append(res.summary.assign(nuisance_functions=name))
        minutes = (time.perf_counter() - started) / 60
        print(f"{reps} repetitions done, {minutes:.1f} min", flush=True)
    table = pd.concat(tables, ignore_index=True)
    print(publish(table, args.out, args.reps))
    return 0


def publish(table: pd.DataFrame, run_dir: Path, reps: int) -> str:
    """Write the combined table, copy the plots, write the README; returns the table."""
    here = Path(__file__).with_suffix("")
    here.mkdir(exist_ok=True)
    table = table.sort_values(["nuisance_functions", "method", "eta", "nuisance"])
    cols = ["nuisance_functions", "eta", "method", "nuisance", "avg_mse", "max_mse"]
    cols += ["coverage", "width", "seconds", "avg_mse_mcse", "n_reps"]
    table[cols].to_csv(here / "summary.csv", index=False, float_format="%.6g")
    for name in DESIGNS:
        shutil.copy(run_dir / name / "mse.png", here / f"mse_{name}.png")

    # Multi-task against per-task, method by method.
    wide = table.pivot_table(
        index=["nuisance_functions", "eta", "method"], columns="nuisance", values="avg_mse"
    )
    wide["ratio"] = wide["multitask"] / wide["task"]
    ratio = wide.reset_index().to_markdown(index=False, floatfmt=".4g")
    full = table[cols].to_markdown(index=False, floatfmt=".4g")
    text = README.format(reps=reps, ratio=ratio, table=full, designs=DESIGNS, settings=SETTINGS)
    (here / "README.md").write_text(text, encoding="utf-8")
    return ratio + "\n\n" + full


README = """# Multi-task against per-task nuisance learning

Two designs of K = 20 randomised tasks of 150 rows with a strong nonlinear baseline outcome:
nuisance functions similar across tasks (`nuisance_spread = 0.1`, correlation 0.99 between
two tasks' coefficient vectors) or unrelated (`1.0`). Per repetition, every task is estimated
by DML (interactive model, AIPW, design propensity, 5 folds, quadratic ridge outcome learner)
twice on the same folds: nuisances learnt task by task, and by
`latefusion.dml.multitask.estimate_tasks_multitask` (shared model on all tasks' training rows
plus a ridge deviation per task, or the task's own learner where its out-of-fold loss is
lower). {reps} repetitions per eta and design.

Made by

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multitask_study.py \\
        --out benchmarks/multitask_study/run --reps {reps} --jobs 2

## Average MSE, multi-task / per-task

{ratio}

## Every column

{table}

Designs: `{designs}`

Settings: `{settings}`
"""


if __name__ == "__main__":
    sys.exit(main())
