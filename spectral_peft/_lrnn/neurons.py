"""LRNN neurons: univariate component MLPs and the product-structured activation, as pure functions.

References:
  "Deep learning with learnable product-structured activations" (LRNNs), eq. 1 and 4 (the neuron),
  eq. 5 (shared activations), Lemma 1 (variance-controlled init), App. B.1 (component MLPs),
  App. B.2 (memory and checkpointing).

An LRNN neuron ``l`` maps a ``d``-dimensional projection ``z = x W_l + b_l`` to the scalar
``phi_l(z) = prod_j (1 + gamma g_lj(z_j))`` with ``gamma = d^(-1/2)``, where every ``g_lj`` is a tiny
MLP whose first operation is an activation and whose last layer is linear without a bias.

Layouts:
  * component parameters, a dict ``{"weights": (w_0, ..., w_L), "biases": (b_0, ..., b_{L-1})}``:
    per neuron (eq. 4) ``w_i: (r, d, h_i, h_{i+1})`` and ``b_i: (r, d, h_{i+1})`` with ``h_0 = 1`` and
    ``h_{L+1} = 1``; shared across the neurons of a layer (eq. 5) the leading ``r`` axis is absent,
    ``w_i: (d, h_i, h_{i+1})`` and ``b_i: (d, h_{i+1})``. All ``r * d`` component MLPs are evaluated
    at once by einsum over the stacked weights (the block-diagonal layer of App. B.1);
  * a component evaluates ``a_0 = act(omega z)``, ``a_{i+1} = act(omega (a_i w_i + b_i))`` for the
    hidden layers and ``g = a_L w_L`` (no bias).

Where omega goes (a choice; App. B.1 writes the first stage as ``sigma(z)``): ``omega`` multiplies
the argument of *every* component activation, the SIREN convention ``sin(omega (W x + b))`` that the
paper's "SIREN-style initialization" (App. C.2) and its "omega_0 = 30 ... with omega = 30" (App. E)
presuppose. ``act(omega z)`` with ``z = x W + b`` is the paper's ``sigma(z')`` with ``z' = x (omega W)
+ omega b``, so the two readings are the same family of functions; they differ in the scale of the
trainable projection (and hence in Adam's effective step on it), and our projection initialisation
(:func:`lrnn_projection_init`) is SIREN's for exactly this ``omega``-scaled argument.

Initialisation (Lemma 1, App. C.2): the components are initialised SIREN-style, the bias-free output
weight of each component included, ``U(+-sqrt(6/h_L)/omega)``. This gives ``E[g] = 0`` and
``Var[g] = 2 E[a_L^2] / omega^2`` (about ``1/omega^2`` for sine components), so Lemma 1 bounds
``Var[phi] <= e^{Var g} - 1``, close to ``Var g``: the product starts near 1 and LayerNorm (App. C.2)
rescales it. An earlier default of this library, ``U(+-sqrt(6/h_L))`` (``Var[g] ~= 1`` for sine
components, ``~15`` for SPDER at ``omega = 30``, where ``|phi|`` reached ``~1.5e4`` in 8k draws at
``d = 16``), is kept only as ``output_init="unit_variance"``.

Layers and networks built from these neurons are in :mod:`spectral_peft._lrnn.network`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from spectral_peft import _validation

Array = jax.Array
Activation = Union[str, Callable[[Array], Array]]
Params = dict[str, Any]


@jax.custom_jvp
def _sin_cos(u: Array) -> tuple[Array, Array]:
  # (sin u, cos u). XLA counts real sin and cos as cheap and re-evaluates them, with the ops that
  # lead to them, inside every fusion that reads them: under nested forward mode plus a gradient
  # (the parameter gradient of a PDE residual) that was dozens of evaluations per element and 3/4 of
  # the step on CPU. exp(i u) = cos u + i sin u gives both from one op that XLA evaluates once.
  if u.dtype in (jnp.float32, jnp.float64):
    e = jnp.exp(1j * u)
    return e.imag, e.real
  return jnp.sin(u), jnp.cos(u)


@_sin_cos.defjvp
def _sin_cos_jvp(primals, tangents):
  (u,), (du,) = primals, tangents
  s, c = _sin_cos(u)
  return (s, c), (c * du, -s * du)


@jax.custom_jvp
def _sine(u: Array) -> Array:
  # sin u; its derivatives of every order take sin and cos from `_sin_cos`.
  return jnp.sin(u)


@_sine.defjvp
def _sine_jvp(primals, tangents):
  (u,), (du,) = primals, tangents
  s, c = _sin_cos(u)
  return s, c * du


def _spder(u: Array) -> Array:
  # sin(u) sqrt|u|, with a finite (zero) derivative at u = 0 (the double-where trick).
  zero = u == 0
  safe = jnp.where(zero, jnp.ones_like(u), u)
  return jnp.where(zero, jnp.zeros_like(u), _sine(safe) * jnp.sqrt(jnp.abs(safe)))


def _sin_arctan(u: Array) -> Array:
  return _sine(u) * jnp.arctan(u)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {  # "spder", "sin_arctan": Shah & Sitawarin (2024).
    "sine": _sine,
    "spder": _spder,
    "sin_arctan": _sin_arctan,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}
"""Named component activations. Each is applied as ``act(omega * u)`` (SIREN convention).

