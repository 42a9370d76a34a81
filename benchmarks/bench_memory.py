"""Peak memory of one large task: 1,000,000 rows, 20 covariates, linear learners.

Target: the whole process stays under 3 GB. Each case runs in a fresh Python process that
builds the data (a DataFrame of 1,000,000 rows: task label, treatment, outcome, 20 covariates),
records its memory, then estimates the task with ``estimate_tasks`` (5 folds; linear and
logistic regression; ``n_jobs=1``). Reported:

- ``process peak``: the child's peak resident memory, everything included (interpreter,
  libraries, data, estimation), as the operating system counts it (``ru_maxrss`` of that
  child, from ``os.wait4``);
- ``data``: the DataFrame's own size; ``before``: the child's resident memory once the data are
  built (interpreter, libraries and data);
- ``added``: process peak less ``before``, the memory the estimation itself adds. (Building the
  data peaks lower than the estimation, which the child checks, so the peak is the
  estimation's.)

Run: ``.venv/bin/python benchmarks/run.py --only memory [--quick]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

GB = 1024**3

CHILD = r"""
import json, os, sys
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression
from latefusion.dml import DMLSettings, estimate_tasks

model, n, q = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

rng = np.random.default_rng(0)
cols = {"task": np.full(n, "site")}
for j in range(q):
    cols[f"x{j}"] = rng.standard_normal(n)
m = 0.8 * cols["x0"] - 0.5 * cols["x1"]
if model == "irm":
    cols["A"] = (rng.random(n) < 1 / (1 + np.exp(-m))).astype(float)
else:
    cols["A"] = m + rng.standard_normal(n)
cols["Y"] = np.sin(cols["x0"]) + cols["x2"] + cols["A"] + rng.standard_normal(n)
df = pd.DataFrame(cols)
del cols, m
data_bytes = int(df.memory_usage(deep=True).sum())
before, building_peak = status("VmRSS"), status("VmHWM")
treat = LogisticRegression(max_iter=1000) if model == "irm" else LinearRegression()
settings = DMLSettings(model=model, ml_outcome=LinearRegression(), ml_treatment=treat)
xcols = [f"x{j}" for j in range(q)]
ss = estimate_tasks(df, "task", "A", "Y", xcols, settings=settings, n_jobs=1)
assert ss.summaries[0].ok
print(json.dumps({
    "data_bytes": data_bytes,
    "rss_before_bytes": before,
    "building_peak_bytes": building_peak,
    "own_peak_bytes": status("VmHWM"),
}))
"""


def measure(model: str, n: int, q: int) -> dict:
    """Run one case in a fresh process and return its figures in bytes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, model, str(n), str(q)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one pipe, read to the end: no deadlock on a full pipe
        text=True,
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {model} failed:\n{stdout}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["process_peak_bytes"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    figures["added_bytes"] = figures["process_peak_bytes"] - figures["rss_before_bytes"]
    return figures


def main(quick: bool = False) -> dict:
    """Print the table and return the figures."""
    n, q = (200_000, 20) if quick else (1_000_000, 20)
    repeats = 1 if quick else 3
    cases = []
    print(f"one task of {n:,} rows x {q} covariates, linear learners, median of {repeats}")
    print(f"{'model':<5} {'process peak GB':>15} {'data GB':>8} {'before GB':>9} "
          f"{'added GB':>9} {'build peak GB':>14}")  # fmt: skip
    for model in ("plr", "irm"):
        runs = [measure(model, n, q) for _ in range(repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row = {"model": model, "rows": n, "covariates": q, "repeats": repeats, **med,
               "runs": runs}  # fmt: skip
        cases.append(row)
        print(f"{model:<5} {med['process_peak_bytes'] / GB:>15.2f} {med['data_bytes'] / GB:>8.2f} "
              f"{med['rss_before_bytes'] / GB:>9.2f} {med['added_bytes'] / GB:>9.2f} "
              f"{med['building_peak_bytes'] / GB:>14.2f}")  # fmt: skip
    worst = max(c["process_peak_bytes"] for c in cases) / GB
    print(f"largest process peak: {worst:.2f} GB (target < 3 GB)")
    return {"target": "process peak < 3 GB", "worst_process_peak_gb": worst, "cases": cases}


if __name__ == "__main__":
    main()
