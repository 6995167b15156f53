"""Every notebook in colab/ runs top to bottom on the CPU in a fresh Jupyter kernel (nbclient) and shows plots.

The install cell of each notebook skips itself when ``spectral_peft`` is already importable, which it is
in the test environment, so the kernel runs the checked-out package; the kernel gets
``SPECTRAL_PEFT_SOURCE`` pointing at this checkout all the same. The install command itself (what a fresh
Colab runtime runs) is checked separately: it installs this checkout through the same
``spectral_peft[experiments] @ <source>`` requirement, without dependencies or network.

The repository URL is written once, in pyproject.toml (``[project.urls] Source``); the notebooks'
``REPO_URL`` and the README's install line and badges must use the same one.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
  REPO_URL = tomllib.load(_f)["project"]["urls"]["Source"]
COLAB_PREFIX = "https://colab.research.google.com/github/" + REPO_URL.split("github.com/", 1)[1] + "/blob/main/colab/"


def _install_cell(notebook) -> str:
  cells = [c.source for c in notebook.cells if c.cell_type == "code" and "def install_command" in c.source]
  assert len(cells) == 1, "expected one install cell defining install_command()"
  return cells[0]


def _require_flax_transformers() -> None:
  """Skips (without the ``transformers`` extra, which ``make test`` installs) rather than letting the
  notebook's install cell reach for the network."""
  try:
    major = int(importlib.metadata.version("transformers").split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs the `transformers` extra (transformers 4.x)")
  if major >= 5:
    pytest.skip(f"needs transformers 4.x for its Flax models, found {importlib.metadata.version('transformers')}")


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_plots(path, tmp_path, monkeypatch):
  if "transformers" in _install_cell(nbformat.read(path, as_version=4)):
    _require_flax_transformers()
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("SPECTRAL_PEFT_SOURCE", ROOT)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders PNGs with Agg
  notebook = nbformat.read(path, as_version=4)
  assert any(c.cell_type == "code" for c in notebook.cells), "a notebook without code"
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
  outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", ())]
  text = "".join(out.get("text", "") for out in outputs)
  assert "backend:" in text, "the notebook did not report the backend it found"
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 2, f"the notebook showed {len(images)} plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_points_at_the_repository_and_has_a_badge(path):
  notebook = nbformat.read(path, as_version=4)
  assert re.search(rf"^REPO_URL = '{re.escape(REPO_URL)}'$", _install_cell(notebook), flags=re.M)
  first = notebook.cells[0]
  assert first.cell_type == "markdown"
  assert f"({COLAB_PREFIX}{os.path.basename(path)})" in first.source, "no Open-in-Colab badge for this notebook"


def test_readme_uses_the_repository_url_and_links_every_notebook():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert f'pip install "spectral_peft[experiments] @ git+{REPO_URL}"' in readme
  for path in NOTEBOOKS:
    assert f"({COLAB_PREFIX}{os.path.basename(path)})" in readme, f"no README badge for {os.path.basename(path)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_command_names_declared_extras(path, monkeypatch):
  """Every notebook installs from the repository URL with extras that pyproject.toml declares."""
  scope: dict = {}
  exec(_install_cell(nbformat.read(path, as_version=4)), scope)  # noqa: S102  (skips the install here)
  monkeypatch.delenv("SPECTRAL_PEFT_SOURCE", raising=False)
  requirement = scope["install_command"]()[5]
  match = re.fullmatch(rf"spectral_peft\[([a-z,-]+)\] @ git\+{re.escape(REPO_URL)}", requirement)
  assert match, requirement
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    declared = set(tomllib.load(f)["project"]["optional-dependencies"])
  extras = match.group(1).split(",")
  assert "experiments" in extras and set(extras) <= declared, (extras, sorted(declared))


def test_install_command_installs_from_the_repository(tmp_path, monkeypatch):
  """The command a fresh runtime runs: the URL form by default, this checkout when pointed at it."""
  scope: dict = {}
  exec(_install_cell(nbformat.read(NOTEBOOKS[0], as_version=4)), scope)  # noqa: S102  (skips the install here)
  monkeypatch.delenv("SPECTRAL_PEFT_SOURCE", raising=False)
  command = scope["install_command"]()
  assert command[:5] == [sys.executable, "-m", "pip", "install", "-q"]
  assert command[5] == f"spectral_peft[experiments] @ git+{REPO_URL}"
  assert all(re.fullmatch(r"jax\[(cuda12|cuda13|tpu)\]", extra) for extra in command[6:]), command

  monkeypatch.setenv("SPECTRAL_PEFT_SOURCE", ROOT)
  command = scope["install_command"]()
  assert command[5] == f"spectral_peft[experiments] @ file://{ROOT}"

  setuptools_version = importlib.metadata.version("setuptools")
  if int(setuptools_version.split(".")[0]) < 77:
    pytest.skip(f"building needs setuptools>=77 (the dev extra installs it), found {setuptools_version}")
  target = tmp_path / "site"
  subprocess.run(
      [*command[:5], "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), command[5]],
      check=True, cwd=tmp_path,
  )
  probe = "import json, spectral_peft; print(json.dumps([spectral_peft.__file__, spectral_peft.__version__]))"
  out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}, cwd=tmp_path)
  installed_file, version = json.loads(out.stdout.strip().splitlines()[-1])
  assert installed_file.startswith(str(target)), installed_file
  with open(os.path.join(ROOT, "spectral_peft", "_version.py")) as f:
    assert f'__version__ = "{version}"' in f.read()
