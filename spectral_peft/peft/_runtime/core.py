"""The adapter runtime: each adapted layer computes its own product, with bounded memory.

Training through :func:`sp.peft.merge` builds ``W0 + Delta W`` for every adapted weight before the
forward pass and keeps all of them alive until the backward pass: at LLM scale, a second copy of
the adapted part of the model. The runtime instead applies each adapter *inside the layer that owns
its weight*, in one of two ways, chosen per layer:

* **factored**: where the layer is a plain contraction over trailing input axes (Linen ``Dense`` /
  ``DenseGeneral``, NNX ``Linear`` / ``LinearGeneral``) and the method has a memory-lean product
  (LoRA ``x W0 + s (x a) b``, DoRA's column norms from ``a^T W0``, sine LoRA's blocked product;
  SHiRA, WaveFT (periodic, one level), FourierFT and LFMA with ``path="auto"``: a transient merged
  weight whose coefficient gradient is sampled from ``x^T g`` at the coefficients' positions, after
  1-D transforms of the activations, never the ``(m, n)`` weight gradient; or a sparse/spectral spec
  with ``path="factored"``), the layer computes ``method.apply(x, W0)``; no ``(m, n)`` array is kept
  between the forward and the backward pass. Einsum layers (Linen ``nn.Einsum``, ``nnx.Einsum``,
  and modules in Tunix's and Gemma's style that contract one weight with ``jnp.einsum``) take this
  route too, the contraction read from their equation: methods whose branch is lean on its own
  (low-rank methods, ``path="factored"``) add it to the layer's output; methods whose lean product
  is a merged one (SHiRA, WaveFT, FourierFT, LFMA) replace the contraction by that product. LoRA
  and DoRA compute the value as the lighter of ``x W0 + s (x a) b`` and a transient
  ``x (W0 + s a b)``, from the shapes (``low_rank_product`` in ``_methods/lowrank.py``: a batch with
  more rows than ``m`` costs an ``(m, n)`` temporary rather than a second activation-sized one), and
  differentiate it factored. LoRA's product has forward and reverse mode; on the transient route
  DoRA's has reverse mode only, its magnitude gradient taken from ``x^T g`` as the merged weight's
  would be, so that its pre-scale output is not kept for the backward pass.
* **merged, rematerialised**: every other case (any method on any kernel-using layer: ``Conv``,
  ``Einsum``, ``DenseGeneral`` with ``batch_dims``, subclasses, custom layers) runs the layer's own
  code with the weight ``W0 + Delta W`` built for that layer only, under ``jax.checkpoint``: the
  merged weight is not stored for the backward pass but rebuilt there, so at most a few ``(m, n)``
  temporaries are alive at any time, whatever the depth. By construction the result is the layer
  evaluated at the merged weight, i.e. exactly what :func:`merge` gives.

The framework providers (:mod:`spectral_peft.peft._runtime.linen`, ``_runtime_nnx``) only find the
layers and route them here; every method's per-layer product is written once, in its spec.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft._sparse import sharded
from spectral_peft.peft._methods.bank import INDEX as BANK_INDEX
from spectral_peft.peft._methods.bank import AdapterBank
from spectral_peft.peft._methods.base import Adapter
from spectral_peft.peft._quant import dequantized, is_quantized

Array = jax.Array
PyTree = Any


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class LayerAdapter:
  """An adapter as it travels into a layer: trainable ``params`` *and* constants as array children.

  Inside a model (and under ``nn.scan`` / ``nnx.scan``, which slice every array of the layer's
  variables along the stack axis) the constants must be arrays so that they are sliced with the
  weight; outside, :class:`~spectral_peft.peft.Adapter` keeps them static.

  Attributes:
    params: trainable arrays (stack axes included unless sliced by a lifted transform).
    frozen: the constants as ``jax.Array`` s.
    shell: an :class:`Adapter` with the static description (method, shapes, layout; empty arrays).
    path: the adapter's path in the adapters dict (for messages and bookkeeping).
    dropout_key: ``None``, or the PRNG key of this layer's adapter dropout (a key array of the
      stack shape for stacked weights, so that lifted transforms slice it with the weight).
  """

  params: PyTree
  frozen: PyTree
  shell: Adapter
  path: str
  dropout_key: Any = None

  def tree_flatten(self):
    return (self.params, self.frozen, self.dropout_key), (self.shell, self.path)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], *aux, dropout_key=children[2])

  @classmethod
  def from_adapter(cls, path: str, adapter: Adapter, dropout_key: Array | None = None,
                   adapter_index: Array | None = None) -> "LayerAdapter":
    """The adapter as it travels into its layer; ``dropout_key`` (if given) is folded with ``path``.

    ``adapter_index`` (``(B,)`` integers) travels with an :class:`AdapterBank`'s constants: the
    per-example choice of a mixed-adapter batch.
    """
    adapter.check_concrete()
    shell = Adapter({}, {}, adapter.method, adapter.shape, adapter.dtype, adapter.in_axes, adapter.layout,
                    adapter.stack_axes)
    key = None
    if dropout_key is not None:
      key = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
      stack = adapter.shape[: adapter.stack_axes]
      if stack:
        key = jax.random.split(key, math.prod(stack)).reshape(stack)
    frozen = jax.tree.map(jnp.asarray, adapter.frozen)
    if adapter_index is not None and isinstance(adapter.method, AdapterBank):
      frozen = {**frozen, BANK_INDEX: jnp.asarray(adapter_index)}
    return cls(adapter.params, frozen, shell, path, key)

  @property
  def method(self):
    return self.shell.method

  def for_weight(self, w0: Array) -> "LayerAdapter":
    """Checks ``w0`` is the adapted weight (whole stack, or one slice of it) and returns self.

    Raises:
      ValueError: ``w0`` has neither the adapted weight's shape nor the shape of one of its slices.
    """
    shape = tuple(w0.shape)
    if shape == self.shell.shape or shape == self.shell.slice_shape:
      return self
    raise ValueError(
        f"The adapter at {self.path!r} was made for a weight of shape {self.shell.shape} "
        f"(slices {self.shell.slice_shape}), but the layer uses a weight of shape {shape} there.")

  def _is_slice(self, w0: Array) -> bool:
    return self.shell.stack_axes > 0 and tuple(w0.shape) == self.shell.slice_shape

  def _map(self, fn, w0: Array) -> Array:
    """``fn(params, frozen, w0)`` on the whole stack (vmapped) or on one slice."""
    self.for_weight(w0)
    if self.shell.stack_axes == 0 or self._is_slice(w0):
      return fn(self.params, self.frozen, w0)
    mapped = fn
    for _ in range(self.shell.stack_axes):
      mapped = jax.vmap(mapped)
    return mapped(self.params, self.frozen, w0)

  def delta(self, w0: Array) -> Array:
    """``Delta W`` of the weight ``w0`` (the whole stack or one slice), in ``w0``'s shape and dtype."""
    shell = self.shell
    return self._map(lambda p, f, w: shell.from_matrix(shell.method.delta(p, shell.to_matrix(w), f)).astype(w.dtype), w0)

  def merge(self, w0: Array) -> Array:
    """``w0 + Delta W`` (the method's own merge: scatter methods add into a copy of ``w0``)."""
    shell = self.shell
    return self._map(lambda p, f, w: shell.from_matrix(shell.method.merge(p, shell.to_matrix(w), f)).astype(w.dtype), w0)

  def apply(self, x: Array, w0: Array) -> Array:
    """The factored product ``x @ (W0 + Delta W)`` over the trailing input axes of ``x`` (one slice)."""
    return self._one(w0).apply(x, w0)

  def branch(self, x: Array, w0: Array) -> Array:
    """The adapter's part ``x @ Delta W`` over the trailing input axes of ``x`` (one slice)."""
    return self._one(w0).branch(x, w0)

  def _one(self, w0: Array) -> Adapter:
    if self.shell.stack_axes and not self._is_slice(w0):
      raise ValueError(f"The adapter at {self.path!r} is stacked; the factored product needs one slice.")
    return Adapter.tree_unflatten(
        (_ArrayConstants(self.frozen), self.shell.method, self.shell.slice_shape, self.shell.dtype,
         self.shell.in_axes, self.shell.layout, 0), (self.params,))

  def dropped(self, x: Array, rate: float) -> Array:
    """``x`` with each entry zeroed with probability ``rate`` and the rest scaled by ``1 / (1 - rate)``.

    The mask is drawn from this layer's ``dropout_key`` (one slice's key under a lifted transform).

    Raises:
      ValueError: no key (the caller passed a rate without a key), or a stacked key outside a
        lifted transform.
    """
    key = self.dropout_key
    if key is None:
      raise ValueError(f"Adapter dropout at {self.path!r} needs a key: pass `dropout_key=`.")
    if jnp.ndim(key) != 0:
      raise ValueError(
          f"The adapter at {self.path!r} is stacked ({self.shell.stack_axes} stack axes); adapter dropout "
          "needs its layer to run once per slice (nn.scan / nnx.scan), not on the whole stack.")
    # Drawn flat and reshaped: the same bits as drawing at x's shape, but XLA:CPU compiles the
    # generator for a 4-D activation (a Conv's NHWC input) up to 5x slower (measured 4.0 s vs 0.8 s
    # for (8, 32, 32, 16)).
    keep = jax.random.bernoulli(key, 1.0 - rate, (math.prod(jnp.shape(x)),)).reshape(jnp.shape(x))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class _ArrayConstants:
  """Stands in for :class:`Constants` when the constants are (possibly traced) arrays inside a layer."""

  abstract = False

  def __init__(self, tree: PyTree):
    self.tree = tree


