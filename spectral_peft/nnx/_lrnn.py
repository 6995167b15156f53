"""Flax NNX LRNN layer and network (thin wrappers over :mod:`spectral_peft._lrnn`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_peft import _validation
from spectral_peft._lrnn import network
from spectral_peft._lrnn import neurons

Array = jax.Array


def _is_variable(v: Any) -> bool:
  return isinstance(v, nnx.Variable)


def _wrap(tree: Any) -> Any:
  return nnx.data(jax.tree.map(nnx.Param, tree))


def _unwrap(tree: Any) -> Any:
  return jax.tree.map(lambda v: v[...], tree, is_leaf=_is_variable)


def _promote(x: Array, tree: Any, dtype: Optional[Any]) -> tuple[Array, Any]:
  leaves, treedef = jax.tree.flatten(tree)
  x, *leaves = nnx.nn.dtypes.promote_dtype((x, *leaves), dtype=dtype)
  return x, jax.tree.unflatten(treedef, leaves)


class LRNNLayer(nnx.Module):
  """One LRNN layer ``x -> prod_j (1 + gamma g_lj(z_lj))``, ``z = einsum('...i,ird->...rd', x, kernel) + bias``.

  References:
    "Deep learning with learnable product-structured activations" (LRNNs), eq. 1 and 4-5.

  Parameters: ``kernel: (in_features, rank, projection_width)``, ``bias: (rank,
  projection_width)`` and ``components`` (see :func:`spectral_peft.component_init`), initialised
  SIREN-style by :func:`spectral_peft.lrnn_projection_init` and
  :func:`spectral_peft.component_init`. The call is :func:`spectral_peft.lrnn_layer`.

  Args:
    in_features, rank, projection_width: ``n_in``, ``r`` and ``d``.
    hidden: hidden widths of every component MLP.
    activation, omega, gamma, remat: as in :func:`spectral_peft.product_activation`.
    first_layer: initialise the projection as a first (input) layer.
    shared_components: one set of ``d`` components for all neurons (eq. 5).
    output_init: component output-weight scheme (``"siren"``, the paper's; see
      :func:`spectral_peft.component_init`).
    dtype: computation dtype (``None``: promote inputs and parameters); ``param_dtype``: of the
      parameters; ``rngs``: an ``nnx.Rngs`` with a ``params`` stream.

  Example:
    >>> from flax import nnx; import jax.numpy as jnp, spectral_peft as sp
    >>> layer = sp.nnx.LRNNLayer(2, 8, projection_width=4, first_layer=True, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((5, 2))).shape
    (5, 8)
  """

  def __init__(
      self,
      in_features: int,
      rank: int,
      *,
      projection_width: int,
      hidden: Sequence[int] = (1,),
      activation: neurons.Activation = "sine",
      omega: float = 30.0,
      gamma: Optional[float] = None,
      first_layer: bool = False,
      shared_components: bool = False,
      output_init: str = "siren",
      remat: bool = False,
      dtype: Optional[Any] = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.in_features = _validation.check_positive_int("in_features", in_features)
    self.rank = _validation.check_positive_int("rank", rank)
    self.projection_width = _validation.check_positive_int("projection_width", projection_width)
    neurons.resolve_activation(activation)  # Validates the name (raises early).
    self.activation = activation
    self.omega = _validation.check_positive_float("omega", omega)
    self.gamma = None if gamma is None else _validation.check_positive_float("gamma", gamma)
    self.remat = bool(remat)
    self.dtype, self.param_dtype = dtype, param_dtype
    kernel, bias = network.lrnn_projection_init(
        rngs.params(), in_features, rank, projection_width, omega=omega, first_layer=first_layer, dtype=param_dtype
    )
    self.kernel, self.bias = nnx.Param(kernel), nnx.Param(bias)
    self.components = _wrap(
        neurons.component_init(
            rngs.params(), rank, projection_width, hidden, omega=omega, shared=shared_components,
            output_init=output_init, dtype=param_dtype,
        )
    )

  def __call__(self, x: Array) -> Array:
    x, (kernel, bias, components) = _promote(x, (self.kernel[...], self.bias[...], _unwrap(self.components)), self.dtype)
    return network.lrnn_layer(
        x, kernel, bias, components, gamma=self.gamma, activation=self.activation, omega=self.omega, remat=self.remat
    )


class LRNN(nnx.Module):
  """A shallow (eq. 1) or deep (eq. 3-4) LRNN ``[in_features, *ranks, out_features]``.

  References:
    LRNN paper, eq. 1, 3-5; App. C.2 (LayerNorm after each layer).

  The parameters are those of :func:`spectral_peft.lrnn_init` (as ``nnx.Param`` leaves of the
  ``params`` attribute, same nesting) and the call is :func:`spectral_peft.lrnn_apply`, so
  ``model(x) == sp.lrnn_apply(model.params_dict(), x, **model.apply_kwargs())``.

  Args:
    in_features, ranks, out_features: as in :func:`spectral_peft.lrnn_init`.
    projection_width, hidden, omega, first_omega: as in :func:`spectral_peft.lrnn_init`.
    layer_norm, shared_components, output_init, output_bias: as in :func:`spectral_peft.lrnn_init`.
    activation, gamma, remat, epsilon: as in :func:`spectral_peft.lrnn_apply`.
    dtype: computation dtype (``None``: promote); ``param_dtype``; ``rngs``: ``nnx.Rngs``.

  Example:
    >>> from flax import nnx; import jax.numpy as jnp, spectral_peft as sp
    >>> model = sp.nnx.LRNN(2, (16, 16), 1, projection_width=12, omega=6.0, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((7, 2))).shape
    (7, 1)
  """

  def __init__(
      self,
      in_features: int,
      ranks: Sequence[int],
      out_features: int,
      *,
      projection_width: Union[int, Sequence[int]],
      hidden: Sequence[int] = (1,),
      activation: neurons.Activation = "sine",
      omega: float = 30.0,
      first_omega: Optional[float] = None,
      gamma: Optional[float] = None,
      layer_norm: bool = True,
      shared_components: bool = False,
      output_init: str = "siren",
      output_bias: bool = False,
      remat: bool = False,
      epsilon: float = 1e-5,
      dtype: Optional[Any] = None,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    params = network.lrnn_init(
        rngs.params(), in_features, ranks, out_features, projection_width=projection_width, hidden=hidden,
        omega=omega, first_omega=first_omega, layer_norm=layer_norm, shared_components=shared_components,
        output_init=output_init, output_bias=output_bias, dtype=param_dtype,
    )
    neurons.resolve_activation(activation)  # Validates the name (raises early).
    self.activation = activation
    self.omega = _validation.check_positive_float("omega", omega)
    self.first_omega = None if first_omega is None else _validation.check_positive_float("first_omega", first_omega)
    self.gamma = None if gamma is None else _validation.check_positive_float("gamma", gamma)
    self.remat = bool(remat)
    self.epsilon = _validation.check_positive_float("epsilon", epsilon)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.params = _wrap(params)

  def params_dict(self) -> dict:
    """The parameters as the plain dict of arrays that :func:`spectral_peft.lrnn_apply` takes."""
    return _unwrap(self.params)

  def apply_kwargs(self) -> dict:
    """The keyword arguments of :func:`spectral_peft.lrnn_apply` this module calls it with."""
    return {"gamma": self.gamma, "activation": self.activation, "omega": self.omega,
            "first_omega": self.first_omega, "remat": self.remat, "epsilon": self.epsilon}

  def __call__(self, x: Array) -> Array:
    x, params = _promote(x, self.params_dict(), self.dtype)
    return network.lrnn_apply(params, x, **self.apply_kwargs())
