"""PEP 562 lazy names for a package whose heavy parts (Flax, optax, orbax) load on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_names(package: str, table: Mapping[str, str],
               namespace: dict[str, Any]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for ``package`` serving the names of ``table`` on first access.

  Args:
    package: the package's ``__name__``.
    table: ``{name: module}``; a name equal to its module's last component (``"peft"`` ->
      ``"spectral_peft.peft"``) is the module itself, any other is an attribute of the module.
    namespace: the package's ``globals()``, where a served name is stored so that later accesses
      are plain attribute reads.
  """

  def __getattr__(name: str) -> object:
    module_name = table.get(name)
    if module_name is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"{package}.{name}" else getattr(module, name)
    namespace[name] = value
    return value

  def __dir__() -> list[str]:
    return sorted(set(namespace) | set(table))

  return __getattr__, __dir__