``"sine"`` is SIREN's (Sitzmann et al., 2020); ``"spder"`` (``sin(u) sqrt|u|``) and ``"sin_arctan"``
(``sin(u) arctan(u)``) are the SPDER activations of Shah & Sitawarin, "SPDER: Semiperiodic
Damping-Enabled Object Representation", ICLR 2024, which the LRNN paper uses in its components.
"""

OUTPUT_INITS = ("siren", "unit_variance")
"""Schemes for the bias-free output weight of the component MLPs (see :func:`component_init`)."""


def resolve_activation(activation: Activation) -> Callable[[Array], Array]:
  """The activation function named by ``activation``, or ``activation`` itself if callable.

  Args:
    activation: one of ``"sine"`` (``sin u``), ``"spder"`` (``sin(u) sqrt|u|``), ``"sin_arctan"``
      (``sin(u) arctan(u)``), ``"relu"``, ``"tanh"``, ``"gelu"``, or any elementwise callable.

  Returns:
    An elementwise function of arrays.

  Raises:
    ValueError: for an unknown name. TypeError: for anything else that is not callable.
  """
  if callable(activation):
    return activation
  if isinstance(activation, str):
    if activation not in ACTIVATIONS:
      raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}.")
    return ACTIVATIONS[activation]
  raise TypeError(f"`activation` must be a str or a callable, got {type(activation).__name__}.")


def default_gamma(projection_width: int) -> float:
  """The paper's scaling ``gamma = d^(-1/2)`` for a projection width ``d`` (Lemma 1)."""
  return 1.0 / math.sqrt(_validation.check_positive_int("projection_width", projection_width))


# --------------------------------------------------------------------------------------------
# Component MLPs.


def _check_components(components: Any, rank: Optional[int], width: int) -> bool:
  """Checks the component pytree against ``(r, d)`` and returns whether it is shared (eq. 5)."""
  if not isinstance(components, dict) or set(components) != {"weights", "biases"}:
    got = sorted(components) if isinstance(components, dict) else type(components).__name__
    raise TypeError(f"`components` must be a dict with keys 'weights' and 'biases', got {got}.")
  weights, biases = tuple(components["weights"]), tuple(components["biases"])
  if len(weights) != len(biases) + 1:
    raise ValueError(
        f"`components` must have one more weight than biases (the last layer has no bias), got "
        f"{len(weights)} weights and {len(biases)} biases."
    )
  ndim = getattr(weights[0], "ndim", None)
  if ndim not in (3, 4):
    raise ValueError(
        "`components['weights'][0]` must have shape (r, d, 1, h) (one MLP per neuron) or (d, 1, h) "
        f"(shared, eq. 5), got shape {getattr(weights[0], 'shape', None)}."
    )
  shared = ndim == 3
  lead = (width,) if shared else (rank, width)
  lead_txt = "(d, ...)" if shared else "(r, d, ...)"
  h_in = 1
  for i, w in enumerate(weights):
    _validation.check_floating(f"components['weights'][{i}]", w)
    if w.ndim != ndim or tuple(w.shape[:-2]) != lead or w.shape[-2] != h_in:
      raise ValueError(
          f"`components['weights'][{i}]` must have shape {lead_txt[:-5]}, h_in, h_out) = {lead} + ({h_in}, h_out), "
          f"matching z's (r, d) and the previous layer's width, got {tuple(w.shape)}."
      )
    h_in = w.shape[-1]
    if i < len(biases) and tuple(biases[i].shape) != lead + (h_in,):
      raise ValueError(f"`components['biases'][{i}]` must have shape {lead + (h_in,)}, got {tuple(biases[i].shape)}.")
  if h_in != 1:
    raise ValueError(f"`components['weights'][-1]` must map to one output (last axis 1), got {tuple(weights[-1].shape)}.")
  return shared


