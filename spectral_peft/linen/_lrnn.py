"""Flax Linen LRNN layer and network (thin wrappers over :mod:`spectral_peft._lrnn`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_peft._lrnn import network
from spectral_peft._lrnn import neurons

Array = jax.Array


def _promote(x: Array, tree: Any, dtype: Optional[Any]) -> tuple[Array, Any]:
  leaves, treedef = jax.tree.flatten(tree)
  x, *leaves = nn.dtypes.promote_dtype(x, *leaves, dtype=dtype)
  return x, jax.tree.unflatten(treedef, leaves)


class LRNNLayer(nn.Module):
  """One LRNN layer ``x -> prod_j (1 + gamma g_lj(z_lj))``, ``z = einsum('...i,ird->...rd', x, kernel) + bias``.

  References:
    "Deep learning with learnable product-structured activations" (LRNNs), eq. 1 and 4-5.

  Parameters: ``kernel: (in_features, rank, projection_width)``, ``bias: (rank,
  projection_width)``, ``components`` (a dict, see :func:`spectral_peft.component_init`); the
  call is :func:`spectral_peft.lrnn_layer`.

  Attributes:
    rank, projection_width: ``r`` and ``d``.
    hidden: hidden widths of every component MLP.
    activation, omega, gamma, remat: as in :func:`spectral_peft.product_activation`.
    first_layer: initialise the projection as a first (input) layer.
    shared_components: one set of ``d`` components for all neurons (eq. 5).
    output_init: component output-weight scheme (``"siren"``, the paper's; see
      :func:`spectral_peft.component_init`).
    dtype: computation dtype (``None``: promote); ``param_dtype``: of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.linen.LRNNLayer(rank=8, projection_width=4, first_layer=True)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((5, 2)))
    >>> layer.apply(variables, jnp.ones((5, 2))).shape
    (5, 8)
  """

  rank: int
  projection_width: int
  hidden: Sequence[int] = (1,)
  activation: neurons.Activation = "sine"
  omega: float = 30.0
  gamma: Optional[float] = None
  first_layer: bool = False
  shared_components: bool = False
  output_init: str = "siren"
  remat: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    kernel = self.param(
        "kernel",
        lambda key: network.lrnn_projection_init(
            key, in_features, self.rank, self.projection_width, omega=self.omega, first_layer=self.first_layer,
            dtype=self.param_dtype,
        )[0],
    )
    bias = self.param(
        "bias",
        lambda key: network.lrnn_projection_init(
            key, in_features, self.rank, self.projection_width, omega=self.omega, first_layer=self.first_layer,
            dtype=self.param_dtype,
        )[1],
    )
    components = self.param(
        "components",
        lambda key: neurons.component_init(
            key, self.rank, self.projection_width, tuple(self.hidden), omega=self.omega,
            shared=self.shared_components, output_init=self.output_init, dtype=self.param_dtype,
        ),
    )
    x, (kernel, bias, components) = _promote(x, (kernel, bias, components), self.dtype)
    return network.lrnn_layer(
        x, kernel, bias, components, gamma=self.gamma, activation=self.activation, omega=self.omega, remat=self.remat
    )


class LRNN(nn.Module):
  """A shallow (eq. 1) or deep (eq. 3-4) LRNN ``[in_features, *ranks, out_features]``.

  References:
    LRNN paper, eq. 1, 3-5; App. C.2 (LayerNorm after each layer).

  The parameters are ``{"layers": [...], "output": {...}}`` exactly as
  :func:`spectral_peft.lrnn_init` makes them (``variables["params"]`` is that dict), and the call
  is :func:`spectral_peft.lrnn_apply`.

  Attributes:
    ranks, out_features, projection_width, hidden, omega, first_omega, layer_norm,
      shared_components, output_init, output_bias: as in :func:`spectral_peft.lrnn_init` (``in_features`` is read from the
      input).
    activation, gamma, remat, epsilon: as in :func:`spectral_peft.lrnn_apply`.
    dtype: computation dtype (``None``: promote); ``param_dtype``: of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> model = sp.linen.LRNN(ranks=(16, 16), out_features=1, projection_width=12, omega=6.0)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((7, 2)))
    >>> model.apply(variables, jnp.zeros((7, 2))).shape
    (7, 1)
  """

  ranks: Sequence[int]
  out_features: int
  projection_width: Union[int, Sequence[int]]
  hidden: Sequence[int] = (1,)
  activation: neurons.Activation = "sine"
  omega: float = 30.0
  first_omega: Optional[float] = None
  gamma: Optional[float] = None
  layer_norm: bool = True
  shared_components: bool = False
  output_init: str = "siren"
  output_bias: bool = False
  remat: bool = False
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  def _init(self, key: Array, in_features: int) -> dict:
    return network.lrnn_init(
        key, in_features, tuple(self.ranks), self.out_features, projection_width=self.projection_width,
        hidden=tuple(self.hidden), omega=self.omega, first_omega=self.first_omega, layer_norm=self.layer_norm,
        shared_components=self.shared_components, output_init=self.output_init, output_bias=self.output_bias,
        dtype=self.param_dtype,
    )

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    layers = self.param("layers", lambda key: self._init(key, in_features)["layers"])
    output = self.param("output", lambda key: self._init(key, in_features)["output"])
    x, params = _promote(x, {"layers": layers, "output": output}, self.dtype)
    return network.lrnn_apply(
        params, x, gamma=self.gamma, activation=self.activation, omega=self.omega, first_omega=self.first_omega,
        remat=self.remat, epsilon=self.epsilon,
    )
