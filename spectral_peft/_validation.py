"""Argument checks shared by the public entry points.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the argument, says what
was expected and what was given. Checks only look at static information (Python numbers, array
shapes and dtypes), so they are free under ``jit``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp


def check_positive_int(name: str, value: Any) -> int:
  """Returns ``value`` as an ``int`` after checking it is a positive integer."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value}.")
  return int(value)


def check_positive_float(name: str, value: Any) -> float:
  """Returns ``value`` as a ``float`` after checking it is a finite positive real number."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a positive real number, got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not (value > 0.0 and value < float("inf")):
    raise ValueError(f"`{name}` must be a finite positive real number, got {value}.")
  return value


def check_ndim(name: str, x: Any, ndim: int) -> None:
  """Checks that ``x`` is an array with ``ndim`` axes."""
  shape = getattr(x, "shape", None)
  if shape is None:
    raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")
  if len(shape) != ndim:
    raise ValueError(f"`{name}` must have {ndim} axes, got shape {tuple(shape)}.")


def check_floating(name: str, x: Any) -> None:
  """Checks that ``x`` has an inexact (floating or complex) dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    raise TypeError(f"`{name}` must have a floating dtype, got {jnp.result_type(x)}.")


def check_lowrank_factors(a: Any, b: Any) -> tuple[int, int, int]:
  """Checks ``a: (m, k)`` and ``b: (k, n)`` and returns ``(m, k, n)``."""
  check_ndim("a", a, 2)
  check_ndim("b", b, 2)
  check_floating("a", a)
  check_floating("b", b)
  m, k = a.shape
  k_b, n = b.shape
  if k != k_b:
    raise ValueError(
        f"`a` and `b` must share the rank axis: a is (m, k) = {tuple(a.shape)} and b is (k, n) = "
        f"{tuple(b.shape)}, so k differs ({k} vs {k_b})."
    )
  return m, k, n