def check_bank_layer(adapter: LayerAdapter, layer: str) -> None:
  """Refuses an :class:`AdapterBank` on a layer that has no per-example product (a Conv, an einsum...).

  Raises:
    ValueError: naming the adapter and the layer.
  """
  if isinstance(adapter.method, AdapterBank):
    raise ValueError(
        f"The adapter at {adapter.path!r} is an AdapterBank (a mixed-adapter batch), but its layer {layer} is not a "
        "plain contraction over trailing input axes (Linen Dense/DenseGeneral, NNX Linear, with the default "
        "layout and precision) nor one of the einsum layers whose input leads with the batch (nn.Einsum, "
        "nnx.Einsum, Tunix's and Gemma's Einsum): mixed-adapter batches run on those layers only.")


def uses_factored_product(adapter: LayerAdapter) -> bool:
  """Whether the method's own product beats the rematerialised merged weight (see the module docstring)."""
  method = adapter.method
  return bool(getattr(method, "runtime_factored", False))


def uses_factored_branch(adapter: LayerAdapter) -> bool:
  """Whether the method's branch ``x @ Delta W`` alone is lean (what einsum layers add to their output).

  A method whose lean product is a merged one (SHiRA's :meth:`apply`: ``x (W0 + Delta W)`` with a
  sampled gradient) has no lean branch: its einsum layers compute the whole contraction through
  that product instead (:func:`einsum_branch` with ``full=True``).
  """
  return uses_factored_product(adapter) and bool(getattr(adapter.method, "factored_branch", True))


