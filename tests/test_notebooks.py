"""Every notebook in colab/ runs top to bottom on the CPU in a fresh Jupyter kernel (nbclient) and shows plots.

The install cell of each notebook skips itself when ``spectral_peft`` is already importable, which it is
in the test environment, so the kernel runs the checked-out package; the kernel gets
``SPECTRAL_PEFT_SOURCE`` pointing at this checkout all the same. The install command itself (what a fresh
Colab runtime runs) is checked separately: it installs this checkout through the same
``spectral_peft[experiments] @ <source>`` requirement, without dependencies or network.

The repository URL is written once, in pyproject.toml (``[project.urls] Source``); the notebooks'
``REPO_URL`` and the README's install line and badges must use the same one.

The notebooks are committed with their outputs (what GitHub and Colab show before anything runs), and
those outputs are the ones this execution produces: the run that CI does is compared with the committed
outputs cell by cell, in kind (stream, Markdown table, image) and in text, numbers within a tolerance
relative to their size (the same code gives slightly different floats on another CPU or jax build).
After editing a notebook, or code whose numbers a notebook prints, rewrite its outputs with::

  SPECTRAL_PEFT_UPDATE_NOTEBOOKS=1 .venv/bin/python -m pytest tests/test_notebooks.py -k runs_and_plots

which executes each notebook as below and writes it back without per-run noise (execution timestamps,
stderr warnings, the kernel's Python version).
"""

from __future__ import annotations

import base64
import copy
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
UPDATE = os.environ.get("SPECTRAL_PEFT_UPDATE_NOTEBOOKS", "") not in ("", "0")

# Committed outputs: how close a re-execution's numbers must be, and how large the images may get.
RTOL = 0.05           # relative to the larger magnitude of the two numbers
ROUND_OFF = 1e-3      # numbers both below this (round-off residues, converged losses) only need to stay below it
PNG_BYTES = 300_000   # per image
NOTEBOOK_BYTES = 1_200_000
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")
# Written into the notebook metadata with the outputs, to tell a numerical drift from a new release.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers")
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/tmp/|/home/|/Users/|/work/|/root/|/private/|/var/folders/|[A-Z]:\\)")


def _committed_form(notebook, metadata=None):
  """The notebook as committed: per-run noise removed, consecutive stream outputs of a cell merged,
  stderr dropped (warnings differ between machines and library versions)."""
  notebook = copy.deepcopy(notebook)
  if metadata is not None:
    notebook.metadata = copy.deepcopy(metadata)  # the kernel rewrites language_info (its Python version)
  for cell in notebook.cells:
    cell.metadata.pop("execution", None)  # nbclient's timestamps
    if cell.cell_type != "code":
      continue
    outputs = []
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        if out.name == "stderr":
          continue
        if outputs and outputs[-1].output_type == "stream" and outputs[-1].name == out.name:
          outputs[-1].text += out.text
          continue
      outputs.append(out)
    cell.outputs = outputs
  return notebook


