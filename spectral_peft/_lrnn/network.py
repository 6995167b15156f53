"""LRNN layers and networks: projections, LayerNorm, deep LRNN init and apply, interaction heatmaps.

References:
  "Deep learning with learnable product-structured activations" (LRNNs), eq. 1 (shallow LRNN),
  eq. 3-4 (deep LRNN), App. A.2 (interaction heatmaps), App. C.2 (LayerNorm, initialisation).

Layout (Flax kernel layout, inputs first): a layer's projection kernel is ``(in_features, r, d)`` and
its bias ``(r, d)``, ``z = einsum('...i,ird->...rd')``; the neurons, their component MLPs and where
``omega`` goes are described in :mod:`spectral_peft._lrnn.neurons`.

Network parameters (:func:`lrnn_init`) are a plain dict of arrays::

  {"layers": [{"kernel", "bias", "components", ["norm": {"scale", "bias"}]}, ...],
   "output": {"kernel": (r_L, out_features), ["bias": (out_features,)]}}

A layer has a ``"norm"`` entry exactly when LayerNorm follows it, and the output map has a
``"bias"`` exactly when it was asked for (eq. 3's ``S_out`` has none, the default), so the
architecture is read from the parameters; only how to evaluate the components (activation,
frequencies, gamma, rematerialisation) is passed to :func:`lrnn_apply`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from spectral_peft import _validation
from spectral_peft._lrnn import neurons

Array = jax.Array
Params = dict[str, Any]


def _check_x(x: Any, in_features: int) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] != in_features:
    raise ValueError(f"`x` must have shape (..., in_features) with in_features = {in_features}, got shape {shape}.")
  _validation.check_floating("x", x)


def _project(x: Array, kernel: Array, bias: Array) -> Array:
  # z = einsum('...i,ird->...rd', x, kernel) + bias, computed as one matmul with the kernel flattened
  # to (in_features, r * d): the same contraction, but XLA:CPU then needs no transposes of the
  # (..., r, d) tangents and cotangents in the derivatives (about a third of a Poisson step).
  in_features, rank, width = kernel.shape
  z = jnp.matmul(x, kernel.reshape(in_features, rank * width))
  return z.reshape(z.shape[:-1] + (rank, width)) + bias


def lrnn_projection_init(
    key: Array,
    in_features: int,
    rank: int,
    projection_width: int,
    *,
    omega: float = 30.0,
    first_layer: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[Array, Array]:
  """SIREN-style projection kernel ``(in_features, r, d)`` and bias ``(r, d)`` of an LRNN layer.

  First layer: kernel ``U(-1/in, 1/in)`` (its components use ``omega_0``); later layers: kernel
  ``U(-sqrt(6/in)/omega, sqrt(6/in)/omega)``. Biases ``U(-1/sqrt(in), 1/sqrt(in))`` (the
  ``nn.Linear`` default that SIREN keeps).
  """
  in_features = _validation.check_positive_int("in_features", in_features)
  rank = _validation.check_positive_int("rank", rank)
  width = _validation.check_positive_int("projection_width", projection_width)
  omega = _validation.check_positive_float("omega", omega)
  k_kernel, k_bias = jax.random.split(key)
  bound = 1.0 / in_features if first_layer else math.sqrt(6.0 / in_features) / omega
  kernel = neurons.uniform(k_kernel, (in_features, rank, width), bound, dtype)
  bias = neurons.uniform(k_bias, (rank, width), 1.0 / math.sqrt(in_features), dtype)
  return kernel, bias


def lrnn_layer(
    x: Array,
    kernel: Array,
    bias: Array,
    components: Params,
    *,
    gamma: Optional[float] = None,
    activation: neurons.Activation = "sine",
    omega: float = 30.0,
    remat: bool = False,
) -> Array:
  """One LRNN layer: ``z = einsum('...i,ird->...rd', x, kernel) + bias``, then ``phi(z)``.

  References:
    LRNN paper, eq. 1 (one layer) and eq. 4 (a layer of a deep LRNN).

  Args:
    x: ``(..., in_features)`` inputs.
    kernel: ``(in_features, r, d)`` projection kernel.
    bias: ``(r, d)`` projection bias.
    components: component MLPs of the layer (see :func:`product_activation`).
    gamma, activation, omega, remat: as in :func:`product_activation`.

  Returns:
    ``(..., r)`` product-structured activations.

  Raises:
    ValueError / TypeError: on mismatched shapes or bad hyperparameters.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> kernel, bias = sp.lrnn_projection_init(jax.random.key(0), 2, 8, 4, first_layer=True)
    >>> comps = sp.component_init(jax.random.key(1), 8, 4)
    >>> sp.lrnn_layer(jnp.ones((5, 2)), kernel, bias, comps).shape
    (5, 8)
  """
  _validation.check_ndim("kernel", kernel, 3)
  _validation.check_floating("kernel", kernel)
  in_features, rank, width = kernel.shape
  if rank < 1 or width < 1:
    raise ValueError(f"`kernel` must have shape (in_features, r, d) with r >= 1 and d >= 1, got {tuple(kernel.shape)}.")
  if tuple(bias.shape) != (rank, width):
    raise ValueError(f"`bias` must have shape (r, d) = {(rank, width)}, got {tuple(bias.shape)}.")
  _check_x(x, in_features)
  z = _project(x, kernel, bias)
  return neurons.product_activation(z, components, gamma=gamma, activation=activation, omega=omega, remat=remat)


def layer_norm(x: Array, scale: Array, bias: Array, *, epsilon: float = 1e-5) -> Array:
  """LayerNorm over the last axis, ``(x - mean) / sqrt(var + epsilon) * scale + bias``.

  Args:
    x: ``(..., r)``; ``scale``, ``bias``: ``(r,)``; ``epsilon``: PyTorch's default ``1e-5``.

  Returns:
    ``(..., r)``.
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def _as_widths(name: str, value: Union[int, Sequence[int]], n: int) -> tuple[int, ...]:
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be an int or have one int per layer ({n}), got {value!r}.")
  if isinstance(value, int):
    return (_validation.check_positive_int(name, value),) * n
  values = tuple(value)
  if len(values) != n:
    raise ValueError(f"`{name}` must be an int or have one entry per layer ({n}), got {values}.")
  return tuple(_validation.check_positive_int(name, v) for v in values)