def _zero_cotangent(x: Any) -> Any:
  x_dtype = jnp.result_type(x)
  if jnp.issubdtype(x_dtype, jnp.inexact):
    return jnp.zeros(jnp.shape(x), x_dtype)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _cotangent_like(value: Any, cotangent: Any) -> Any:
  """``cotangent`` for floating ``value``, a float0 zero for integer/bool ``value`` (custom_vjp's rule)."""
  if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
    return cotangent
  return np.zeros(jnp.shape(value), jax.dtypes.float0)


def _reduced_like(cotangent: Any, primal: Any) -> Any:
  """:func:`~spectral_peft._sparse.sharded.reduced_like` for floating cotangents (float0 ones pass)."""
  if jnp.result_type(cotangent) == jax.dtypes.float0:
    return cotangent
  return sharded.reduced_like(cotangent, primal)


def merged_call(adapters: Mapping[str, tuple[LayerAdapter | None, Any]],
                call: Callable[[dict[str, Array], Any], Any], operands: Any) -> Any:
  """``call({name: W0 + Delta W}, operands)`` with the merged weights rebuilt in the backward pass.

  The merged weights exist only while this layer runs forward, and again while its backward pass
  runs: the backward rule rebuilds them only once the output cotangent has arrived (an
  ``optimization_barrier`` ties the rebuild to it), so XLA cannot hoist every layer's rebuild to the
  start of the backward pass. Memory: a few ``(m, n)`` temporaries of one layer at a time.

  A quantized ``w0`` (:class:`~spectral_peft.peft.QuantizedArray`) is dequantized inside the same
  rebuild, and an entry without an adapter (``(None, w0)``) only dequantizes: the layer's quantized
  weights exist in floating point only while it runs.

  Args:
    adapters: ``{name: (layer_adapter or None, w0)}`` for every adapted or quantized weight of one layer.
    call: ``(merged, operands) -> outputs``: the layer evaluated at its merged weights by name; it
      must not close over traced values (pass them in ``operands``).
    operands: every array the layer reads besides the adapted weights (its inputs, other
      variables); a pytree whose leaves are arrays (integer leaves get no gradient).

  Returns:
    ``call(merged, operands)``, equal in value and gradient to evaluating it at merged weights.
  """
  names = sorted(adapters)
  layer_adapters = [adapters[n][0] for n in names]
  shells = [None if a is None else (a.shell, a.path) for a in layer_adapters]

  def merge_all(arrays, weights):
    out = {}
    for name, (params, frozen), spec, w0 in zip(names, arrays, shells, weights):
      w0 = dequantized(w0)
      out[name] = w0 if spec is None else LayerAdapter(params, frozen, *spec).merge(w0)
    return out

  @jax.custom_vjp
  def run(params, frozen, weights, operands):
    # Tie the rebuild to the layer's inputs, so XLA cannot hoist every layer's merge to the start.
    params, frozen, operands = jax.lax.optimization_barrier((params, frozen, operands))
    return call(merge_all(list(zip(_tie(params, operands), frozen)), weights), operands)

  def run_fwd(params, frozen, weights, operands):
    return run(params, frozen, weights, operands), (params, frozen, weights, operands)

  def run_bwd(residuals, cotangent):
    params, frozen, weights, operands = residuals
    params, frozen, operands, cotangent = jax.lax.optimization_barrier((params, frozen, operands, cotangent))
    params = _tie(params, cotangent)
    float_ops, rebuild = _split_floats(operands)
    merged, merge_vjp = jax.vjp(lambda p, w: merge_all(list(zip(p, frozen)), w), params, weights)
    # The input gradient first (it needs the merged weights), then the weight gradient (it does not):
    # tying the second to the first lets XLA free the merged weights before dW and its adjoint exist.
    _, inputs_vjp = jax.vjp(lambda f: call(merged, rebuild(f)), float_ops)
    (d_float_ops,) = inputs_vjp(cotangent)
    _, weights_vjp = jax.vjp(lambda m: call(m, rebuild(float_ops)), merged)
    (d_merged,) = weights_vjp(_tie(cotangent, d_float_ops))
    d_params, d_weights = merge_vjp(d_merged)
    d_weights = [jax.tree.map(_cotangent_like, w, d) for w, d in zip(weights, d_weights)]
    d_frozen = jax.tree.map(lambda f: np.zeros(jnp.shape(f), jax.dtypes.float0), frozen)
    # Inside shard_map: each cotangent varies like its primal (the tie made the parameters vary).
    primal_params, _, primal_weights, primal_operands = residuals
    d_params = jax.tree.map(_reduced_like, d_params, primal_params)
    d_weights = jax.tree.map(_reduced_like, d_weights, primal_weights)
    return d_params, d_frozen, d_weights, jax.tree.map(_reduced_like, rebuild(d_float_ops, fill=True), primal_operands)

  run.defvjp(run_fwd, run_bwd)
  params = [() if a is None else a.params for a in layer_adapters]
  frozen = [() if a is None else a.frozen for a in layer_adapters]
  weights = [adapters[n][1] for n in names]
  return run(params, frozen, weights, operands)


