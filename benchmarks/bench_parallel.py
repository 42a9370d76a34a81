"""Many tasks at once: speed-up of 2 worker processes over one, and of a 2-worker Dask cluster.

Fifty sites of 400 rows, the interactive model with the default small-task learners (ridge and
logistic regression with cross-validated penalties), 5 folds: the shape of a multi-site study.
Serial is ``n_jobs=1`` with BLAS and OpenMP limited to one thread, as each joblib worker is, so
the speed-up measures the processes, not the thread pools. The worker processes are started
before timing (their start-up, paid once per Python session, is reported apart); so is the
Dask cluster (``LocalCluster``, 2 worker processes of 1 thread), whose start-up is not timed.

Target: a speed-up near the number of cores (>= 1.6 on 2 idle cores); every run must give the
serial estimates bit for bit. On a shared machine the wall-clock speed-up depends on what else
runs (Linux groups a session's processes and shares the CPU between groups), so the CPU time
of all processes is reported too: ``2 x serial CPU / parallel CPU`` is the speed-up that 2 free
cores would give, the parallel run's overhead included. Needs ``psutil`` (installed with Dask).

Run: ``.venv/bin/python benchmarks/run.py --only parallel [--quick]``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from latefusion.datasets import simulate_rows
from latefusion.dml import DMLSettings, estimate_tasks

ROWS = 400
SETTINGS = DMLSettings(seed=3)


def _cpu_seconds() -> float:
    """CPU time of this process and all its descendants still running (the workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


def _timed(df, xcols, **kw):
    start, cpu = time.perf_counter(), _cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipped propensities in a few simulated sites
        ss = estimate_tasks(df, "task", "A", "Y", xcols, settings=SETTINGS, **kw)
    return time.perf_counter() - start, _cpu_seconds() - cpu, ss.arrays()[0]


def main(quick: bool = False) -> dict:
    """Print the table and return the figures."""
    n_tasks, repeats = (20, 2) if quick else (50, 3)
    df, _ = simulate_rows(n_tasks=n_tasks, n=ROWS, seed=1)
    xcols = [c for c in df if c.startswith("x")]

    # Start the worker processes (and import the library in them) before timing.
    start = time.perf_counter()
    _timed(df[df["task"].isin(df["task"].unique()[:2])], xcols, n_jobs=2)
    startup = time.perf_counter() - start

    serial, parallel, cpu_serial, cpu_parallel = [], [], [], []
    reference = None
    for _ in range(repeats):  # alternate, so that a busy spell on the machine hits both
        with threadpool_limits(1):
            t, cpu, theta = _timed(df, xcols, n_jobs=1)
        serial.append(t)
        cpu_serial.append(cpu)
        reference = theta if reference is None else reference
        t, cpu, theta = _timed(df, xcols, n_jobs=2)
        parallel.append(t)
        cpu_parallel.append(cpu)
        assert np.array_equal(theta, reference), "parallel estimates differ from serial"
    s, p = statistics.median(serial), statistics.median(parallel)
    cs, cp = statistics.median(cpu_serial), statistics.median(cpu_parallel)
    # What 2 idle cores would give: serial CPU over half the parallel CPU (work + overhead)
    rows = [("serial (n_jobs=1)", s, cs, 1.0, 1.0), ("2 processes (n_jobs=2)", p, cp, s / p,
            2 * cs / cp)]  # fmt: skip
    result = {
        "tasks": n_tasks,
        "rows_per_task": ROWS,
        "repeats": repeats,
        "serial_s": s,
        "n_jobs_2_s": p,
        "speedup_n_jobs_2": s / p,
        "speedup_n_jobs_2_idle_cores": 2 * cs / cp,
        "serial_cpu_s": cs,
        "n_jobs_2_cpu_s": cp,
        "serial_all_s": serial,
        "n_jobs_2_all_s": parallel,
        "worker_startup_s": startup,
    }

    dask = _dask(df, xcols, repeats, reference) if not quick else None
    if dask is not None:
        d, dc = dask["median_s"], dask["median_cpu_s"]
        rows.append(("Dask, 2 workers", d, dc, s / d, 2 * cs / dc))
        result.update(
            dask_s=d, dask_cpu_s=dc, dask_all_s=dask["all_s"], speedup_dask=s / d,
            speedup_dask_idle_cores=2 * cs / dc,
        )  # fmt: skip

    print(f"{n_tasks} tasks of {ROWS} rows, median of {repeats} runs")
    print(f"{'run':<24} {'wall s':>7} {'CPU s':>7} {'speed-up':>9} {'on 2 idle cores':>16}")
    for name, t, c, x, ideal in rows:
        print(f"{name:<24} {t:>7.2f} {c:>7.1f} {x:>9.2f} {ideal:>16.2f}")
    print(f"(worker start-up before the first parallel run: {startup:.1f} s)")
    print("speed-up: serial wall / wall. On 2 idle cores: 2 x serial CPU / CPU of all processes,")
    print("the speed-up if both cores were free (a busy shared machine gives one session less).")
    return result


def _dask(df, xcols, repeats, reference) -> dict | None:
    try:
        from distributed import LocalCluster
    except ImportError:
        print("Dask distributed not installed: cluster run skipped")
        return None
    times, cpus = [], []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        _timed(df[df["task"].isin(df["task"].unique()[:2])], xcols, scheduler=address)  # warm
        for _ in range(repeats):
            t, cpu, theta = _timed(df, xcols, scheduler=address)
            assert np.array_equal(theta, reference), "cluster estimates differ from serial"
            times.append(t)
            cpus.append(cpu)
    return {
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpus),
        "all_s": times,
    }


if __name__ == "__main__":
    main()
