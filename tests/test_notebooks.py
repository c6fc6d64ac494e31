"""The teaching notebooks (notebooks/0*.ipynb): committed clean, and executed top to bottom in fast mode.

Each notebook is run by nbclient in a real Jupyter kernel, from the notebooks/ folder (as JupyterLab would), with
its default parameters (FAST = True). conftest.py points the package's cache and runs root at temporary folders and
the kernel inherits them; TMPDIR is pointed at the test's own folder as well, so a notebook that writes anywhere
but a temporary folder or the cache shows up as a changed notebooks/ folder.

The `tiny` preset's tokenizer and teacher are trained once per session (shared with the distillation tests) before
the notebooks that need them, so a cold cache is not charged to a notebook's cell timeout.
"""
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ["01_quantization", "02_trust_region", "03_auxiliary_nn", "04_data_clustering", "05_precision_plan",
            "06_hybrid_distillation"]
NEEDS_TINY_TEACHER = {"05_precision_plan", "06_hybrid_distillation"}
CELL_TIMEOUT_S = 600          # generous: CI machines are shared; fast mode takes well under 2 minutes per notebook
MAX_NOTEBOOK_BYTES = 100_000  # committed without outputs: prose and code only


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(nb) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell must be tagged 'parameters'"
    return tagged[0]


def test_the_six_notebooks_exist():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_is_clean(name):
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, "keep committed notebooks small: clear the outputs"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks with outputs cleared"
    params = parameters_cell(nb)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code is params, "the parameters cell must be the first code cell (papermill convention)"
    assert "FAST = True" in params.source, "fast mode must be the default, for CI"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "start with a title"
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Sources:" in prose, "explain the math and cite its sources"


_tiny_teacher_ready = False


@pytest.fixture
def tiny_teacher_cached():
    """Train (or find) the tiny preset's tokenizer, teacher and logits in the session's cache (conftest.py), outside
    the notebook's cell timeout: a one-step run without a run record, once per session."""
    global _tiny_teacher_ready
    if not _tiny_teacher_ready:
        from hybrid_optimization.distill import TrainOptions, train

        train(TrainOptions(preset="tiny", max_steps=1, eval_every=10_000, quiet=True, progress=False, track=False))
        _tiny_teacher_ready = True


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_top_to_bottom_in_fast_mode(name, request, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    if name in NEEDS_TINY_TEACHER:
        request.getfixturevalue("tiny_teacher_cached")
    monkeypatch.setenv("TMPDIR", str(tmp_path))          # tempfile.mkdtemp() in the kernel lands here
    before = sorted(p.name for p in NOTEBOOKS_DIR.iterdir())
    nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
                            extra_arguments=["--HistoryManager.enabled=False"])   # no ~/.ipython history writes
    start = time.perf_counter()
    client.execute()                                     # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    print(f"{name}: executed in {seconds:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 2, "every notebook teaches with plotly figures"
    assert sorted(p.name for p in NOTEBOOKS_DIR.iterdir()) == before, "a notebook wrote into notebooks/"
    if name == "06_hybrid_distillation":                 # its run store went to a temporary folder
        assert list(tmp_path.glob("hybrid-notebook-06-*/runs.db"))
