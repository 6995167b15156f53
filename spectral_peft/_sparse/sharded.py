"""The Fourier update on a device mesh: each device transforms only what it holds.

``Delta W = scale Re(ifft2(S))`` is a global transform of its sparse spectrum: XLA's SPMD partitioner
cannot split an FFT along a transformed axis, so under a sharded kernel it all-gathers the operand of
every FFT (the half spectrum before the synthesis, the weight gradient before its adjoint). Here:

* the synthesis runs replicated, from the replicated coefficients (:func:`replicated_like`): each
  device builds the whole update and keeps its block of ``W0 + Delta W``; nothing is gathered;
* the coefficients' cotangent (:func:`fourier_cotangent`) is one ``custom_partitioning`` op. Each
  device forms its block of ``x^T g`` from its own activations, places it at its offset in a zero
  ``(m, n)`` array and applies the synthesis' adjoint to that. The adjoint is linear, so the sum of
  those ``(p,)`` results over the devices is the cotangent: one all-reduce of ``p`` values replaces
  the all-gather of an ``(m, n)`` gradient, and the ``(m, n)`` gradient is never reduced over the
  batch either.

Off a mesh (no mesh in the arrays' types, or inside ``shard_map``) both are the plain computations.
Inside ``shard_map``, :func:`reduced_like` gives the library's custom derivatives cotangents that
vary like their primals.
``custom_partitioning`` has neither a batching nor a differentiation rule: batched (``vmap``), the
cotangent is the plain computation; differentiated, it is a bilinear map of ``(x, g)``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_peft._sparse import deltas

Array = jax.Array


def mesh_of(x: Any) -> Any:
  """The (abstract) mesh in ``x``'s type, or ``None`` off a mesh.

  Off a mesh: no mesh, a one-device one, or one with a manual axis (inside ``shard_map`` the arrays
  are already each device's own, and the plain computations are local).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  if any(kind == jax.sharding.AxisType.Manual for kind in getattr(mesh, "axis_types", ())):
    return None
  return mesh


def replicated_like(a: Array, like: Array) -> Array:
  """``a`` constrained to be replicated over ``like``'s mesh (unchanged off a mesh)."""
  mesh = mesh_of(like)
  if mesh is None:
    return a
  return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P()))


