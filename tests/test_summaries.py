"""Summary container and its JSON file: round trips, and untrusted input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from latefusion import summaries as summaries_mod
from latefusion.summaries import (
    SummarySet,
    TaskSummary,
    project_covariance,
    smallest_correlation_eigenvalue,
)
from latefusion.warnings import LateFusionWarning


def _set(rng, K=4, p=2):
    out = []
    for k in range(K):
        A = rng.standard_normal((p, p))
        out.append(
            TaskSummary(
                f"site{k}",
                "cate",
                ("intercept", "z")[:p],
                rng.standard_normal(p),
                A @ A.T + np.eye(p),
                n=100 + k,
                diagnostics={"n_folds": 5, "lst": [1, 2]},
            )
        )
    out.append(TaskSummary.excluded("bad", "cate", ("intercept", "z")[:p], 7, "one arm"))
    return SummarySet(out, meta={"dml": {"model": "irm", "clip": 0.01}})


def test_json_round_trip_is_exact(tmp_path, rng):
    ss = _set(rng)
    path = ss.to_json(tmp_path / "s.json")
    back = SummarySet.read_json(path)
    assert [s.task for s in back] == [s.task for s in ss]
    for a, b in zip(ss, back, strict=True):
        np.testing.assert_array_equal(a.theta_hat, b.theta_hat)  # repr of floats is exact
        np.testing.assert_array_equal(a.V, b.V)
        assert (a.status, a.reason, a.n, a.coef_names) == (b.status, b.reason, b.n, b.coef_names)
    assert back.meta == ss.meta
    assert not back["bad"].ok and np.isnan(back["bad"].theta_hat).all()
    doc = json.loads(path.read_text())
    assert doc["schema"] == "latefusion.summaries" and doc["schema_version"] == 1
    assert doc["tasks"][-1]["estimate"] == ["nan", "nan"]  # JSON has no NaN: spelled out


def test_arrays_stack_only_usable_tasks(rng):
    theta_hat, V, n = _set(rng, K=3).arrays()
    assert theta_hat.shape == (3, 2) and V.shape == (3, 2, 2) and list(n) == [100, 101, 102]


def test_written_file_has_the_usual_mode_and_no_temporary_left(tmp_path, rng):
    path = _set(rng).to_json(tmp_path / "s.json")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_malformed_numbers_and_diagnostics_name_the_file_and_task(tmp_path, rng):
    # A 400-digit integer was an OverflowError traceback; a non-count rows_dropped failed only
    # when the report was written, after all the fusion, naming nothing.
    doc = json.loads(_set(rng).to_json(tmp_path / "s.json").read_text())
    task = doc["tasks"][0]["task"]
    huge = json.dumps(doc).replace('"estimate": [', '"estimate": [1' + "0" * 400 + ", ", 1)
    (tmp_path / "huge.json").write_text(huge)
    with pytest.raises(ValueError, match=f"task '{task}' in .*huge.json: malformed numbers"):
        SummarySet.read_json(tmp_path / "huge.json")
    doc["tasks"][1]["status"], doc["tasks"][1]["reason"] = "excluded", ""
    (tmp_path / "noreason.json").write_text(json.dumps(doc))
    assert list(SummarySet.read_json(tmp_path / "noreason.json"))[1].reason == (
        "no reason given"
    )  # the report said "excluded task00: " and nothing more
    doc["tasks"][0]["diagnostics"] = {"rows_dropped": "some"}
    (tmp_path / "diag.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="diagnostic 'rows_dropped' must be a count, got 'some'"):
        SummarySet.read_json(tmp_path / "diag.json")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "is not valid JSON"),
        ('{"schema": "other"}', "not a latefusion summaries file"),
        ('{"schema": "latefusion.summaries", "schema_version": 99, "tasks": []}', "version 99"),
        ('{"schema": "latefusion.summaries", "schema_version": 1, "tasks": {}}', "not a list"),
        (
            '{"schema": "latefusion.summaries", "schema_version": 1, "tasks": [{"task": "a"}]}',
            "task 'a'.*missing field",
        ),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_files_raise_value_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "site.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=match) as info:
        SummarySet.read_json(path)
    assert "site.json" in str(info.value)


def test_truncated_file_is_an_error(tmp_path, rng):
    path = _set(rng).to_json(tmp_path / "s.json")
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ValueError, match="not valid JSON"):
        SummarySet.read_json(path)


def test_oversized_file_is_refused_before_reading(tmp_path, rng, monkeypatch):
    path = _set(rng).to_json(tmp_path / "s.json")
    monkeypatch.setattr(summaries_mod, "MAX_FILE_BYTES", 100)
    with pytest.raises(ValueError, match="bytes, over 100"):
        SummarySet.read_json(path)


def test_wrong_numbers_in_file_name_the_task(tmp_path, rng):
    doc = _set(rng).to_dict()
    doc["tasks"][1]["covariance"][0][0] = "a lot"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="task 'site1'.*malformed numbers"):
        SummarySet.read_json(path)


def test_duplicate_tasks_and_mismatched_coefficients_are_refused(rng):
    a = TaskSummary("a", "ate", ("effect",), [1.0], [[1.0]], 10)
    with pytest.raises(ValueError, match=r"duplicate task names: \['a'\]"):
        SummarySet([a, a])
    b = TaskSummary("b", "cate", ("intercept", "z"), [1.0, 2.0], np.eye(2), 10)
    with pytest.raises(ValueError, match="task 'b' estimates cate"):
        SummarySet([a, b])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_zero_negative_or_non_finite_variance_names_the_task(bad):
    with pytest.raises(ValueError, match="task 'x'"):
        TaskSummary("x", "ate", ("effect",), [1.0], [[bad]], 10)


def test_estimand_names_ignore_case():
    assert TaskSummary("a", "ATE", ("effect",), [1.0], [[1.0]], 10).estimand == "ate"


def test_coefficient_names_must_be_distinct_names():
    # Two coefficients of one name made estimates.csv rows that could not be told apart.
    with pytest.raises(ValueError, match=r"task 'a': coefficient name\(s\) \['effect'\]"):
        TaskSummary("a", "cate", ("effect", "effect"), [1.0, 2.0], np.eye(2), 10)
    with pytest.raises(ValueError, match="not the string 'effect'"):
        TaskSummary("a", "ate", "effect", [1.0], [[1.0]], 10)


def test_shape_mismatch_names_the_task():
    with pytest.raises(ValueError, match="task 'x'.*2 coefficient names"):
        TaskSummary("x", "cate", ("intercept", "z"), [1.0], [[1.0]], 10)


def test_rounding_asymmetry_is_symmetrised_and_real_asymmetry_refused():
    V = np.array([[2.0, 0.5], [0.5 + 1e-12, 1.0]])
    s = TaskSummary("a", "cate", ("intercept", "z"), [0.0, 0.0], V, 10)
    np.testing.assert_array_equal(s.V, s.V.T)
    with pytest.raises(ValueError, match="task 'b': covariance is not symmetric"):
        TaskSummary("b", "cate", ("intercept", "z"), [0.0, 0.0], [[2.0, 0.5], [0.9, 1.0]], 10)


def test_indefinite_covariance_is_refused_or_projected_when_asked(tmp_path):
    bad = {
        "task": "site9",
        "estimand": "cate",
        "n": 50,
        "coef_names": ["intercept", "z"],
        "estimate": [1.0, 2.0],
        "covariance": [[1.0, 2.0], [2.0, 1.0]],
    }
    doc = {"schema": "latefusion.summaries", "schema_version": 1, "tasks": [bad]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="site9.*not positive definite.*--project-psd"):
        SummarySet.read_json(path)
    s = SummarySet.read_json(path, project_psd=True)["site9"]
    assert np.linalg.eigvalsh(s.V)[0] > 0
    assert s.diagnostics["covariance_projected"] == pytest.approx(-1.0)  # smallest eigenvalue


def test_covariance_checks_do_not_depend_on_the_coefficients_units():
    # An intercept with standard error 1000 beside a slope with 1e-4: positive definite, once
    # refused as singular (eigenvalue ratio 1e-14) and then inflated 1000-fold by projection.
    V = np.diag([1000.0**2, 1e-4**2])
    s = TaskSummary("site", "cate", ("intercept", "z"), [1.0, 0.001], V, 50)
    np.testing.assert_array_equal(s.V, V)
    # A covariance that is not positive definite in those units is refused, and projection
    # keeps both variances and repairs only the correlation.
    bad = np.array([[1000.0**2, 0.2], [0.2, 1e-4**2]])  # correlation 2
    with pytest.raises(ValueError, match="not positive definite"):
        TaskSummary("site", "cate", ("intercept", "z"), [1.0, 0.001], bad, 50)
    fixed, smallest = project_covariance(bad)
    assert smallest == pytest.approx(-1.0)
    np.testing.assert_allclose(np.diag(fixed), np.diag(bad), rtol=1e-12)
    assert smallest_correlation_eigenvalue(fixed) > 0


def test_combine_sites_checks_duplicates_and_coefficients(rng):
    a = SummarySet([TaskSummary("x", "ate", ("effect",), [1.0], [[1.0]], 10)], meta={"k": 1})
    b = SummarySet([TaskSummary("y", "ate", ("effect",), [2.0], [[1.0]], 10)])
    both = SummarySet.combine([a, b], ["a.json", "b.json"])
    assert both.task_names == ["x", "y"] and both.meta["sites"]["a.json"] == {"k": 1}
    with pytest.raises(ValueError, match="task 'x' appears in both a.json and b.json"):
        SummarySet.combine([a, a], ["a.json", "b.json"])
    c = SummarySet([TaskSummary("z", "att", ("effect",), [2.0], [[1.0]], 10)])
    with pytest.raises(ValueError, match="c.json estimates att") as err:
        SummarySet.combine([a, c], ["a.json", "c.json"])
    assert "column 'estimand'" not in str(err.value)  # no table involved
    # A summary table without an 'estimand' column is taken as ATEs: the error says so.
    with pytest.raises(ValueError, match=r"table.csv: a summary table states its estimand"):
        SummarySet.combine([c, a], ["c.json", "table.csv"])


def test_combine_warns_when_sites_summarise_other_columns():
    def site(task, treatment, outcome):
        meta = {"columns": {"treatment": treatment, "outcome": outcome}}
        return SummarySet([TaskSummary(task, "ate", ("effect",), [1.0], [[1.0]], 10)], meta=meta)

    SummarySet.combine([site("x", "A", "Y"), site("y", "A", "Y")], ["a.json", "b.json"])
    with pytest.warns(LateFusionWarning, match="b.json summarises outcome column 'bmi' but a.json"):
        SummarySet.combine([site("x", "A", "Y"), site("y", "A", "bmi")], ["a.json", "b.json"])


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such summary file"):
        SummarySet.read_json(tmp_path / "nope.json")


def test_deeply_nested_json_and_bad_fields_are_value_errors(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(
        '{"schema": "latefusion.summaries", "schema_version": 1, "tasks": ' + "[" * 100_000
    )
    with pytest.raises(ValueError, match="deep.json"):
        SummarySet.read_json(deep)
    good = {
        "task": "a",
        "estimand": "ate",
        "n": 10,
        "coef_names": ["effect"],
        "estimate": [1.0],
        "covariance": [[1.0]],
    }
    for field, value, match in [
        ("n", -5, "'n' must be a count"),
        ("n", "100", "'n' must be a count"),
        ("task", None, "not a string"),
        ("coef_names", 3, "not a list of names"),
        ("estimand", 3, "not a name"),
    ]:
        doc = {
            "schema": "latefusion.summaries",
            "schema_version": 1,
            "tasks": [{**good, field: value}],
        }
        path = tmp_path / "f.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=match):
            SummarySet.read_json(path)


def test_byte_order_mark_is_accepted(tmp_path, rng):
    path = _set(rng).to_json(tmp_path / "s.json")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(SummarySet.read_json(path)) == 5
