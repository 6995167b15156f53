"""Bounding the hidden matrix (Def. 6.1) and block bounding by frequency band (sec. 6).

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): Def. 6.1 (bounding) and sec. 6 (block bounding).

Layout and groups as in :mod:`spectral_peft._sinusoidal.hidden`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sinusoidal import hidden

if TYPE_CHECKING:
  import optax  # Imported where used: `import spectral_peft` stays free of optax's start-up cost.

Array = jax.Array
Params = dict[str, Any]


def check_bound(name: str, bound: Any) -> Any:
  """A non-negative scalar or array bound (``inf`` allowed); arrays are checked when concrete."""
  if isinstance(bound, (bool,)) or bound is None:
    raise TypeError(f"`{name}` must be a non-negative number or array, got {bound!r}.")
  try:
    concrete = np.asarray(bound, dtype=np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return bound  # A traced bound: checked by the caller's shapes only.
  if concrete.size and (np.isnan(concrete).any() or (concrete < 0).any()):
    raise ValueError(f"`{name}` must be non-negative (inf allowed), got {concrete.tolist()}.")
  return bound


def row_bound(bound: Any, m: int) -> Any:
  """Broadcasts a scalar or per-frequency ``(m,)`` bound against ``A: (m, n)``."""
  shape = np.shape(bound)
  if shape == ():
    return bound
  if shape != (m,):
    raise ValueError(f"`bound` must be a scalar or a per-frequency vector of shape ({m},), got shape {shape}.")
  return jnp.asarray(bound)[:, None]


def bound_matrix(a: Array, bound: Any) -> Array:
  """The bound of ``A`` (Def. 6.1): every entry clipped to ``[-B, B]``.

  References:
    Aldana, Novello, Velho, TR-24-02, Def. 6.1 (``f_B(x) = max(x, -B)`` for ``x <= 0``, ``min(x, B)``
    otherwise) and sec. 6 (block bounding: one ``B`` per frequency row).

  Args:
    a: ``(m, n)`` hidden matrix (rows are input frequencies).
    bound: a non-negative scalar, or an ``(m,)`` vector of per-frequency bounds (e.g. from
      :func:`block_bounds`); ``inf`` leaves the entries free.

  Returns:
    ``(m, n)`` array, same dtype as ``a``, with ``|result[i, j]| <= bound[i]``.

  Raises:
    ValueError: on a negative bound or a vector bound of the wrong length.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.bound_matrix(jnp.array([[2.0, -3.0], [0.1, 0.5]]), 1.0).tolist()
    [[1.0, -1.0], [0.10000000149011612, 0.5]]
  """
  _validation.check_ndim("a", a, 2)
  bound = row_bound(check_bound("bound", bound), a.shape[0])
  bound = jnp.asarray(bound, a.dtype)
  return jnp.clip(a, -bound, bound)


def block_bounds(omega: Any, limits: Sequence[float], bounds: Sequence[float], *, period: float = 2.0) -> Array:
  """Per-frequency bounds for block bounding: ``B_i`` where ``max_d |k_d|`` falls in ``[L_i, L_{i+1})``.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 6 (block bounding, Fig. 10 and 12: ``L = [5, 10]``,
    ``B = [1.3, 0.6, 0.05]``).

  Frequencies are measured in integer units ``k = omega * period / (2 pi)`` (any real ``omega`` works,
  e.g. a SIREN first layer).

  Args:
    omega: ``(dim, m)`` first layer.
    limits: the inner limits ``L_2 < ... < L_l`` (``L_1 = 0`` and ``L_{l+1} = inf`` are implicit), positive
      and strictly increasing; may be empty (one block).
    bounds: ``l = len(limits) + 1`` non-negative bounds ``B_1, ..., B_l`` (``inf`` allowed).
    period: the network period.

  Returns:
    ``(m,)`` float32 array of bounds, one per frequency row of ``A``.

  Raises:
    ValueError: if ``limits`` is not positive and strictly increasing, ``bounds`` has the wrong length,
      or a bound is negative.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> omega = jnp.pi * jnp.array([[1.0, 7.0, 20.0], [0.0, -2.0, 3.0]])  # k = (1, 0), (7, -2), (20, 3)
    >>> [round(b, 4) for b in sp.block_bounds(omega, [5, 10], [1.3, 0.6, 0.05]).tolist()]
    [1.3, 0.6, 0.05]
  """
  _validation.check_ndim("omega", omega, 2)
  period = _validation.check_positive_float("period", period)
  limits_np = np.asarray(limits, np.float64).reshape(-1)
  bounds_np = np.asarray(bounds, np.float64).reshape(-1)
  if limits_np.size and (not (limits_np > 0).all() or not (np.diff(limits_np) > 0).all()):
    raise ValueError(f"`limits` must be positive and strictly increasing, got {limits_np.tolist()}.")
  if bounds_np.size != limits_np.size + 1:
    raise ValueError(
        f"`bounds` must hold len(limits) + 1 = {limits_np.size + 1} values (one per block), got {bounds_np.size}."
    )
  check_bound("bounds", bounds_np)
  block = block_index(omega, limits_np, period=period)
  return jnp.asarray(bounds_np, jnp.float32)[block]


def block_index(omega: Any, limits: Sequence[float] | np.ndarray, *, period: float = 2.0) -> Array:
  """The block ``i`` (0-based) of each frequency: ``max_d |k_d| in [L_i, L_{i+1})`` with ``L_0 = 0``.

  Args:
    omega: ``(dim, m)`` first layer.
    limits: the inner limits (positive, strictly increasing).
    period: the network period.

  Returns:
    ``(m,)`` int32 array with values in ``0..len(limits)``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.block_index(jnp.pi * jnp.array([[1.0, 7.0, 20.0], [0.0, -2.0, 3.0]]), [5, 10]).tolist()
    [0, 1, 2]
  """
  period = _validation.check_positive_float("period", period)
  limits_f32 = jnp.asarray(np.asarray(limits, np.float64).reshape(-1), jnp.float32)
  level = jnp.max(jnp.abs(jnp.asarray(omega)), axis=0) * (period / (2.0 * math.pi))
  # A tiny slack so that an integer frequency computed in float32 lands in its own block.
  return jnp.searchsorted(limits_f32, level + 1e-4, side="right").astype(jnp.int32)


def bound_params(params: Params, bound: Any) -> Params:
  """Projects a periodic SIREN onto ``|A_ij| <= bound_i`` (bounding applied after an update).

  Args:
    params: the dict from :func:`spectral_peft.periodic_siren_init`.
    bound: scalar or ``(m,)`` per-frequency bounds.

  Returns:
    ``params`` with the hidden matrix ``A`` replaced by :func:`bound_matrix` of it.

  Example:
    >>> import jax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 8, 4), 16, 1)
    >>> round(float(abs(sp.bound_params(p, 0.1)["hidden"][0]["kernel"]).max()), 6)
    0.1
  """
  return hidden.with_matrix(params, bound_matrix(hidden.matrix(params), bound))


class BoundingState(NamedTuple):
  """The bounding transform is stateless."""


def bounding(bound: Any) -> optax.GradientTransformation:
  """Optax transform keeping ``|A_ij| <= bound_i`` after every step (bounding, Def. 6.1).

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 6: "bounds the hidden matrix A after each gradient
    descent step".

  Place it last in an ``optax.chain``: it rewrites the update of ``A`` to ``clip(A + u) - A`` so that
  ``optax.apply_updates`` lands on the clipped matrix (exactly up to one float rounding; use
  :func:`bound_params` after the step for an exact projection). Other leaves pass through.

  Args:
    bound: scalar or ``(m,)`` per-frequency bounds (:func:`block_bounds` for block bounding).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Raises:
    ValueError: on a negative bound (at construction) or when ``update`` gets no ``params``.

  Example:
    >>> import jax, optax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 8, 4), 16, 1)
    >>> tx = optax.chain(optax.sgd(10.0), sp.bounding(0.5))
    >>> g = jax.tree.map(jax.numpy.ones_like, p)
    >>> u, _ = tx.update(g, tx.init(p), p)
    >>> float(abs(optax.apply_updates(p, u)["hidden"][0]["kernel"]).max()) <= 0.5 + 1e-6
    True
  """
  bound = check_bound("bound", bound)

  def init_fn(params):
    del params
    return BoundingState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("`bounding` needs `params` in `update(updates, state, params)` to project A.")
    a = hidden.matrix(params)
    u = updates["hidden"][0]["kernel"]
    target = bound_matrix(a + u, bound)
    return hidden.with_matrix(updates, (target - a).astype(u.dtype)), state

  import optax

  return optax.GradientTransformation(init_fn, update_fn)
