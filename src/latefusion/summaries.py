"""Task summaries: the only thing that leaves a task.

A :class:`TaskSummary` holds one task's estimate ``theta_hat`` (shape ``(p,)``), its sandwich
covariance ``V`` (shape ``(p, p)``), the number of rows ``n``, the coefficient names, a status
and diagnostics. A :class:`SummarySet` holds the summaries of K tasks with the settings that
produced them, and reads and writes a versioned, human-readable JSON file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latefusion._version import __version__

__all__ = ["SCHEMA", "SCHEMA_VERSION", "SummarySet", "TaskSummary", "read_summary_files"]

SCHEMA = "latefusion.summaries"
SCHEMA_VERSION = 1

#: Largest summary file :meth:`SummarySet.read_json` accepts; files from other sites are
#: untrusted input, and a summary of thousands of tasks is far smaller than this.
MAX_FILE_BYTES = 64 * 1024 * 1024

STATUS_OK = "ok"
STATUS_EXCLUDED = "excluded"


#: Diagnostics that are counts of units, rows or folds (the report shows them as integers).
_COUNT_DIAGNOSTICS = (
    "n_treated",
    "n_control",
    "n_folds",
    "clipped_treated",
    "clipped_control",
    "rows_dropped",
)


@dataclass(frozen=True)
class TaskSummary:
    """Summary of one task.

    Parameters
    ----------
    task : str
        Task name (site, hospital, school).
    estimand : str
        What ``theta_hat`` estimates: ``"plr"`` (partially linear coefficients), ``"ate"``,
        ``"att"`` or ``"cate"`` (best linear projection of the conditional effect).
    coef_names : tuple of str, length p
        Names of the coefficients; ``("effect",)`` for a scalar effect, else
        ``("intercept", modifier, ...)``.
    theta_hat : ndarray of shape (p,)
        The estimate. ``nan`` when the task is excluded.
    V : ndarray of shape (p, p)
        Sandwich covariance of ``theta_hat``. ``nan`` when the task is excluded.
    n : int
        Rows used.
    status : {"ok", "excluded"}, default="ok"
        ``"excluded"`` tasks carry a ``reason`` and are left out of fusion.
    reason : str, default=""
        Why the task is excluded.
    diagnostics : dict, default={}
        JSON-serialisable diagnostics (propensity range, clipped units, folds, ...).
    """

    task: str
    estimand: str
    coef_names: tuple[str, ...]
    theta_hat: np.ndarray
    V: np.ndarray
    n: int
    status: str = STATUS_OK
    reason: str = ""
    diagnostics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        theta_hat = np.asarray(self.theta_hat, dtype=float).reshape(-1)
        V = np.asarray(self.V, dtype=float)
        if isinstance(self.coef_names, str):  # tuple("effect") would be six names
            raise ValueError(
                f"task {self.task!r}: coef_names must be a sequence of names, not the string "
                f"{self.coef_names!r}"
            )
        p = len(self.coef_names)
        if V.ndim == 0 or V.size == 1:
            V = V.reshape(1, 1)
        object.__setattr__(self, "task", str(self.task))
        # "ATE" from a hand-written table is the "ate" of summarize's files.
        object.__setattr__(self, "estimand", str(self.estimand).strip().lower())
        object.__setattr__(self, "coef_names", tuple(str(c) for c in self.coef_names))
        object.__setattr__(self, "theta_hat", theta_hat)
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "diagnostics", dict(self.diagnostics))
        repeated = sorted({c for c in self.coef_names if self.coef_names.count(c) > 1})
        if repeated:
            raise ValueError(
                f"task {self.task!r}: coefficient name(s) {repeated} appear more than once; "
                "every coefficient needs its own name"
            )
        if self.status not in (STATUS_OK, STATUS_EXCLUDED):
            raise ValueError(f"task {self.task!r}: unknown status {self.status!r}")
        if self.status == STATUS_EXCLUDED and not str(self.reason).strip():
            object.__setattr__(self, "reason", "no reason given")  # never an empty "excluded:"
        if theta_hat.shape != (p,) or V.shape != (p, p):
            raise ValueError(
                f"task {self.task!r}: theta_hat has shape {theta_hat.shape} and V {V.shape}, "
                f"but there are {p} coefficient names {list(self.coef_names)}"
            )
        if self.status == STATUS_OK:
            _check_estimate(self.task, self.coef_names, theta_hat, V)
            object.__setattr__(self, "V", _check_covariance(self.task, V))

    @property
    def ok(self) -> bool:
        """Whether the task takes part in fusion."""
        return self.status == STATUS_OK

    @property
    def std_error(self) -> np.ndarray:
        """Standard errors, ``sqrt(diag(V))``, shape ``(p,)``."""
        return np.sqrt(np.diag(self.V))

    @classmethod
    def excluded(
        cls,
        task: str,
        estimand: str,
        coef_names: Iterable[str],
        n: int,
        reason: str,
        diagnostics: Mapping[str, Any] | None = None,
    ) -> TaskSummary:
        """Summary of a task that could not be estimated, with the reason."""
        names = tuple(coef_names)
        p = len(names)
        return cls(
            task=task,
            estimand=estimand,
            coef_names=names,
            theta_hat=np.full(p, np.nan),
            V=np.full((p, p), np.nan),
            n=int(n),
            status=STATUS_EXCLUDED,
            reason=reason,
            diagnostics=diagnostics or {},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "status": self.status,
            "reason": self.reason,
            "estimand": self.estimand,
            "n": int(self.n),
            "coef_names": list(self.coef_names),
            "estimate": _floats(self.theta_hat),
            "covariance": [_floats(row) for row in self.V],
            "diagnostics": _jsonable(self.diagnostics),
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "", project_psd: bool = False
    ) -> TaskSummary:
        """Build from the JSON form; ``project_psd`` repairs a covariance that is not positive
        definite (recorded in ``diagnostics["covariance_projected"]``) instead of raising."""
        where = f" in {source}" if source else ""
        if not isinstance(d, Mapping):
            raise ValueError(f"a task entry{where} is not a JSON object")
        task = d.get("task", "?")
        required = ("task", "estimand", "n", "coef_names", "estimate", "covariance")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"task {task!r}{where}: missing field(s) {missing}")
        if not isinstance(d["task"], str) or not d["task"]:
            raise ValueError(f"a task entry{where} has task name {d['task']!r}, not a string")
        if not isinstance(d["estimand"], str) or not d["estimand"]:
            raise ValueError(f"task {task!r}{where}: estimand {d['estimand']!r} is not a name")
        names = d["coef_names"]
        if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
            raise ValueError(f"task {task!r}{where}: 'coef_names' is not a list of names")
        n = d["n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"task {task!r}{where}: 'n' must be a count, got {n!r}")
        if not isinstance(d["estimate"], list) or not isinstance(d["covariance"], list):
            raise ValueError(f"task {task!r}{where}: estimate and covariance must be lists")
        try:
            theta_hat = np.array([_unfloat(x) for x in d["estimate"]], dtype=float)
            V = np.array([[_unfloat(x) for x in row] for row in d["covariance"]], dtype=float)
            n = int(d["n"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"task {task!r}{where}: malformed numbers ({exc})") from None
        diagnostics = d.get("diagnostics", {})
        if not isinstance(diagnostics, Mapping):
            raise ValueError(f"task {task!r}{where}: 'diagnostics' is not an object")
        for key in _COUNT_DIAGNOSTICS:
            value = diagnostics.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(
                    f"task {task!r}{where}: diagnostic {key!r} must be a count, got {value!r}"
                )
        status = d.get("status", STATUS_OK)
        if project_psd and status == STATUS_OK and V.ndim == 2 and V.shape[0] == V.shape[1] > 1:
            # -inf (a variance that is not positive and finite) is left for the checks to refuse.
            if -np.inf < smallest_correlation_eigenvalue(V) <= EIGEN_TOL:
                V, smallest = project_covariance(V)
                diagnostics = {**diagnostics, "covariance_projected": smallest}
        return cls(
            task=d["task"],
            estimand=str(d["estimand"]),
            coef_names=tuple(d["coef_names"]),
            theta_hat=theta_hat,
            V=V,
            n=n,
            status=status,
            reason=str(d.get("reason") or ""),
            diagnostics=diagnostics,
        )


class SummarySet:
    """Summaries of K tasks, with the settings that produced them.

    Parameters
    ----------
    summaries : iterable of TaskSummary
        One per task; task names must be unique, and every usable task must share the
        estimand and coefficient names.
    meta : dict, optional
        JSON-serialisable settings (model, learners, folds, seed, library version).
    """

    def __init__(
        self, summaries: Iterable[TaskSummary], meta: Mapping[str, Any] | None = None
    ) -> None:
        self.summaries: list[TaskSummary] = list(summaries)
        self.meta: dict[str, Any] = dict(meta or {})
        names = [s.task for s in self.summaries]
        dupes = sorted({t for t in names if names.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate task names: {dupes}")
        ok = [s for s in self.summaries if s.ok]
        if ok:
            first = ok[0]
            for s in ok[1:]:
                if s.coef_names != first.coef_names or s.estimand != first.estimand:
                    raise ValueError(
                        f"task {s.task!r} estimates {s.estimand} with coefficients "
                        f"{list(s.coef_names)}, but task {first.task!r} estimates "
                        f"{first.estimand} with {list(first.coef_names)}"
                    )

    def __len__(self) -> int:
        return len(self.summaries)

    def __iter__(self) -> Iterator[TaskSummary]:
        return iter(self.summaries)

    def __getitem__(self, task: str) -> TaskSummary:
        for s in self.summaries:
            if s.task == task:
                return s
        raise KeyError(task)

    def __repr__(self) -> str:
        n_ok = len(self.usable())
        return (
            f"SummarySet({len(self)} tasks, {n_ok} usable, estimand={self.estimand!r}, "
            f"coefs={list(self.coef_names)})"
        )

    def usable(self) -> list[TaskSummary]:
        """Summaries with status ``"ok"``, in order."""
        return [s for s in self.summaries if s.ok]

    def excluded(self) -> list[TaskSummary]:
        """Summaries with status ``"excluded"``, in order."""
        return [s for s in self.summaries if not s.ok]

    @property
    def estimand(self) -> str | None:
        ok = self.usable() or self.summaries
        return ok[0].estimand if ok else None

    @property
    def coef_names(self) -> tuple[str, ...]:
        ok = self.usable() or self.summaries
        return ok[0].coef_names if ok else ()

    @property
    def task_names(self) -> list[str]:
        """Names of the usable tasks, in order."""
        return [s.task for s in self.usable()]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stack the usable tasks.

        Returns
        -------
        theta_hat : ndarray of shape (K, p)
        V : ndarray of shape (K, p, p)
        n : ndarray of shape (K,)
        """
        ok = self.usable()
        if not ok:
            raise ValueError("no usable task: every task is excluded (see their reasons)")
        theta_hat = np.stack([s.theta_hat for s in ok])
        V = np.stack([s.V for s in ok])
        n = np.array([s.n for s in ok])
        return theta_hat, V, n

    # JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "latefusion_version": __version__,
            "meta": _jsonable(self.meta),
            "tasks": [s.to_dict() for s in self.summaries],
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "", project_psd: bool = False) -> SummarySet:
        where = f" {source}" if source else ""
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ValueError(f"summary file{where} is not a latefusion summaries file")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"summary file{where} has schema version {version!r}; this latefusion "
                f"({__version__}) reads version {SCHEMA_VERSION}"
            )
        tasks = d.get("tasks")
        if not isinstance(tasks, list):
            raise ValueError(f"summary file{where}: 'tasks' is not a list")
        summaries = [TaskSummary.from_dict(t, source, project_psd) for t in tasks]
        meta = d.get("meta", {})
        return cls(summaries, meta=meta if isinstance(meta, Mapping) else {})

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the summaries as JSON, atomically (never a half-written file)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        return atomic_write_text(path, text + "\n")

    @classmethod
    def read_json(cls, path: str | os.PathLike[str], project_psd: bool = False) -> SummarySet:
        """Read a summaries file written by :meth:`to_json` (untrusted input is checked).

        Every problem raises :class:`ValueError` naming the file (and the task where there is
        one): not JSON, another schema or version, missing fields, malformed numbers, a file
        over :data:`MAX_FILE_BYTES`, a covariance that is not positive definite (unless
        ``project_psd``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such summary file: {path}")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"summary file {path} is {size} bytes, over {MAX_FILE_BYTES}")
        try:
            d = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ValueError(f"summary file {path} is not valid JSON: {what}") from None
        try:
            return cls.from_dict(d, source=str(path), project_psd=project_psd)
        except (ValueError, OverflowError) as exc:
            msg = str(exc)
            raise ValueError(msg if str(path) in msg else f"{path}: {msg}") from None

    @classmethod
    def combine(cls, sets: Iterable[SummarySet], sources: Iterable[str] = ()) -> SummarySet:
        """One set from the summaries of several sites.

        Task names must be unique across sites, and every usable task must share the estimand
        and coefficient names; the error names the files at fault. ``meta`` keeps each site's
        settings under ``"sites"``.
        """
        sets = list(sets)
        sources = list(sources) or [f"input {i + 1}" for i in range(len(sets))]
        seen: dict[str, str] = {}
        for ss, src in zip(sets, sources, strict=True):
            for s in ss:
                if s.task in seen:
                    raise ValueError(
                        f"task {s.task!r} appears in both {seen[s.task]} and {src}; task names "
                        "must be unique across sites"
                    )
                seen[s.task] = src
        ref = next(((ss, src) for ss, src in zip(sets, sources, strict=True) if ss.usable()), None)
        if ref is not None:
            for ss, src in zip(sets, sources, strict=True):
                if ss.usable() and (ss.coef_names, ss.estimand) != (
                    ref[0].coef_names,
                    ref[0].estimand,
                ):
                    csv = [x for x in (src, ref[1]) if str(x).lower().endswith(".csv")]
                    hint = (
                        f" ({' and '.join(csv)}: a summary table states its estimand in a column "
                        "'estimand'; without one its tasks are taken as 'ate')"
                        if csv
                        else ""
                    )
                    raise ValueError(
                        f"{src} estimates {ss.estimand} with coefficients {list(ss.coef_names)}, "
                        f"but {ref[1]} estimates {ref[0].estimand} with "
                        f"{list(ref[0].coef_names)}{hint}"
                    )
        _warn_other_columns(sets, sources)
        meta = {"sites": {src: ss.meta for ss, src in zip(sets, sources, strict=True)}}
        return cls([s for ss in sets for s in ss], meta=meta)


def _warn_other_columns(sets: list[SummarySet], sources: list[str]) -> None:
    """Warn when sites' summaries record different treatment or outcome columns.

    Sites may name their columns differently, so this is a warning, not an error: it is the
    one sign, in summaries alone, that two files may not estimate the same effect.
    """
    from latefusion.warnings import LateFusionWarning

    seen: dict[str, tuple[str, str]] = {}
    for ss, src in zip(sets, sources, strict=True):
        columns = ss.meta.get("columns") if isinstance(ss.meta, Mapping) else None
        if not isinstance(columns, Mapping):
            continue
        for role in ("treatment", "outcome"):
            name = columns.get(role)
            if not isinstance(name, str):
                continue
            if role in seen and seen[role][0] != name:
                warnings.warn(
                    f"{src} summarises {role} column {name!r} but {seen[role][1]} summarises "
                    f"{seen[role][0]!r}: check that the sites estimate the same effect",
                    LateFusionWarning,
                    stacklevel=3,
                )
            seen.setdefault(role, (name, src))


def read_summary_files(
    paths: Iterable[str | os.PathLike[str]],
    project_psd: bool = False,
    assume_independent: bool = False,
) -> SummarySet:
    """One SummarySet from summary JSON files and CSV tables of univariate summaries.

    JSON files are read by :meth:`SummarySet.read_json`; ``.csv``/``.tsv``/``.gz`` tables (the
    meta-analyst's ``task,coef,estimate,std_error``) by
    :func:`latefusion.dml.interop.summaries_from_table`. Several files are combined with
    :meth:`SummarySet.combine`; every error names the file at fault. ``assume_independent``
    is passed to ``summaries_from_table`` (tables with several coefficients per task and no
    covariance columns).
    """
    paths = [Path(p) for p in paths]
    sets = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        if path.suffix.lower() in (".csv", ".tsv", ".gz"):
            from latefusion.dml.interop import summaries_from_table

            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ValueError(f"summary file {path} is {size} bytes, over {MAX_FILE_BYTES}")

            try:
                sets.append(
                    summaries_from_table(
                        path, project_psd=project_psd, assume_independent=assume_independent
                    )
                )
            except ValueError as exc:
                msg = str(exc)
                raise ValueError(msg if str(path) in msg else f"{path}: {msg}") from None
        else:
            sets.append(SummarySet.read_json(path, project_psd=project_psd))
    if len(sets) == 1:
        return sets[0]
    return SummarySet.combine(sets, [str(p) for p in paths])


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_estimate(task: str, names: tuple[str, ...], theta_hat: np.ndarray, V: np.ndarray):
    if not np.all(np.isfinite(theta_hat)):
        bad = [n for n, x in zip(names, theta_hat, strict=True) if not np.isfinite(x)]
        raise ValueError(f"task {task!r}: non-finite estimate for {bad}")
    if not np.all(np.isfinite(V)):
        raise ValueError(f"task {task!r}: non-finite covariance")
    var = np.diag(V)
    if np.any(var <= 0):
        bad = [n for n, v in zip(names, var, strict=True) if v <= 0]
        raise ValueError(f"task {task!r}: variance of {bad} is zero or negative")


#: Relative asymmetry of a covariance accepted as rounding noise (and symmetrised).
SYMMETRY_TOL = 1e-8
#: Smallest eigenvalue of the correlation matrix of an acceptable covariance. Judged on the
#: correlation scale so that coefficients in different units (an intercept with standard error
#: 1000 beside a slope with 1e-4) are not mistaken for a singular covariance.
EIGEN_TOL = 1e-12


def smallest_correlation_eigenvalue(V: np.ndarray) -> float:
    """Smallest eigenvalue of the correlation matrix of ``V`` (-inf if a variance is not
    positive and finite): at most 0 when ``V`` is not positive definite, whatever the units."""
    V = (V + V.T) / 2
    d = np.diag(V)
    if not np.all(np.isfinite(V)) or np.any(d <= 0):
        return -np.inf
    s = 1 / np.sqrt(d)
    return float(np.linalg.eigvalsh(V * s[:, None] * s[None, :])[0])


def _check_covariance(task: str, V: np.ndarray) -> np.ndarray:
    """Symmetrise rounding noise; refuse a covariance that is not positive definite."""
    scale = np.max(np.abs(V))
    asym = np.max(np.abs(V - V.T)) / scale
    if asym > SYMMETRY_TOL:
        raise ValueError(
            f"task {task!r}: covariance is not symmetric (relative asymmetry {asym:.2g})"
        )
    V = (V + V.T) / 2
    if V.shape[0] > 1:
        smallest = smallest_correlation_eigenvalue(V)
        if smallest <= EIGEN_TOL:
            raise ValueError(
                f"task {task!r}: covariance is not positive definite (smallest eigenvalue of "
                f"its correlation matrix {smallest:.3g}); fix it at the site, or project it "
                "onto the positive definite matrices (project_psd=True, --project-psd)"
            )
    return V


def project_covariance(V: np.ndarray) -> tuple[np.ndarray, float]:
    """Keep the variances, and replace the correlation matrix by the nearest symmetric matrix
    with eigenvalues at least ``1e-8``.

    Returns the projected matrix and the smallest eigenvalue of the correlation matrix before
    projection. Working on the correlation scale leaves every variance as the site reported
    it, whatever the coefficients' units (clipping eigenvalues of ``V`` itself inflated a small
    variance beside a large one).
    """
    V = (V + V.T) / 2
    sd = np.sqrt(np.diag(V))
    R = V / np.outer(sd, sd)
    w, Q = np.linalg.eigh(R)
    R = (Q * np.maximum(w, 1e-8)) @ Q.T
    R = R / np.sqrt(np.outer(np.diag(R), np.diag(R)))  # unit diagonal again
    return R * np.outer(sd, sd), float(w[0])


def _floats(x: np.ndarray) -> list[float | str]:
    return [_float(v) for v in np.asarray(x, dtype=float).ravel()]


def _float(v: float) -> float | str:
    # JSON has no NaN; excluded tasks store "nan" as a string.
    return float(v) if math.isfinite(v) else str(v)


def _unfloat(x: Any) -> float:
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"{x!r} is not a number")
    return float(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer | bool):
        return int(obj) if not isinstance(obj, bool) else obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, float | np.floating):
        return _float(float(obj))
    return obj
