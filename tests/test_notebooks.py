"""Every notebook in colab/ runs top to bottom on the CPU in a fresh Jupyter kernel (nbclient).

The install cell of each notebook skips itself when ``spectral_peft`` is already importable, which it is
in the test environment, so the kernel runs the checked-out package.
"""

from __future__ import annotations

import glob
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "colab", "*.ipynb")))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  notebook = nbformat.read(path, as_version=4)
  assert any(c.cell_type == "code" for c in notebook.cells), "a notebook without code"
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  outputs = "".join(
      out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", ())
  )
  assert "backend:" in outputs, "the notebook did not report the backend it found"
