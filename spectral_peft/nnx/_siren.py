"""Flax NNX periodic sinusoidal network (a thin wrapper over :mod:`spectral_peft._sinusoidal.siren`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_peft import _validation
from spectral_peft._sinusoidal import siren

Array = jax.Array


class Frequencies(nnx.Variable):
  """The frozen first-layer frequencies ``omega`` (not an ``nnx.Param``: optimizers skip it)."""


class PeriodicSiren(nnx.Module):
  """``f(x) = C S(...S(sin(x @ omega + phi))) + d`` with a frozen first layer ``omega``.

  References:
    Aldana, Novello, Velho, TR-24-02, eq. 1 and sec. 3.1. Parameters are created by
    :func:`spectral_peft.periodic_siren_init` and the forward pass is
    :func:`spectral_peft.periodic_siren_apply`; :meth:`as_dict` returns the core parameter dict.

  Args:
    omega: ``(dim, m)`` frequencies (e.g. :func:`spectral_peft.integer_frequencies` for a periodic
      network, :func:`spectral_peft.siren_frequencies` for SIREN), stored as a :class:`Frequencies`.
    hidden_features: hidden width ``n`` or a sequence of widths.
    out_features: output channels.
    dtype: computation dtype (``None``: promoted from inputs and parameters).
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Example:
    >>> from flax import nnx; import jax, jax.numpy as jnp, spectral_peft as sp
    >>> omega = sp.integer_frequencies(jax.random.key(0), 16, 8)
    >>> model = sp.nnx.PeriodicSiren(omega, 32, 1, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((5, 2))).shape
    (5, 1)
  """

  def __init__(
      self,
      omega: Array,
      hidden_features: Union[int, Sequence[int]],
      out_features: int,
      *,
      dtype: Optional[Any] = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    params = siren.periodic_siren_init(rngs.params(), omega, hidden_features, out_features, dtype=param_dtype)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.out_features = _validation.check_positive_int("out_features", out_features)
    self.omega = Frequencies(params["omega"])
    self.phi = nnx.Param(params["phi"])
    self.hidden = nnx.List(
        [nnx.Dict(kernel=nnx.Param(layer["kernel"]), bias=nnx.Param(layer["bias"])) for layer in params["hidden"]]
    )
    self.output_kernel = nnx.Param(params["output"]["kernel"])
    self.output_bias = nnx.Param(params["output"]["bias"])

  def as_dict(self) -> dict[str, Any]:
    """The core parameter dict (for :mod:`spectral_peft` training controls and analysis)."""
    return {
        "omega": self.omega[...],
        "phi": self.phi[...],
        "hidden": tuple({"kernel": layer["kernel"][...], "bias": layer["bias"][...]} for layer in self.hidden),
        "output": {"kernel": self.output_kernel[...], "bias": self.output_bias[...]},
    }

  def __call__(self, x: Array) -> Array:
    params = self.as_dict()
    leaves, tree = jax.tree.flatten(params)
    x, *leaves = nnx.nn.dtypes.promote_dtype((x, *leaves), dtype=self.dtype)
    return siren.periodic_siren_apply(jax.tree.unflatten(tree, leaves), x)
