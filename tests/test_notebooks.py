"""The notebooks in examples/ run top to bottom in a fresh kernel, and are committed with outputs.

Each notebook runs in a temporary copy (its files land in a temporary directory) with
``LATEFUSION_QUICK=1``, which the notebooks read to use small sampling settings; the committed
outputs come from a run with the full settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
#: A committed notebook larger than this has too many or too large images.
MAX_BYTES = 1_500_000

EXPECTED = [
    "01_quickstart_star",
    "02_posterior_analysis",
    "03_prior_sensitivity",
    "04_bayes_vs_frequentist_simulation",
    "05_federated_workflow",
]


def test_every_example_is_here() -> None:
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_outputs(path: Path) -> None:
    """A reader on GitHub sees the plots without running anything."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "not executed in full"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "executed top to bottom, once"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "no plot in the committed outputs"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert path.stat().st_size < MAX_BYTES
    assert "LATEFUSION_QUICK" in code[0].source or "LATEFUSION_QUICK" in code[1].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATEFUSION_QUICK", "1")
    # Opt in to jupyter_core's platformdirs paths; the default warns (DeprecationWarning).
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel must be this environment's Python, fresh.
    guard = f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"
    nb.cells.insert(0, nbformat.v4.new_code_cell(guard))

    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs
        if "image/png" in o.get("data", {})
    ]  # fmt: skip
    assert images, "the notebook drew no plot"
    assert not (EXAMPLES / "star-output").exists(), "files go to the temporary directory"