def quantized_product(product: Callable[[Array, Array], Array], x: Array, kernel: Any) -> Array:
  """``product(x, dequantize(kernel))`` for a quantized kernel, the dequantized weight rebuilt in the backward pass.

  Under ``jax.checkpoint`` the dequantized ``(m, n)`` weight is a temporary of this layer's forward
  pass and of its backward pass, never a residual kept between them (the saved values are ``x``
  and the integer kernel). No gradient reaches the kernel's integers or scales.
  """
  if not is_quantized(kernel):
    return product(x, kernel)
  frozen = jax.tree.map(jax.lax.stop_gradient, kernel)
  return jax.checkpoint(lambda x, k: product(x, dequantized(k)))(x, frozen)


def _tie(params: Any, anchor: Any) -> Any:
  """``params`` made data-dependent on ``anchor``, their values unchanged whatever ``anchor`` holds.

  ``optimization_barrier`` orders the rebuild on GPU/TPU, but XLA:CPU removes barriers before
  scheduling, so every backend also gets a real dependency: a layer's merged weight cannot be built
  before its input (forward) or its output cotangent (backward) exists. The dependency is on one
  element, read by indexing (not by flattening, which would make a sharded activation gather
  whole), through ``where(isfinite(e), 0 * e, 0)``: exactly zero for every value of ``e``, inf and
  NaN included (so one non-finite input element never reaches another example), and not folded
  away by XLA (``0 * e`` is not zero for non-finite floats).
  """
  floats = [x for x in jax.tree.leaves(anchor) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and jnp.size(x)]
  if not floats:
    return params
  element = jnp.real(floats[0][(0,) * jnp.ndim(floats[0])])
  zero = jnp.where(jnp.isfinite(element), element * 0, jnp.zeros((), element.dtype))

  def tie(p):
    if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      return p
    return p + zero.astype(p.dtype)

  return jax.tree.map(tie, params)


