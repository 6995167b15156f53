"""Method-free functions over parameter pytrees: select, init, merge, unmerge, mask, count.

The adapters of a model are a plain ``dict`` from a target's path (its keys joined by ``'/'``,
e.g. ``"encoder/layer_0/attention/query/kernel"``) to an :class:`Adapter`. It is a pytree: pass
it to ``jax.grad``, optax, ``jit`` or ``vmap`` like any other.

Paths. A leaf's path joins its dictionary keys, sequence indices and attribute names with
``'/'``. Flax NNX ``State`` leaves end in a ``Variable``'s ``.value``; that last step is left out,
so a Linen ``params`` dict and the NNX ``State`` of the same model give the same paths (up to
Linen's leading ``"params"`` collection when it is present).

Flattening rule. An adapter sees its weight as a matrix ``(m, n)``: the first ``in_axes`` axes are
inputs, the rest outputs, ``m = prod(shape[:in_axes])``, ``n = prod(shape[in_axes:])``. A 2-D
``Dense`` kernel ``(in, out)`` has ``in_axes = 1``. For more axes ``in_axes`` must be given: a
Linen ``DenseGeneral`` query kernel ``(embed, heads, head_dim)`` has ``in_axes = 1``, an attention
output kernel ``(heads, head_dim, embed)`` has ``in_axes = 2``, a ``Conv`` kernel
``(h, w, in, out)`` has ``in_axes = 3``.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft.peft._method import Adapter, AdapterMethod, matrix_shape

Array = jax.Array
PyTree = Any
Adapters = dict[str, Adapter]
Target = Union[str, "re.Pattern[str]", Callable[[str, Any], bool]]
InAxes = Union[None, int, Mapping[str, int], Callable[[str, tuple[int, ...]], Optional[int]]]
MethodChoice = Union[AdapterMethod, Mapping[str, AdapterMethod], Callable[[str, tuple[int, ...]], AdapterMethod]]


# -- paths -------------------------------------------------------------------------------------
def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_to_str(path: Sequence[Any]) -> str:
  """``'/'``-joined names of a ``jax.tree_util`` key path (NNX's trailing ``.value`` dropped)."""
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def leaf_paths(params: PyTree) -> dict[str, Any]:
  """``{path: leaf}`` for every array leaf of ``params``, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {path_to_str(p): leaf for p, leaf in flat}


def _available_paths(paths: Mapping[str, Any], limit: int = 12) -> str:
  shown = [f"{p} {tuple(np.shape(v))}" for p, v in list(paths.items())[:limit]]
  more = len(paths) - len(shown)
  return "; ".join(shown) + (f"; ... ({more} more)" if more > 0 else "")


def select_paths(params: PyTree, targets: Target) -> list[str]:
  """Paths of the leaves chosen by ``targets``.

  Args:
    params: any pytree of arrays.
    targets: a regular expression searched (``re.search``) in each ``'/'``-joined path, or a
      predicate ``(path, leaf) -> bool``.

  Returns:
    The matching paths, in tree order.

  Raises:
    ValueError: if nothing matches (the message lists some available paths).
  """
  paths = leaf_paths(params)
  if isinstance(targets, (str, re.Pattern)):
    pattern = re.compile(targets)
    chosen = [p for p in paths if pattern.search(p)]
    described = f"pattern {pattern.pattern!r}"
  elif callable(targets):
    chosen = [p for p, leaf in paths.items() if targets(p, leaf)]
    described = "predicate"
  else:
    raise TypeError(
        f"`targets` must be a regex string or a predicate (path, leaf) -> bool, got {type(targets).__name__}."
    )
  if not chosen:
    raise ValueError(f"`targets` {described} matched no parameter. Available paths: {_available_paths(paths)}.")
  return chosen


def _resolve_method(method: MethodChoice, path: str, shape: tuple[int, ...]) -> AdapterMethod:
  chosen: Any
  if isinstance(method, AdapterMethod):
    chosen = method
  elif isinstance(method, Mapping):
    chosen = next((m for pattern, m in method.items() if re.search(pattern, path)), None)
    if chosen is None:
      raise ValueError(f"`method` mapping has no pattern matching target {path!r}; patterns: {list(method)}.")
  elif callable(method):
    chosen = method(path, shape)
  else:
    chosen = method
  if not isinstance(chosen, AdapterMethod):
    raise TypeError(
        f"`method` must be an adapter spec such as sp.peft.LoRA(rank=8), a {{regex: spec}} mapping or "
        f"a callable (path, shape) -> spec; for {path!r} it gave {type(chosen).__name__}."
    )
  return chosen


def _resolve_in_axes(in_axes: InAxes, path: str, shape: tuple[int, ...]) -> int:
  value: Optional[int]
  if in_axes is None:
    value = None
  elif isinstance(in_axes, int):
    value = in_axes
  elif isinstance(in_axes, Mapping):
    value = next((v for pattern, v in in_axes.items() if re.search(pattern, path)), None)
  elif callable(in_axes):
    value = in_axes(path, shape)
  else:
    raise TypeError(f"`in_axes` must be None, an int, a {{regex: int}} mapping or a callable, got {in_axes!r}.")
  if len(shape) < 2:
    raise ValueError(
        f"Target {path!r} has shape {shape}, which is not a matrix: adapters need a weight with at "
        "least 2 axes (choose `targets` that select kernels, not biases or scales)."
    )
  if value is None:
    if len(shape) == 2:
      return 1
    raise ValueError(
        f"Target {path!r} has shape {shape} with {len(shape)} axes and no reshape rule: pass `in_axes` "
        "(the number of leading input axes, e.g. 1 for a DenseGeneral query kernel (embed, heads, "
        "head_dim), 2 for an attention output kernel (heads, head_dim, embed))."
    )
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value < len(shape):
    raise ValueError(f"`in_axes` for target {path!r} of shape {shape} must be an int in [1, {len(shape) - 1}], got {value!r}.")
  return int(value)


def path_key(key: Array, path: str) -> Array:
  """The key of one target: ``fold_in(key, crc32(path))``, the same on every machine."""
  return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


def init_adapters(
    key: Array,
    params: PyTree,
    method: MethodChoice,
    targets: Target,
    *,
    in_axes: InAxes = None,
) -> Adapters:
  """Creates one adapter of ``method`` for every target weight of ``params``.

  Args:
    key: a ``jax.random`` key. Each target gets ``fold_in(key, crc32(path))`` (split into an
      ``init`` and an ``init_frozen`` key), so an adapter does not change when other targets are
      added, and the same key gives the same adapters on every machine.
    params: the frozen base parameters: a Linen ``params`` dict, an NNX ``State`` or any pytree.
    method: an adapter spec such as ``sp.peft.LoRA(rank=8)``; or, for per-target choices (a
      different rank or budget per layer), a ``{regex: spec}`` mapping (first match wins) or a
      callable ``(path, shape) -> spec``.
    targets: regex searched in ``'/'``-joined paths, or a predicate ``(path, leaf) -> bool``.
    in_axes: reshape rule for weights with more than 2 axes (see the module docstring): an int for
      all targets, ``{regex: int}``, or ``(path, shape) -> int | None``.

  Returns:
    ``{path: Adapter}``, identity at init: ``merge(params, adapters)`` equals ``params``.

  Raises:
    ValueError: if no path matches, a target is not a matrix or has no reshape rule, or the
      method does not fit a target's shape (e.g. ``rank > min(m, n)``).
  """
  paths = leaf_paths(params)
  adapters: Adapters = {}
  for path in select_paths(params, targets):
    w0 = paths[path]
    shape = tuple(int(d) for d in np.shape(w0))
    axes = _resolve_in_axes(in_axes, path, shape)
    mshape = matrix_shape(shape, axes)
    spec = _resolve_method(method, path, shape)
    try:
      spec.check_shape(mshape)
    except ValueError as err:
      raise ValueError(f"Target {path!r} (shape {shape}, matrix {mshape}): {err}") from None
    w0_matrix = jnp.reshape(w0, mshape)
    params_key, frozen_key = jax.random.split(path_key(key, path))
    adapter_params, frozen = spec.init_both(params_key, frozen_key, w0_matrix)
    adapters[path] = Adapter(
        params=adapter_params,
        frozen=frozen,
        method=spec,
        shape=shape,
        dtype=jnp.dtype(w0.dtype).name,
        in_axes=axes,
    )
  return adapters


def _check_adapters(adapters: Any) -> None:
  if not isinstance(adapters, Mapping) or not all(isinstance(a, Adapter) for a in adapters.values()):
    raise TypeError("`adapters` must be the {path: Adapter} dict returned by sp.peft.init_adapters.")


def _map_targets(params: PyTree, adapters: Adapters, fn: Callable[[Adapter, Array], Array], what: str) -> PyTree:
  _check_adapters(adapters)
  seen: set[str] = set()

  def visit(path, leaf):
    name = path_to_str(path)
    adapter = adapters.get(name)
    if adapter is None:
      return leaf
    if tuple(np.shape(leaf)) != adapter.shape:
      raise ValueError(
          f"Cannot {what}: adapter for {name!r} was made for shape {adapter.shape}, but `params` has "
          f"shape {tuple(np.shape(leaf))} there."
      )
    seen.add(name)
    return fn(adapter, leaf)

  out = jax.tree_util.tree_map_with_path(visit, params)
  missing = [p for p in adapters if p not in seen]
  if missing:
    raise ValueError(
        f"Cannot {what}: `params` has no leaf at adapter path(s) {missing[:5]}. Available paths: "
        f"{_available_paths(leaf_paths(params))}."
    )
  return out


def merge(params: PyTree, adapters: Adapters) -> PyTree:
  """``params`` with every target ``w0`` replaced by ``w0 + Delta W``.

  Returns the same structure and dtypes; differentiable with respect to both arguments, so a
  training loss can call ``model.apply(merge(params, adapters), x)`` and take gradients with
  respect to ``adapters``.
  """
  return _map_targets(params, adapters, lambda adapter, w0: adapter.merge(w0), "merge")


def unmerge(merged: PyTree, adapters: Adapters) -> PyTree:
  """Inverse of :func:`merge`: recovers the base parameters from merged ones."""
  return _map_targets(merged, adapters, lambda adapter, w: adapter.unmerge(w), "unmerge")


def switch_adapters(merged: PyTree, current: Adapters, new: Adapters) -> PyTree:
  """Turns parameters merged with ``current`` into parameters merged with ``new``."""
  return merge(unmerge(merged, current), new)


def delta_tree(params: PyTree, adapters: Adapters) -> dict[str, Array]:
  """``{path: Delta W}`` (in each weight's own shape) for every adapter."""
  paths = leaf_paths(params)
  _check_adapters(adapters)
  return {p: a.delta(paths[p]) for p, a in adapters.items()}


# -- trainable / frozen ---------------------------------------------------------------------------
def trainable_mask(tree: PyTree) -> PyTree:
  """Boolean pytree: True exactly on the trainable adapter arrays found in ``tree``.

  ``tree`` may be the adapters alone or any container holding them and other arrays (e.g.
  ``{"base": params, "adapters": adapters}``); frozen adapter constants and everything outside an
  adapter are False. Use with ``optax.masked`` or, better (masked-out gradients then produce no
  update at all), with :func:`masked_optimizer`.
  """

  def mark(node):
    if isinstance(node, Adapter):
      return Adapter(
          params=jax.tree.map(lambda _: True, node.params),
          frozen=jax.tree.map(lambda _: False, node.frozen),
          method=node.method,
          shape=node.shape,
          dtype=node.dtype,
          in_axes=node.in_axes,
      )
    return jax.tree.map(lambda _: False, node)

  return jax.tree.map(mark, tree, is_leaf=lambda n: isinstance(n, Adapter))


def masked_optimizer(tx, tree: PyTree):
  """``tx`` on the trainable adapter arrays of ``tree``; every other leaf gets a zero update."""
  import optax  # Local import keeps the core importable without optax's start-up cost.

  labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(tree))
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def partition(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Splits ``tree`` into ``(trainable, rest)`` with ``None`` in place of the other part's leaves.

  ``jax.grad`` of a function of ``trainable`` then differentiates the adapters only (integer
  constants such as sparse positions never reach ``grad``). :func:`combine` puts them back.
  """
  mask = trainable_mask(tree)
  trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
  rest = jax.tree.map(lambda x, m: None if m else x, tree, mask)
  return trainable, rest


def combine(*trees: PyTree) -> PyTree:
  """Inverse of :func:`partition`: at each leaf, the first non-``None`` value."""

  def first(*xs):
    return next((x for x in xs if x is not None), None)

  return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)


def count_parameters(tree: PyTree) -> int:
  """Number of trainable adapter scalars in ``tree`` (a complex entry counts as 2)."""
  mask = trainable_mask(tree)
  sizes = jax.tree.map(
      lambda x, m: int(np.size(x)) * (2 if jnp.iscomplexobj(x) else 1) if m else 0, tree, mask
  )
  return int(sum(jax.tree.leaves(sizes)))
