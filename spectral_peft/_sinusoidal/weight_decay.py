"""L1 and targeted weight decay of the hidden matrix (Def. 3.2, 3.3) and the alpha schedule (sec. 7.2.1).

References:
  Aldana, Novello, Velho. "Sinusoidal Networks in practice: Controlling the frequencies' factory",
  VISGRAF TR-24-02 (2024): Def. 3.2 (weight decay), Def. 3.3 and Obs. 1-2 (targeted weight decay), sec. 7.1 (the
  regularised loss) and sec. 7.2.1 (the alpha schedule).

Layout and groups as in :mod:`spectral_peft._sinusoidal.hidden`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sinusoidal import hidden

Array = jax.Array
Params = dict[str, Any]


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
  axis = 1 if hidden.check_groups(groups) == "frequencies" else 0
  return jnp.sum(jnp.abs(a), axis=axis)


def l1_weight_decay(params: Params) -> Array:
  """The weight decay functional ``L_wd = ||A||_1`` (Def. 3.2), a scalar.

  Example:
    >>> import jax, spectral_peft as sp
    >>> p = sp.periodic_siren_init(jax.random.key(1), sp.integer_frequencies(jax.random.key(0), 4, 2), 3, 1)
    >>> bool(sp.l1_weight_decay(p) > 0)
    True
  """
  return jnp.sum(jnp.abs(hidden.matrix(params)))


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
  norms = group_l1_norms(hidden.matrix(params), groups)
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
