"""Run the benchmarks in this folder and keep their figures.

Every module ``bench_<name>.py`` here is a benchmark: it defines ``main(quick: bool) -> dict``,
which prints a small table and returns its figures. This runner calls each one, stamps the
figures with the date, the machine and the library versions, and writes them to
``benchmarks/results/<name>.json``.

    .venv/bin/python benchmarks/run.py                 # all of them (make bench)
    .venv/bin/python benchmarks/run.py --only dml      # one of them
    .venv/bin/python benchmarks/run.py --quick         # smaller sizes, fewer repeats
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PACKAGES = (
    "latefusion", "numpy", "scipy", "pandas", "scikit-learn", "joblib", "threadpoolctl",
    "doubleml", "dask", "distributed", "pymc", "cvxpy",
)  # fmt: skip


def available() -> dict[str, Path]:
    """Benchmark names and their modules, in alphabetical order."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(path: Path) -> ModuleType:
    sys.path.insert(0, str(HERE))  # benchmarks may share helpers that live next to them
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stamp() -> dict:
    """Where and when the figures were measured."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)),
            "load_average": list(os.getloadavg()),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
        },
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    benches = available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", choices=sorted(benches), metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(benches)}",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in benches.items():
            doc = (load(path).__doc__ or "").strip().splitlines()
            print(f"{name:<12} {doc[0] if doc else ''}")
        return 0

    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in args.only or benches:
        print(f"== {name} {'(quick) ' if args.quick else ''}" + "=" * 60, flush=True)
        started = time.perf_counter()
        where = stamp()
        try:
            figures = load(benches[name]).main(quick=args.quick)
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        record = {
            "benchmark": name,
            **where,
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started, 1),
            "results": figures,
        }
        out = RESULTS / f"{name}.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=float) + "\n", encoding="utf-8")
        tmp.replace(out)  # never a half-written results file
        print(f"-> {out.relative_to(HERE.parent)} ({record['seconds']} s)\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