def lrnn_init(
    key: Array,
    in_features: int,
    ranks: Sequence[int],
    out_features: int,
    *,
    projection_width: Union[int, Sequence[int]],
    hidden: Sequence[int] = (1,),
    omega: float = 30.0,
    first_omega: Optional[float] = None,
    layer_norm: bool = True,
    shared_components: bool = False,
    output_init: str = "siren",
    output_bias: bool = False,
    dtype: Any = jnp.float32,
) -> Params:
  """Initialises a shallow (eq. 1, one layer) or deep (eq. 3-4) LRNN.

  References:
    LRNN paper, eq. 1, 3-5, App. B.1, App. C.2 (LayerNorm after every layer), SIREN-style init.

  Architecture ``[in_features, *ranks, out_features]``, e.g. the paper's PDE network
  ``LRNN [2, 16, 16, 1]`` is ``lrnn_init(key, 2, (16, 16), 1, projection_width=12)``. A shallow
  LRNN (eq. 1) is ``ranks=(r,)`` with ``layer_norm=False``.

  The projections and components are initialised SIREN-style (:func:`lrnn_projection_init`,
  :func:`component_init`); the output map ``S_out`` (eq. 3) is SIREN's last layer,
  ``U(+-sqrt(6/r_L)/omega)``, and has no bias unless ``output_bias=True`` (with LayerNorm after the
  last layer, a constant offset is already representable through LayerNorm's bias).

  Args:
    key: a ``jax.random`` key.
    in_features: input dimension.
    ranks: separation rank (neurons) ``r_k`` of each layer; at least one layer.
    out_features: ``K``, columns of the output map ``S_out``.
    projection_width: ``d``, an int for all layers or one per layer.
    hidden: hidden widths of every component MLP (``(1,)``: the paper's 3-parameter components).
    omega: frequency of the component activations of layers after the first.
    first_omega: ``omega_0`` of the first layer; ``None`` means ``omega``.
    layer_norm: LayerNorm (learnable scale and bias) after every layer.
    shared_components: share the ``d`` components across the neurons of each layer (eq. 5).
    output_init: the component output-weight scheme, ``"siren"`` (the paper's) or
      ``"unit_variance"`` (see :func:`component_init`).
    output_bias: give the output map a (zero-initialised) bias, ``y = h S_out + c``; eq. 3 has none.
    dtype: parameter dtype.

  Returns:
    The parameter dict described in the module docstring.

  Raises:
    ValueError / TypeError: on non-positive sizes or frequencies, an empty ``ranks`` or an unknown
    ``output_init``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = sp.lrnn_init(jax.random.key(0), 2, (16, 16), 1, projection_width=12, omega=6.0)
    >>> sp.lrnn_apply(params, jnp.zeros((7, 2)), omega=6.0).shape
    (7, 1)
  """
  in_features = _validation.check_positive_int("in_features", in_features)
  out_features = _validation.check_positive_int("out_features", out_features)
  ranks = tuple(ranks)
  if not ranks:
    raise ValueError("`ranks` must name at least one layer, got ().")
  ranks = _as_widths("ranks", ranks, len(ranks))
  widths = _as_widths("projection_width", projection_width, len(ranks))
  omega = _validation.check_positive_float("omega", omega)
  first_omega = omega if first_omega is None else _validation.check_positive_float("first_omega", first_omega)
  keys = jax.random.split(key, 2 * len(ranks) + 1)
  layers, fan_in = [], in_features
  for k, (rank, width) in enumerate(zip(ranks, widths)):
    layer_omega = first_omega if k == 0 else omega
    kernel, bias = lrnn_projection_init(
        keys[2 * k], fan_in, rank, width, omega=layer_omega, first_layer=k == 0, dtype=dtype
    )
    comps = neurons.component_init(keys[2 * k + 1], rank, width, hidden, omega=layer_omega, shared=shared_components,
                           output_init=output_init, dtype=dtype)
    layer = {"kernel": kernel, "bias": bias, "components": comps}
    if layer_norm:
      layer["norm"] = {"scale": jnp.ones((rank,), dtype), "bias": jnp.zeros((rank,), dtype)}
    layers.append(layer)
    fan_in = rank
  bound = math.sqrt(6.0 / fan_in) / omega
  output = {"kernel": neurons.uniform(keys[-1], (fan_in, out_features), bound, dtype)}
  if output_bias:
    output["bias"] = jnp.zeros((out_features,), dtype)
  return {"layers": layers, "output": output}


