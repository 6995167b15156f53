"""Shardings for adapters that agree with their base weights, for data x model parallel training.

A base kernel sharded over a ``jax.sharding.Mesh`` (say an MLP kernel ``(in, out)`` split along
``"model"`` on its output axis) should get an adapter whose arrays live where the kernel's slices
live, so ``w0 + Delta W`` and the factored ``x @ a @ b`` need no extra communication. The rule is
generic, decided by each adapter array's shape relative to the adapted matrix ``(m, n)``, so a new
method gets a sensible layout without edits:

* an array with the kernel's own shape takes the kernel's spec;
* a 2-D array ``(p, q)`` (LoRA's ``a: (m, r)``, ``b: (r, n)``, dense coefficient matrices ``(m, n)``)
  takes the mesh axes of the matrix's input axis on its first axis when ``p == m`` and those of the
  output axis on its second when ``q == n``;
* everything else is replicated: rank axes, vectors (sparse coefficients, DoRA's magnitude and
  stored column norms: tiny next to the kernel, and a replicated vector needs no communication
  where it meets a sharded kernel), integer positions and scalars; so is any axis whose size the
  mesh axes do not divide.

The matrix's input (output) axis is the flattening of the kernel's first ``in_axes`` (remaining)
axes. It inherits the mesh axes of the first of those axes of size > 1 when that axis is the only
sharded one (then each device's slice is a contiguous block of the flattened axis); otherwise the
matrix axis is replicated in the adapter. Shardings never change values: a sharded training step
equals the unsharded one up to the order of floating-point reductions.

References:
  JAX, "Distributed arrays and automatic parallelization" (``jax.sharding.Mesh``,
  ``NamedSharding``, ``PartitionSpec``); Shoeybi et al., "Megatron-LM" (2019) for the
  column/row split of attention and MLP kernels used in the examples.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spectral_peft import _validation
from spectral_peft.peft._methods.base import Adapter
from spectral_peft.peft._tree import Adapters, _check_adapters, path_to_str

PyTree = Any
SpecEntry = Union[None, str, tuple[str, ...]]
AnyMesh = Union[Mesh, jax.sharding.AbstractMesh]  # a NamedSharding may hold either
BaseSharding = Union[None, PartitionSpec, NamedSharding, jax.Array]


def _is_sharding_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def data_model_mesh(
    data: Optional[int] = None,
    model: int = 1,
    *,
    devices: Optional[Sequence[jax.Device]] = None,
    axis_names: tuple[str, str] = ("data", "model"),
) -> Mesh:
  """A 2-D ``(data, model)`` device mesh with automatic (GSPMD) sharding propagation.

  Args:
    data: size of the data-parallel axis; ``None`` uses ``len(devices) // model``.
    model: size of the model-parallel axis (the base kernels' split).
    devices: the devices to use (default ``jax.devices()``, all processes' devices in a
      multi-process run).
    axis_names: names of the two mesh axes.

  Returns:
    ``jax.sharding.Mesh`` of shape ``(data, model)`` with ``AxisType.Auto`` axes.

  Raises:
    ValueError: if there are fewer than ``data * model`` devices, or ``data`` is ``None`` and
      ``model`` does not divide the device count.

  Example:
    >>> import spectral_peft as sp
    >>> mesh = sp.peft.data_model_mesh(model=1)
    >>> mesh.axis_names
    ('data', 'model')
  """
  devices = list(jax.devices() if devices is None else devices)
  model = _validation.check_positive_int("model", model)
  if data is None:
    if len(devices) % model:
      raise ValueError(f"`model` must divide the number of devices ({len(devices)}), got {model}.")
    data = len(devices) // model
  data = _validation.check_positive_int("data", data)
  if data * model > len(devices):
    raise ValueError(
        f"`data * model` must be at most the number of devices ({len(devices)}), got "
        f"{data} * {model} = {data * model}."
    )
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), axis_names, axis_types=auto, devices=devices[: data * model])


def _check_spec_fits(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"Spec {spec} for {path!r} has more entries than the leaf has axes (shape {shape}).")
  for size, entry in zip(shape, spec):
    parts = _mesh_size(entry, mesh)
    if size % parts:
      raise ValueError(
          f"Spec {spec} for {path!r} splits an axis of size {size} into {parts} parts; the mesh "
          f"axes must divide it (leaf shape {shape}, mesh {dict(mesh.shape)})."
      )


def path_shardings(
    params: PyTree,
    mesh: Mesh,
    rules: Union[Mapping[str, PartitionSpec], Sequence[tuple[str, PartitionSpec]]],
    *,
    default: PartitionSpec = PartitionSpec(),
) -> PyTree:
  """``NamedSharding`` for every leaf of ``params``, chosen by regular expressions on its path.

  Args:
    params: any pytree of arrays (Linen ``params``, NNX ``State``); only shapes are read.
    mesh: the device mesh.
    rules: ``{regex: PartitionSpec}`` or a sequence of ``(regex, PartitionSpec)``; each regex is
      searched in the ``'/'``-joined leaf path (as in :func:`sp.peft.init_adapters`) and the first
      match wins.
    default: spec of leaves no rule matches (replicated by default).

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``params``.

  Raises:
    ValueError: if a chosen spec has more entries than its leaf has axes, or its mesh axes do not
      divide the axis they split.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = sp.peft.data_model_mesh(model=1)
    >>> params = {"mlp": {"kernel": jnp.zeros((4, 8))}}
    >>> sp.peft.path_shardings(params, mesh, {r"mlp/kernel$": P(None, "model")})["mlp"]["kernel"].spec
    P(None, 'model')
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = []
  for pattern, spec in items:
    if not isinstance(spec, PartitionSpec):
      raise TypeError(f"`rules` must map regexes to PartitionSpec, got {type(spec).__name__} for {pattern!r}.")
    compiled.append((re.compile(pattern), spec))

  def choose(path, leaf):
    name = path_to_str(path)
    spec = next((s for pattern, s in compiled if pattern.search(name)), default)
    _check_spec_fits(name, tuple(np.shape(leaf)), spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(choose, params)


# -- adapter layouts ------------------------------------------------------------------------------
def _mesh_size(entry: SpecEntry, mesh: Optional[AnyMesh]) -> int:
  if entry is None or mesh is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[name] for name in names]))


