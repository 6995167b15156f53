"""Run a Linen model with adapters applied as factored products instead of merged kernels.

``merge(params, adapters)`` materialises ``W0 + Delta W`` for every target on every step: simple,
and exact, but it pays an (m, n) matrix (and, for sine LoRA, its cosine in the backward pass) per
adapted kernel. Inside :func:`factored`, every ``flax.linen.Dense`` / ``DenseGeneral`` whose kernel
has an adapter computes ``x @ (W0 + Delta W)`` with the method's own ``apply`` instead: LoRA as
``x W0 + s (x a) b``, sine LoRA with the memory-lean blocked product, the sparse/spectral methods
with their factored products where those are cheaper. Values and gradients are those of the merged
model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_peft.peft._method import Adapter

Array = jax.Array


def _lookup(adapters: Mapping[str, Adapter], module_path: tuple[str, ...]) -> Adapter | None:
  name = "/".join(tuple(module_path) + ("kernel",))
  return adapters.get(name, adapters.get("params/" + name))


def _contracted_axes(module: nn.Module, ndim: int) -> int | None:
  """Number of trailing input axes the layer contracts, or None when the layout is not supported."""
  if type(module) is nn.Dense:
    return 1
  if type(module) is nn.DenseGeneral:
    if module.batch_dims:
      return None
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    contracted = sorted(a % ndim for a in axis)
    if contracted != list(range(ndim - len(contracted), ndim)):
      return None
    return len(contracted)
  return None


def _dense_with_adapter(module: nn.Module, adapter: Adapter, x: Array) -> Array:
  kernel: Array = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)
  y = adapter.apply(x, kernel).astype(x.dtype)
  if bias is not None:
    y = y + bias
  return y


@contextlib.contextmanager
def factored(adapters: Mapping[str, Adapter]) -> Iterator[None]:
  """Context in which adapted Linen Dense/DenseGeneral layers use the factored product.

  Call ``model.apply`` with the *base* (unmerged) parameters inside the context; layers are found by
  their kernel path (the ``'/'``-joined module path plus ``/kernel``, with or without a leading
  ``params/``), exactly the keys :func:`sp.peft.init_adapters` produced. Layers without an adapter,
  and layouts the interception does not cover (``DenseGeneral`` with ``batch_dims`` or non-trailing
  ``axis``), run unchanged; a covered layer whose adapter was built with a different ``in_axes`` than
  the layer contracts raises. The layer's ``precision`` and ``dot_general`` settings are not used on
  the adapted path. Works under ``jit``, ``grad`` and ``vmap``: enter the context inside the traced
  function so the adapters are the traced values.

  Args:
    adapters: ``{path: Adapter}`` from :func:`sp.peft.init_adapters`.

  Raises:
    TypeError: ``adapters`` is not a mapping of :class:`Adapter`.
    ValueError: (when a layer runs) the adapter's ``in_axes`` does not match the layer.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, spectral_peft as sp
    >>> model = nn.Dense(8)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> adapters = sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel")
    >>> with sp.peft.factored(adapters):
    ...   y = model.apply({"params": params}, jnp.ones((3, 4)))
    >>> y.shape
    (3, 8)
  """
  if not isinstance(adapters, Mapping) or not all(isinstance(a, Adapter) for a in adapters.values()):
    raise TypeError(f"`adapters` must be the {{path: Adapter}} dict of sp.peft.init_adapters, got {type(adapters).__name__}.")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or len(args) != 1 or kwargs:
      return next_fun(*args, **kwargs)
    adapter = _lookup(adapters, module.path)
    if adapter is None:
      return next_fun(*args, **kwargs)
    (x,) = args
    contracted = _contracted_axes(module, jnp.ndim(x))
    if contracted is None:
      return next_fun(*args, **kwargs)
    if contracted != adapter.in_axes:
      raise ValueError(
          f"The adapter at {'/'.join(module.path)}/kernel has in_axes={adapter.in_axes} but the layer contracts "
          f"{contracted} input axes; build it with in_axes={contracted}.")
    return _dense_with_adapter(module, adapter, x)

  with nn.intercept_methods(interceptor):
    yield


def apply_factored(model: nn.Module, params: Any, adapters: Mapping[str, Adapter], *args: Any, **kwargs: Any) -> Any:
  """``model.apply({"params": params}, *args, **kwargs)`` with the adapters as factored products.

  Equal in value and gradient to ``model.apply({"params": merge(params, adapters)}, ...)``.

  Args:
    model: a Linen module.
    params: the base parameters (the ``params`` collection, unmerged).
    adapters: ``{path: Adapter}`` for ``params``.
    *args: positional arguments of ``model.apply``.
    **kwargs: keyword arguments of ``model.apply``.
  """
  with factored(adapters):
    return model.apply({"params": params}, *args, **kwargs)