def split_call_arguments(args: tuple, kwargs: dict) -> tuple[list, Callable[[list], tuple[tuple, dict]]]:
  """``(arrays, rebuild)``: the array leaves of a call's arguments, and ``rebuild(arrays) -> (args, kwargs)``.

  Arrays travel into :func:`merged_call` as operands (they may be traced and differentiated); every
  other leaf (flags, ``None``, strings) stays static.
  """
  flat, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in flat]

  def rebuild(arrays: list) -> tuple[tuple, dict]:
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if a else leaf for leaf, a in zip(flat, is_array)])

  return [leaf for leaf, a in zip(flat, is_array) if a], rebuild


def _split_floats(tree: Any):
  """``(floating leaves, rebuild)``: ``rebuild(floats)`` puts them back among the other leaves.

  ``rebuild(cotangents, fill=True)`` instead returns a cotangent tree for ``tree``: the given
  cotangents at floating leaves and float0 zeros elsewhere.
  """
  leaves, treedef = jax.tree.flatten(tree)
  is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
  floats = [x for x, f in zip(leaves, is_float) if f]

  def rebuild(values, fill=False):
    it = iter(values)
    out = [next(it) if f else (np.zeros(jnp.shape(x), jax.dtypes.float0) if fill else x)
           for x, f in zip(leaves, is_float)]
    return jax.tree.unflatten(treedef, out)

  return floats, rebuild


