"""Exact least squares for a sparse weight update confined to a fixed support.

The WaveFT paper's Lemma 3 says a sparse update can interpolate k input/output pairs when every output
column it must change holds k support positions whose inputs are linearly independent. For a fixed
support the best such update has a closed form, one small k x k system per output column, so the
interpolation threshold can be measured exactly instead of by a long optimiser run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spectral_peft import _validation

Array = jax.Array


class SparseFit(NamedTuple):
  """Result of :func:`sparse_least_squares`.

  Attributes:
    delta: (n_in, n_out) the minimum-norm update supported on the mask that minimises
      ``||x @ delta - y||^2``.
    residual: (n_out,) the squared residual ``||x @ delta[:, j] - y[:, j]||^2`` of each column.
    mse: scalar, ``sum(residual) / y.size`` (the mean squared error over all targets).
  """

  delta: Array
  residual: Array
  mse: Array


def sparse_least_squares(x: Array, y: Array, mask: Array, *, rtol: float | None = None) -> SparseFit:
  """Best update ``delta`` with ``x @ delta ~= y`` whose non-zeros lie on ``mask``.

  Flax kernel layout: ``delta`` is (in_features, out_features) and acts as ``x @ delta``. Column j
  of ``delta`` may only use the rows where ``mask[:, j]`` is true, so each column is an independent
  least-squares problem ``min_c ||x[:, S_j] c - y[:, j]||``. With ``G_j = x diag(mask_j) x^T``
  (k x k) the minimum-norm solution is ``delta[:, j] = mask_j * x^T G_j^+ y_j`` and the residual is
  ``y_j^T (I - G_j G_j^+) y_j`` (evaluated directly as ``||x @ delta_j - y_j||^2``); everything is batched over columns (no Python loop), so it runs
  under ``jit`` and costs O(k^2 n_in n_out).

  References:
    The WaveFT paper (WaveFT), Lemma 3 and App. A.3.1 (block-sparse interpolation capacity).

  Args:
    x: (k, n_in) float, the k inputs as rows.
    y: (k, n_out) float, the wanted outputs as rows.
    mask: (n_in, n_out) bool (or 0/1), the support of the update.
    rtol: eigenvalues of ``G_j`` below ``rtol * max_eigenvalue(G_j)`` count as zero; default
      ``max(k, n_in) * eps(dtype)``, as in ``numpy.linalg.matrix_rank``.

  Returns:
    A :class:`SparseFit` with the update, the per-column squared residuals and the MSE.

  Raises:
    ValueError: shapes that do not fit together, or a non-positive ``rtol``.
    TypeError: ``x`` or ``y`` not floating point.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> kx, ky = jax.random.split(jax.random.key(0))
    >>> x, y = jax.random.normal(kx, (2, 6)), jax.random.normal(ky, (2, 3))
    >>> fit = sp.sparse_least_squares(x, y, jnp.ones((6, 3), bool))
    >>> bool(fit.mse < 1e-8)
    True
  """
  _validation.check_ndim("x", x, 2)
  _validation.check_ndim("y", y, 2)
  _validation.check_ndim("mask", mask, 2)
  _validation.check_floating("x", x)
  _validation.check_floating("y", y)
  k, n_in = x.shape
  if y.shape[0] != k:
    raise ValueError(f"`y` must have one row per row of `x` ({k}), got shape {tuple(y.shape)}.")
  n_out = y.shape[1]
  if tuple(mask.shape) != (n_in, n_out):
    raise ValueError(f"`mask` must have shape (x.shape[1], y.shape[1]) = {(n_in, n_out)}, got {tuple(mask.shape)}.")
  dtype = jnp.result_type(x, y)
  if rtol is None:
    rtol = max(k, n_in) * float(jnp.finfo(dtype).eps)
  else:
    _validation.check_positive_float("rtol", rtol)
  x = x.astype(dtype)
  y = y.astype(dtype)
  m = mask.astype(dtype)
  gram = jnp.einsum("ai,ij,bi->jab", x, m, x)  # (n_out, k, k)
  evals, evecs = jnp.linalg.eigh(gram)
  keep = evals > rtol * jnp.max(evals, axis=-1, keepdims=True)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  coords = jnp.einsum("jab,aj->jb", evecs, y)  # y_j in each column's eigenbasis
  solve = jnp.einsum("jab,jb->ja", evecs, inv * coords)  # G_j^+ y_j, (n_out, k)
  delta = m * (x.T @ solve.T)
  residual = jnp.sum(jnp.square(x @ delta - y), axis=0)  # direct, no cancellation in low precision
  return SparseFit(delta, residual, jnp.sum(residual) / y.size)


def random_support(key: Array, shape: tuple[int, int], p: int) -> Array:
  """A boolean (m, n) mask with exactly ``p`` true entries, uniform without replacement.

  Args:
    key: a ``jax.random`` key.
    shape: (m, n).
    p: the number of positions, 1 <= p <= m * n.

  Returns:
    (m, n) bool mask.

  Raises:
    ValueError: ``p`` outside [1, m * n] or a bad shape.
  """
  if len(shape) != 2:
    raise ValueError(f"`shape` must be (m, n), got {shape!r}.")
  m, n = (_validation.check_positive_int(f"shape[{i}]", s) for i, s in enumerate(shape))
  p = _validation.check_positive_int("p", p)
  if p > m * n:
    raise ValueError(f"`p` must be at most m * n = {m * n} for shape {shape}, got {p}.")
  flat = jax.random.choice(key, m * n, (p,), replace=False)
  return jnp.zeros((m * n,), bool).at[flat].set(True).reshape(m, n)