def _forward(params, x, *, gamma, activation, omega, first_omega, remat, epsilon, collect):
  if not isinstance(params, dict) or "layers" not in params or "output" not in params:
    raise TypeError("`params` must be the dict returned by `lrnn_init` (keys 'layers' and 'output').")
  omega = _validation.check_positive_float("omega", omega)
  first_omega = omega if first_omega is None else _validation.check_positive_float("first_omega", first_omega)
  act = neurons.resolve_activation(activation)
  h, collected = x, []
  for k, layer in enumerate(params["layers"]):
    layer_omega = first_omega if k == 0 else omega
    if collect:
      _check_x(h, layer["kernel"].shape[0])
      z = _project(h, layer["kernel"], layer["bias"])
      collected.append(neurons.component_apply(z, layer["components"], activation=act, omega=layer_omega))
    h = lrnn_layer(h, layer["kernel"], layer["bias"], layer["components"], gamma=gamma, activation=act,
                   omega=layer_omega, remat=remat)
    if "norm" in layer:
      h = layer_norm(h, layer["norm"]["scale"], layer["norm"]["bias"], epsilon=epsilon)
  out = params["output"]
  _check_x(h, out["kernel"].shape[0])
  y = jnp.matmul(h, out["kernel"])
  if "bias" in out:
    y = y + out["bias"]
  return y, collected