def unused_adapters_error(unused: list[str], seen: Mapping[str, str]) -> ValueError:
  """The error for adapters no layer consumed during a call (``seen``: module path -> layer type)."""
  lines = []
  for path in unused:
    owner = "/".join(p for p in path.split("/")[:-1] if p != "params")
    kind = seen.get(owner)
    if kind is None:
      lines.append(f"{path!r}: no layer owning this weight was called")
    else:
      lines.append(f"{path!r}: the layer {owner!r} ({kind}) ran but did not read this weight through a "
                   "method the runtime intercepts")
  return ValueError(
      "Adapters were not applied during this call (the runtime never skips an adapter silently): "
      + "; ".join(lines) + ". Check the adapter paths against the model's parameters and that these layers run.")


# -- fallbacks to the rebuilt path, reported in debug mode ------------------------------------------
DEBUG_ENV = "SPECTRAL_PEFT_DEBUG"


def report_fallback(path: str, layer: str, reason: str) -> None:
  """Warns (``RuntimeWarning``) that a factored method runs on the rebuilt path, when debugging.

  Debug mode is the environment variable ``SPECTRAL_PEFT_DEBUG`` set to a non-empty value other
  than ``0``; the rebuilt path is exact either way, only slower and heavier than the factored one.
  """
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    warnings.warn(f"The adapter at {path!r} runs on the rebuilt path in {layer}: {reason}.", RuntimeWarning,
                  stacklevel=3)


# -- einsum layers: the adapter's branch placed by the layer's own equation ----------------------------
def _einsum_specs(equation: str, operand_ndims: tuple[int, int]) -> tuple[list[str], str]:
  """``([spec_0, spec_1], out)`` of a two-operand einsum with ``...`` spelled out as fresh letters."""
  equation = equation.replace(" ", "")
  if "->" not in equation:
    raise ValueError(f"Einsum equation {equation!r} has no '->': the runtime needs an explicit output.")
  lhs, out = equation.split("->")
  specs = lhs.split(",")
  if len(specs) != 2:
    raise ValueError(f"Einsum equation {equation!r} must have two operands (input, kernel).")
  used = set(equation)
  fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
  ellipsis = ""
  for i, spec in enumerate(specs):
    if "..." in spec:
      count = operand_ndims[i] - (len(spec) - 3)
      ellipsis = "".join(fresh[:count])
      specs[i] = spec.replace("...", ellipsis)
  return specs, out.replace("...", ellipsis)


