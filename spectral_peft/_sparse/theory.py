"""Rank and gradient-coverage tools for sparse (SHiRA, WaveFT, FourierFT) updates.

References:
  "Exploring sparsity for PEFT using wavelets for vision" (WaveFT), Sec. 4: Lemma 1 and Fig. 3
  (rank of random sparse matrices), Definition 1 and Proposition 1 (gradient receptive field and
  coverage ``1 - (1 - rho)^|R|``, Table 1).
  Frieze and Pittel, "Perfect matchings in random graphs with prescribed minimal degree" (2004):
  an ``n x n`` matrix with ``n (ln n + c)`` random non-zeros is full rank with probability
  ``-> exp(-2 exp(-c))``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sparse import wavelets

Array = jax.Array


def _check_shape(shape: Any) -> tuple[int, int]:
  if (not isinstance(shape, (tuple, list)) or len(shape) != 2
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0 for d in shape)):
    raise ValueError(f"`shape` must be a pair of positive ints (m, n), got {shape!r}.")
  return int(shape[0]), int(shape[1])


# Grids up to this many entries draw with ``jax.random.permutation`` (exactly uniform, O(M N) but
# cheap at this size); larger ones with the keyed Feistel permutation below (O(p)).
_PERMUTATION_LIMIT = 2**16
_FEISTEL_ROUNDS = 6


def _mix32(x: Array, round_key: Array) -> Array:
  """A keyed 32-bit integer hash (murmur3's finaliser over ``x ^ round_key``): a Feistel round function."""
  h = (x ^ round_key) * jnp.uint32(0x9E3779B1)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@functools.partial(jax.jit, static_argnums=(1, 2))  # One compilation per (grid size, p): a model has few.
def _feistel_prefix(key: Array, size: int, p: int) -> Array:
  """``pi(0), ..., pi(p - 1)`` for a key-chosen permutation ``pi`` of ``[0, size)``, in ``O(p)``.

  ``pi`` is a balanced Feistel network (keyed :func:`_mix32` rounds) over the smallest ``2^(2h) >=
  size``, restricted to ``[0, size)`` by cycle walking (re-apply until the value falls inside; each
  walk ends because the value's cycle passes through its start). The outputs are distinct because
  ``pi`` is a bijection, and each is close to uniform over ``[0, size)``; nothing of size ``size``
  is formed.
  """
  bits = max(2, (size - 1).bit_length())
  half = (bits + 1) // 2
  mask = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

  def permute(x):
    left, right = x >> half, x & mask
    for r in range(_FEISTEL_ROUNDS):
      left, right = right, left ^ (_mix32(right, round_keys[r]) & mask)
    return (left << half) | right

  bound = jnp.uint32(size)
  out = jax.lax.while_loop(lambda y: jnp.any(y >= bound), lambda y: jnp.where(y >= bound, permute(y), y),
                           permute(jnp.arange(p, dtype=jnp.uint32)))
  return out


def sparse_positions(key: Array, grid: Sequence[int], n_params: int) -> Array:
  """``n_params`` distinct flat positions drawn (without replacement) from an ``(M, N)`` grid.

  The draw is a function of ``key`` alone, so the same key gives the same positions on every machine,
  with and without ``jit``. Up to ``2**16`` grid entries it is ``jax.random.permutation(key, M * N)[:p]``
  (exactly uniform); above, the first ``p`` images of a key-chosen pseudorandom permutation of the
  grid (a 6-round Feistel network with cycle walking), which costs ``O(p)`` time and memory whatever
  ``M * N``: attaching sparse adapters to a 4096 x 11008 weight draws ``p`` numbers, not 45 million.
  Positions are returned sorted, which keeps gathers local.

  Args:
    key: a ``jax.random`` key.
    grid: ``(M, N)``, ``M * N < 2**31``.
    n_params: ``p``, ``1 <= p <= M * N``.

  Returns:
    ``(p,)`` int32 flat row-major positions, sorted ascending.

  Raises:
    ValueError: ``p < 1`` or ``p > M * N``, or a grid of ``2**31`` entries or more; TypeError:
      non-integer ``p``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> sp.sparse_positions(jax.random.key(0), (4, 4), 3).shape
    (3,)
  """
  big_m, big_n = _check_shape(tuple(grid))
  p = _validation.check_positive_int("n_params", n_params)
  size = big_m * big_n
  if p > size:
    raise ValueError(f"`n_params` must be at most the {big_m} x {big_n} = {size} grid positions, got {p}.")
  if size >= 2**31:
    raise ValueError(f"`grid` must have fewer than 2**31 entries (int32 flat positions), got {big_m} x {big_n} = {size}.")
  return jnp.sort(distinct_draw(key, size, p)).astype(jnp.int32)


def distinct_draw(key: Array, size: int, p: int) -> Array:
  """``p`` distinct integers of ``[0, size)`` in draw order (what :func:`sparse_positions` sorts).

  The order is random too: the first ``p`` entries of a key-chosen permutation of ``[0, size)``,
  exactly uniform up to ``2**16`` entries, a keyed Feistel permutation (``O(p)``) above.
  """
  if size <= _PERMUTATION_LIMIT:
    return jax.random.permutation(key, size)[:p]
  return _feistel_prefix(key, size, p)


def lemma1_threshold(n: int, c: float = 0.0) -> float:
  """``n (ln n + c)``: the number of random non-zeros at which an ``n x n`` matrix becomes full rank.

  With ``p = n (ln n + c)`` the probability of full rank tends to ``exp(-2 exp(-c))`` (Lemma 1 of
  WaveFT, after Frieze and Pittel): about 0.48 at ``c = 0``, 0.87 at ``c = 2``.

  Example:
    >>> import spectral_peft as sp
    >>> round(sp.lemma1_threshold(64))
    266
  """
  n = _validation.check_positive_int("n", n)
  return float(n * (math.log(n) + float(c)))


def sparse_rank_curve(shape: Sequence[int], ps: Sequence[int], key: Array, *, trials: int = 3,
                      rtol: Optional[float] = None) -> Array:
  """Numerical rank of random sparse ``(m, n)`` matrices with ``p`` non-zeros, for each ``p`` in ``ps``.

  Each trial puts ``p`` standard-normal values at ``p`` positions drawn uniformly without
  replacement (:func:`sparse_positions`), the update of SHiRA (and, the IDWT being invertible, the
  rank of WaveFT's coefficient matrix) at init with random values, and measures its rank in float64.

  References:
    WaveFT, Lemma 1 and Fig. 3.

  Args:
    shape: ``(m, n)``.
    ps: numbers of non-zeros, each in ``[1, m * n]``.
    key: a ``jax.random`` key; trial ``t`` of ``ps[i]`` uses ``fold_in(fold_in(key, i), t)``.
    trials: independent draws per ``p``.
    rtol: relative singular-value threshold (``None``: ``max(m, n) * eps``, numpy's default).

  Returns:
    ``(len(ps), trials)`` int32 ranks.

  Raises:
    ValueError: a ``p`` outside ``[1, m * n]``, bad ``shape`` or ``trials``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> ranks = sp.sparse_rank_curve((16, 16), [4, 256], jax.random.key(0), trials=2)
    >>> ranks.shape, int(ranks[1, 0])
    ((2, 2), 16)
  """
  m, n = _check_shape(tuple(shape))
  trials = _validation.check_positive_int("trials", trials)
  ps = [int(p) for p in ps]
  out = np.zeros((len(ps), trials), np.int32)
  for i, p in enumerate(ps):
    for t in range(trials):
      k_pos, k_val = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), t))
      positions = np.asarray(sparse_positions(k_pos, (m, n), p))
      values = np.asarray(jax.random.normal(k_val, (p,), jnp.float32), np.float64)
      matrix = np.zeros(m * n)
      matrix[positions] = values
      singular = np.linalg.svd(matrix.reshape(m, n), compute_uv=False)
      tol = singular[0] * (max(m, n) * np.finfo(np.float64).eps if rtol is None else float(rtol))
      out[i, t] = int(np.sum(singular > tol))
  return jnp.asarray(out)