def lrnn_apply(
    params: Params,
    x: Array,
    *,
    gamma: Optional[float] = None,
    activation: neurons.Activation = "sine",
    omega: float = 30.0,
    first_omega: Optional[float] = None,
    remat: bool = False,
    epsilon: float = 1e-5,
) -> Array:
  """Evaluates an LRNN ``y = S_out (phi^(L) o ... o phi^(1))(x)`` (eq. 1, 3-4), ``+ c`` if it has an output bias.

  References:
    LRNN paper, eq. 1, 3-5; App. C.2 (LayerNorm after each layer); App. B.2 (checkpointing).

  The architecture (ranks, projection widths, component sizes, shared components, LayerNorm)
  is read from ``params``; ``activation``, ``omega`` and ``first_omega`` must be those the
  parameters were initialised for (they are not stored in the pytree of arrays).

  Args:
    params: the dict returned by :func:`lrnn_init`.
    x: ``(..., in_features)`` inputs.
    gamma: the product scaling; ``None`` uses ``d^(-1/2)`` of each layer.
    activation: component activation (name or callable).
    omega: frequency of the layers after the first; ``first_omega``: of the first (``None``:
      ``omega``).
    remat: rematerialise every layer's components and product (see :func:`product_activation`).
    epsilon: LayerNorm epsilon.

  Returns:
    ``(..., out_features)`` outputs, in the promoted dtype of ``x`` and ``params``.

  Raises:
    ValueError / TypeError: on malformed parameters or inputs.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = sp.lrnn_init(jax.random.key(0), 3, (8,), 2, projection_width=4, layer_norm=False)
    >>> sp.lrnn_apply(params, jnp.ones((5, 3))).shape
    (5, 2)
  """
  y, _ = _forward(params, x, gamma=gamma, activation=activation, omega=omega, first_omega=first_omega,
                  remat=remat, epsilon=epsilon, collect=False)
  return y


def interaction_heatmap(
    params: Params,
    x: Array,
    *,
    activation: neurons.Activation = "sine",
    omega: float = 30.0,
    first_omega: Optional[float] = None,
    epsilon: float = 1e-5,
) -> list[Array]:
  """Interaction heatmaps ``Var_x[g_lj(z_lj)]`` per neuron ``l`` and component ``j`` of each layer.

  References:
    LRNN paper, App. A.2: a component with near-zero variance over the data leaves its factor
    ``(1 + gamma g)`` near constant, so the neuron ignores that projected coordinate.

  Args:
    params: the dict returned by :func:`lrnn_init`.
    x: ``(N, in_features)`` inputs (e.g. a validation set); the variance is over the ``N`` rows.
    activation, omega, first_omega, epsilon: as in :func:`lrnn_apply`.

  Returns:
    One array per layer, ``(r_k, d_k)``.

  Raises:
    ValueError: if ``x`` is not ``(N, in_features)``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> params = sp.lrnn_init(jax.random.key(0), 2, (8, 6), 1, projection_width=4)
    >>> x = jax.random.uniform(jax.random.key(1), (128, 2), minval=-1, maxval=1)
    >>> [h.shape for h in sp.interaction_heatmap(params, x)]
    [(8, 4), (6, 4)]
  """
  _validation.check_ndim("x", x, 2)
  _, collected = _forward(params, x, gamma=None, activation=activation, omega=omega, first_omega=first_omega,
                          remat=False, epsilon=epsilon, collect=True)
  return [jnp.var(g, axis=0) for g in collected]
