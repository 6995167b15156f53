"""Training controls for periodic sinusoidal networks: bounding, L1 and targeted decay, pruning, growing.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): Def. 3.2-3.4 (decay, pruning), Def. 6.1 (bounding), sec. 6 (block
  bounding), sec. 7.1-7.2 (pruning loop, alpha schedule), Def. 8.1 and sec. 8 (growing).

Layout (see :mod:`spectral_peft._sinusoidal.siren`): the hidden matrix is ``A = params["hidden"][0]["kernel"]``
of shape ``(m, n)`` (the transpose of the paper's ``n x m``). A *frequency group* is a row ``A[i, :]``
(the paper's column ``A^(i)``, tied to the input frequency ``omega[:, i]``); a *neuron group* is a
column ``A[:, j]`` (the paper's row ``A_j``, tied to hidden neuron ``j``). Functions that act on groups
take ``groups="frequencies"`` or ``groups="neurons"``.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft._sinusoidal import siren
from spectral_peft import _validation

if TYPE_CHECKING:
  import optax  # Imported where used: `import spectral_peft` stays free of optax's start-up cost.

Array = jax.Array
Params = dict[str, Any]
_GROUPS = ("frequencies", "neurons")


# ----------------------------------------------------------------------------------------------
# Validation helpers.


def _check_groups(groups: Any) -> str:
  if groups not in _GROUPS:
    raise ValueError(f"`groups` must be one of {_GROUPS}, got {groups!r}.")
  return groups


def _hidden_kernel(params: Params) -> Array:
  siren._check_params(params)
  return params["hidden"][0]["kernel"]


def _with_hidden_kernel(params: Params, kernel: Array) -> Params:
  hidden = list(params["hidden"])
  hidden[0] = {**hidden[0], "kernel": kernel}
  return {**params, "hidden": tuple(hidden)}


def _check_bound(name: str, bound: Any) -> Any:
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


def _row_bound(bound: Any, m: int) -> Any:
  """Broadcasts a scalar or per-frequency ``(m,)`` bound against ``A: (m, n)``."""
  shape = np.shape(bound)
  if shape == ():
    return bound
  if shape != (m,):
    raise ValueError(f"`bound` must be a scalar or a per-frequency vector of shape ({m},), got shape {shape}.")
  return jnp.asarray(bound)[:, None]


# ----------------------------------------------------------------------------------------------
# Bounding (Def. 6.1) and block bounding (sec. 6).


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
  bound = _row_bound(_check_bound("bound", bound), a.shape[0])
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
  _check_bound("bounds", bounds_np)
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
  return _with_hidden_kernel(params, bound_matrix(_hidden_kernel(params), bound))


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
  bound = _check_bound("bound", bound)

  def init_fn(params):
    del params
    return BoundingState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("`bounding` needs `params` in `update(updates, state, params)` to project A.")
    a = _hidden_kernel(params)
    u = updates["hidden"][0]["kernel"]
    target = bound_matrix(a + u, bound)
    return _with_hidden_kernel(updates, (target - a).astype(u.dtype)), state

  import optax

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Weight decay (Def. 3.2, 3.3) and the alpha schedule (sec. 7.2.1).


def group_l1_norms(a: Array, groups: str = "frequencies") -> Array:
  """L1 norm of every frequency row (``groups="frequencies"``) or neuron column of ``A: (m, n)``.

  Returns:
    ``(m,)`` or ``(n,)`` array.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> sp.group_l1_norms(jnp.array([[1.0, -2.0], [0.0, 3.0]]), "neurons").tolist()
    [1.0, 5.0]
  """
  _validation.check_ndim("a", a, 2)
  axis = 1 if _check_groups(groups) == "frequencies" else 0
  return jnp.sum(jnp.abs(a), axis=axis)


def l1_weight_decay(params: Params) -> Array:
  """The weight decay functional ``L_wd = ||A||_1`` (Def. 3.2), a scalar.

  Example:
    >>> import jax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> bool(sp.l1_weight_decay(p) > 0)
    True
  """
  return jnp.sum(jnp.abs(_hidden_kernel(params)))


def targeted_weight_decay(params: Params, selected: Array, groups: str = "frequencies") -> Array:
  """Targeted weight decay ``sum_{i in I} ||A^(i)||_1`` over a set of groups (Def. 3.3, Obs. 2).

  References:
    Aldana, Novello, Velho, TR-24-02, Def. 3.3 (columns = our frequency rows) and Observation 2.

  Args:
    params: a periodic SIREN dict.
    selected: boolean mask ``(m,)`` (frequencies) or ``(n,)`` (neurons) marking the set ``I``.
    groups: ``"frequencies"`` or ``"neurons"``.

  Returns:
    A scalar; equals :func:`l1_weight_decay` when every group is selected (Obs. 1).

  Raises:
    ValueError: if ``selected`` has the wrong shape.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> bool(jnp.isclose(sp.targeted_weight_decay(p, jnp.ones(4, bool)), sp.l1_weight_decay(p)))
    True
  """
  norms = group_l1_norms(_hidden_kernel(params), groups)
  if np.shape(selected) != norms.shape:
    raise ValueError(f"`selected` must be a boolean mask of shape {norms.shape} over the {groups}, got {np.shape(selected)}.")
  return jnp.sum(jnp.where(jnp.asarray(selected, bool), norms, 0.0))


def alpha_schedule(step: Any, decay_steps: int, *, scale: float = 1e-6) -> Array:
  """The piecewise-quadratic regularisation weight ``alpha = alpha_s g(step)`` of sec. 7.2.1.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 7.2.1: ``g = g_1`` on ``[0, e_wd / 2]`` and ``g_2`` after, with
    quadratics ``g_1(0) = 0``, ``g_1(e_wd / 2) = 1``, ``g_2(e_wd) = 0``, ``g_2(e_wd / 2) = 1``; so
    ``g(t) = (2 t / e_wd)^2`` rising, then ``(2 (t - e_wd) / e_wd)^2`` falling; ``alpha_s = 1e-6``.

  Args:
    step: the step ``t`` (int or traced scalar); 0 outside ``[0, e_wd]``.
    decay_steps: ``e_wd``, the length of the decay phase (positive int).
    scale: ``alpha_s``.

  Returns:
    A float32 scalar in ``[0, scale]``.

  Example:
    >>> import spectral_peft as sp
    >>> [round(float(sp.alpha_schedule(t, 100, scale=1.0)), 3) for t in (0, 25, 50, 75, 100)]
    [0.0, 0.25, 1.0, 0.25, 0.0]
  """
  decay_steps = _validation.check_positive_int("decay_steps", decay_steps)
  scale = float(scale)
  if not 0.0 <= scale <= 1.0:
    raise ValueError(f"`scale` must lie in [0, 1] (alpha weighs (1 - alpha) MSE + alpha L_wd), got {scale}.")
  t = jnp.asarray(step, jnp.float32)
  half = decay_steps / 2.0
  g = jnp.where(t <= half, (t / half) ** 2, ((t - decay_steps) / half) ** 2)
  g = jnp.where((t < 0) | (t > decay_steps), 0.0, g)
  return scale * g


def regularized_loss(mse: Array, penalty: Array, alpha: Any) -> Array:
  """``L = (1 - alpha) L_MSE + alpha L_penalty`` (Def. 3.2, 3.3 and sec. 7.1)."""
  return (1.0 - alpha) * mse + alpha * penalty


# ----------------------------------------------------------------------------------------------
# Structured pruning (Def. 3.4, sec. 7.1, 7.2.4) and a real shrink.


def pruning_selection(
    a: Array, threshold: float, groups: str = "frequencies", *, max_groups: Optional[int] = None
) -> np.ndarray:
  """The largest set of groups holding less than a fraction ``T_p`` of ``A``'s total L1 (sec. 7.1, step 2).

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 3.2.2 (the pruning criterion: the least-informative
    rows/columns "such that their added information constitutes less or equal to P% of the total
    information") and sec. 7.1 (``T_p in [0, 1]``, the greatest ``I`` with
    ``sum_{i in I} ||A^i||_1 < T_p``). The largest such set takes the groups in increasing order of norm.

  ``threshold`` is a fraction of the total ``||A||_1``, as in the paper. (Before 0.2 it was an
  absolute L1 budget; values outside ``[0, 1]`` now raise.)

  Args:
    a: ``(m, n)`` hidden matrix.
    threshold: ``T_p`` in ``[0, 1]``: the selection's summed L1 norm stays below ``T_p * ||A||_1``.
      ``1`` selects every group but the largest (and every group only if ``max_groups`` caps first).
    groups: ``"frequencies"`` (the paper's columns) or ``"neurons"`` (rows).
    max_groups: optional cap on the size of the set (the smallest-norm groups are kept first).

  Returns:
    Host boolean mask ``(m,)`` or ``(n,)``, ``True`` for the selected (to be pruned) groups.

  Raises:
    ValueError: on a threshold outside ``[0, 1]`` or a negative ``max_groups``.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> a = jnp.array([[0.1, 0.0], [3.0, 1.0], [0.2, 0.2], [0.5, 0.0]])
    >>> sp.pruning_selection(a, 0.2).tolist()  # norms 0.1, 4, 0.4, 0.5 (total 5): 0.1 + 0.4 < 1, + 0.5 is not
    [True, False, True, False]
  """
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"`threshold` (T_p) must be a fraction of the total L1 norm in [0, 1], got {threshold}.")
  norms = np.asarray(group_l1_norms(a, groups), np.float64)
  order = np.argsort(norms, kind="stable")
  cumulative = np.cumsum(norms[order])
  count = int(np.sum(cumulative < threshold * norms.sum()))
  if max_groups is not None:
    if isinstance(max_groups, bool) or int(max_groups) != max_groups or max_groups < 0:
      raise ValueError(f"`max_groups` must be a non-negative int or None, got {max_groups!r}.")
    count = min(count, int(max_groups))
  mask = np.zeros(norms.shape, bool)
  mask[order[:count]] = True
  return mask


def prune_params(params: Params, pruned: Any, groups: str = "frequencies") -> Params:
  """Structured pruning (Def. 3.4): zeros the selected groups of ``A`` (the *masked* network).

  Args:
    params: a periodic SIREN dict.
    pruned: boolean mask over the groups, ``True`` = zero it.
    groups: ``"frequencies"`` or ``"neurons"``.

  Returns:
    ``params`` with the pruned rows/columns of ``A`` set to zero; shapes unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> float(abs(sp.prune_params(p, jnp.array([True, False, False, False]))["hidden"][0]["kernel"][0]).sum())
    0.0
  """
  a = _hidden_kernel(params)
  groups = _check_groups(groups)
  size = a.shape[0] if groups == "frequencies" else a.shape[1]
  if np.shape(pruned) != (size,):
    raise ValueError(f"`pruned` must be a boolean mask of shape ({size},) over the {groups}, got {np.shape(pruned)}.")
  keep = ~jnp.asarray(pruned, bool)
  keep = keep[:, None] if groups == "frequencies" else keep[None, :]
  return _with_hidden_kernel(params, jnp.where(keep, a, jnp.zeros_like(a)))


def shrink_params(
    params: Params,
    *,
    keep_frequencies: Optional[Any] = None,
    keep_neurons: Optional[Any] = None,
    drop_zero_frequencies: bool = True,
) -> Params:
  """Removes pruned groups for real, so that parameter counts are real (sec. 3.2.2, Fig. 1).

  A removed frequency row drops ``A[i, :]``, ``omega[:, i]`` and ``phi[i]``; this is exact when the row
  was zero (pruned). A removed neuron column ``j`` drops ``A[:, j]``, ``b[j]`` and row ``j`` of the next
  kernel; if ``A[:, j]`` was zero the neuron was the constant ``sin(b_j)``, whose contribution
  ``sin(b_j) K_next[j, :]`` is folded into the next bias, so the shrunk network equals the masked one.

  Args:
    params: a periodic SIREN dict.
    keep_frequencies: boolean ``(m,)`` mask of frequency rows to keep (default: all).
    keep_neurons: boolean ``(n,)`` mask of first-layer neurons to keep (default: all).
    drop_zero_frequencies: also drop every frequency row of ``A`` that is exactly zero (an unused
      input frequency).

  Returns:
    A smaller parameter dict with the same structure.

  Raises:
    ValueError: on masks of the wrong shape, or masks that keep no frequency or no neuron.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> masked = sp.prune_params(p, jnp.array([True, False, True, False]))
    >>> small = sp.shrink_params(masked)
    >>> small["omega"].shape, small["hidden"][0]["kernel"].shape
    ((2, 2), (2, 3))
    >>> x = jnp.array([[0.1, 0.4]])
    >>> bool(jnp.allclose(sp.periodic_siren_apply(small, x), sp.periodic_siren_apply(masked, x), atol=1e-5))
    True
  """
  a = np.asarray(_hidden_kernel(params))
  m, n = a.shape
  keep_f = np.ones(m, bool) if keep_frequencies is None else np.asarray(keep_frequencies, bool)
  keep_n = np.ones(n, bool) if keep_neurons is None else np.asarray(keep_neurons, bool)
  if keep_f.shape != (m,):
    raise ValueError(f"`keep_frequencies` must be a boolean mask of shape ({m},), got {keep_f.shape}.")
  if keep_n.shape != (n,):
    raise ValueError(f"`keep_neurons` must be a boolean mask of shape ({n},), got {keep_n.shape}.")
  if drop_zero_frequencies:
    keep_f = keep_f & np.any(a != 0, axis=1)
  if not keep_f.any() or not keep_n.any():
    raise ValueError(f"shrinking must keep at least one frequency and one neuron, got {keep_f.sum()} and {keep_n.sum()}.")
  fi, ni = np.flatnonzero(keep_f), np.flatnonzero(keep_n)
  hidden = [dict(layer) for layer in params["hidden"]]
  first = hidden[0]
  kernel_full = jnp.asarray(first["kernel"])
  dropped = np.flatnonzero(~keep_n)
  # Columns dropped from A: the neuron is sin(A[:, j] . H + b_j); exact fold only if A[:, j] == 0.
  constant = jnp.sin(first["bias"][dropped]) * jnp.all(kernel_full[:, dropped] == 0, axis=0)
  hidden[0] = {"kernel": kernel_full[fi][:, ni], "bias": first["bias"][ni]}
  if len(hidden) > 1:
    nxt = hidden[1]
    hidden[1] = {"kernel": nxt["kernel"][ni], "bias": nxt["bias"] + constant @ nxt["kernel"][dropped]}
    output = params["output"]
  else:
    out = params["output"]
    output = {"kernel": out["kernel"][ni], "bias": out["bias"] + constant @ out["kernel"][dropped]}
  return {
      **params,
      "omega": params["omega"][:, fi],
      "phi": params["phi"][fi],
      "hidden": tuple(hidden),
      "output": output,
  }


# ----------------------------------------------------------------------------------------------
# Fitting, the pruning loop and the grow loop.


def _mse_loss(params: Params, x: Array, y: Array) -> Array:
  return jnp.mean((siren.periodic_siren_apply(params, x) - y) ** 2)


class FitResult(NamedTuple):
  """Trained parameters and the per-step MSE (numpy ``(steps,)``)."""

  params: Params
  losses: np.ndarray


@functools.partial(jax.jit, static_argnames=("optimizer", "penalty", "bounded", "batch_size"))
def _train_step(params, opt_state, x, y, alpha, weights, bound, key, *, optimizer, penalty, bounded, batch_size):
  """One step of ``(1 - alpha) MSE + alpha P``; ``P = sum(weights * |A|)`` or ``penalty(params)``."""
  if batch_size is not None:
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    x, y = x[idx], y[idx]

  def loss_fn(p):
    mse = _mse_loss(p, x, y)
    reg = jnp.sum(weights * jnp.abs(_hidden_kernel(p))) if penalty is None else penalty(p)
    return regularized_loss(mse, reg, alpha), mse

  (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grads = {**grads, "omega": jnp.zeros_like(grads["omega"])}
  import optax

  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = {**optax.apply_updates(params, updates), "omega": params["omega"]}  # omega stays frozen.
  if bounded:
    params = bound_params(params, bound)
  return params, opt_state, mse


@functools.partial(jax.jit, static_argnames=("optimizer", "penalty", "bounded", "batch_size"))
def _train_chunk(params, opt_state, x, y, alphas, weights, bound, keys, *, optimizer, penalty, bounded, batch_size):
  """``len(alphas)`` steps of :func:`_train_step` in one ``lax.scan`` (one dispatch per chunk)."""

  def body(carry, inputs):
    params, opt_state = carry
    alpha, key = inputs
    params, opt_state, mse = _train_step(
        params, opt_state, x, y, alpha, weights, bound, key,
        optimizer=optimizer, penalty=penalty, bounded=bounded, batch_size=batch_size)
    return (params, opt_state), mse

  (params, opt_state), mses = jax.lax.scan(body, (params, opt_state), (alphas, keys))
  return params, opt_state, mses


def fit_periodic_siren(
    params: Params,
    x: Array,
    y: Array,
    optimizer: optax.GradientTransformation,
    steps: int,
    *,
    bound: Any = None,
    penalty: Optional[Callable[[Params], Array]] = None,
    targeted: Optional[Any] = None,
    groups: str = "frequencies",
    alpha: Any = None,
    batch_size: Optional[int] = None,
    key: Optional[Array] = None,
    progress: Optional[Callable[[Any], Any]] = None,
    until: Optional[Callable[[Params], bool]] = None,
    check_every: int = 25,
) -> FitResult:
  """Full-batch training of a periodic SIREN on ``(x, y)``, with optional bounding and regularisation.

  The loss is ``(1 - alpha(t)) MSE + alpha(t) P`` (sec. 7.1), with ``P`` the targeted weight decay over the
  boolean mask ``targeted`` (Def. 3.3), else ``penalty(params)`` when given, else ``||A||_1`` (Def. 3.2);
  with ``alpha=None`` the loss is the MSE. With ``bound`` the matrix ``A`` is projected after every step
  (Def. 6.1). The jitted step is cached per optimizer object and shapes, so loops that reuse the same
  optimizer compile once per network size.

  Args:
    params: a periodic SIREN dict.
    x: ``(N, dim)`` coordinates; ``y``: ``(N, out)`` targets.
    optimizer: an optax transformation (e.g. ``optax.adam(1e-3)``).
    steps: number of full-batch steps (non-negative int).
    bound: ``None`` or a scalar / ``(m,)`` bound.
    penalty: optional ``params -> scalar`` regulariser (replaces ``||A||_1``).
    targeted: optional boolean mask over ``groups`` for targeted weight decay.
    groups: ``"frequencies"`` or ``"neurons"`` (for ``targeted``).
    alpha: ``None`` (plain MSE), a constant in ``[0, 1]``, or a vectorisable function of the step array
      (e.g. ``lambda t: sp.alpha_schedule(t, steps)``).
    batch_size: ``None`` for full-batch steps, else the number of points drawn (with replacement) per step.
    key: a ``jax.random`` key, required with ``batch_size``.
    progress: optional wrapper of the iterable of chunk starts (a tqdm progress bar; steps run in
      scanned chunks of 50, or of ``check_every`` with ``until``).
    until: optional host predicate on the parameters, checked every ``check_every`` steps; training
      stops early (with the optimizer state kept until then) once it returns True.
    check_every: how often ``until`` is checked (positive int).

  Returns:
    :class:`FitResult` with the final parameters and the MSE of every step run (before its update, on
    the step's batch); fewer than ``steps`` entries when ``until`` stopped it.

  Raises:
    ValueError: on a negative ``steps``, ``penalty`` or ``targeted`` without ``alpha``, or a bad mask.

  Example:
    >>> import jax, optax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 8, 4), 16, 1)
    >>> x = jax.random.uniform(jax.random.key(2), (32, 2), minval=-1, maxval=1)
    >>> fit = sp.fit_periodic_siren(p, x, x[:, :1] ** 2, optax.adam(1e-2), 20, bound=0.5)
    >>> bool(fit.losses[-1] < fit.losses[0])
    True
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"`steps` must be a non-negative int, got {steps!r}.")
  if (penalty is not None or targeted is not None) and alpha is None:
    raise ValueError("`alpha` (a constant or a function of the step) is required with `penalty` or `targeted`.")
  a = _hidden_kernel(params)
  weights = jnp.ones((), a.dtype)
  if targeted is not None:
    groups = _check_groups(groups)
    size = a.shape[0] if groups == "frequencies" else a.shape[1]
    if np.shape(targeted) != (size,):
      raise ValueError(f"`targeted` must be a boolean mask of shape ({size},) over the {groups}, got {np.shape(targeted)}.")
    mask = jnp.asarray(targeted, bool).astype(a.dtype)
    weights = mask[:, None] if groups == "frequencies" else mask[None, :]
    penalty = None
  weights = jnp.broadcast_to(weights, a.shape)
  if alpha is None:
    alphas = np.zeros(steps, np.float32)
  elif callable(alpha):
    alphas = np.broadcast_to(np.asarray(alpha(jnp.arange(steps, dtype=jnp.float32)), np.float32), (steps,))
  else:
    alphas = np.full(steps, float(alpha), np.float32)
  if batch_size is not None:
    batch_size = _validation.check_positive_int("batch_size", batch_size)
    if key is None:
      raise ValueError("`key` (a jax.random key) is required with `batch_size`.")
  keys = jax.random.split(key if key is not None else jax.random.key(0), max(steps, 1))
  bounded = bound is not None
  bound_arr = jnp.asarray(_check_bound("bound", bound) if bounded else 0.0, a.dtype)
  if bounded:
    _row_bound(bound_arr, a.shape[0])
  check_every = _validation.check_positive_int("check_every", check_every)
  opt_state = optimizer.init(params)
  losses = np.zeros(steps, np.float32)
  # Steps run in scanned chunks (one dispatch each); ``until`` is checked between chunks.
  chunk = check_every if until is not None else 50
  starts = range(0, steps, chunk)
  iterator = starts if progress is None else progress(starts)
  done = steps
  alpha_steps = jnp.asarray(alphas)
  for t0 in iterator:
    t1 = min(t0 + chunk, steps)
    params, opt_state, mses = _train_chunk(
        params, opt_state, x, y, alpha_steps[t0:t1], weights, bound_arr, keys[t0:t1],
        optimizer=optimizer, penalty=penalty, bounded=bounded, batch_size=batch_size,
    )
    losses[t0:t1] = np.asarray(mses)
    if until is not None and t1 % check_every == 0 and until(params):
      done = t1
      break
  return FitResult(params, losses[:done])


