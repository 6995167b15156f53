"""Sphinx configuration of the API reference: ``make docs`` (or ``sphinx-build -W -b html docs docs/_build/html``).

Builds offline (no intersphinx). The API pages are generated at build time from the packages'
``__all__``, grouped by the module that defines each name, so a new public name appears without
editing these files.
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import spectral_peft  # noqa: E402

project = "spectral_peft"
author = "spectral_peft developers"
copyright = "spectral_peft developers, Apache-2.0"  # noqa: A001
release = version = spectral_peft.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"page_width": "1180px", "sidebar_width": "260px"}
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" sections as field lists, not a second description of each field
napoleon_custom_sections = [("References", "notes_style"), ("Example", "example")]
default_role = "code"

# One section per defining module, in this order; a module not listed gets its own name as title.
SECTIONS = {
    "spectral_peft": {
        "_lowrank": "Low rank and sine low rank",
        "_spectral": "Sparse spectral updates: wavelet, Fourier, scatter, top-k masks",
        "_wavelets": "Wavelet analysis and synthesis",
        "_sparse_theory": "Sparse updates: positions, rank and coverage",
        "_sparse_interpolation": "Sparse least squares",
        "_diagnostics": "Rank and spectrum diagnostics",
        "_lrnn": "LRNN: product-separated neurons",
        "_sinusoidal": "Sinusoidal networks: periodic SIREN and integer frequencies",
        "_sinusoidal_training": "Sinusoidal networks: bounding, decay, pruning, growing",
        "_frequency_analysis": "Sinusoidal networks: frequency analysis",
        "_pde": "PDE: Poisson problem",
    },
    "spectral_peft.peft": {
        "_lowrank_methods": "Low-rank methods",
        "_spectral_methods": "Sparse spectral methods",
        "_method": "The adapter and method protocol",
        "_tree": "Adapters over parameter pytrees",
        "_intercept": "Factored application inside Linen models",
        "_combination": "Combining adapters",
        "_checkpoint": "Saving and loading adapters",
        "_sharding": "Sharding",
    },
    "spectral_peft.nnx": {},
    "spectral_peft.linen": {},
}
TITLES = {
    "spectral_peft": "Core functions (``spectral_peft``)",
    "spectral_peft.peft": "Adapters (``spectral_peft.peft``)",
    "spectral_peft.nnx": "Flax NNX modules (``spectral_peft.nnx``)",
    "spectral_peft.linen": "Flax Linen modules (``spectral_peft.linen``)",
}


def _page(package: str) -> str:
  module = importlib.import_module(package)
  groups: dict[str, list[str]] = {}
  for name in module.__all__:
    obj = getattr(module, name)
    if type(obj).__name__ == "module":
      continue
    groups.setdefault(getattr(obj, "__module__", package).rsplit(".", 1)[-1], []).append(name)
  order = list(SECTIONS[package]) + sorted(set(groups) - set(SECTIONS[package]))
  title = TITLES[package]
  lines = [title, "=" * len(title), "", f".. currentmodule:: {package}", ""]
  doc = (module.__doc__ or "").strip().split("\n\n")[0]
  lines += [doc, ""]
  for key in order:
    if key not in groups:
      continue
    heading = SECTIONS[package].get(key, key.lstrip("_").replace("_", " ").capitalize())
    lines += [heading, "-" * len(heading), ""]
    for name in groups[key]:
      obj = getattr(module, name)
      directive = "autoclass" if isinstance(obj, type) else "autofunction"
      lines += [f".. {directive}:: {name}", ""]
  return "\n".join(lines)


def _write_api_pages(app) -> None:
  out = os.path.join(app.srcdir, "api")
  os.makedirs(out, exist_ok=True)
  for package in SECTIONS:
    path = os.path.join(out, package.replace(".", "_") + ".rst")
    text = _page(package)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged pages keep their timestamps
      with open(path, "w") as f:
        f.write(text)


def _skip_generated_field_docs(app, what, name, obj, skip, options):
  """NamedTuple fields ("Alias for field number N") are described by the class's Attributes section."""
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return None


def setup(app):
  app.connect("builder-inited", _write_api_pages)
  app.connect("autodoc-skip-member", _skip_generated_field_docs)
