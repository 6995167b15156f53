"""The contract every adapter method fulfils, and the pytree node that carries one adapter.

A method is a small immutable spec (a frozen dataclass of hyperparameters) with pure functions,
in the manner of ``optax.GradientTransformation``:

* ``init(key, w0) -> params``: the trainable arrays for one weight matrix ``w0: (m, n)``.
* ``init_frozen(key, w0) -> frozen``: constants the method needs besides ``w0`` (sparse positions,
  spectral masks, reference norms); empty for most methods. They are never trained, may be
  integer arrays, and are saved with the adapter.
* ``delta(params, w0, frozen) -> Delta W``: the ``(m, n)`` update, so the adapted weight is
  ``w0 + Delta W``.
* ``unmerge(params, w, frozen) -> w0``: inverts ``w = w0 + delta(params, w0, frozen)``.
* ``apply(params, x, w0, frozen) -> x @ (w0 + Delta W)``: the same product, factored where the
  method allows, without materialising ``Delta W``.

Matrices use the Flax kernel layout ``(in_features, out_features)``; higher-rank kernels are
flattened to a matrix by :class:`Adapter` before a method sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

_METHOD_REGISTRY: dict[str, type["AdapterMethod"]] = {}


def method_registry() -> Mapping[str, type["AdapterMethod"]]:
  """Every adapter method class by name (used to rebuild specs from checkpoint metadata)."""
  return dict(_METHOD_REGISTRY)


class AdapterMethod:
  """Base class of adapter method specs.

  Subclasses are frozen dataclasses whose fields are hyperparameters (Python scalars, strings
  or tuples); they are hashable, so a spec can be static data under ``jit``. Subclasses implement
  :meth:`init` and :meth:`delta` and override the other hooks when they can do better.
  """

  #: True when ``delta`` ignores ``w0`` (then ``unmerge`` is ``w - delta``).
  delta_depends_on_w0: ClassVar[bool] = False

  #: True when the adapter runtime should use :meth:`apply` (a product that never forms an
  #: ``(m, n)`` array) on plain contraction layers; otherwise the runtime rebuilds ``W0 + Delta W``
  #: per layer under ``jax.checkpoint``.
  runtime_factored: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    if not cls.__name__.startswith("_"):
      _METHOD_REGISTRY[cls.__name__] = cls

  # -- to implement ---------------------------------------------------------------------------
  def init(self, key: Array, w0: Array) -> PyTree:
    """Trainable parameters for ``w0: (m, n)``; the adapted weight must equal ``w0`` at init."""
    raise NotImplementedError

  def delta(self, params: PyTree, w0: Array, frozen: PyTree = None) -> Array:
    """The ``(m, n)`` update ``Delta W`` (in the dtype of ``params``)."""
    raise NotImplementedError

  # -- optional hooks -------------------------------------------------------------------------
  def check_shape(self, shape: tuple[int, int]) -> None:
    """Raises ``ValueError`` when the method cannot adapt an ``(m, n)`` matrix."""

  def init_frozen(self, key: Array, w0: Array) -> PyTree:
    """Constants stored with the adapter but never trained (default: none)."""
    del key, w0
    return {}

  def init_both(self, params_key: Array, frozen_key: Array, w0: Array) -> tuple[PyTree, PyTree]:
    """``(init(params_key, w0), init_frozen(frozen_key, w0))``; override when both share a random draw."""
    return self.init(params_key, w0), self.init_frozen(frozen_key, w0)

  def merge(self, params: PyTree, w0: Array, frozen: PyTree = None) -> Array:
    """``w0 + Delta W`` in ``w0``'s dtype; override when the sum can be formed without ``Delta W``."""
    return w0 + self.delta(params, w0, frozen).astype(w0.dtype)

  def unmerge(self, params: PyTree, w: Array, frozen: PyTree = None) -> Array:
    """Recovers ``w0`` from ``w = w0 + delta(params, w0, frozen)``."""
    if self.delta_depends_on_w0:
      raise NotImplementedError(f"{type(self).__name__} must override `unmerge`.")
    return w - self.delta(params, w, frozen).astype(w.dtype)

  def apply(self, params: PyTree, x: Array, w0: Array, frozen: PyTree = None) -> Array:
    """``x @ (w0 + Delta W)`` for ``x: (..., m)``; override to avoid forming ``Delta W``."""
    w = w0 + self.delta(params, w0, frozen).astype(w0.dtype)
    return jnp.matmul(x, w)

  def branch(self, params: PyTree, x: Array, w0: Array, frozen: PyTree = None) -> Array:
    """The adapter's part of the product, ``x @ Delta W`` for ``x: (..., m)`` (``apply`` minus ``x @ w0``).

    The adapter runtime evaluates ``x @ w0 + branch(dropout(x))`` for adapter dropout (PEFT's
    ``lora_dropout``: only the adapter's branch sees the dropped input). Override to avoid forming
    ``Delta W``.
    """
    return jnp.matmul(x, self.delta(params, w0, frozen).astype(jnp.result_type(x, w0)))

  # -- serialisation --------------------------------------------------------------------------
  def to_config(self) -> dict[str, Any]:
    """JSON-compatible description (``{"method": name, **fields}``)."""
    config: dict[str, Any] = {"method": type(self).__name__}
    for field in dataclasses.fields(self):  # type: ignore[arg-type]
      config[field.name] = _to_json(getattr(self, field.name))
    return config