class PruningRound(NamedTuple):
  """One round of the pruning loop.

  Attributes:
    selected: groups in ``I`` (step 2).
    pruned: groups removed (step 4: the selected ones whose norm fell below ``T_n``).
    remaining: groups left after the round.
    mse: full-data MSE after fine-tuning (step 5).
    targeted_steps: targeted-decay steps run (step 3 stops once the selection is near zero).
    decayed_fraction: ``max_{i in I} ||A^i||_1 / ||A^i||_1(selection)`` after step 3 (the largest norm
      left on a selected group, relative to its norm when selected; ``<= T_n`` means all were pruned).
    steps: all optimiser steps of the round (decay, targeted decay, fine-tuning).
  """

  selected: int
  pruned: int
  remaining: int
  mse: float
  targeted_steps: int = 0
  decayed_fraction: float = float("nan")
  steps: int = 0


def structured_pruning(
    params: Params,
    x: Array,
    y: Array,
    optimizer: optax.GradientTransformation,
    *,
    threshold: float,
    groups: str = "frequencies",
    decay_steps: int,
    targeted_steps: int,
    finetune_steps: int,
    prune_below: float = 0.05,
    alpha_scale: float = 1e-6,
    targeted_alpha: float = 1e-2,
    check_every: int = 25,
    max_groups_per_round: Optional[int] = None,
    target_pruned: Optional[int] = None,
    max_rounds: int = 100,
    bound: Any = None,
    batch_size: Optional[int] = None,
    key: Optional[Array] = None,
    progress: Optional[Callable[[Any], Any]] = None,
) -> tuple[Params, list[PruningRound]]:
  """The pruning loop of sec. 7.2.4 (targeted weight decay, then prune, then fine-tune), with a real shrink.

  References:
    Aldana, Novello, Velho, TR-24-02, sec. 3.2.2, 7.1 and 7.2.4: (1) train ``e_wd`` steps with
    ``(1 - alpha) MSE + alpha ||A||_1`` (alpha from :func:`alpha_schedule`); (2) select the largest set
    ``I`` of groups whose summed L1 norm is below a fraction ``T_p in [0, 1]`` of ``||A||_1``;
    (3) targeted weight decay ``(1 - alpha) MSE + alpha sum_{i in I} ||A^i||_1`` over ``I``; (4) prune the
    groups whose norm fell below ``T_n``; (5) fine-tune with the MSE ``e_rec`` steps; repeat until ``I`` is
    empty, nothing was pruned, ``max_rounds`` or ``target_pruned`` groups are reached.

  Step 3 runs until every selected group is near zero (its L1 norm below ``T_n`` times its norm when
  selected, checked every ``check_every`` steps) or ``targeted_steps`` steps have run, so pruning removes
  groups that carry almost nothing rather than cutting live ones. Step 4 is a real guard: a selected group
  the MSE keeps alive (its norm stays above ``T_n`` of where it started) is an essential one and is not
  pruned. Pruned groups are removed with :func:`shrink_params` (with ``groups="frequencies"``, the input
  frequencies go too), so the returned network is genuinely smaller. The optimizer restarts each phase.

  Changed semantics (0.2): ``threshold`` is the paper's fraction ``T_p`` (it was an absolute L1 budget),
  ``prune_below`` is ``T_n`` relative to each group's norm at selection (it was an absolute norm that
  defaulted to infinity, which pruned every selected group), and targeted decay stops early once the
  selection is near zero.

  Args:
    params: a trained periodic SIREN dict.
    x, y: training data, ``(N, dim)`` and ``(N, out)``.
    optimizer: the optax transformation used in every phase.
    threshold: ``T_p in [0, 1]``, the fraction of ``||A||_1`` a round may remove.
    groups: ``"frequencies"`` (the paper's columns) or ``"neurons"`` (rows).
    decay_steps: ``e_wd`` (0 skips step 1).
    targeted_steps: the most steps of targeted decay per round (``e_twd``).
    finetune_steps: ``e_rec``.
    prune_below: ``T_n`` in ``[0, 1]``: a selected group is pruned once its L1 norm is at most ``T_n``
      times its norm at selection. ``1`` prunes every selected group (an abrupt cut, no decay needed),
      ``0`` only groups decayed exactly to zero.
    alpha_scale: ``alpha_s`` of the weight decay phase.
    targeted_alpha: the constant ``alpha`` of the targeted decay phase, in ``[0, 1]``.
    check_every: how often step 3 checks whether the selection is near zero.
    max_groups_per_round: cap on ``|I|`` per round.
    target_pruned: stop once this many groups are removed in total (caps the last selection).
    max_rounds: at most this many rounds.
    bound: optional bounding applied throughout (scalar only, as the rows change).
    batch_size, key: minibatch training (see :func:`fit_periodic_siren`); the key is split per phase.
    progress: optional wrapper of each phase's step iterable.

  Returns:
    ``(shrunk_params, rounds)``; ``rounds[i].mse`` is the full-data MSE after round ``i``.

  Raises:
    ValueError: on bad ``groups``, a ``threshold`` or ``prune_below`` outside ``[0, 1]``, or a
      per-frequency (vector) ``bound``.

  Example:
    >>> import jax, optax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 8, 3), 10, 1)
    >>> x = jax.random.uniform(jax.random.key(2), (48, 2), minval=-1, maxval=1)
    >>> small, rounds = sp.structured_pruning(p, x, x[:, :1] ** 2, optax.adam(1e-2), threshold=0.3,
    ...     decay_steps=4, targeted_steps=40, finetune_steps=4, prune_below=1.0, max_rounds=1)
    >>> small["omega"].shape[1] == 8 - rounds[0].pruned
    True
  """
  groups = _check_groups(groups)
  if bound is not None and np.shape(bound) != ():
    raise ValueError(f"`bound` must be a scalar here (groups are removed between rounds), got shape {np.shape(bound)}.")
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"`threshold` (T_p) must be a fraction of the total L1 norm in [0, 1], got {threshold}.")
  prune_below = float(prune_below)
  if not 0.0 <= prune_below <= 1.0:
    raise ValueError(f"`prune_below` (T_n, relative to each group's norm at selection) must lie in [0, 1], got {prune_below}.")
  max_rounds = _validation.check_positive_int("max_rounds", max_rounds)
  rounds: list[PruningRound] = []
  total = 0
  key = jax.random.key(0) if key is None else key
  fit_kw = dict(bound=bound, batch_size=batch_size, progress=progress)
  for _ in range(max_rounds):
    key, k_decay, k_targeted, k_finetune = jax.random.split(key, 4)
    steps = 0
    if decay_steps:
      params = fit_periodic_siren(
          params, x, y, optimizer, decay_steps, alpha=lambda t: alpha_schedule(t, decay_steps, scale=alpha_scale),
          key=k_decay, **fit_kw,
      ).params
      steps += decay_steps
    cap = max_groups_per_round
    if target_pruned is not None:
      cap = target_pruned - total if cap is None else min(cap, target_pruned - total)
    a = _hidden_kernel(params)
    size = a.shape[0] if groups == "frequencies" else a.shape[1]
    cap = size - 1 if cap is None else min(cap, size - 1)
    selected = pruning_selection(a, threshold, groups, max_groups=cap)
    if not selected.any():
      break
    start_norms = np.asarray(group_l1_norms(a, groups), np.float64)
    scale = np.where(selected, np.maximum(start_norms, np.finfo(np.float32).tiny), 1.0)

    def relative_norms(p, scale=scale):
      return np.asarray(group_l1_norms(_hidden_kernel(p), groups), np.float64) / scale

    def near_zero(p, selected=selected):
      return bool(np.all(relative_norms(p)[selected] <= prune_below))

    run = 0
    if targeted_steps and not near_zero(params):
      fit = fit_periodic_siren(
          params, x, y, optimizer, targeted_steps, targeted=selected, groups=groups, alpha=targeted_alpha,
          key=k_targeted, until=near_zero, check_every=check_every, **fit_kw,
      )
      params, run = fit.params, len(fit.losses)
    steps += run
    rel = relative_norms(params)
    pruned = selected & (rel <= prune_below)
    if pruned.any():
      params = prune_params(params, jnp.asarray(pruned), groups)
      if groups == "frequencies":
        params = shrink_params(params, keep_frequencies=~pruned, drop_zero_frequencies=False)
      else:
        params = shrink_params(params, keep_neurons=~pruned, drop_zero_frequencies=False)
    total += int(pruned.sum())
    fit = fit_periodic_siren(params, x, y, optimizer, finetune_steps, key=k_finetune, **fit_kw)
    params = fit.params
    steps += finetune_steps
    mse = float(_mse_loss(params, x, y))
    a = _hidden_kernel(params)
    rounds.append(PruningRound(int(selected.sum()), int(pruned.sum()), a.shape[0 if groups == "frequencies" else 1],
                               mse, run, float(np.max(rel[selected])), steps))
    if not pruned.any() or (target_pruned is not None and total >= target_pruned):
      break
  return params, rounds


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
  block_bounds(params["omega"], limits, bounds, period=period)  # Validates limits and bounds.
  block = np.asarray(block_index(params["omega"], limits, period=period))
  a = np.abs(np.asarray(_hidden_kernel(params), np.float64))
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
  a = _hidden_kernel(params)
  n_add = new_omega.shape[1]
  phi_new = jax.random.uniform(key, (n_add,), params["phi"].dtype, -math.pi, math.pi)
  grown = _with_hidden_kernel(params, jnp.concatenate([a, jnp.zeros((n_add, a.shape[1]), a.dtype)], axis=0))
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
    bound = block_bounds(params["omega"], limits, bounds, period=period)
    key, k_fit = jax.random.split(key)
    fit = fit_periodic_siren(
        params, x, y, optimizer, steps_per_round, bound=bound, batch_size=batch_size, key=k_fit, progress=progress
    )
    params = fit.params
    if added >= total_add:
      break
    mse = float(_mse_loss(params, x, y))  # Full-data MSE before this growth.
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
    bound = block_bounds(params["omega"], limits, bounds, period=period)
    params = fit_periodic_siren(
        params, x, y, optimizer, final_steps, bound=bound, batch_size=batch_size, key=key, progress=progress
    ).params
  return params, rounds