def _entries(spec: PartitionSpec, ndim: int) -> list[SpecEntry]:
  entries = [None if e is PartitionSpec.UNCONSTRAINED else e for e in spec]
  return entries + [None] * (ndim - len(entries))


def _flattened_entry(entries: Sequence[SpecEntry], dims: Sequence[int]) -> SpecEntry:
  """Mesh axes of the flattening of axes ``dims`` sharded by ``entries``, or None if not a block split."""
  sharded = [i for i, e in enumerate(entries) if e is not None]
  if len(sharded) != 1:
    return None
  first = sharded[0]
  if any(d != 1 for d in dims[:first]):
    return None
  return entries[first]


def _array_spec(x: Any, adapter: Adapter, base: list[SpecEntry], mesh: Optional[AnyMesh]) -> PartitionSpec:
  shape = tuple(np.shape(x))
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact) or not shape:
    return PartitionSpec()
  stack = adapter.stack_axes
  stack_entries, base = list(base[:stack]), list(base[stack:])
  shape = shape[stack:]
  slice_shape = adapter.slice_shape
  k = adapter.in_axes if adapter.layout == "in_out" else len(slice_shape) - adapter.in_axes
  m, n = adapter.matrix_shape
  row = _flattened_entry(base[:k], slice_shape[:k])
  col = _flattened_entry(base[k:], slice_shape[k:])
  if adapter.layout == "out_in":
    row, col = col, row
  if shape == slice_shape:
    entries = list(base)
  elif len(shape) == 2:
    entries = [row if shape[0] == m else None, col if shape[1] == n else None]
  else:
    entries = [None] * len(shape)
  entries = stack_entries + entries
  full_shape = tuple(np.shape(x))
  entries = [e if size % _mesh_size(e, mesh) == 0 else None for e, size in zip(entries, full_shape)]
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def _base_layouts(adapters: Adapters, base: PyTree, mesh: Optional[Mesh]) -> dict[str, tuple[PartitionSpec, Optional[AnyMesh]]]:
  """``{path: (spec, mesh)}`` of every adapted weight, from specs, shardings or sharded arrays."""
  _check_adapters(adapters)
  flat, _ = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_sharding_leaf)
  found = {path_to_str(p): leaf for p, leaf in flat}
  layouts = {}
  for path, adapter in adapters.items():
    leaf = found.get(path, found.get("params/" + path))
    if leaf is None and path not in found and "params/" + path not in found:
      raise ValueError(
          f"The base shardings have no entry for adapter path {path!r}. Available paths: "
          f"{list(found)[:12]}."
      )
    leaf_mesh: Optional[AnyMesh] = mesh
    if isinstance(leaf, jax.Array):
      if not isinstance(leaf.sharding, NamedSharding):
        raise TypeError(
            f"The base array at {path!r} has a {type(leaf.sharding).__name__}; pass arrays placed with a "
            "NamedSharding, or PartitionSpecs / NamedShardings."
        )
      leaf = leaf.sharding
    if isinstance(leaf, NamedSharding):
      leaf_mesh = leaf.mesh if mesh is None else mesh
      spec = leaf.spec
    elif leaf is None:
      spec = PartitionSpec()
    elif isinstance(leaf, PartitionSpec):
      spec = leaf
    else:
      raise TypeError(
          f"The base sharding at {path!r} must be a PartitionSpec, NamedSharding, None or a jax.Array "
          f"with a NamedSharding, got {type(leaf).__name__}."
      )
    if len(spec) > len(adapter.shape):
      raise ValueError(f"The base spec {spec} at {path!r} has more entries than the weight's axes {adapter.shape}.")
    layouts[path] = (spec, leaf_mesh)
  return layouts