def _check_z(z: Any) -> tuple[int, int]:
  shape = getattr(z, "shape", None)
  if shape is None:
    raise TypeError(f"`z` must be an array of shape (..., r, d), got {type(z).__name__}.")
  if len(shape) < 2:
    raise ValueError(f"`z` must have shape (..., r, d), got shape {tuple(shape)}.")
  _validation.check_floating("z", z)
  return shape[-2], shape[-1]


def _block_linear(a: Array, w: Array, shared: bool) -> Array:
  # One layer of all r * d component MLPs. ``a`` is (..., r, d) when its width is 1 (the singleton
  # axis is left out: a trailing axis of size 1 makes XLA's CPU loops and reductions several times
  # slower) and (..., r, d, h_in) otherwise; w is (r, d, h_in, h_out) (or the shared (d, h_in, h_out)).
  # The result follows the same convention for h_out. Width-1 sides are elementwise products (a
  # batched dot_general over r * d tiny matrices costs more, above all under nested forward-mode AD).
  h_in, h_out = w.shape[-2:]
  if h_in == 1:
    return a * w[..., 0, 0] if h_out == 1 else a[..., None] * w[..., 0, :]
  if h_out == 1:
    return jnp.sum(a * w[..., 0], axis=-1)
  return jnp.einsum("...rdi,dio->...rdo" if shared else "...rdi,rdio->...rdo", a, w)


def _components_forward(z: Array, components: Params, activation: Callable, omega: float, shared: bool) -> Array:
  weights, biases = components["weights"], components["biases"]
  a = activation(omega * z)  # (..., r, d): the first op is the activation (width 1, axis left out).
  for w, b in zip(weights[:-1], biases):
    a = activation(omega * (_block_linear(a, w, shared) + (b[..., 0] if b.shape[-1] == 1 else b)))
  return _block_linear(a, weights[-1], shared)  # Last layer: linear, no bias, width 1.


def component_apply(z: Array, components: Params, *, activation: Activation = "sine", omega: float = 1.0) -> Array:
  """Evaluates all ``r * d`` univariate component functions ``g_lj(z_lj)`` at once.

  References:
    LRNN paper, App. B.1 (component MLPs whose first op is an activation, last layer bias-free).

  Args:
    z: ``(..., r, d)`` projected inputs, floating.
    components: ``{"weights": (w_0, ..., w_L), "biases": (b_0, ..., b_{L-1})}`` with
      ``w_i: (r, d, h_i, h_{i+1})`` (``h_0 = h_{L+1} = 1``) and ``b_i: (r, d, h_{i+1})``; or the
      shared form (eq. 5) without the leading ``r`` axis.
    activation: component activation (see :func:`resolve_activation`).
    omega: frequency multiplying every pre-activation, ``act(omega * u)``.

  Returns:
    ``(..., r, d)`` values ``g_lj(z_lj)`` in the promoted dtype.

  Raises:
    ValueError / TypeError: if ``z`` or ``components`` have the wrong structure or shapes.

  Example:
    >>> import jax, spectral_peft as sp
    >>> comps = sp.component_init(jax.random.key(0), 4, 3, hidden=(2,), omega=30.0)
    >>> sp.component_apply(jax.numpy.zeros((5, 4, 3)), comps, omega=30.0).shape
    (5, 4, 3)
  """
  rank, width = _check_z(z)
  shared = _check_components(components, rank, width)
  omega = _validation.check_positive_float("omega", omega)
  return _components_forward(z, components, resolve_activation(activation), omega, shared)


