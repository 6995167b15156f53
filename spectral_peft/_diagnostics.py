"""Rank and spectrum diagnostics for weight matrices.

References:
  Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", Prop. 1 and App. A.1
  (stable rank, the lower bound on rank(sin(omega A))).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from spectral_peft import _validation

Array = jax.Array


def singular_spectrum(w: Array, *, normalize: bool = False) -> Array:
  """Singular values of a matrix, largest first.

  Args:
    w: ``(m, n)`` real matrix.
    normalize: divide by the largest singular value (as in the paper's Fig. 3); an all-zero
      matrix gives all zeros.

  Returns:
    ``(min(m, n),)`` singular values, descending.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.singular_spectrum(jnp.diag(jnp.array([1.0, 3.0]))).tolist()
    [3.0, 1.0]
  """
  _validation.check_ndim("w", w, 2)
  _validation.check_floating("w", w)
  s = jnp.linalg.svd(w, compute_uv=False)
  if normalize:
    s = s / jnp.where(s[0] > 0, s[0], 1.0)
  return s


def stable_rank(w: Array) -> Array:
  """Stable rank ``||w||_F^2 / ||w||_op^2`` (a smooth lower bound on the rank).

  Args:
    w: ``(m, n)`` real matrix, not all zero.

  Returns:
    Scalar in ``[1, min(m, n)]`` (NaN for the zero matrix).
  """
  s = singular_spectrum(w)
  return jnp.sum(jnp.square(s)) / jnp.square(s[0])


def numerical_rank(w: Array, rtol: Optional[float] = None) -> Array:
  """Number of singular values above ``rtol * sigma_max``.

  Args:
    w: ``(m, n)`` real matrix.
    rtol: relative threshold. ``None`` uses ``max(m, n) * eps(dtype)``, the convention of
      ``numpy.linalg.matrix_rank``.

  Returns:
    Integer scalar.

  Raises:
    ValueError: ``w`` is concrete and holds NaN or inf (its rank is undefined). Under ``jit`` the
      values cannot be checked and such a matrix gives ``-1``.
  """
  _validation.check_finite("w", w)
  s = singular_spectrum(w)
  if rtol is None:
    rtol = max(w.shape) * float(jnp.finfo(s.dtype).eps)
  elif not rtol >= 0:
    raise ValueError(f"`rtol` must be a non-negative float, got {rtol}.")
  rank = jnp.sum(s > rtol * s[0]).astype(jnp.int32)
  return jnp.where(jnp.all(jnp.isfinite(s)), rank, -1)


class SineRankBound(NamedTuple):
  """Result of :func:`sine_rank_lower_bound`.

  Attributes:
    bound: the lower bound on ``rank(sin(omega * A))``, or NaN where it does not apply.
    valid: whether ``0 <= omega <= omega_max`` (the range in which Prop. 1 holds).
    omega_max: ``pi / (3 A0_min)``, the largest frequency for which the bound is proved.
    min_abs_entry: ``A0_min``, the smallest non-zero ``|A_ij|``.
  """

  bound: Array
  valid: Array
  omega_max: Array
  min_abs_entry: Array


def sine_rank_lower_bound(w: Array, omega: float) -> SineRankBound:
  """Prop. 1: a lower bound on ``rank(sin(omega * w))``.

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", Prop. 1:
    ``rank(sin(omega A)) >= omega (A0_min / ||sqrt|A|||_op)^2`` for
    ``0 <= omega <= pi / (3 A0_min)``, with ``A0_min`` the smallest non-zero ``|A_ij|``.

  Outside the validity range the result is flagged (``valid`` is False) and ``bound`` is NaN,
  so it can never be mistaken for a proved bound; the function stays traceable under ``jit``.

  Args:
    w: ``(m, n)`` real matrix ``A``, not all zero.
    omega: non-negative frequency.

  Returns:
    A :class:`SineRankBound`.

  Raises:
    ValueError: if ``omega`` is negative, or ``w`` is concrete and all zero.
  """
  _validation.check_ndim("w", w, 2)
  _validation.check_floating("w", w)
  if not (isinstance(omega, (int, float)) and math.isfinite(omega) and omega >= 0):
    raise ValueError(f"`omega` must be a finite non-negative number, got {omega!r}.")
  abs_w = jnp.abs(w)
  nonzero = abs_w > 0
  if not isinstance(w, jax.core.Tracer) and not bool(jnp.any(nonzero)):
    raise ValueError("`w` must not be the zero matrix: Prop. 1 needs a non-zero entry.")
  min_abs = jnp.min(jnp.where(nonzero, abs_w, jnp.inf))
  sqrt_op = jnp.linalg.norm(jnp.sqrt(abs_w), ord=2)
  omega_max = jnp.pi / (3.0 * min_abs)
  valid = omega <= omega_max
  value = omega * jnp.square(min_abs / sqrt_op)
  return SineRankBound(
      bound=jnp.where(valid, value, jnp.nan),
      valid=valid,
      omega_max=omega_max,
      min_abs_entry=min_abs,
  )
