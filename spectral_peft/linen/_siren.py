"""Flax Linen periodic sinusoidal network (a thin wrapper over :mod:`spectral_peft._sinusoidal.siren`)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_peft import _validation
from spectral_peft._sinusoidal import siren

Array = jax.Array


def _uniform(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class PeriodicSiren(nn.Module):
  """``f(x) = C S(...S(sin(x @ omega + phi))) + d`` with a frozen first layer ``omega``.

  References:
    Aldana, Novello, Velho, TR-24-02, eq. 1 and sec. 3.1. Same initial distributions as
    :func:`spectral_peft.periodic_siren_init`; the forward pass is :func:`spectral_peft.periodic_siren_apply`.

  ``omega`` lives in the ``"frequencies"`` collection (not ``"params"``), so gradients of the params skip
  it. :func:`periodic_siren_dict` turns the variables into the core parameter dict.

  Attributes:
    omega: ``(dim, m)`` frequencies.
    hidden_features: hidden width or a tuple of widths.
    out_features: output channels.
    dtype: computation dtype (``None``: promoted); ``param_dtype``: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> model = sp.linen.PeriodicSiren(sp.integer_frequencies(jax.random.key(0), 16, 8), 32, 1)
    >>> variables = model.init(jax.random.key(1), jnp.zeros((1, 2)))
    >>> model.apply(variables, jnp.zeros((5, 2))).shape
    (5, 1)
  """

  omega: Any
  hidden_features: Union[int, Sequence[int]]
  out_features: int
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _validation.check_ndim("omega", self.omega, 2)
    widths = [self.hidden_features] if isinstance(self.hidden_features, int) else list(self.hidden_features)
    widths = [_validation.check_positive_int("hidden_features", w) for w in widths]
    out_features = _validation.check_positive_int("out_features", self.out_features)
    omega = self.variable("frequencies", "omega", lambda: jnp.asarray(self.omega, self.param_dtype)).value
    m = omega.shape[1]
    phi = self.param("phi", _uniform(math.pi), (m,), self.param_dtype)
    hidden, fan_in = [], m
    for i, width in enumerate(widths):
      kernel = self.param(f"hidden_{i}_kernel", _uniform(math.sqrt(6.0 / fan_in)), (fan_in, width), self.param_dtype)
      bias = self.param(f"hidden_{i}_bias", _uniform(1.0 / math.sqrt(fan_in)), (width,), self.param_dtype)
      hidden.append({"kernel": kernel, "bias": bias})
      fan_in = width
    out_kernel = self.param("output_kernel", _uniform(math.sqrt(6.0 / fan_in)), (fan_in, out_features), self.param_dtype)
    out_bias = self.param("output_bias", _uniform(1.0 / math.sqrt(fan_in)), (out_features,), self.param_dtype)
    params = {"omega": omega, "phi": phi, "hidden": tuple(hidden), "output": {"kernel": out_kernel, "bias": out_bias}}
    leaves, tree = jax.tree.flatten(params)
    x, *leaves = nn.dtypes.promote_dtype(x, *leaves, dtype=self.dtype)
    return siren.periodic_siren_apply(jax.tree.unflatten(tree, leaves), x)


def periodic_siren_dict(variables: Any) -> dict[str, Any]:
  """The core parameter dict of :class:`PeriodicSiren` variables ``{"params": ..., "frequencies": ...}``."""
  p = variables["params"]
  count = sum(1 for name in p if name.startswith("hidden_") and name.endswith("_kernel"))
  return {
      "omega": variables["frequencies"]["omega"],
      "phi": p["phi"],
      "hidden": tuple({"kernel": p[f"hidden_{i}_kernel"], "bias": p[f"hidden_{i}_bias"]} for i in range(count)),
      "output": {"kernel": p["output_kernel"], "bias": p["output_bias"]},
  }