def _to_json(value: Any) -> Any:
  if isinstance(value, AdapterMethod):
    return value.to_config()
  if isinstance(value, tuple):
    return {"tuple": [_to_json(v) for v in value]}
  return value


def _from_json(value: Any) -> Any:
  if isinstance(value, dict) and "method" in value:
    return method_from_config(value)
  if isinstance(value, dict) and "tuple" in value:
    return tuple(_from_json(v) for v in value["tuple"])
  return value


def method_from_config(config: Mapping[str, Any]) -> AdapterMethod:
  """Inverse of :meth:`AdapterMethod.to_config`."""
  config = dict(config)
  name = config.pop("method")
  if name not in _METHOD_REGISTRY:
    raise ValueError(f"Unknown adapter method {name!r}; known: {sorted(_METHOD_REGISTRY)}.")
  return _METHOD_REGISTRY[name](**{k: _from_json(v) for k, v in config.items()})


class Constants:
  """Hashable holder of an adapter's constant arrays (host numpy), compared by content.

  An adapter's constants (sparse positions, spectral masks, reference norms) are never trained;
  keeping them out of the pytree children means ``jax.grad``, optax, an EMA ``tree_map`` and
  ``jax.device_put`` see only trainable floating arrays. Under ``jit`` the constants are compile-time
  constants; two holders with equal contents are equal (and hash alike), so re-creating an adapter
  with the same positions does not retrace.
  """

  __slots__ = ("tree", "_key", "abstract")

  def __init__(self, tree: PyTree):
    self.abstract = False
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest = hashlib.sha1()
    converted: list[Any] = []
    for leaf in leaves:
      if isinstance(leaf, jax.core.Tracer):  # Made under eval_shape/jit: only its structure is known.
        leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
      if isinstance(leaf, jax.ShapeDtypeStruct):  # Abstract structure (planning, checkpoint restore).
        self.abstract = True
        converted.append(leaf)
        digest.update(repr((leaf.shape, str(leaf.dtype))).encode())
        continue
      array = np.array(leaf, copy=True)
      array.setflags(write=False)
      converted.append(array)
      digest.update(repr((array.shape, array.dtype.str)).encode())
      digest.update(np.ascontiguousarray(array).tobytes())
    self.tree = jax.tree_util.tree_unflatten(treedef, converted)
    self._key = (treedef, digest.hexdigest())

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Constants) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __repr__(self) -> str:
    shapes = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", self.tree)
    return f"Constants({shapes})"


LAYOUTS = ("in_out", "out_in")