def einsum_io_axes(equation: str, kernel_ndim: int, kernel_operand: int = 1) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``(input_axes, output_axes, other_axes)`` of the kernel operand of a two-operand einsum.

  Input axes are contracted with the other operand (letters in both operands, not in the output),
  output axes reach the output only from the kernel. Other axes are those in the other operand and
  the output too (a per-head weight: one independent matrix per index) or summed out of the kernel
  alone; a single ``(in, out)`` matrix cannot describe them.

  Example:
    >>> einsum_io_axes("BTD,NDH->BTNH", 3)
    ((1,), (0, 2), ())
  """
  specs, out = _einsum_specs(equation, (kernel_ndim, kernel_ndim))
  kernel, other = specs[kernel_operand], specs[1 - kernel_operand]
  if len(kernel) != kernel_ndim or len(set(kernel)) != len(kernel):
    raise ValueError(f"Einsum equation {equation!r}: the kernel operand {kernel!r} does not name its {kernel_ndim} "
                     "axes with distinct letters.")
  ins = tuple(i for i, c in enumerate(kernel) if c in other and c not in out)
  outs = tuple(i for i, c in enumerate(kernel) if c in out and c not in other)
  rest = tuple(i for i in range(kernel_ndim) if i not in ins and i not in outs)
  return ins, outs, rest


def check_einsum_layout(adapter: Any, equation: str, path: str, kernel_operand: int = 1) -> None:
  """Raises when the adapter's input/output axes contradict the layer's einsum contraction.

  Raises:
    ValueError: naming the weight, the equation, the axes it contracts and the adapter's axes.
  """
  ins, outs, rest = einsum_io_axes(equation, len(adapter.slice_shape), kernel_operand)
  mine_in, mine_out = adapter.io_axes
  if set(mine_in) == set(ins) and set(mine_out) == set(outs) and not rest:
    return
  if rest and set(mine_in) | set(mine_out) == set(range(len(adapter.slice_shape))) and set(mine_in) >= set(ins) - set(rest):
    detail = (f"its axes {rest} index independent matrices (per-head weights): adapt them with `stack_axes` "
              "after moving them first, or choose input/output axes that the contraction uses")
  else:
    detail = f"it contracts kernel axes {ins} with the input and writes axes {outs} to the output"
  raise ValueError(
      f"The adapter at {path!r} takes kernel axes {mine_in} as inputs and {mine_out} as outputs, but the layer's "
      f"einsum {equation!r} disagrees: {detail}. Pass `in_axes={ins}` (or leave `in_axes` unset to read it from "
      "the equation).")


def einsum_branch(adapter: LayerAdapter, equation: str, x: Array, kernel: Array, kernel_operand: int = 1, *,
                  full: bool = False) -> Array | None:
  """The adapter's part of ``einsum(equation, x, W0 + Delta W)``: ``einsum(equation, x, Delta W)``, factored.

  ``x`` is transposed so that its contracted axes come last in the adapter's input-axis order, the
  method's factored ``branch`` maps them to the output axes (never forming ``Delta W`` for LoRA-type
  methods), and the result is arranged as the equation's output. With ``full``, the method's
  ``apply`` gives the whole contraction ``einsum(equation, x, W0 + Delta W)`` instead (a merged
  product's value and its sampled coefficient gradient, with ``kernel`` read as ``W0``). Returns
  ``None`` where no single matrix describes the kernel (per-head or summed-out kernel axes): the
  caller rebuilds instead.
  """
  shell = adapter.shell
  ndims = (x.ndim, kernel.ndim) if kernel_operand == 1 else (kernel.ndim, x.ndim)
  specs, out = _einsum_specs(equation, ndims)
  w_spec, x_spec = specs[kernel_operand], specs[1 - kernel_operand]
  ins, outs = shell.io_axes
  if len(w_spec) != kernel.ndim or len(ins) + len(outs) != kernel.ndim:
    return None
  in_letters = "".join(w_spec[a] for a in ins)
  out_letters = "".join(w_spec[a] for a in outs)
  if any(c not in x_spec or c in out for c in in_letters) or any(c in x_spec or c not in out for c in out_letters):
    return None
  keep = "".join(c for c in x_spec if c not in in_letters)
  if len(set(x_spec)) != len(x_spec):
    return None
  if isinstance(adapter.method, AdapterBank) and not keep.startswith(x_spec[0]):
    return None  # A bank's product reads the input's leading axis as the batch: it must stay leading.
  x_t = jnp.einsum(f"{x_spec}->{keep}{in_letters}", x)
  y = adapter.apply(x_t, kernel) if full else adapter.branch(x_t, kernel)
  return jnp.einsum(f"{keep}{out_letters}->{out}", y)


def einsum_with_bias(product: Array, equation: str, x: Array, kernel: Array, bias: Array | None) -> Array:
  """An einsum layer's output from the whole contraction ``product`` (:func:`einsum_branch` with ``full``).

  ``product`` in the promoted dtype of ``x`` and ``kernel``, plus ``bias`` (over the kernel's output
  axes) broadcast as ``nn.Einsum`` / ``nnx.Einsum`` do: the output axes that come from the kernel keep
  their sizes, the others are 1.
  """
  y = product.astype(jnp.result_type(x, kernel))
  if bias is None:
    return y
  specs, out = _einsum_specs(equation, (x.ndim, kernel.ndim))
  shape = tuple(kernel.shape[specs[1].index(c)] if c in specs[1] else 1 for c in out)
  return y + jnp.reshape(bias, shape)