def _map_adapter_arrays(adapters: Adapters, base: PyTree, mesh: Optional[Mesh], make) -> dict[str, Adapter]:
  layouts = _base_layouts(adapters, base, mesh)
  out = {}
  for path, adapter in adapters.items():
    spec, leaf_mesh = layouts[path]
    entries = _entries(spec, len(adapter.shape))
    out[path] = jax.tree.map(lambda x: make(_array_spec(x, adapter, entries, leaf_mesh), leaf_mesh), adapter)
  return out


def adapter_partition_specs(adapters: Adapters, base_specs: PyTree, mesh: Optional[Mesh] = None) -> dict[str, Adapter]:
  """``PartitionSpec`` of every adapter array, compatible with its base weight's spec.

  Args:
    adapters: ``{path: Adapter}`` from :func:`sp.peft.init_adapters`.
    base_specs: a pytree holding, at least at every adapter path, the base weight's
      ``PartitionSpec``, ``NamedSharding``, ``None`` (replicated) or the sharded ``jax.Array``
      itself: e.g. the Linen ``params`` placed on the mesh, the output of :func:`path_shardings`,
      ``nnx.get_partition_spec(state)`` or a flat ``{path: PartitionSpec}`` dict.
    mesh: the mesh, used to replicate axes its axis sizes do not divide; taken from the base
      shardings when they are ``NamedSharding`` s or arrays.

  Returns:
    ``{path: Adapter}`` with a ``PartitionSpec`` in place of every array (see the module docstring
    for the rule), usable as ``shard_map`` specs or with ``NamedSharding``.

  Raises:
    ValueError: if ``base_specs`` lacks an adapter path, or a spec has more entries than its weight
      has axes.
    TypeError: on a base leaf that is none of the accepted kinds.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"mlp": {"kernel": jnp.ones((8, 4))}}
    >>> adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "kernel")
    >>> specs = sp.peft.adapter_partition_specs(adapters, {"mlp/kernel": P(None, "model")})
    >>> specs["mlp/kernel"].params
    {'a': P(), 'b': P(None, 'model')}
  """
  return _map_adapter_arrays(adapters, base_specs, mesh, lambda spec, _: spec)


def adapter_shardings(adapters: Adapters, base_shardings: PyTree, mesh: Optional[Mesh] = None) -> dict[str, Adapter]:
  """``NamedSharding`` of every adapter array, compatible with its base weight's sharding.

  Args:
    adapters: ``{path: Adapter}`` from :func:`sp.peft.init_adapters`.
    base_shardings: as ``base_specs`` of :func:`adapter_partition_specs`; typically the sharded
      base ``params`` themselves or the output of :func:`path_shardings`.
    mesh: required when the base entries are bare ``PartitionSpec`` s; otherwise each adapter uses
      its base weight's mesh.

  Returns:
    ``{path: Adapter}`` with a ``NamedSharding`` in place of every array: pass it to
    ``jax.device_put`` or as ``jit``'s ``in_shardings`` / ``out_shardings``.

  Raises:
    ValueError: as :func:`adapter_partition_specs`, or when no mesh is known for a path.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = sp.peft.data_model_mesh(model=1)
    >>> params = {"mlp": {"kernel": jnp.ones((8, 4))}}
    >>> adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "kernel")
    >>> shardings = sp.peft.adapter_shardings(adapters, {"mlp/kernel": P(None, "model")}, mesh)
    >>> shardings["mlp/kernel"].params["b"].spec
    P(None, 'model')
  """

  def make(spec, leaf_mesh):
    if leaf_mesh is None:
      raise ValueError("`mesh` is required when the base shardings are bare PartitionSpecs or None.")
    return NamedSharding(leaf_mesh, spec)

  return _map_adapter_arrays(adapters, base_shardings, mesh, make)


def shard_adapters(adapters: Adapters, base_shardings: PyTree, mesh: Optional[Mesh] = None) -> dict[str, Adapter]:
  """Places ``adapters`` on the mesh with :func:`adapter_shardings` (``jax.device_put``).

  In a multi-process run every process must hold the same (full) adapter values, as
  :func:`sp.peft.init_adapters` gives from the same key; use
  ``jax.make_array_from_process_local_data`` for data that differs between processes.

  Args:
    adapters: ``{path: Adapter}``.
    base_shardings: as in :func:`adapter_shardings`.
    mesh: as in :func:`adapter_shardings`.

  Returns:
    The same adapters as sharded ``jax.Array`` s; values are unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> mesh = sp.peft.data_model_mesh(model=1)
    >>> params = sp.peft.path_shardings({"mlp": {"kernel": jnp.ones((8, 4))}}, mesh, {})
    >>> base = jax.device_put({"mlp": {"kernel": jnp.ones((8, 4))}}, params)
    >>> adapters = sp.peft.init_adapters(jax.random.key(0), base, sp.peft.LoRA(2), "kernel")
    >>> sharded = sp.peft.shard_adapters(adapters, base)
    >>> sharded["mlp/kernel"].params["a"].sharding.mesh.axis_names
    ('data', 'model')
  """
  return jax.device_put(adapters, adapter_shardings(adapters, base_shardings, mesh))