def _shrink_pngs(notebook) -> None:
  """Re-encode every plot as a 256-colour palette PNG when that is smaller (a third of the size for
  these plots; what GitHub renders, not what the comparison reads)."""
  import io

  from PIL import Image

  for cell in notebook.cells:
    for out in cell.get("outputs", []):
      if "image/png" not in out.get("data", {}):
        continue
      raw = base64.b64decode(out.data["image/png"])
      image = Image.open(io.BytesIO(raw))
      flat = Image.new("RGB", image.size, "white")
      flat.paste(image, mask=image.getchannel("A") if image.mode == "RGBA" else None)
      buffer = io.BytesIO()
      flat.quantize(colors=256, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
      if len(buffer.getvalue()) < len(raw):
        out.data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def _versions() -> dict[str, str]:
  found = {}
  for name in VERSIONED:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _kind(out) -> str:
  if out.output_type == "stream":
    return f"stream:{out.name}"
  return f"{out.output_type}:{','.join(sorted(out.get('data', {})))}"


def _texts(out) -> list[str]:
  if out.output_type == "stream":
    return [out.text]
  return [out.data[m] for m in ("text/plain", "text/markdown", "text/html") if m in out.get("data", {})]


def _numbers_close(a: str, b: str) -> bool:
  x, y = float(a), float(b)
  if x == y or (x != x and y != y):
    return True
  big = max(abs(x), abs(y))
  return big < ROUND_OFF or abs(x - y) <= RTOL * big


def _text_mismatch(committed: str, fresh: str) -> str | None:
  """None when the texts agree: equal once numbers are masked, numbers close. Otherwise the first
  differing line of each. Lines starting with ``backend:`` (devices, versions) only have to exist in both."""
  old_lines, new_lines = committed.splitlines(), fresh.splitlines()
  if len(old_lines) != len(new_lines):
    return f"{len(old_lines)} lines committed, {len(new_lines)} now"
  for old, new in zip(old_lines, new_lines):
    if old.startswith("backend:") and new.startswith("backend:"):
      continue
    old_numbers, new_numbers = NUMBER.findall(old), NUMBER.findall(new)
    if (NUMBER.sub("#", old) != NUMBER.sub("#", new) or len(old_numbers) != len(new_numbers)
        or not all(_numbers_close(a, b) for a, b in zip(old_numbers, new_numbers))):
      return f"committed: {old!r}\n      now: {new!r}"
  return None


def _output_mismatches(committed, fresh) -> list[str]:
  """Cell by cell: the same kinds of output in the same order, and their texts in agreement."""
  problems = []
  old_cells = [c for c in committed.cells if c.cell_type == "code"]
  new_cells = [c for c in fresh.cells if c.cell_type == "code"]
  if [c.source for c in old_cells] != [c.source for c in new_cells]:
    return ["the code cells differ"]
  for index, (old, new) in enumerate(zip(old_cells, new_cells), start=1):
    old_kinds, new_kinds = [_kind(o) for o in old.outputs], [_kind(o) for o in new.outputs]
    if old_kinds != new_kinds:
      problems.append(f"code cell {index}: outputs committed {old_kinds}, now {new_kinds}")
      continue
    for old_out, new_out in zip(old.outputs, new.outputs):
      for old_text, new_text in zip(_texts(old_out), _texts(new_out)):
        mismatch = _text_mismatch(old_text, new_text)
        if mismatch:
          problems.append(f"code cell {index} ({_kind(old_out)}):\n      {mismatch}")
  return problems


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
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS


# Notebooks whose run is mostly compilation keep the suite's XLA:CPU -O0 (tests/conftest.py); their
# outputs stay within the tolerance above. Measured alone (pytest wall time, default -> -O0):
# llm_finetuning 141 -> 104 s, quickstart 42 -> 34 s, spectral_analysis 32 -> 26 s; the others are
# compute-bound and slower at -O0 (implicit_neural_representations 43 -> 47 s, pretrained_transformer
# 158 -> 248 s), so they compile as a user's would.
COMPILE_BOUND = {"llm_finetuning.ipynb", "quickstart.ipynb", "spectral_analysis.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_plots(path, tmp_path, monkeypatch):
  if "transformers" in _install_cell(nbformat.read(path, as_version=4)):
    _require_flax_transformers()
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("SPECTRAL_PEFT_SOURCE", ROOT)
  flags = os.environ.get("XLA_FLAGS", "")
  if os.path.basename(path) not in COMPILE_BOUND:
    flags = flags.replace("--xla_backend_optimization_level=0", "").strip()
  if flags:  # The kernel compiles as a user's would (conftest's flag is the suite's, not the notebook's).
    monkeypatch.setenv("XLA_FLAGS", flags)
  else:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
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

  committed = nbformat.read(path, as_version=4)
  fresh = _committed_form(notebook, metadata=committed.metadata)
  if UPDATE:
    _shrink_pngs(fresh)
    fresh.metadata["spectral_peft"] = {"outputs_computed_with": _versions()}
    nbformat.write(fresh, path)
    return
  if os.environ["JAX_PLATFORMS"] != "cpu":
    return  # the committed outputs are a CPU run's
  problems = _output_mismatches(_committed_form(committed), fresh)
  then = committed.metadata.get("spectral_peft", {}).get("outputs_computed_with", {})
  now = {k: v for k, v in _versions().items() if k in then}
  assert not problems, (
      f"{os.path.basename(path)}: the committed outputs are not what the committed code gives now "
      f"(rewrite them with SPECTRAL_PEFT_UPDATE_NOTEBOOKS=1, see this module's docstring)"
      + (f"; they were computed with {then}, this run has {now}" if then != now else "")
      + ":\n  " + "\n  ".join(problems))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_with_its_outputs(path):
  """What GitHub and Colab show before anything runs: every code cell executed in order, the backend
  printed, plots as small PNGs, no stderr, no absolute paths, and a CPU runtime in the metadata."""
  notebook = nbformat.read(path, as_version=4)
  assert "accelerator" not in notebook.metadata, "the notebook asks Colab for an accelerator; CPU is the default"
  assert "Change runtime type" in notebook.cells[0].source, "the introduction does not say how to pick a GPU/TPU"
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed top to bottom in one run"
  assert all("execution" not in c.metadata for c in notebook.cells), "per-run timestamps in the cell metadata"
  assert "version" not in notebook.metadata.get("language_info", {}), "the kernel's Python version in the metadata"
  assert "jax" in notebook.metadata.get("spectral_peft", {}).get("outputs_computed_with", {}), "no library versions"
  outputs = [out for cell in code for out in cell.outputs]
  assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], "stderr output committed"
  assert not [o for o in outputs if o.output_type == "error"], "an error output committed"
  assert re.search(r"^backend: cpu\b", "".join(o.get("text", "") for o in outputs), flags=re.M), "no `backend: cpu` line"
  images = [base64.b64decode(o.data["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2, f"{len(images)} plots committed"
  assert max(len(png) for png in images) <= PNG_BYTES, sorted(len(png) for png in images)
  assert os.path.getsize(path) <= NOTEBOOK_BYTES, os.path.getsize(path)
  for out in outputs:
    for text in _texts(out):
      assert not ABSOLUTE_PATH.search(text) and ROOT not in text, f"an absolute path in an output: {text[:300]!r}"


def test_output_comparison_tolerates_round_off_and_catches_changes():
  assert _text_mismatch("loss 0.1234 after 40 steps", "loss 0.1250 after 40 steps") is None
  assert _text_mismatch("error 2.4e-07", "error 9.1e-07") is None
  assert _text_mismatch("backend: cpu | spectral_peft 0.1.0", "backend: cpu | spectral_peft 0.2.0") is None
  assert _text_mismatch("| LoRA r2 | 512 | 0.10% |", "| LoRA r2 | 512 | 0.10% |") is None
  assert _text_mismatch("loss 0.1234", "loss 0.2034")                       # a different number
  assert _text_mismatch("| LoRA r2 | 512 |", "| LoRA r2 | 1,024 |")          # a different count
  assert _text_mismatch("restored equals saved: True", "restored equals saved: False")
  assert _text_mismatch("rank 4", "rank 4\nrank 5")                         # an extra line


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


@pytest.mark.slow
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