def reduced_like(cotangent: Any, primal: Any) -> Any:
  """``cotangent`` summed over the manual mesh axes it varies along and ``primal`` does not.

  Inside ``shard_map`` a custom derivative's cotangent must vary like its primal: the gradient of
  a value that is the same on every device (a base kernel, an adapter) is the sum of the devices'
  contributions. Outside ``shard_map`` (nothing varies) it is ``cotangent`` unchanged.
  """
  extra = _varying(cotangent) - _varying(primal)
  return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying(x: Any) -> frozenset:
  """The manual mesh axes ``x`` varies along (empty outside ``shard_map``)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _adjoint(g_full: Array, values: Array, indices: Array, shape: tuple[int, int], scale: float) -> Array:
  """The cotangent of ``values`` under ``scale fourier_delta(values, indices, shape)`` for ``g_full``."""
  _, pullback = jax.vjp(lambda v: scale * deltas.fourier_delta(v, indices, shape), values)
  (d_values,) = pullback(g_full)
  return d_values


def _block_cotangent(x: Array, g: Array, values: Array, indices: Array, shape: tuple[int, int], scale: float,
                     offsets: Sequence[Any]) -> Array:
  """:func:`_adjoint` of ``x^T g`` placed at ``offsets`` in a zero ``shape`` array."""
  real = jnp.real(values).dtype if jnp.iscomplexobj(values) else values.dtype
  block = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=real).astype(real)
  if block.shape == tuple(shape):
    full = block
  else:
    full = jax.lax.dynamic_update_slice(jnp.zeros(shape, real), block, tuple(offsets))
  return _adjoint(full, values, indices, shape, scale)


def _axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple[str, ...]) -> Any:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _layout(x_sharding: Any, g_sharding: Any) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """Mesh axes splitting the tokens, the rows (``x``'s features) and the columns (``g``'s features).

  Taken from the shardings XLA proposes; a mesh axis is used once (tokens first, then rows), and
  the operands are resharded to agree.
  """
  x_spec = tuple(getattr(x_sharding, "spec", ())) + (None, None)
  g_spec = tuple(getattr(g_sharding, "spec", ())) + (None, None)
  tokens = _axes(x_spec[0]) or _axes(g_spec[0])
  rows = tuple(a for a in _axes(x_spec[1]) if a not in tokens)
  cols = tuple(a for a in _axes(g_spec[1]) if a not in tokens + rows)
  return tokens, rows, cols


def _partition(shape, scale, mesh, arg_shapes, result_shape):
  tokens, rows, cols = _layout(arg_shapes[0].sharding, arg_shapes[1].sharding)
  replicated = NamedSharding(mesh, P())
  summed = tokens + rows + cols

  def lower(x, g, values, indices):
    row0 = jax.lax.axis_index(rows) * x.shape[1] if rows else 0
    col0 = jax.lax.axis_index(cols) * g.shape[1] if cols else 0
    d_values = _block_cotangent(x, g, values, indices, shape, scale, (row0, col0))
    return jax.lax.psum(d_values, summed) if summed else d_values

  arg_shardings = (NamedSharding(mesh, P(_entry(tokens), _entry(rows))),
                   NamedSharding(mesh, P(_entry(tokens), _entry(cols))), replicated, replicated)
  return mesh, lower, replicated, arg_shardings


def _replicated_result(shape, scale, mesh, arg_shapes, result_shape):
  return NamedSharding(mesh, P())


@functools.partial(custom_partitioning, static_argnums=(4, 5))
def _partitioned_cotangent(x, g, values, indices, shape, scale):
  return _block_cotangent(x, g, values, indices, shape, scale, (0, 0))


_partitioned_cotangent.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_replicated_result,
    sharding_rule="b i, b j, p, p -> p",
    reduction_factors=("b", "i", "j"),
)


def _plain(shape, scale):
  return lambda x, g, values, indices: _block_cotangent(x, g, values, indices, shape, scale, (0, 0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _on_mesh(x, g, values, indices, shape, scale):
  """The partitioned op, with the rules ``custom_partitioning`` lacks: batched, it is the plain
  computation (vmapped); its derivative is that of a bilinear map of ``(x, g)``."""
  batchable = jax.custom_batching.custom_vmap(lambda x, g, v, i: _partitioned_cotangent(x, g, v, i, shape, scale))

  @batchable.def_vmap
  def _batched(axis_size, in_batched, x, g, v, i):
    in_axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(_plain(shape, scale), in_axes=in_axes, axis_size=axis_size)(x, g, v, i), True

  return batchable(x, g, values, indices)


@_on_mesh.defjvp
def _on_mesh_jvp(shape, scale, primals, tangents):
  x, g, values, indices = primals
  dx, dg = tangents[0], tangents[1]
  out = _on_mesh(x, g, values, indices, shape, scale)
  return out, _on_mesh(dx, g, values, indices, shape, scale) + _on_mesh(x, dg, values, indices, shape, scale)


def fourier_cotangent(x: Array, g: Array, values: Array, indices: Array, shape: Sequence[int], scale: float) -> Array:
  """Cotangent of ``values`` for ``y = x (W0 + scale Re(ifft2(S(values))))`` and output cotangent ``g``.

  Args:
    x: ``(B, m)`` inputs; g: ``(B, n)`` output cotangents (any sharding).
    values: ``(p,)`` real or complex coefficients; indices: ``(p,)`` flat positions in ``(m, n)``.
    shape: ``(m, n)``; scale: the update's scale.

  Returns:
    ``(p,)`` of ``values``' dtype, replicated: the adjoint of the synthesis applied to ``x^T g``.
    On a mesh each device transforms its own block of ``x^T g`` (see the module docstring); off a
    mesh it is the plain adjoint.
  """
  shape = (int(shape[0]), int(shape[1]))
  indices = jnp.asarray(indices, jnp.int32)
  if mesh_of(x) is None and mesh_of(g) is None:
    return _plain(shape, float(scale))(x, g, values, indices)
  return _on_mesh(x, g, values, indices, shape, float(scale))
