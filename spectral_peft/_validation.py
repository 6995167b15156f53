"""Argument checks shared by the public entry points.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the argument, says what
was expected and what was given. Most checks only look at static information (Python numbers,
array shapes and dtypes), so they are free under ``jit``. The value checks (:func:`check_finite`,
:func:`check_positions`) look at an array's values only when it is concrete; under tracing they do
nothing, and each caller documents what happens then.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


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


def check_nonempty(name: str, x: Any) -> None:
  """Checks that no axis of the array ``x`` has size 0."""
  shape = tuple(getattr(x, "shape", ()))
  if any(d == 0 for d in shape):
    raise ValueError(f"`{name}` must not have an axis of size 0, got shape {shape}.")


def check_lowrank_factors(a: Any, b: Any) -> tuple[int, int, int]:
  """Checks ``a: (m, k)`` and ``b: (k, n)`` (no size 0) and returns ``(m, k, n)``."""
  check_ndim("a", a, 2)
  check_ndim("b", b, 2)
  check_floating("a", a)
  check_floating("b", b)
  check_nonempty("a", a)
  check_nonempty("b", b)
  m, k = a.shape
  k_b, n = b.shape
  if k != k_b:
    raise ValueError(
        f"`a` and `b` must share the rank axis: a is (m, k) = {tuple(a.shape)} and b is (k, n) = "
        f"{tuple(b.shape)}, so k differs ({k} vs {k_b})."
    )
  return m, k, n


# -- spec fields ---------------------------------------------------------------------------------
def python_scalar(value: Any) -> Any:
  """``value`` with NumPy scalars (and concrete 0-d arrays) turned into Python numbers, recursively in tuples.

  Specs are static data: hashable, JSON-serialisable and compared by value. ``np.int64(4)`` or a
  0-d ``jnp`` array would build a spec that cannot be saved; this keeps every field a plain Python
  ``bool``/``int``/``float``/``complex``/``str``.
  """
  if isinstance(value, tuple):
    return tuple(python_scalar(v) for v in value)
  if isinstance(value, list):
    return [python_scalar(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer) and value.ndim == 0:
    return value.item()
  return value


def normalize_fields(spec: Any) -> None:
  """Replaces, in place, every field of the frozen dataclass ``spec`` by :func:`python_scalar` of it.

  Called first in the ``__post_init__`` of every adapter spec, so ``LoRA(rank=np.int64(4))`` equals
  ``LoRA(rank=4)`` and saves like it.
  """
  for field in dataclasses.fields(spec):
    value = getattr(spec, field.name)
    normalized = python_scalar(value)
    if normalized is not value:
      object.__setattr__(spec, field.name, normalized)


def check_float_dtype(name: str, dtype: Any, *, allow_none: bool = True) -> Optional[str]:
  """Returns the name of a real floating dtype, or raises ``TypeError`` naming ``name``."""
  if dtype is None and allow_none:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except Exception:  # numpy raises TypeError, jax may raise others for odd objects.
    resolved = None
  if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
    expected = "a real floating dtype (e.g. jnp.float32, jnp.bfloat16, 'float16')" + (" or None" if allow_none else "")
    raise TypeError(f"`{name}` must be {expected}, got {dtype!r}.")
  return resolved.name


def check_finite_number(name: str, value: Any) -> float:
  """Returns ``value`` as a ``float`` after checking it is a finite real number."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a finite real number, got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"`{name}` must be a finite real number, got {value}.")
  return value


def check_fits_dtype(owner: str, fields: dict[str, Any], dtype: Any) -> None:
  """Checks that every Python number in ``fields`` is finite in ``dtype`` (and in float32 at least).

  A spec field such as ``omega=1e39`` is finite as a Python float but ``inf`` once cast to the
  weight's float32 (``jnp.finfo(dtype).max``), which turns every update into NaN.

  Args:
    owner: what the fields belong to, for the message (e.g. ``"SineLoRA"``).
    fields: ``{field name: value}``; ``None`` values are skipped.
    dtype: the dtype the values are cast to (the computation dtype of the update).
  """
  finfo = jnp.finfo(jnp.promote_types(jnp.dtype(dtype), jnp.float32))
  for field_name, value in fields.items():
    if value is None:
      continue
    if abs(float(value)) > float(finfo.max):
      raise ValueError(
          f"`{field_name}` of {owner} is {value}, which overflows to inf in {finfo.dtype} (largest finite "
          f"value {float(finfo.max):.4g}); every update would be NaN. Choose a smaller `{field_name}`."
      )


# -- concrete values -----------------------------------------------------------------------------
def is_concrete(x: Any) -> bool:
  """True when ``x`` holds values now (not a tracer under ``jit``/``grad``/``vmap``)."""
  return not isinstance(x, jax.core.Tracer) and not isinstance(x, jax.ShapeDtypeStruct)


def check_finite(name: str, x: Any, *, where: str = "") -> None:
  """Raises ``ValueError`` when the concrete array ``x`` holds NaN or inf; a no-op under tracing.

  Args:
    name: the argument's name for the message.
    x: array-like.
    where: optional context appended to the message (e.g. ``" for target 'dense/kernel'"``).
  """
  if not is_concrete(x):
    return
  values = np.asarray(x)
  if not np.issubdtype(values.dtype, np.inexact) and values.dtype.name not in ("bfloat16",):
    return
  finite = np.isfinite(values.astype(np.complex128 if np.iscomplexobj(values) else np.float64))
  if not finite.all():
    bad = int(values.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0]) if values.ndim else ()
    raise ValueError(
        f"`{name}`{where} must be finite, but {bad} of its {values.size} entries are NaN or inf "
        f"(first at index {first})."
    )


def check_positions(name: str, indices: Any, grid: tuple[int, int]) -> None:
  """Checks concrete sparse positions lie in an ``(M, N)`` grid; a no-op under tracing.

  Args:
    name: the argument's name for the message.
    indices: ``(p,)`` flat row-major positions in ``[0, M * N)`` or ``(p, 2)`` ``(row, col)`` pairs.
    grid: ``(M, N)``.
  """
  if not is_concrete(indices):
    return
  idx = np.asarray(indices)
  big_m, big_n = grid
  if idx.ndim == 2 and idx.shape[1] == 2:
    rows, cols = idx[:, 0], idx[:, 1]
    bad = (rows < 0) | (rows >= big_m) | (cols < 0) | (cols >= big_n)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
          f"`{name}` must hold (row, col) pairs with 0 <= row < {big_m} and 0 <= col < {big_n} (the "
          f"{big_m} x {big_n} grid), got ({int(rows[i])}, {int(cols[i])}) at entry {i} ({int(bad.sum())} out of range)."
      )
    return
  bad = (idx < 0) | (idx >= big_m * big_n)
  if bad.any():
    i = int(np.argmax(bad.reshape(-1)))
    raise ValueError(
        f"`{name}` must hold flat row-major positions in [0, {big_m * big_n}) (the {big_m} x {big_n} grid), "
        f"got {int(idx.reshape(-1)[i])} at entry {i} ({int(bad.sum())} out of range)."
    )