def uniform(key: Array, shape: tuple[int, ...], bound: float, dtype: Any) -> Array:
  """``U(-bound, bound)`` samples of ``shape``: the initialiser of components and projections."""
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _check_output_init(output_init: Any) -> str:
  if output_init not in OUTPUT_INITS:
    raise ValueError(f"`output_init` must be one of {OUTPUT_INITS}, got {output_init!r}.")
  return output_init


def component_init(
    key: Array,
    rank: int,
    projection_width: int,
    hidden: Sequence[int] = (1,),
    *,
    omega: float = 30.0,
    shared: bool = False,
    output_init: str = "siren",
    dtype: Any = jnp.float32,
) -> Params:
  """SIREN-style initialisation of the ``r * d`` component MLPs of one LRNN layer.

  References:
    LRNN paper, App. B.1, App. C.2 ("we use SIREN-style initialization for each individual
    component function g_j"), Lemma 1; Sitzmann et al. (2020), SIREN initialisation.

  Every layer that follows an activation is initialised as a SIREN hidden layer whose input is
  ``act(omega u)``: weights ``w_i: (.., h_i, h_{i+1})`` are ``U(-sqrt(6/h_i)/omega, sqrt(6/h_i)/omega)``,
  hidden biases ``U(-1/sqrt(h_i), 1/sqrt(h_i))``. That includes the bias-free output weight ``w_L``
  (``output_init="siren"``, the default), so ``E[g] = 0`` and
  ``Var[g] = h_L Var[w_L] E[a_L^2] = 2 E[a_L^2] / omega^2``: about ``1/omega^2`` for sine components.
  Lemma 1 then bounds ``Var[phi] <= e^{Var g} - 1`` and
  ``sum_k Var[d phi / d z_k] <= Var[g'] e^{Var g}`` at initialisation.

  ``output_init="unit_variance"`` keeps this library's earlier scheme ``w_L ~ U(+-sqrt(6/h_L))``
  (``omega`` times larger, ``Var[g] ~= 1`` for sine components, ``~15`` for SPDER at ``omega = 30``),
  outside the regime where Lemma 1's bound is small; it is not the paper's.

  Args:
    key: a ``jax.random`` key.
    rank: number of neurons ``r`` (ignored in size when ``shared``, still validated).
    projection_width: ``d``, components per neuron.
    hidden: hidden widths of each component MLP; ``()`` gives ``g(z) = w act(omega z)``.
      The paper's image and PDE runs use ``(1,)`` (3 parameters per component).
    omega: the frequency the components are evaluated with.
    shared: one set of ``d`` components shared by all neurons of the layer (eq. 5).
    output_init: ``"siren"`` (the paper's, ``U(+-sqrt(6/h_L)/omega)``) or ``"unit_variance"``
      (``U(+-sqrt(6/h_L))``) for the output weight ``w_L``.
    dtype: parameter dtype.

  Returns:
    ``{"weights": tuple, "biases": tuple}`` as described in :func:`component_apply`.

  Raises:
    ValueError / TypeError: on non-positive sizes or ``omega``, or an unknown ``output_init``.

  Example:
    >>> import jax, spectral_peft as sp
    >>> comps = sp.component_init(jax.random.key(0), 8, 4, hidden=(1,), omega=30.0)
    >>> [w.shape for w in comps["weights"]], float(abs(comps["weights"][-1]).max()) <= 6**0.5 / 30
    ([(8, 4, 1, 1), (8, 4, 1, 1)], True)
  """
  rank = _validation.check_positive_int("rank", rank)
  width = _validation.check_positive_int("projection_width", projection_width)
  hidden = tuple(_validation.check_positive_int("hidden", h) for h in hidden)
  omega = _validation.check_positive_float("omega", omega)
  output_init = _check_output_init(output_init)
  lead = (width,) if shared else (rank, width)
  sizes = (1,) + hidden + (1,)
  keys = jax.random.split(key, 2 * len(sizes))
  weights, biases = [], []
  for i in range(len(sizes) - 1):
    h_in, h_out = sizes[i], sizes[i + 1]
    last = i == len(sizes) - 2
    bound = math.sqrt(6.0 / h_in) / omega  # SIREN: the layer's input is act(omega * u).
    if last and output_init == "unit_variance":
      bound = math.sqrt(6.0 / h_in)
    weights.append(uniform(keys[2 * i], lead + (h_in, h_out), bound, dtype))
    if not last:
      biases.append(uniform(keys[2 * i + 1], lead + (h_out,), 1.0 / math.sqrt(h_in), dtype))
  return {"weights": tuple(weights), "biases": tuple(biases)}


