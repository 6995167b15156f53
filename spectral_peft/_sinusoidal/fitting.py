"""Training a periodic SIREN with optional bounding and (targeted) weight decay: the loop the controls share.

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): sec. 7.1 (the loss ``(1 - alpha) MSE + alpha P``), Def. 3.2-3.3 (the
  penalties) and Def. 6.1 (bounding after every step).

Steps run in jitted ``lax.scan`` chunks, one dispatch per chunk. Layout and groups as in
:mod:`spectral_peft._sinusoidal.hidden`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sinusoidal import bounding
from spectral_peft._sinusoidal import hidden
from spectral_peft._sinusoidal import siren
from spectral_peft._sinusoidal import weight_decay

if TYPE_CHECKING:
  import optax  # Imported where used: `import spectral_peft` stays free of optax's start-up cost.

Array = jax.Array
Params = dict[str, Any]


def mse_loss(params: Params, x: Array, y: Array) -> Array:
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
    mse = mse_loss(p, x, y)
    reg = jnp.sum(weights * jnp.abs(hidden.matrix(p))) if penalty is None else penalty(p)
    return weight_decay.regularized_loss(mse, reg, alpha), mse

  (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grads = {**grads, "omega": jnp.zeros_like(grads["omega"])}
  import optax

  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = {**optax.apply_updates(params, updates), "omega": params["omega"]}  # omega stays frozen.
  if bounded:
    params = bounding.bound_params(params, bound)
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
  a = hidden.matrix(params)
  weights = jnp.ones((), a.dtype)
  if targeted is not None:
    groups = hidden.check_groups(groups)
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
  bound_arr = jnp.asarray(bounding.check_bound("bound", bound) if bounded else 0.0, a.dtype)
  if bounded:
    bounding.row_bound(bound_arr, a.shape[0])
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
