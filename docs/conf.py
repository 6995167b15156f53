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

# One section per defining module (its path below the package), in this order; a module not listed
# gets its own name as title. The core's modules sit in one private subpackage per paper family, and
# its page groups the sections under FAMILIES.
SECTIONS = {
    "spectral_peft": {
        "_lowrank.matrices": "Low rank and sine low rank",
        "_lowrank.diagnostics": "Rank and spectrum diagnostics",
        "_sparse.deltas": "Sparse coefficient updates: scatter, wavelet and Fourier syntheses, top-k masks",
        "_sparse.wavelets": "Wavelet analysis and synthesis",
        "_sparse.theory": "Sparse updates: positions, rank and coverage",
        "_sparse.interpolation": "Sparse least squares",
        "_sinusoidal.siren": "Periodic SIREN and integer frequencies",
        "_sinusoidal.frequency_analysis": "Frequency analysis",
        "_sinusoidal.fitting": "Fitting with bounding and weight decay",
        "_sinusoidal.bounding": "Bounding and block bounding",
        "_sinusoidal.weight_decay": "L1 and targeted weight decay",
        "_sinusoidal.pruning": "Structured pruning",
        "_sinusoidal.growing": "Growing",
        "_lrnn.neurons": "Product-separated neurons: component MLPs and the product activation",
        "_lrnn.network": "LRNN layers and networks",
        "_lrnn.pde": "PDE: Poisson problem",
    },
    "spectral_peft.peft": {
        "_methods.lowrank": "Low-rank methods",
        "_methods.spectral": "Sparse spectral methods",
        "_methods.base": "The adapter and method protocol",
        "_tree": "Adapters over parameter pytrees",
        "_modules": "Modules trained fully and saved with the adapter",
        "_runtime.linen": "The adapter runtime: adapters applied inside the model's call",
        "_methods.combination": "Combining adapters",
        "_formats.checkpoint": "Saving and loading adapters",
        "_formats.peft_files": "HuggingFace PEFT files",
        "_sharding": "Sharding",
    },
    "spectral_peft.nnx": {},
    "spectral_peft.linen": {},
}
FAMILIES = {
    "spectral_peft": {
        "_lowrank": "Sine-activated low rank",
        "_sparse": "Sparse spectral updates: WaveFT, SHiRA, FourierFT, LFMA",
        "_sinusoidal": "Sinusoidal networks",
        "_lrnn": "LRNN: product-structured activations",
    },
}
TITLES = {
    "spectral_peft": "Core functions (``spectral_peft``)",
    "spectral_peft.peft": "Adapters (``spectral_peft.peft``)",
    "spectral_peft.nnx": "Flax NNX modules (``spectral_peft.nnx``)",
    "spectral_peft.linen": "Flax Linen modules (``spectral_peft.linen``)",
}


def _section_key(package: str, obj: object) -> str:
  """The defining module below ``package`` (``"_sparse.deltas"``), else the module's last component."""
  module = getattr(obj, "__module__", package)
  if module.startswith(package + "."):
    return module[len(package) + 1:]
  return module.rsplit(".", 1)[-1]


def _page(package: str) -> str:
  module = importlib.import_module(package)
  groups: dict[str, list[str]] = {}
  for name in module.__all__:
    obj = getattr(module, name)
    if type(obj).__name__ == "module":
      continue
    groups.setdefault(_section_key(package, obj), []).append(name)
  order = list(SECTIONS[package]) + sorted(set(groups) - set(SECTIONS[package]))
  families = FAMILIES.get(package, {})
  if families:  # an unlisted module joins the end of its family
    rank = {f: i for i, f in enumerate(dict.fromkeys(key.split(".")[0] for key in order))}
    order.sort(key=lambda key: rank[key.split(".")[0]])
  title = TITLES[package]
  lines = [title, "=" * len(title), "", f".. currentmodule:: {package}", ""]
  doc = (module.__doc__ or "").strip().split("\n\n")[0]
  lines += [doc, ""]
  family = None
  for key in order:
    if key not in groups:
      continue
    underline = "-"
    if families:
      underline = "~"
      if key.split(".")[0] != family:
        family = key.split(".")[0]
        heading = families.get(family, family.lstrip("_").replace("_", " ").capitalize())
        lines += [heading, "-" * len(heading), ""]
    heading = SECTIONS[package].get(key, key.rsplit(".", 1)[-1].lstrip("_").replace("_", " ").capitalize())
    lines += [heading, underline * len(heading), ""]
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
