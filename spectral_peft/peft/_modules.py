"""Base leaves trained in full beside the adapters (PEFT's ``modules_to_save``) and the trainable count."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft.peft._tree import Adapters, PyTree, count_parameters, leaf_paths, path_to_str, select_paths


def modules_to_save(params: PyTree, targets: Any) -> dict[str, jax.Array]:
  """The base leaves to train fully and save with the adapter (PEFT's ``modules_to_save``).

  Args:
    params: the base parameters.
    targets: module names (``["classifier"]``: every leaf, bias included, under a module whose path
      ends in that name), a regex searched in each path, or a predicate ``(path, leaf) -> bool``.

  Returns:
    ``{path: array}``, a copy of the chosen leaves: a pytree of plain arrays to train beside the
    adapters (differentiate a loss of ``merge_modules(merge(params, adapters), modules)`` with respect
    to both and step them with ``optax``; :func:`sp.peft.trainable_mask` marks only adapter arrays, so
    keep the modules out of a tree masked by it), put back with :func:`merge_modules` and saved with
    :func:`export_peft` (``modules=``).

  Raises:
    ValueError: nothing matches.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> params = {"body": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> sorted(sp.peft.modules_to_save(params, ["head"]))
    ['head/bias', 'head/kernel']
  """
  paths = leaf_paths(params)
  if isinstance(targets, (list, tuple)):
    names = [str(t).replace(".", "/") for t in targets]

    def under(path, leaf):
      del leaf
      module = path.rsplit("/", 1)[0] if "/" in path else ""
      return any(module == nm or module.endswith("/" + nm) for nm in names)

    chosen = select_paths(params, under)
  else:
    chosen = select_paths(params, targets)
  return {p: jnp.array(paths[p]) for p in chosen}


def merge_modules(params: PyTree, modules: Mapping[str, Any]) -> PyTree:
  """``params`` with the leaves of ``modules`` (:func:`modules_to_save`) put in place.

  Raises:
    ValueError: a path of ``modules`` missing from ``params``, or of another shape.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> params = {"head": {"bias": jnp.zeros(2)}}
    >>> sp.peft.merge_modules(params, {"head/bias": jnp.ones(2)})["head"]["bias"].tolist()
    [1.0, 1.0]
  """
  if not isinstance(modules, Mapping):
    raise TypeError(f"`modules` must be a {{path: array}} dict, got {type(modules).__name__}.")
  seen: set[str] = set()

  def visit(key_path, leaf):
    name = path_to_str(key_path)
    if name not in modules:
      return leaf
    new = modules[name]
    if tuple(np.shape(new)) != tuple(np.shape(leaf)):
      raise ValueError(f"`modules[{name!r}]` has shape {tuple(np.shape(new))}, `params` has {tuple(np.shape(leaf))} there.")
    seen.add(name)
    return jnp.asarray(new).astype(jnp.result_type(leaf))

  out = jax.tree_util.tree_map_with_path(visit, params)
  missing = sorted(set(modules) - seen)
  if missing:
    raise ValueError(f"`params` has no leaf at module path(s) {missing[:5]}.")
  return out


class TrainableSummary(NamedTuple):
  """Counts of :func:`trainable_summary`; ``str()`` is PEFT's ``print_trainable_parameters`` line."""

  trainable: int
  adapter: int
  modules: int
  base: int
  total: int

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_summary(params: PyTree, adapters: Adapters, modules_to_save: Optional[Mapping[str, Any]] = None) -> TrainableSummary:
  """Trainable vs all parameters of an adapted model, as PEFT's ``print_trainable_parameters``.

  ``trainable`` = adapter scalars (:func:`sp.peft.count_parameters`, complex counted twice) +
  modules-to-save scalars; ``total`` = base scalars + trainable (PEFT counts a module to save
  twice as well: the frozen original and its trained copy).

  Args:
    params: the base parameters.
    adapters: ``{path: Adapter}``.
    modules_to_save: optional ``{path: array}`` of :func:`modules_to_save`.

  Returns:
    A :class:`TrainableSummary` ``(trainable, adapter, modules, base, total)``; ``print(summary)``
    gives ``"trainable params: ... || all params: ... || trainable%: ..."``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    >>> ad = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(rank=2), ["dense"])
    >>> print(sp.peft.trainable_summary(params, ad))
    trainable params: 32 || all params: 104 || trainable%: 30.7692
  """
  base = int(sum(int(np.size(x)) for x in jax.tree.leaves(params)))
  adapter = count_parameters(adapters)
  modules = int(sum(int(np.size(x)) for x in jax.tree.leaves(dict(modules_to_save or {}))))
  trainable = adapter + modules
  return TrainableSummary(trainable, adapter, modules, base, base + trainable)
