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
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

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

  def unmerge(self, params: PyTree, w: Array, frozen: PyTree = None) -> Array:
    """Recovers ``w0`` from ``w = w0 + delta(params, w0, frozen)``."""
    if self.delta_depends_on_w0:
      raise NotImplementedError(f"{type(self).__name__} must override `unmerge`.")
    return w - self.delta(params, w, frozen).astype(w.dtype)

  def apply(self, params: PyTree, x: Array, w0: Array, frozen: PyTree = None) -> Array:
    """``x @ (w0 + Delta W)`` for ``x: (..., m)``; override to avoid forming ``Delta W``."""
    w = w0 + self.delta(params, w0, frozen).astype(w0.dtype)
    return jnp.matmul(x, w)

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


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter on one weight: its arrays (pytree children) and how it attaches (static).

  Attributes:
    params: trainable arrays, as returned by ``method.init``.
    frozen: constant arrays, as returned by ``method.init_frozen`` (often empty).
    method: the method spec (static).
    shape: shape of the adapted weight ``w0`` (static).
    dtype: dtype name of ``w0`` (static).
    in_axes: number of leading axes of ``w0`` that are input axes (static). ``w0`` is seen by the
      method as the matrix ``(prod(shape[:in_axes]), prod(shape[in_axes:]))``.
  """

  params: PyTree
  frozen: PyTree
  method: AdapterMethod
  shape: tuple[int, ...]
  dtype: str
  in_axes: int

  def tree_flatten(self):
    return (self.params, self.frozen), (self.method, self.shape, self.dtype, self.in_axes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], *aux)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(m, n)``: the matrix the method adapts."""
    return matrix_shape(self.shape, self.in_axes)

  def delta(self, w0: Array) -> Array:
    """``Delta W`` in the shape and dtype of ``w0``."""
    w0_matrix = w0.reshape(self.matrix_shape)
    return self.method.delta(self.params, w0_matrix, self.frozen).astype(w0.dtype).reshape(w0.shape)

  def merge(self, w0: Array) -> Array:
    """``w0 + Delta W`` in the shape and dtype of ``w0``."""
    return w0 + self.delta(w0)

  def unmerge(self, w: Array) -> Array:
    """Recovers ``w0`` from a merged weight."""
    w_matrix = w.reshape(self.matrix_shape)
    return self.method.unmerge(self.params, w_matrix, self.frozen).astype(w.dtype).reshape(w.shape)

  def apply(self, x: Array, w0: Array) -> Array:
    """``x @ (w0 + Delta W)`` for inputs ``x: (..., *shape[:in_axes])``.

    Returns:
      ``(..., *shape[in_axes:])``.
    """
    in_shape, out_shape = self.shape[: self.in_axes], self.shape[self.in_axes :]
    if tuple(x.shape[x.ndim - len(in_shape) :]) != tuple(in_shape):
      raise ValueError(f"`x` must end with the input axes {in_shape}, got shape {x.shape}.")
    batch = x.shape[: x.ndim - len(in_shape)]
    m, _ = self.matrix_shape
    y = self.method.apply(self.params, x.reshape(batch + (m,)), w0.reshape(self.matrix_shape), self.frozen)
    return y.reshape(batch + out_shape)


def matrix_shape(shape: tuple[int, ...], in_axes: int) -> tuple[int, int]:
  """Flattening rule: leading ``in_axes`` axes are inputs, the rest outputs."""
  return math.prod(shape[:in_axes]), math.prod(shape[in_axes:])