def receptive_field_size(wavelet: str = "haar", level: int = 1, shape: Optional[Sequence[int]] = None) -> int:
  """``|R|``: number of weights a wavelet coefficient of ``level`` reaches (Definition 1 of WaveFT).

  A level-``j`` coefficient's 2-D basis function is the tensor product of two 1-D functions of
  support ``s_j = (K - 1)(2**j - 1) + 1`` (``K`` the filter length), so ``|R| = s_j**2``; Haar at
  level 1 gives ``|R| = 4``, the value of Table 1. With ``shape = (m, n)`` the periodised support is
  capped at the matrix: ``min(s_j, m) * min(s_j, n)``. For comparison SHiRA has ``|R| = 1`` and
  FourierFT ``|R| = m n``.

  Args:
    wavelet: a discrete PyWavelets name.
    level: the coefficient's level, ``>= 1`` (1 = finest details).
    shape: optional ``(m, n)`` cap.

  Returns:
    ``|R|`` as an int (an upper bound: a filter tap that is exactly zero shrinks the true support).

  Example:
    >>> import spectral_peft as sp
    >>> sp.receptive_field_size("haar", 1), sp.receptive_field_size("db2", 2)
    (4, 100)
  """
  wavelets.check_wavelet(wavelet)
  side = wavelets.receptive_field_1d(wavelet, level)
  if shape is None:
    return side * side
  m, n = _check_shape(tuple(shape))
  return min(side, m) * min(side, n)


def gradient_coverage(rho: Any, receptive_field: Any) -> Array:
  """Probability that a coefficient with receptive field ``|R|`` sees a non-zero gradient: ``1 - (1 - rho)^|R|``.

  References:
    WaveFT, Proposition 1 and Table 1 (``rho = 0.1``: SHiRA 10%, Haar WaveFT 34%, FourierFT 100%).

  Args:
    rho: gradient density, the fraction of weight positions with a non-zero gradient, in ``[0, 1]``
      (scalar or array).
    receptive_field: ``|R| >= 1`` (scalar or array, broadcast against ``rho``).

  Returns:
    float array of the broadcast shape.

  Raises:
    ValueError: a concrete ``rho`` outside ``[0, 1]`` or ``receptive_field < 1``.

  Example:
    >>> import spectral_peft as sp
    >>> round(float(sp.gradient_coverage(0.1, sp.receptive_field_size("haar", 1))), 3)
    0.344
  """
  rho_np = np.asarray(rho, np.float64) if not isinstance(rho, jax.core.Tracer) else None
  if rho_np is not None and (np.any(rho_np < 0) or np.any(rho_np > 1)):
    raise ValueError(f"`rho` must lie in [0, 1], got {rho!r}.")
  rf_np = np.asarray(receptive_field, np.float64) if not isinstance(receptive_field, jax.core.Tracer) else None
  if rf_np is not None and np.any(rf_np < 1):
    raise ValueError(f"`receptive_field` must be at least 1, got {receptive_field!r}.")
  rho = jnp.asarray(rho, jnp.result_type(float))
  return 1.0 - jnp.power(1.0 - rho, jnp.asarray(receptive_field, rho.dtype))
