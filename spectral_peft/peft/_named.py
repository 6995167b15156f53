"""Several named adapters for one model, as an immutable mapping (PEFT's named-adapter workflow, functionally).

PEFT keeps named adapters inside the model (``add_adapter``, ``set_adapter``, ``disable_adapter``,
``add_weighted_adapter``, ``delete_adapter``); NNX models do too (:mod:`spectral_peft.nnx`). For Linen
and the functional API, :class:`NamedAdapters` holds ``{name: {path: Adapter}}`` and the active
names, and *is* the ``{path: Adapter}`` mapping of its active adapters: pass it wherever an adapters
dict goes (``merge``, ``apply_adapters``, ``save_adapters``, ``jax.grad``).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax

from spectral_peft.peft._methods.base import Adapter
from spectral_peft.peft._methods.combination import combine_adapters, weighted_combination
from spectral_peft.peft._tree import Adapters, _check_adapters


@jax.tree_util.register_pytree_node_class
class NamedAdapters(Mapping[str, Adapter]):
  """Named adapters dicts and the active names; as a mapping, the active adapters ``{path: Adapter}``.

  With one active name the mapping is that adapters dict; with several, every path gets a
  :class:`~spectral_peft.peft.WeightedSum` of unit weights (``W0 + sum_i Delta W_i``, PEFT's
  ``set_adapter([a, b])``); with none (:meth:`disabled`) it is empty: the base model. Every method
  returns a new object. As a pytree its children are the named dicts, so ``jax.grad`` with respect
  to it gives the gradient of every named adapter (zero for inactive ones).

  Args:
    adapters: ``{name: {path: Adapter}}``.
    active: the active names; ``None``: the first name (PEFT activates the first adapter).

  Raises:
    ValueError: unknown or malformed names. TypeError: values that are not adapters dicts.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, spectral_peft as sp
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> make = lambda k: sp.peft.init_adapters(jax.random.key(k), params, sp.peft.LoRA(2), "kernel")
    >>> named = sp.peft.NamedAdapters({"task_a": make(1)}).add("task_b", make(2)).set_adapter("task_b")
    >>> y = sp.peft.apply_adapters(model, params, named, jnp.ones((1, 4)))
    >>> base = sp.peft.apply_adapters(model, params, named.disabled(), jnp.ones((1, 4)))
    >>> named.names, named.active
    (('task_a', 'task_b'), ('task_b',))
  """

  def __init__(self, adapters: Mapping[str, Adapters] | None = None, active: Sequence[str] | str | None = None):
    adapters = dict(adapters or {})
    for name, value in adapters.items():
      _check_name(name)
      try:
        _check_adapters(value)
      except TypeError:
        raise TypeError(f"`adapters[{name!r}]` must be a {{path: Adapter}} dict, got {type(value).__name__}.") from None
    self._named = adapters
    if active is None:
      active = tuple(adapters)[:1]
    active = (active,) if isinstance(active, str) else tuple(active)
    missing = [n for n in active if n not in adapters]
    if missing:
      raise ValueError(f"No adapter named {missing}; the names: {list(adapters)}.")
    self._active = active
    self._resolved: Adapters | None = None

  # -- pytree ---------------------------------------------------------------------------------
  def tree_flatten(self):
    return tuple(self._named.values()), (tuple(self._named), self._active)

  @classmethod
  def tree_unflatten(cls, aux, children):
    out = cls.__new__(cls)
    out._named, out._active, out._resolved = dict(zip(aux[0], children)), aux[1], None
    return out

  # -- the active adapters, as a mapping ------------------------------------------------------
  def _active_adapters(self) -> Adapters:
    if self._resolved is None:
      if not self._active:
        self._resolved = {}
      elif len(self._active) == 1:
        self._resolved = dict(self._named[self._active[0]])
      else:
        self._resolved = weighted_combination([self._named[n] for n in self._active], [1.0] * len(self._active))
    return self._resolved

  def __getitem__(self, path: str) -> Adapter:
    return self._active_adapters()[path]

  def __iter__(self) -> Iterator[str]:
    return iter(self._active_adapters())

  def __len__(self) -> int:
    return len(self._active_adapters())

  def __repr__(self) -> str:
    return f"NamedAdapters(names={list(self._named)}, active={list(self._active)})"

  # -- named operations -----------------------------------------------------------------------
  @property
  def names(self) -> tuple[str, ...]:
    """Every name, in the order added."""
    return tuple(self._named)

  @property
  def active(self) -> tuple[str, ...]:
    """The active names (empty: disabled)."""
    return self._active

  def adapter(self, name: str) -> Adapters:
    """The adapters dict named ``name`` (to save, export or summarise one adapter)."""
    self._check_known([name])
    return self._named[name]

  def add(self, name: str, adapters: Adapters) -> "NamedAdapters":
    """A copy with ``adapters`` under ``name`` (inactive unless it is the first; PEFT's ``add_adapter``)."""
    if name in self._named:
      raise ValueError(f"An adapter named {name!r} exists already; delete it first or pick another name.")
    return NamedAdapters({**self._named, name: adapters}, self._active if self._named else (name,))

  def set_adapter(self, names: str | Sequence[str]) -> "NamedAdapters":
    """A copy whose active adapters are ``names`` (one name or several, summed)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    self._check_known(names)
    return NamedAdapters(self._named, names)

  def disabled(self) -> "NamedAdapters":
    """A copy with no active adapter: the base model (PEFT's ``disable_adapter``)."""
    return NamedAdapters(self._named, ())

  def delete(self, name: str) -> "NamedAdapters":
    """A copy without ``name`` (PEFT's ``delete_adapter``); it leaves the active names too."""
    self._check_known([name])
    return NamedAdapters({n: a for n, a in self._named.items() if n != name}, tuple(n for n in self._active if n != name))

  def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], name: str, *,
                           combination_type: str = "linear") -> "NamedAdapters":
    """A copy with ``name`` = the weighted combination of ``names`` (PEFT's ``add_weighted_adapter``).

    ``combination_type``: ``"linear"`` (``sum_i w_i Delta W_i`` exactly, every method) or ``"cat"``
    (LoRA only: one LoRA of the summed rank, :func:`concatenate_lora`).
    """
    names = [names] if isinstance(names, str) else list(names)
    self._check_known(names)
    return self.add(name, combine_adapters([self._named[n] for n in names], weights, combination_type))

  def _check_known(self, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in self._named]
    if missing:
      raise ValueError(f"No adapter named {missing}; the names: {list(self._named)}.")


def _check_name(name: Any) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f"An adapter name must be a non-empty str, got {name!r}.")
