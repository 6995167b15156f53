"""Every notebook in colab/ runs top to bottom on the CPU (install cells skipped: the package is installed)."""

from __future__ import annotations

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "colab", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, capsys):
  with open(path) as f:
    notebook = json.load(f)
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "install" not in c["metadata"].get("tags", [])]
  assert cells, "a notebook without code"
  scope: dict = {}
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), scope)  # noqa: S102
  assert "backend:" in capsys.readouterr().out