def normalize_layout(layout: Any, slice_shape: tuple[int, ...], in_axes: int) -> Any:
  """``"in_out"``, ``"out_in"``, or an explicit ``(input_axes, output_axes)`` pair checked against the slice.

  An explicit layout names the axes of one weight slice (stack axes excluded) that are inputs and
  those that are outputs, at any position: Gemma's ``q_einsum`` kernel ``(heads, embed, head_dim)``
  is ``((1,), (0, 2))``. Together they must name every axis once, and ``in_axes`` must equal the
  number of input axes. The matrix the method sees is ``transpose(w, input_axes + output_axes)``
  flattened to ``(prod(inputs), prod(outputs))``.

  Raises:
    ValueError: an unknown string, axes that are not a partition of the slice's axes, an empty side,
      or an ``in_axes`` that disagrees.
  """
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise ValueError(f"`layout` must be one of {LAYOUTS} or an (input_axes, output_axes) pair, got {layout!r}.")
    return layout
  ndim = len(slice_shape)
  try:
    ins, outs = (tuple(int(a) for a in side) for side in layout)
  except (TypeError, ValueError):
    raise ValueError(f"`layout` must be one of {LAYOUTS} or an (input_axes, output_axes) pair of int tuples, "
                     f"got {layout!r}.") from None
  if not ins or not outs or sorted(ins + outs) != list(range(ndim)):
    raise ValueError(f"An explicit `layout` (input_axes, output_axes) must split the axes 0..{ndim - 1} of a weight "
                     f"slice of shape {tuple(slice_shape)} into two non-empty groups, each axis once; got {layout!r}.")
  if in_axes != len(ins):
    raise ValueError(f"`in_axes={in_axes}` disagrees with the explicit layout {layout!r} ({len(ins)} input axes).")
  return (ins, outs)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
  """One adapter on one weight: its trainable arrays (the pytree children) and how it attaches.

  Only ``params`` are pytree children, so ``jax.grad``, optax and ``tree_map`` over a dict of
  adapters see exactly the trainable arrays; the constants ``frozen`` and the rest are static.

  Attributes:
    params: trainable arrays, as returned by ``method.init`` (with ``stack_axes`` leading axes).
    frozen: constant arrays, as returned by ``method.init_frozen`` (often empty), held as read-only
      host numpy arrays (static under ``jit``; see :class:`Constants`).
    method: the method spec.
    shape: shape of the adapted weight leaf ``w0`` (stack axes included).
    dtype: dtype name of ``w0``.
    in_axes: number of input axes of one slice of ``w0``.
    layout: ``"in_out"`` (Flax: the first ``in_axes`` axes of a slice are inputs), ``"out_in"``
      (PyTorch ``Linear`` / GPT-2 ``Conv1D`` style, PEFT's ``fan_in_fan_out=False`` for torch: the last
      ``in_axes`` axes are inputs), or an explicit ``(input_axes, output_axes)`` pair of a slice's
      axis positions (:func:`normalize_layout`; e.g. ``((1,), (0, 2))`` for Gemma's ``(heads, embed,
      head_dim)`` query kernel). The method always sees the matrix ``(in, out)``.
    stack_axes: leading axes of ``w0`` that index independent weights (``nn.scan``/``nnx.vmap``
      stacked layers): each slice ``w0[i]`` has its own adapter, stacked along the same axes.
  """

  params: PyTree
  frozen: PyTree
  method: Any  # An AdapterMethod spec; callers read the fields of its concrete class.
  shape: tuple[int, ...]
  dtype: str
  in_axes: int
  layout: Any = "in_out"  # "in_out", "out_in" or ((input axes), (output axes)).
  stack_axes: int = 0

  def __post_init__(self) -> None:
    constants = self.frozen if isinstance(self.frozen, Constants) else Constants(self.frozen)
    object.__setattr__(self, "_constants", constants)
    object.__setattr__(self, "frozen", constants.tree)
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "layout", normalize_layout(self.layout, self.shape[self.stack_axes:], self.in_axes))

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, Adapter):
      return NotImplemented
    mine, mine_def = jax.tree_util.tree_flatten(self)
    theirs, theirs_def = jax.tree_util.tree_flatten(other)
    if str(mine_def) != str(theirs_def) or self.tree_flatten()[1] != other.tree_flatten()[1]:
      return False
    return all(_leaf_equal(a, b) for a, b in zip(mine, theirs))

  __hash__ = None  # type: ignore[assignment]

  def _constants_holder(self) -> Constants:
    return getattr(self, "_constants")

  def tree_flatten(self):
    aux = (self._constants_holder(), self.method, self.shape, self.dtype, self.in_axes, self.layout, self.stack_axes)
    return (self.params,), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    constants, method, shape, dtype, in_axes, layout, stack_axes = aux
    adapter = object.__new__(cls)
    for name, value in (("params", children[0]), ("frozen", constants.tree), ("method", method), ("shape", shape),
                        ("dtype", dtype), ("in_axes", in_axes), ("layout", layout), ("stack_axes", stack_axes),
                        ("_constants", constants)):
      object.__setattr__(adapter, name, value)
    return adapter

  def replace(self, **changes: Any) -> "Adapter":
    """A copy with some fields changed (``params``, ``frozen``, ``method``, ...)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if "frozen" not in changes:
      fields["frozen"] = self._constants_holder()
    fields.update(changes)
    return Adapter(**fields)

  @property
  def slice_shape(self) -> tuple[int, ...]:
    """Shape of one adapted weight (``shape`` without the stack axes)."""
    return self.shape[self.stack_axes:]

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(m, n)`` = ``(in_features, out_features)``: the matrix the method adapts."""
    ins, outs = self.io_shapes()
    return math.prod(ins), math.prod(outs)

  @property
  def io_axes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(input_axes, output_axes)`` of one slice, as positions (any layout)."""
    ndim = len(self.slice_shape)
    if self.layout == "in_out":
      return tuple(range(self.in_axes)), tuple(range(self.in_axes, ndim))
    if self.layout == "out_in":
      return tuple(range(ndim - self.in_axes, ndim)), tuple(range(ndim - self.in_axes))
    pair: tuple[tuple[int, ...], tuple[int, ...]] = self.layout  # An explicit (input_axes, output_axes) here.
    return tuple(pair[0]), tuple(pair[1])

  def to_matrix(self, w: Array) -> Array:
    """One weight slice in its stored layout -> the ``(in, out)`` matrix the method sees."""
    m, n = self.matrix_shape
    if self.layout == "in_out":
      return w.reshape(m, n)
    if self.layout == "out_in":
      return w.reshape(n, m).T
    ins, outs = self.io_axes
    return jnp.transpose(w, ins + outs).reshape(m, n)

  def from_matrix(self, matrix: Array) -> Array:
    """Inverse of :meth:`to_matrix`: an ``(in, out)`` matrix -> one weight slice."""
    if self.layout == "in_out":
      return matrix.reshape(self.slice_shape)
    if self.layout == "out_in":
      return matrix.T.reshape(self.slice_shape)
    ins, outs = self.io_axes
    order = ins + outs
    shape = self.slice_shape
    return jnp.transpose(matrix.reshape(tuple(shape[a] for a in order)), tuple(np.argsort(order)))

  def unstacked(self, index: Any) -> "Adapter":
    """The adapter of slice ``index`` of a stacked adapter (``params``/``frozen`` indexed along the stack axes)."""
    if self.stack_axes == 0:
      return self
    params = jax.tree.map(lambda a: a[index], self.params)
    frozen = jax.tree.map(lambda a: np.asarray(a)[index], self.frozen)
    return Adapter(params, frozen, self.method, self.slice_shape, self.dtype, self.in_axes, self.layout, 0)

  def check_concrete(self) -> None:
    """Raises ``TypeError`` when the constants are abstract (the adapter was made under ``jit``/``eval_shape``)."""
    if self._constants_holder().abstract:
      raise TypeError(
          f"This {type(self.method).__name__} adapter's constants (positions, masks, norms) are abstract shapes "
          "because it was created under `jit`/`jax.eval_shape`; such adapters only describe shapes (e.g. for "
          "sharding plans). Create adapters with sp.peft.init_adapters outside `jit` to compute with them.")

  def map_slices(self, fn, *weights: Array) -> Array:
    """``fn(params, frozen, *weight_slices)`` on every slice, vmapped over the stack axes.

    ``fn`` receives one slice's trainable arrays, its constants (arrays) and the matching slices
    of ``weights``; without stack axes it is called once on everything.
    """
    self.check_concrete()
    if self.stack_axes == 0:
      return fn(self.params, self.frozen, *weights)
    mapped = fn
    for _ in range(self.stack_axes):
      mapped = jax.vmap(mapped)
    return mapped(self.params, jax.tree.map(jnp.asarray, self.frozen), *weights)

  def delta(self, w0: Array) -> Array:
    """``Delta W`` in the shape and dtype of ``w0``."""
    def one(params, frozen, w):
      return self.from_matrix(self.method.delta(params, self.to_matrix(w), frozen)).astype(w.dtype)
    return self.map_slices(one, w0)

  def merge(self, w0: Array) -> Array:
    """``w0 + Delta W`` in the shape and dtype of ``w0``.

    The sum is taken in ``w0``'s own shape, so a sharded ``w0`` gives a merged weight of the same
    sharding. (The adapter runtime instead uses ``method.merge`` on the matrix view, which for the
    scatter methods adds into a copy of ``w0`` and saves one ``(m, n)`` buffer per layer.)
    """
    return w0 + self.delta(w0)

  def unmerge(self, w: Array) -> Array:
    """Recovers ``w0`` from a merged weight."""
    def one(params, frozen, w_slice):
      return self.from_matrix(self.method.unmerge(params, self.to_matrix(w_slice), frozen)).astype(w_slice.dtype)
    return self.map_slices(one, w)

  def io_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(input sizes, output sizes)`` of one slice, in the order of :attr:`io_axes`."""
    shape = self.slice_shape
    ins, outs = self.io_axes
    return tuple(shape[a] for a in ins), tuple(shape[a] for a in outs)

  def apply(self, x: Array, w0: Array) -> Array:
    """``x @ (w0 + Delta W)`` for inputs ``x: (..., *input_axes)`` (one unstacked weight).

    Uses the method's factored product (``method.apply``) where it has one.

    Returns:
      ``(..., *output_axes)``.
    """
    return self._product(self.method.apply, x, w0)

  def branch(self, x: Array, w0: Array) -> Array:
    """``x @ Delta W`` for inputs ``x: (..., *input_axes)``: the adapter's part of :meth:`apply`.

    Uses the method's factored branch (``method.branch``) where it has one.

    Returns:
      ``(..., *output_axes)``.
    """
    return self._product(self.method.branch, x, w0)

  def _product(self, product: Any, x: Array, w0: Array) -> Array:
    """``product(params, x, w0, frozen)`` on the flattened input axes, reshaped back."""
    if self.stack_axes:
      raise ValueError("`apply` needs the adapter of one slice: call `adapter.unstacked(index)` first.")
    self.check_concrete()
    in_shape, out_shape = self.io_shapes()
    if tuple(x.shape[x.ndim - len(in_shape):]) != tuple(in_shape):
      raise ValueError(f"`x` must end with the input axes {in_shape}, got shape {x.shape}.")
    batch = x.shape[: x.ndim - len(in_shape)]
    m, _ = self.matrix_shape
    y = product(self.params, x.reshape(batch + (m,)), self.to_matrix(w0), self.frozen)
    return y.reshape(batch + tuple(out_shape))


def _leaf_equal(a: Any, b: Any) -> bool:
  if isinstance(a, (jax.Array, np.ndarray)) or isinstance(b, (jax.Array, np.ndarray)):
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))
  return bool(a == b)


def matrix_shape(shape: tuple[int, ...], in_axes: int) -> tuple[int, int]:
  """Flattening rule: leading ``in_axes`` axes are inputs, the rest outputs."""
  return math.prod(shape[:in_axes]), math.prod(shape[in_axes:])
