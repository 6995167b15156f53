"""The public surface: every exported name resolves, and the core imports without Flax/optax/orbax.

``spectral_peft`` and ``spectral_peft.peft`` load their heavy parts on first access (PEP 562
``__getattr__`` over a ``_LAZY`` table, mirrored in an ``if TYPE_CHECKING:`` block for type checkers).
These tests keep the three in agreement with ``__all__`` and keep the light import light.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import json
import re
import os
import subprocess
import sys

import pytest

import spectral_peft

PACKAGES = ("spectral_peft", "spectral_peft.peft", "spectral_peft.nnx", "spectral_peft.linen")
LAZY_PACKAGES = ("spectral_peft", "spectral_peft.peft")
HEAVY = ("optax", "flax", "orbax", "pywt")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(spectral_peft.__file__)))


def _modules_after(statement: str) -> list[str]:
  """Top-level module names in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
  code = f"import json, sys\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", ["import spectral_peft", "import spectral_peft.peft"])
def test_core_import_does_not_load_heavy_dependencies(statement):
  loaded = _modules_after(statement)
  assert "jax" in loaded and "spectral_peft" in loaded, loaded  # the probe sees real imports
  heavy = sorted(set(HEAVY) & set(loaded))
  assert not heavy, (
      f"`{statement}` imported {heavy}. Import those modules where they are used, or serve the name "
      f"through the `_LAZY` table of the package's __init__.py (and its TYPE_CHECKING block)."
  )


def test_lazy_names_load_their_dependency_on_first_use():
  loaded = _modules_after("import spectral_peft as sp\nsp.nnx.LRNN\nsp.peft.factored")
  assert "flax" in loaded, loaded  # so the check above can fail: the probe does see Flax when it loads


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package):
  module = importlib.import_module(package)
  assert len(module.__all__) == len(set(module.__all__)), "duplicate names in __all__"
  missing = [name for name in module.__all__ if getattr(module, name, None) is None]
  assert not missing, f"{package}.__all__ names that do not resolve: {missing}"
  assert set(module.__all__) <= set(dir(module))


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_every_public_name(package):
  module = importlib.import_module(package)
  machinery = {"TYPE_CHECKING"}  # the __init__'s own import
  bound = {
      name for name, value in vars(module).items()
      if not name.startswith("_") and name not in machinery and (name in module.__all__ or not inspect.ismodule(value))
  }
  bound |= set(getattr(module, "_LAZY", {}))
  assert bound == set(module.__all__), (
      f"public but not in __all__: {sorted(bound - set(module.__all__))}; "
      f"in __all__ but not bound: {sorted(set(module.__all__) - bound)}"
  )


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_table_matches_type_checking_imports(package):
  module = importlib.import_module(package)
  tree = ast.parse(inspect.getsource(module))
  blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
  assert len(blocks) == 1, "expected one `if TYPE_CHECKING:` block"
  declared = {}
  for node in blocks[0].body:
    assert isinstance(node, ast.ImportFrom), ast.unparse(node)
    for alias in node.names:
      source = f"{node.module}.{alias.name}" if node.module == package else node.module
      declared[alias.asname or alias.name] = source
  assert declared == module._LAZY


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_unknown_attribute_is_an_attribute_error(package):
  module = importlib.import_module(package)
  with pytest.raises(AttributeError, match="no_such_name"):
    module.no_such_name  # noqa: B018
  assert not hasattr(module, "no_such_name")


def test_version_is_single_sourced():
  assert spectral_peft.__version__ == importlib.import_module("spectral_peft._version").__version__
  try:
    installed = importlib.metadata.version("spectral_peft")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("spectral_peft is not installed, only on the path")
  assert installed == spectral_peft.__version__


def test_readme_method_table_names_resolve():
  """The README's method table names real functions, specs and modules, and lists every method spec."""
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  table = readme[readme.index("## Methods"):]
  table = table[: table.index("\n\n", table.index("| --- |"))]
  rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
  assert len(rows) >= 10, rows
  missing = []
  for name in sorted(set(re.findall(r"`(sp\.[\w.]+)`", table))):
    obj = spectral_peft
    for part in name.split(".")[1:]:
      obj = getattr(obj, part, None)
    if obj is None:
      missing.append(name)
  for row in rows:
    modules = row.split("|")[4]
    for name in re.findall(r"`(\w+)`", modules):
      if not (hasattr(spectral_peft.nnx, name) or hasattr(spectral_peft.linen, name)):
        missing.append(f"module {name}")
  assert not missing, f"README names that do not resolve: {missing}"
  specs = {n for n in spectral_peft.peft.__all__ if isinstance(getattr(spectral_peft.peft, n), type)
           and issubclass(getattr(spectral_peft.peft, n), spectral_peft.peft.AdapterMethod)
           and getattr(spectral_peft.peft, n) is not spectral_peft.peft.AdapterMethod}
  unlisted = sorted(s for s in specs if f"`sp.peft.{s}`" not in table)
  assert not unlisted, f"method specs missing from the README table: {unlisted}"
