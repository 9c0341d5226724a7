"""Every notebook runs top to bottom, and is committed without outputs."""

import os
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_simulate.ipynb", "02_gradients.ipynb", "03_refine.ipynb",
                                           "04_dataset.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: outputs committed; clear them with "
                "`jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`")
        assert not cell.metadata.get("execution"), f"{path.name}: execution metadata committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # the kernel draws with the inline backend, whatever the environment asks for
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # the kernel imports this checkout's nbragg (and its compiled-kernel cache), as the tests do
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 1, f"{path.name} drew no figures"
    print(f"{path.name}: {elapsed:.1f} s")
