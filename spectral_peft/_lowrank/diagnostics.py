"""Rank and spectrum diagnostics for weight matrices.

References:
  Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", Prop. 1 and App. A.1
  (stable rank; the lower bound on rank(sin(omega A)), corrected by the factor 1/4 that eq. 8 drops).
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
    bound: the proved lower bound ``(omega / 4) (A0_min / ||sqrt|A|||_op)^2`` on
      ``rank(sin(omega * A))`` (and on its stable rank), or NaN where it does not apply.
    valid: whether ``0 <= omega <= omega_max`` (the range in which the bound is proved).
    omega_max: ``pi / (3 A0_min)``, the largest frequency for which the bound is proved.
    min_abs_entry: ``A0_min``, the smallest non-zero ``|A_ij|``.
    paper_eq5_value: ``omega (A0_min / ||sqrt|A|||_op)^2``, Prop. 1 (eq. 5) exactly as printed in
      the paper. NOT a bound: it can exceed the rank (one non-zero entry, ``omega`` near
      ``omega_max``: value ``~pi/3 ~ 1.047``, rank 1). Kept so the paper's figure can be compared;
      NaN outside the range, like ``bound``.
  """

  bound: Array
  valid: Array
  omega_max: Array
  min_abs_entry: Array
  paper_eq5_value: Array


def sine_rank_lower_bound(w: Array, omega: float) -> SineRankBound:
  """Corrected Prop. 1: ``rank(sin(omega w)) >= (omega / 4) (A0_min / ||sqrt|w|||_op)^2``.

  The paper's Prop. 1 (eq. 5) prints the bound without the factor ``1/4``; as printed it is false.
  Derivation (App. A.1, with ``A = w``, ``a = A0_min`` the smallest non-zero ``|A_ij|``,
  ``0 <= omega <= pi / (3 a)``):

  1. Frobenius norm (Lemma 1, eq. 10-11): ``||sin(omega A)||_F^2 >= sin(omega a)^2``, the term of
     one entry of modulus ``a``.
  2. Eq. 15 (proved from ``f(omega) = sin(omega a) - omega a / 2 >= 0`` on ``[0, pi / (3a)]``):
     ``sin(omega a) >= omega a / 2``, hence ``||sin(omega A)||_F^2 >= omega^2 a^2 / 4``.
     The paper's eq. 8 states ``>= omega^2 a^2``: it drops the square of the 1/2.
  3. Operator norm (Lemma 2, eq. 17): ``|sin t| <= sqrt|t|`` entrywise and the operator norm is
     monotone in the entrywise modulus (``||B||_op <= || |B| ||_op <= ||C||_op`` for
     ``|B| <= C``), so ``||sin(omega A)||_op^2 <= omega ||sqrt|A|||_op^2``.
  4. ``rank >= stable rank = ||.||_F^2 / ||.||_op^2 >= (omega / 4) a^2 / ||sqrt|A|||_op^2``.

  Counterexample to the printed form: a 128 x 128 matrix with a single entry 1 and
  ``omega = 0.999 pi / 3`` gives the printed value 1.046 while ``rank(sin(omega A)) = 1``; the
  corrected bound is 0.262. Note also that inside its range the bound never exceeds ``pi / 12``
  (``||sqrt|A|||_op^2 >= max|A_ij| >= a``, so the bound is ``<= omega a / 4 <= pi / 12``) and the
  printed value never exceeds ``pi / 3``: neither can certify a rank above 1, which is why the
  paper's proof of Theorem 1 (which needs this bound to reach ``k``, eq. 30) does not go through;
  Theorem 1's rank growth is an empirical statement here (see ``sp.numerical_rank``).

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", Prop. 1 (eq. 5),
    App. A.1 Lemma 1 (eq. 8, 11, 15), Lemma 2 (eq. 17), eq. 25 and the proof of Theorem 1.

  Outside the validity range the result is flagged (``valid`` is False) and ``bound`` is NaN,
  so it can never be mistaken for a proved bound; the function stays traceable under ``jit``.

  Args:
    w: ``(m, n)`` real matrix ``A``, not all zero.
    omega: non-negative frequency.

  Returns:
    A :class:`SineRankBound` (``bound`` is the corrected bound, ``paper_eq5_value`` the printed
    quantity).

  Raises:
    ValueError: if ``omega`` is negative, or ``w`` is concrete and all zero.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> w = jnp.zeros((128, 128)).at[0, 0].set(1.0)
    >>> r = sp.sine_rank_lower_bound(w, 0.999 * 3.14159265 / 3)
    >>> round(float(r.bound), 3), round(float(r.paper_eq5_value), 3), int(sp.numerical_rank(jnp.sin(1.046 * w)))
    (0.262, 1.046, 1)
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
  printed = omega * jnp.square(min_abs / sqrt_op)
  return SineRankBound(
      bound=jnp.where(valid, 0.25 * printed, jnp.nan),
      valid=valid,
      omega_max=omega_max,
      min_abs_entry=min_abs,
      paper_eq5_value=jnp.where(valid, printed, jnp.nan),
  )
