"""Growing: block importance (Def. 8.1), new frequencies in a band and the grow loop (sec. 8).

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): Def. 8.1 (importance of a frequency block) and sec. 8 (the growing scheme).

Layout and groups as in :mod:`spectral_peft._sinusoidal.hidden`; blocks as in
:mod:`spectral_peft._sinusoidal.bounding`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sinusoidal import bounding
from spectral_peft._sinusoidal import fitting
from spectral_peft._sinusoidal import hidden
from spectral_peft._sinusoidal import siren

if TYPE_CHECKING:
  import optax  # Imported where used: `import spectral_peft` stays free of optax's start-up cost.

Array = jax.Array
Params = dict[str, Any]


def block_importance(
    params: Params, limits: Sequence[float], bounds: Sequence[float], *, eps: float = 1e-2, period: float = 2.0
) -> np.ndarray:
  """Importance ``I_k`` of every frequency block, from weights saturated at the bound (Def. 8.1).

  References:
    Aldana, Novello, Velho, TR-24-02, Def. 8.1:
    ``I_k = sum_{w in A_(k)} B_k max(|w| - B_k + eps, 0) / |A_(k)|``, where ``|A_(k)|`` is the number of
    weights in the block. A block with no frequency, or an infinite bound, has importance 0.

  Args:
    params: a periodic SIREN dict trained with block bounding ``(limits, bounds)``.
    limits, bounds: as in :func:`block_bounds`.
    eps: closeness tolerance (positive).
    period: the network period.

  Returns:
    Host ``(len(bounds),)`` float64 array.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), jnp.pi * jnp.array([[1.0, 8.0], [0.0, 0.0]]), 2, 1)
    >>> p = sp.bound_params(p, sp.block_bounds(p["omega"], [5], [0.1, 0.1]))
    >>> [round(v, 4) for v in sp.block_importance(p, [5], [0.1, 0.1]).tolist()]  # |A| saturates, 2 weights a block
    [0.001, 0.001]
  """
  eps = _validation.check_positive_float("eps", eps)
  bounds_np = np.asarray(bounds, np.float64).reshape(-1)
  bounding.block_bounds(params["omega"], limits, bounds, period=period)  # Validates limits and bounds.
  block = np.asarray(bounding.block_index(params["omega"], limits, period=period))
  a = np.abs(np.asarray(hidden.matrix(params), np.float64))
  importance = np.zeros(bounds_np.size)
  for k, b in enumerate(bounds_np):
    rows = a[block == k]
    if rows.size == 0 or not np.isfinite(b):
      continue
    importance[k] = float(np.sum(b * np.maximum(rows - b + eps, 0.0)) / rows.size)
  return importance


def _ring_candidates(low: int, high: int, dim: int, period: float, exclude: Optional[Array]) -> np.ndarray:
  """``(count, dim)`` integer vectors ``k`` (one of each ``+-k`` pair) with ``low <= |k|_inf < high``, not in ``exclude``."""
  axis = np.arange(-(high - 1), high)
  grid = np.stack(np.meshgrid(*([axis] * dim), indexing="ij"), axis=-1).reshape(-1, dim)
  level = np.abs(grid).max(axis=1)
  first = grid[np.arange(grid.shape[0]), np.argmax(grid != 0, axis=1)]
  candidates = grid[(level >= max(low, 1)) & (first > 0)]
  if exclude is not None:
    existing = siren.frequencies_as_integers(exclude, period=period).T
    taken = {tuple(v) for v in existing} | {tuple(-v) for v in existing}
    candidates = np.array([c for c in candidates if tuple(c) not in taken], dtype=np.int64).reshape(-1, dim)
  return candidates


def band_frequencies(
    key: Array,
    n: int,
    low: int,
    high: int,
    *,
    dim: int = 2,
    period: float = 2.0,
    exclude: Optional[Any] = None,
    dtype: Any = jnp.float32,
) -> Array:
  """``n`` new integer frequencies with ``low <= max_d |k_d| < high`` (half space, no duplicates).

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 8 step 3: new columns are linked to frequencies in the ring
    ``[L_s, L_{s+1}) x [0, L_{s+1}) U [0, L_{s+1}) x [L_s, L_{s+1})``. ``k`` and ``-k`` give the same
    harmonics, so only one of each pair is drawn (first non-zero coordinate positive).

  Args:
    key: a ``jax.random`` key.
    n: number of frequencies.
    low, high: the ring ``[low, high)`` in integer units (``0 <= low < high``; ``k = 0`` is never drawn).
    dim: input dimension.
    period: the network period.
    exclude: optional ``(dim, m)`` existing first layer whose frequencies (and their negatives) are skipped.
    dtype: floating dtype of the result.

  Returns:
    ``(dim, n)`` array of frequencies ``(2 pi / period) k``.

  Raises:
    ValueError: if ``low``/``high`` are not ``0 <= low < high`` or the ring holds fewer than ``n`` new vectors.

  Example:
    >>> import jax, spectral_peft as sp
    >>> k = sp.frequencies_as_integers(sp.band_frequencies(jax.random.key(0), 5, 3, 6))
    >>> bool(((abs(k).max(axis=0) >= 3) & (abs(k).max(axis=0) < 6)).all())
    True
  """
  n = _validation.check_positive_int("n", n)
  dim = _validation.check_positive_int("dim", dim)
  period = _validation.check_positive_float("period", period)
  if isinstance(low, bool) or isinstance(high, bool) or int(low) != low or int(high) != high or not 0 <= low < high:
    raise ValueError(f"`low` and `high` must be ints with 0 <= low < high, got low={low!r}, high={high!r}.")
  candidates = _ring_candidates(int(low), int(high), dim, period, exclude)
  if n > candidates.shape[0]:
    raise ValueError(
        f"`n` must be at most the number of new frequencies in the ring [{low}, {high}): {candidates.shape[0]}, got {n}."
    )
  idx = siren._host_choice(key, candidates.shape[0], n)
  return jnp.asarray((2.0 * math.pi / period) * candidates[idx].T, dtype)


def grow_params(key: Array, params: Params, new_omega: Array) -> Params:
  """Adds frequency rows to ``A`` for the new input frequencies ``new_omega``; the function is unchanged.

  The new rows of ``A`` start at zero (so ``f`` is exactly the same right after growing, and the rows
  receive gradient ``cos(.) H_i``), the new shifts ``phi`` are drawn from ``U(-pi, pi)``.

  Args:
    key: a ``jax.random`` key (for ``phi``).
    params: a periodic SIREN dict.
    new_omega: ``(dim, n_add)`` frequencies to add (e.g. from :func:`band_frequencies`).

  Returns:
    The grown parameter dict (``m + n_add`` frequencies).

  Raises:
    ValueError: if ``new_omega`` does not match the input dimension.

  Example:
    >>> import jax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> sp.grow_params(jax.random.key(2), p, sp.band_frequencies(jax.random.key(3), 2, 3, 5, exclude=p["omega"]))["phi"].shape
    (6,)
  """
  _validation.check_ndim("new_omega", new_omega, 2)
  omega = params["omega"]
  if new_omega.shape[0] != omega.shape[0]:
    raise ValueError(f"`new_omega` must have {omega.shape[0]} rows (the input dimension), got shape {tuple(new_omega.shape)}.")
  a = hidden.matrix(params)
  n_add = new_omega.shape[1]
  phi_new = jax.random.uniform(key, (n_add,), params["phi"].dtype, -math.pi, math.pi)
  grown = hidden.with_matrix(params, jnp.concatenate([a, jnp.zeros((n_add, a.shape[1]), a.dtype)], axis=0))
  grown["omega"] = jnp.concatenate([omega, jnp.asarray(new_omega, omega.dtype)], axis=1)
  grown["phi"] = jnp.concatenate([params["phi"], phi_new])
  return grown


class GrowthRound(NamedTuple):
  """One round of growing: block importances, chosen block, frequency count after growing, MSE before it."""

  importance: tuple[float, ...]
  block: int
  frequencies: int
  mse: float


def grow_loop(
    key: Array,
    params: Params,
    x: Array,
    y: Array,
    optimizer: optax.GradientTransformation,
    *,
    limits: Sequence[float],
    bounds: Sequence[float],
    n_add: int,
    total_add: int,
    steps_per_round: int,
    final_steps: int = 0,
    eps: float = 1e-2,
    period: float = 2.0,
    batch_size: Optional[int] = None,
    progress: Optional[Callable[[Any], Any]] = None,
) -> tuple[Params, list[GrowthRound]]:
  """The growing scheme of sec. 8: train with block bounding, add ``n_add`` frequencies to the most important block.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 8 steps 1-4 (ties go to the lower block).

  Args:
    key: a ``jax.random`` key.
    params: initial periodic SIREN dict.
    x, y: training data.
    optimizer: optax transformation (restarted after each growth).
    limits, bounds: the block partition ``L`` and bounds ``B`` (the last limit ``L_{l+1} = inf`` is replaced
      by the largest ``limits`` value + the width of the previous block for sampling in the last block).
    n_add: frequencies added per round; ``total_add``: in total (a multiple of ``n_add``).
    steps_per_round: ``e_rec``.
    final_steps: extra training steps after the last growth.
    eps: the closeness tolerance of :func:`block_importance`.
    period: the network period.
    batch_size: minibatch size per step (``None``: full batch).
    progress: optional wrapper of each phase's step iterable.

  Returns:
    ``(params, rounds)``. A block whose ring has fewer than ``n_add`` unused frequencies left is skipped for
    the next most important one.

  Raises:
    ValueError: if ``total_add`` is not a positive multiple of ``n_add``, or no block has room left.
  """
  n_add = _validation.check_positive_int("n_add", n_add)
  total_add = _validation.check_positive_int("total_add", total_add)
  if total_add % n_add:
    raise ValueError(f"`total_add` must be a multiple of `n_add`={n_add}, got {total_add}.")
  limits_np = np.asarray(limits, np.float64).reshape(-1)
  edges = [0.0, *limits_np.tolist()]
  last_width = (edges[-1] - edges[-2]) if len(edges) > 1 else 8.0
  edges.append(edges[-1] + last_width)
  rings = [(int(math.ceil(lo)), int(math.ceil(hi))) for lo, hi in zip(edges[:-1], edges[1:])]  # Integer band per block.
  dim = params["omega"].shape[0]
  rounds: list[GrowthRound] = []
  added = 0
  while True:
    bound = bounding.block_bounds(params["omega"], limits, bounds, period=period)
    key, k_fit = jax.random.split(key)
    fit = fitting.fit_periodic_siren(
        params, x, y, optimizer, steps_per_round, bound=bound, batch_size=batch_size, key=k_fit, progress=progress
    )
    params = fit.params
    if added >= total_add:
      break
    mse = float(fitting.mse_loss(params, x, y))  # Full-data MSE before this growth.
    importance = block_importance(params, limits, bounds, eps=eps, period=period)
    key, k_freq, k_phi = jax.random.split(key, 3)
    # Most important block first (ties: the lower block); a block with no room left passes to the next.
    block = next((int(b) for b in np.argsort(-importance, kind="stable")
                  if _ring_candidates(*rings[int(b)], dim, period, params["omega"]).shape[0] >= n_add), None)
    if block is None:
      raise ValueError(f"no block has {n_add} unused integer frequencies left; lower `n_add` or `total_add`.")
    new = band_frequencies(k_freq, n_add, *rings[block], dim=dim, period=period, exclude=params["omega"])
    params = grow_params(k_phi, params, new)
    added += n_add
    rounds.append(GrowthRound(tuple(importance.tolist()), block, params["omega"].shape[1], mse))
  if final_steps:
    bound = bounding.block_bounds(params["omega"], limits, bounds, period=period)
    params = fitting.fit_periodic_siren(
        params, x, y, optimizer, final_steps, bound=bound, batch_size=batch_size, key=key, progress=progress
    ).params
  return params, rounds