# --------------------------------------------------------------------------------------------
# Product-structured activation.


def _prod_last_axis(u: Array) -> Array:
  # Pairwise (tree) product over the last axis: log2(d) elementwise multiplies. Unlike
  # ``jnp.prod``, whose derivative rules are costly when nested (forward-over-forward-over-reverse
  # for a PDE residual's gradient was 100x slower), this differentiates like plain products.
  while u.shape[-1] > 1:
    if u.shape[-1] % 2:
      u = jnp.concatenate([u, jnp.ones_like(u[..., :1])], axis=-1)
    u = u[..., 0::2] * u[..., 1::2]
  return u[..., 0]


def _product(z: Array, components: Params, activation: Callable, omega: float, gamma: float, shared: bool) -> Array:
  g = _components_forward(z, components, activation, omega, shared)
  return _prod_last_axis(1.0 + gamma * g)


def product_activation(
    z: Array,
    components: Params,
    *,
    gamma: Optional[float] = None,
    activation: Activation = "sine",
    omega: float = 1.0,
    remat: bool = False,
) -> Array:
  """LRNN product-structured activation ``phi_l(z_l) = prod_j (1 + gamma g_lj(z_lj))``.

  References:
    LRNN paper, eq. 1 and 4 (per-neuron components), eq. 5 (shared components), Lemma 1
    (``gamma = d^(-1/2)``), App. B.2 (gradient checkpointing).

  Args:
    z: ``(batch..., r, d)`` projections, floating.
    components: component MLP parameters (see :func:`component_apply`): per neuron
      ``w_i: (r, d, h_i, h_{i+1})``, or shared ``w_i: (d, h_i, h_{i+1})``.
    gamma: the scaling; ``None`` uses ``d^(-1/2)``.
    activation: component activation, a name or a callable (see :func:`resolve_activation`).
    omega: frequency of the component activations, ``act(omega * u)``.
    remat: rematerialise (``jax.checkpoint``) the component MLPs and the product, so that only
      ``z`` (``O(B r d)``) is kept for the backward pass instead of the hidden activations of the
      component MLPs (``O(B r d h)``); the backward pass recomputes them. Values and gradients
      are unchanged.

  Returns:
    ``(batch..., r)`` activations in the promoted dtype of ``z`` and the components.

  Raises:
    ValueError: if ``d < 1`` or ``r < 1``, the components do not match ``(r, d)``, or ``gamma`` /
      ``omega`` are not positive. TypeError: for a non-array ``z`` or a malformed ``components``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> comps = sp.component_init(jax.random.key(0), 8, 4, omega=30.0)
    >>> z = jax.random.normal(jax.random.key(1), (16, 8, 4))
    >>> sp.product_activation(z, comps, omega=30.0).shape
    (16, 8)
  """
  rank, width = _check_z(z)
  if rank < 1 or width < 1:
    raise ValueError(f"`z` must have shape (..., r, d) with r >= 1 and d >= 1, got shape {tuple(z.shape)}.")
  shared = _check_components(components, rank, width)
  gamma = default_gamma(width) if gamma is None else _validation.check_positive_float("gamma", gamma)
  omega = _validation.check_positive_float("omega", omega)
  fn: Callable[..., Array] = functools.partial(_product, activation=resolve_activation(activation), omega=omega, gamma=gamma, shared=shared)
  if remat:
    fn = jax.checkpoint(fn)
  return fn(z, components)
