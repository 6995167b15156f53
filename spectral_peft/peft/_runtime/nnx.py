"""The adapter runtime for Flax NNX: adapters added in place to an existing module graph.

:func:`adapt` adds one adapter per target weight to the module that owns it, as variables of
their own types: :class:`AdapterParam` (trainable; an ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` and Tunix's ``PeftTrainer`` train exactly the adapters) and :class:`AdapterConstant` (positions, masks,
reference norms: never trained, but sliced with the weight by ``nnx.scan``/``nnx.vmap``). The
owning module's ``__call__`` then routes through :mod:`spectral_peft.peft._runtime` (factored
product for ``nnx.Linear`` with a low-rank method, the layer at its merged weight rebuilt per layer
under the runtime's checkpointing otherwise), so every kernel-using layer is covered: ``Linear``,
``LinearGeneral`` (the projections of ``MultiHeadAttention``), ``Einsum``, ``Conv``,
``ConvTranspose``, custom layers. The owner keeps its identity and its paths (``.../kernel`` is
still the base weight), so the functional view :func:`adapters_of` returns the same
``{path: Adapter}`` dict as :func:`sp.peft.init_adapters` on the model's ``nnx.Param`` state, and
saves, exports and merges like it. :func:`merge_adapters` folds them into plain weights.

While a weight carries an adapter, its variable has a subclass of its own type (an ``nnx.Param`` stays
an ``nnx.Param`` to every filter) whose reads are checked: during a module's method, a read outside
the layer's own methods (a tied head reading the table through ``getattr``, a property of the layer)
raises, naming the weight and the reader, instead of computing with ``W0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import sys
import threading
import types
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graphlib as _graphlib

from spectral_peft.peft._runtime import core as _runtime
from spectral_peft.peft._methods.bank import INDEX as BANK_INDEX
from spectral_peft.peft._methods.bank import AdapterBank
from spectral_peft.peft._methods.base import Adapter, AdapterMethod
from spectral_peft.peft._methods.combination import WeightedSum, combine_adapters
from spectral_peft.peft._quant import QuantizedArray, describe, dequantized, is_quantized, quantize_array, select_quantized
from spectral_peft.peft._tree import Adapters, init_adapters, leaf_paths

Array = jax.Array


# ``nnx.update`` adds a variable the target module lacks by copying it (flax's ``_graph_update_dynamic``,
# "new state is being added"); that copy is the one point where an adapter variable can see it is being
# put, as an inert attribute, on a module that does not apply it.
_UPDATE_CODE = getattr(getattr(_graphlib, "_graph_update_dynamic", None), "__code__", None)


class _RefusesInertUpdate:
  """Mixin of the adapter variables: ``nnx.update`` may not add one to a module that does not use it."""

  def copy(self, *args: Any, **kwargs: Any) -> Any:
    _refuse_inert_update(sys._getframe(1))
    return super().copy(*args, **kwargs)  # type: ignore[misc]


def _refuse_inert_update(frame: Any) -> None:
  """Raises when ``frame`` is flax's ``nnx.update`` adding an adapter variable its module never reads."""
  if _UPDATE_CODE is None or frame is None or frame.f_code is not _UPDATE_CODE:
    return
  node, key = frame.f_locals.get("node"), frame.f_locals.get("key")
  used = {n for slot in getattr(node, _SLOTS, ()) for n in slot.param_names() + slot.constant_names()}
  if key in used:
    return
  path = []
  while frame is not None and frame.f_code is _UPDATE_CODE:
    path.append(str(frame.f_locals.get("key")))
    frame = frame.f_back
  where = "/".join(reversed(path))
  raise ValueError(
      f"nnx.update would add the adapter variable {where!r} to a {type(node).__name__} that does not apply it: "
      "the state of an adapted model is going into a model (or layer) that was not adapted alike, where flax "
      "would keep it as an inert attribute and the layer would compute without it. The update stopped here "
      "(variables visited before this one already hold their new values). Adapt the target first (sp.nnx.adapt "
      "with the same method and targets, or sp.nnx.load_into(target, sp.nnx.adapters_of(adapted))), then "
      "nnx.update it; or update with sp.nnx.base_params(adapted) only.")


class AdapterParam(_RefusesInertUpdate, nnx.LoRAParam):
  """A trainable adapter array, of every method: flax's ``nnx.LoRAParam`` convention for "the adapter".

  Being an ``nnx.LoRAParam`` (itself an ``nnx.Param``), it is what the ecosystem's adapter filters
  select: Tunix's ``PeftTrainer`` (which trains and checkpoints ``nnx.LoRAParam`` state only when a
  model holds one), qwix-style ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
  ``nnx.state(model, nnx.LoRAParam)``. The filters, on an adapted model:

  =========================================================  ===================================
  filter                                                     selects
  =========================================================  ===================================
  ``nnx.LoRAParam`` or ``sp.nnx.AdapterParam``               the adapters' trainable arrays only
  ``nnx.Param``                                              base weights and adapters (full
                                                             fine-tuning, as flax defines it)
  ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` /           the base weights only
  :func:`base_params`
  :class:`AdapterConstant`                                   positions, masks, reference norms
  =========================================================  ===================================

  ``AdapterParam`` (a subclass) singles out our adapters beside qwix's ``LoRAParam`` in one model.
  """


DEFAULT = "default"


class AdapterConstant(_RefusesInertUpdate, nnx.Variable):
  """An adapter constant (sparse positions, spectral masks, reference norms): never trained."""


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Static description of the adapter on one weight of a module (hashable: part of the graph)."""

  name: str
  path: str
  method: AdapterMethod
  shape: tuple[int, ...]
  dtype: str
  in_axes: int
  layout: str
  stack_axes: int
  params_def: Any
  frozen_def: Any
  adapter: str = DEFAULT

  def _prefix(self) -> str:
    return f"{self.name}_adapter_" if self.adapter == DEFAULT else f"{self.name}_adapter_{self.adapter}_"

  def param_names(self) -> list[str]:
    return [f"{self._prefix()}p{i}" for i in range(self.params_def.num_leaves)]

  def constant_names(self) -> list[str]:
    return [f"{self._prefix()}c{i}" for i in range(self.frozen_def.num_leaves)]

  def shell(self) -> Adapter:
    return Adapter({}, {}, self.method, self.shape, self.dtype, self.in_axes, self.layout, self.stack_axes)


_ADAPTED_CLASSES: dict[type, type] = {}
_SLOTS = "_spectral_peft_slots"
_ACTIVE = "_spectral_peft_active"
_DROPOUT = "adapter_dropout"


def _adapted_class(base: type) -> type:
  if base in _ADAPTED_CLASSES.values():
    return base
  if base not in _ADAPTED_CLASSES:
    namespace = {"__call__": _adapted_call, "__module__": base.__module__, "__qualname__": base.__qualname__}
    for klass in base.__mro__:
      if klass in nnx.Module.__mro__:
        continue
      for name, value in vars(klass).items():
        if not name.startswith("_") and inspect.isfunction(value) and name not in namespace:
          namespace[name] = _adapted_method(name)
    _ADAPTED_CLASSES[base] = type(base.__name__, (base,), namespace)
  return _ADAPTED_CLASSES[base]


def _adapted_method(name: str):
  """A method other than ``__call__`` (``Embed.attend``, a tied head's ``decode``) at the merged weights.

  A method whose code reads an adapted weight runs through the rebuilt path (the method evaluated
  at ``W0 + Delta W``, equal to the merged model in value and gradient); one that reads none runs
  as it is.
  """

  def method(self, *args, **kwargs):
    base = _base_class(type(self))
    fn = getattr(base, name)
    found = _found(self, _override_names(base, name))
    if not found:  # A read its code does not name (getattr with a built name) raises in _check_read.
      return fn(self, *args, **kwargs)
    return _merged(self, base, found, args, kwargs, fn=fn)

  method.__name__ = name
  return method


def _shared_readers(model: nnx.Module, owner: Any, name: str) -> list[str]:
  """Paths of other modules that hold the same weight variable as ``owner.name`` (tied weights)."""
  variable = vars(owner).get(name)
  if not isinstance(variable, nnx.Variable):
    return []
  readers = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and node is not owner:
      for attr, value in vars(node).items():
        if value is variable:
          readers.append("/".join(str(p) for p in path) + "." + attr)
  return readers


def _code_names(code: Any) -> set[str]:
  """The attribute and global names a code object and the code nested in it (lambdas, comprehensions) use."""
  names = set(code.co_names)
  for const in code.co_consts:
    if inspect.iscode(const):
      names |= _code_names(const)
  return names


def _function_names(fn: Any) -> frozenset[str]:
  """The names the code of ``fn`` uses, through decorators that wrap it (``functools.wraps``, ``jax.named_scope``)."""
  try:
    fn = inspect.unwrap(fn)
  except ValueError:  # a cycle of __wrapped__
    pass
  code = getattr(fn, "__code__", None)
  return frozenset(_code_names(code)) if code is not None else frozenset()


@functools.lru_cache(maxsize=None)
def _override_names(cls: type, name: str) -> frozenset[str]:
  """The names used by method ``name`` of ``cls`` and by every definition of it up the MRO (``super().attend(x)``)."""
  names: frozenset[str] = frozenset()
  for klass in cls.__mro__:
    value = vars(klass).get(name)
    if value is not None:
      names |= _function_names(getattr(value, "__func__", value))
  return names


@functools.lru_cache(maxsize=None)
def _method_names(cls: type) -> dict[str, frozenset[str]]:
  """``{method: names its code uses}`` for the methods a module class defines (not Flax's or this library's)."""
  out: dict[str, frozenset[str]] = {}
  for klass in cls.__mro__:
    module = getattr(klass, "__module__", "") or ""
    if klass is object or module.startswith(("flax.", "spectral_peft.")):
      continue
    for attr, value in vars(klass).items():
      fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
      if callable(fn) and attr not in out:
        out[attr] = _function_names(fn)
  return out


def _direct_readers(model: nnx.Module, path: str) -> list[str]:
  """Methods of the modules above a weight's owner whose code names both the way down to it and the weight.

  ``Model.__call__`` reading ``self.embed.embedding`` (a tied head written by hand) names ``embed`` and
  ``embedding``: such a read happens outside the owner's methods, where the adapter is not seen.
  """
  parts = path.split("/")
  node: Any = model
  readers = []
  for depth, part in enumerate(parts[:-1]):
    if isinstance(node, nnx.Module):
      for method, names in _method_names(_base_class(type(node))).items():
        if part in names and parts[-1] in names:
          where = f"the module at {'/'.join(parts[:depth])!r}" if depth else "the root module"
          readers.append(f"{type(node).__name__}.{method} of {where}")
    node = _child(node, part, path)
  return readers


_READING = threading.local()


@contextlib.contextmanager
def _marked(mark: str, module: Any) -> Iterator[None]:
  """Puts ``module`` on the thread-local stack ``mark`` while the block runs."""
  stack = getattr(_READING, mark, None)
  if stack is None:
    stack = []
    setattr(_READING, mark, stack)
  stack.append(module)
  try:
    yield
  finally:
    stack.pop()


def _reading(module: Any) -> contextlib.AbstractContextManager:
  """While the block runs, ``module`` (an adapted layer, or its rebuilt copy) may read its adapted weights."""
  return _marked("modules", module)


def _inactive(module: Any) -> contextlib.AbstractContextManager:
  """While the block runs, ``module``'s methods compute at the weights it holds, without routing adapters.

  Inside a routed call (the layer's own code at ``W0`` plus a branch, or a rebuilt copy holding ``W0 + Delta W``),
  a method the layer's code calls on itself (``self.project(x)``) must not apply the adapter a second time.
  (A thread-local mark, not an attribute: a module from outside a ``jax.jit`` trace cannot be changed inside it.)
  """
  return _marked("inactive", module)


def _holds(module: Any, variable: Any) -> bool:
  return any(value is variable for value in vars(module).values())


_FLAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(nnx.__file__)))
_LIBRARY_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAYER_DIRS = tuple(os.path.join(_FLAX_DIR, *parts) + os.sep for parts in (("nnx", "nn"), ("linen",)))
_PASS_THROUGH = (os.path.join(_FLAX_DIR, "nnx", "variablelib.py"), os.path.dirname(os.path.abspath(jax.__file__)) + os.sep,
                 os.path.dirname(os.path.abspath(np.__file__)) + os.sep)
# Attributes of a variable that say what it holds without reading it.
_DESCRIPTIVE = frozenset({"shape", "dtype", "ndim", "size", "sharding", "aval", "weak_type", "itemsize", "nbytes"})


def _is_library(filename: str) -> bool:
  """Code of flax's graph machinery or of this library: its reads of a weight are not a layer's."""
  path = os.path.abspath(filename)
  if path.startswith(_LIBRARY_DIR + os.sep):
    return True
  return path.startswith(_FLAX_DIR + os.sep) and not path.startswith(_LAYER_DIRS)


def _owner_of(variable: Any, modules: Sequence[Any]) -> Optional[tuple[Any, str, str]]:
  """``(layer, attribute, path)`` of the layer holding ``variable``, searched from the outermost of ``modules``."""
  for root in reversed(modules):
    for path, node in nnx.iter_graph(root):
      if isinstance(node, nnx.Module):
        for attr, value in vars(node).items():
          if value is variable:
            return node, attr, "/".join(str(p) for p in (*path, attr))
  return None


def _check_read(variable: Any) -> None:
  """Raises when an adapted weight is read, during a module's method, outside its own layer's methods.

  Such a read (a tied head written by hand, ``getattr(self.embed, name)``, a property of the layer that
  the runtime does not route) would see ``W0`` where the model computes with ``W0 + Delta W``. Reads by
  the layer's own (adapted) methods, by flax's graph code or this library, and outside any module's
  method (a script inspecting the weight) pass; so do reads of a weight whose adapters are inactive
  (:func:`disable_adapters`, :func:`set_adapter`).
  """
  for module in getattr(_READING, "modules", ()):
    if _holds(module, variable):
      return
  frame: Optional[types.FrameType] = sys._getframe(2)
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PASS_THROUGH):
    frame = frame.f_back
  if frame is None or _is_library(frame.f_code.co_filename):
    return
  modules = []
  outer: Optional[types.FrameType] = frame
  while outer is not None:
    candidate = outer.f_locals.get("self")
    if isinstance(candidate, nnx.Module):
      modules.append(candidate)
    outer = outer.f_back
  if not modules:
    return
  owner = _owner_of(variable, modules)
  if owner is not None and not _found(owner[0], {owner[1]}):
    return
  where = f"{owner[2]!r} ({type(owner[0]).__name__}.{owner[1]})" if owner is not None else type(variable).__name__
  reader = frame.f_locals.get("self")
  code = frame.f_code
  name = f"{type(reader).__name__}.{code.co_name}" if isinstance(reader, nnx.Module) else code.co_name
  raise ValueError(
      f"The adapted weight {where} was read by {name} "
      f"({code.co_filename}:{frame.f_lineno}), outside the methods of its layer: that read sees the weight without "
      "its adapter, and the model would silently differ from its merged form. Read it through a method of the layer "
      "(e.g. `Embed.attend` for a tied head), or inside `sp.nnx.disable_adapters(model)` for the base weight.")


_GUARDED_CLASSES: dict[type, type] = {}


def _guarded_class(base: type) -> type:
  """``base`` (a variable type) whose reads go through :func:`_check_read`: the type of an adapted weight."""
  if base in _GUARDED_CLASSES.values():
    return base
  if base not in _GUARDED_CLASSES:

    def get_value(self, **kwargs):
      _check_read(self)
      return base.get_value(self, **kwargs)

    def __getattr__(self, name):
      if not name.startswith("_") and name not in _DESCRIPTIVE and name not in object.__getattribute__(
          self, "_var_metadata"):
        _check_read(self)
      return base.__getattr__(self, name)

    _GUARDED_CLASSES[base] = type(base.__name__, (base,), {
        "get_value": get_value, "__getattr__": __getattr__, "__slots__": (), "__module__": base.__module__,
        "__qualname__": base.__qualname__})
  return _GUARDED_CLASSES[base]


def _unguarded_class(cls: type) -> type:
  return cls.__mro__[1] if cls in _GUARDED_CLASSES.values() else cls


def _sync_guards(owner: Any) -> None:
  """Gives the weights of ``owner`` that carry an adapter the guarded type, and the others their own back."""
  names = {slot.name for slot in getattr(owner, _SLOTS, ())}
  for attr, value in vars(owner).items():
    if isinstance(value, nnx.Variable) and not isinstance(value, (AdapterParam, AdapterConstant)):
      plain = _unguarded_class(type(value))
      wanted = _guarded_class(plain) if attr in names else plain
      if type(value) is not wanted:
        object.__setattr__(value, "__class__", wanted)


def _base_class(cls: type) -> type:
  return cls.__mro__[1] if cls in _ADAPTED_CLASSES.values() else cls


def _found(module: nnx.Module, names: Any = None) -> dict[str, tuple[_Slot, _runtime.LayerAdapter]]:
  """``{weight: (slot, adapter)}`` for the weights of ``module`` (``names``: those only) with an active adapter.

  Several active adapters on one weight (``set_adapter([a, b])``) travel as one :class:`WeightedSum`
  of unit weights: the weight sees ``W0 + sum_i Delta W_i``.
  """
  if any(m is module for m in getattr(_READING, "inactive", ())):
    return {}
  active = getattr(module, _ACTIVE, None)
  by_weight: dict[str, list[_Slot]] = {}
  for slot in getattr(module, _SLOTS, ()):
    if (active is None or slot.adapter in active) and (names is None or slot.name in names):
      by_weight.setdefault(slot.name, []).append(slot)
  found = {}
  for name, slots in by_weight.items():
    first = slots[0]
    if len(slots) == 1:
      found[name] = (first, _layer_adapter(module, first))
      continue
    terms = [_layer_adapter(module, slot) for slot in slots]
    method = WeightedSum(tuple(slot.method for slot in slots), (1.0,) * len(slots))
    shell = Adapter({}, {}, method, first.shape, first.dtype, first.in_axes, first.layout, first.stack_axes)
    found[name] = (first, _runtime.LayerAdapter(tuple(t.params for t in terms), tuple(t.frozen for t in terms),
                                                shell, first.path))
  return found


def _layer_adapter(module: nnx.Module, slot: _Slot) -> _runtime.LayerAdapter:
  params = jax.tree.unflatten(slot.params_def, [getattr(module, n)[...] for n in slot.param_names()])
  frozen = jax.tree.unflatten(slot.frozen_def, [getattr(module, n)[...] for n in slot.constant_names()])
  if isinstance(slot.method, AdapterBank) and _index_stack():
    frozen = {**frozen, BANK_INDEX: _index_stack()[-1]}
  return _runtime.LayerAdapter(params, frozen, slot.shell(), slot.path)


_INDEX_STATE = threading.local()


def _index_stack() -> list:
  if not hasattr(_INDEX_STATE, "stack"):
    _INDEX_STATE.stack = []
  return _INDEX_STATE.stack


@contextlib.contextmanager
def adapter_index(index: Array) -> Iterator[None]:
  """Mixed-adapter batches in NNX: inside the context, example ``b`` of every call sees adapter ``index[b]``.

  The model's :class:`~spectral_peft.peft.AdapterBank` adapters (attached from
  :func:`sp.peft.stack_adapters`) pick adapter ``index[b]`` for example ``b`` (``-1``: the base
  weight); see :class:`~spectral_peft.peft.AdapterBank` for the products. Enter the context inside
  the function you ``nnx.jit``, with ``index`` one of its arguments: a concrete index entered outside
  the trace would be compiled in as a constant.

  Args:
    index: ``(B,)`` integers in ``[-1, K)``, one per example of the batch (the leading axis of each
      adapted layer's input).

  Raises:
    ValueError: ``index`` is not a 1-D integer array.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> params = nnx.state(model, nnx.Param)
    >>> two = [sp.peft.init_adapters(jax.random.key(k), params, sp.peft.LoRA(2), "kernel") for k in (1, 2)]
    >>> _ = sp.nnx.attach(model, sp.peft.stack_adapters(two))
    >>> with sp.nnx.adapter_index(jnp.array([0, 1, -1])):
    ...   y = model(jnp.ones((3, 4)))
    >>> y.shape
    (3, 3)
  """
  index = jnp.asarray(index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"`index` must be a 1-D integer array (one entry per example), got {index.dtype} of shape "
                     f"{index.shape}.")
  stack = _index_stack()
  stack.append(index)
  try:
    yield
  finally:
    stack.pop()


def _factored_ok(module: Any, slot: _Slot, adapter: _runtime.LayerAdapter, kernel: Array, args, kwargs) -> bool:
  if type(module).__mro__[1] is not nnx.Linear or slot.name != "kernel" or len(args) != 1 or kwargs:
    return False
  if slot.layout != "in_out" or not _runtime.uses_factored_product(adapter):
    return False
  if slot.stack_axes and tuple(kernel.shape) != adapter.shell.slice_shape:
    return False
  return (module.dot_general is jax.lax.dot_general and module.precision is None
          and module.preferred_element_type is None)


def _einsum_equation(module: Any, name: str) -> Optional[str]:
  """The einsum equation a module contracts its weight ``name`` with, when it declares one.

  ``nnx.Einsum`` (weight ``kernel``) and modules in its style, such as Tunix's and Gemma's
  ``Einsum`` (one ``nnx.Param`` ``w`` of rank >= 2 and a string ``einsum_str``), contract
  ``einsum(einsum_str, x, weight)``; ``None`` for every other module.
  """
  equation = getattr(module, "einsum_str", None)
  if not isinstance(equation, str) or "->" not in equation:
    return None
  base = _base_class(type(module))
  if issubclass(base, nnx.Einsum):
    return equation.replace(" ", "") if name == "kernel" else None
  weights = [n for n, v in vars(module).items() if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)
             and np.ndim(v.get_value() if hasattr(v, "get_value") else v.value) >= 2]
  return equation.replace(" ", "") if weights == [name] else None


def _check_known_layer(owner: Any, name: str, adapter: Adapter, path: str) -> None:
  """A ``Linear``/``Conv``/``ConvTranspose`` kernel read with other input/output axes than the layer's is refused."""
  base = _base_class(type(owner))
  ndim = len(adapter.slice_shape)
  if name != "kernel" or not issubclass(base, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
    return
  expected = ((0,), (1,)) if issubclass(base, nnx.Linear) else (tuple(range(ndim - 1)), (ndim - 1,))
  mine = adapter.io_axes
  if set(mine[0]) != set(expected[0]) or set(mine[1]) != set(expected[1]):
    raise ValueError(
        f"The adapter at {path!r} reads its kernel {adapter.slice_shape} with input axes {mine[0]} and output axes "
        f"{mine[1]} (layout {adapter.layout!r}), but {base.__name__} contracts input axes {expected[0]} and writes "
        f"output axes {expected[1]}; build it with in_axes={len(expected[0])} and the default layout.")


def _einsum_in_axes(model: nnx.Module, in_axes: Any, all_linear: bool = False) -> Any:
  """``in_axes`` where the user gave none for an einsum layer's weight: the axes its equation contracts.

  With ``all_linear`` (``targets="all-linear"``), attention projection kernels get their default too.
  """
  from spectral_peft.peft._tree import _default_in_axes, _resolve_in_axes_value

  def choose(path: str, shape: tuple[int, ...]) -> Any:
    value = _resolve_in_axes_value(in_axes, path, shape)
    if value is not None:
      return value
    fallback = _default_in_axes(path, shape) if all_linear else None
    try:
      owner, name = _owner(model, path)
    except ValueError:
      return fallback
    equation = _einsum_equation(owner, name)
    if equation is None or len(shape) != len(equation.split("->")[0].split(",")[1]):
      return fallback
    ins, outs, rest = _runtime.einsum_io_axes(equation, len(shape))
    if rest or not ins or not outs:
      raise ValueError(
          f"Target {path!r}: the layer's einsum {equation!r} uses kernel axes {rest} as per-head (batch) axes, "
          f"which one (in, out) matrix cannot describe; pass `in_axes` and `stack_axes` explicitly.")
    return ins

  return choose


def _adapted_call(self, *args, **kwargs):
  with _reading(self):
    return _adapted_call_body(self, *args, **kwargs)


def _adapted_call_body(self, *args, **kwargs):
  base = _base_class(type(self))
  found = _found(self)
  quantized = _quantized_names(self)
  if not found:  # No active adapter (set_adapter, disable_adapters) or a quantized layer without one.
    return _plain_call(self, base, quantized, args, kwargs)
  factored = None
  if len(found) == 1 and "kernel" in found:
    slot, adapter = found["kernel"]
    kernel = self.kernel[...]
    adapter.for_weight(kernel)
    if _factored_ok(self, slot, adapter, kernel, args, kwargs):
      factored = adapter
  dropout = getattr(self, _DROPOUT, None)
  dropping = dropout is not None and not dropout.deterministic
  if factored is None and len(found) == 1 and not quantized and not dropping:
    # An einsum layer whose batch axis leads its input also takes a bank's per-example product.
    y = _einsum_call(self, base, *next(iter(found.values())), args, kwargs)
    if y is not None:
      return y
  if factored is None:
    for _, adapter in found.values():
      _runtime.check_bank_layer(adapter, f"({type(self).__name__})")
  if dropping:
    return _dropout_call(self, base, found, factored, dropout, args, kwargs)
  if factored is not None:
    return _factored_product(self, args[0], lambda x, k: factored.apply(x, k))
  return _merged(self, base, found, args, kwargs)


def _quantized_names(module: Any) -> list[str]:
  """Names of the module's variables holding a :class:`~spectral_peft.peft.QuantizedArray`."""
  return [name for name, value in vars(module).items()
          if isinstance(value, nnx.Variable) and is_quantized(value.get_value())]


def _plain_call(self, base, quantized, args, kwargs):
  """The layer's own call at its base weights (quantized ones dequantized inside, rebuilt for the backward pass)."""
  if not quantized:
    with _inactive(self):
      return base.__call__(self, *args, **kwargs)
  return _merged(self, base, {}, args, kwargs)


def _factored_product(self, x: Array, product, use_bias: bool = True) -> Array:
  """``product(x, kernel) + bias`` of an ``nnx.Linear`` in its promoted dtype (a quantized kernel dequantized inside)."""
  bias = self.bias[...] if self.bias is not None and use_bias else None
  bias = dequantized(bias) if is_quantized(bias) else bias
  kernel = self.kernel.get_value()
  probe = jnp.zeros((), kernel.dtype) if is_quantized(kernel) else kernel
  x, probe, bias = self.promote_dtype((x, probe, bias), dtype=self.dtype)
  if not is_quantized(kernel):
    kernel = probe
  y = _runtime.quantized_product(lambda x, k: product(x, k.astype(x.dtype)), x, kernel).astype(x.dtype)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _einsum_call(self, base, slot: _Slot, adapter: _runtime.LayerAdapter, args, kwargs):
  """``layer_{W0}(x) + einsum(eq, x, Delta W)`` with the branch factored, for einsum layers; else ``None``.

  The layer is linear in its weight, so its output at ``W0 + Delta W`` is its output at ``W0`` plus
  the contraction with ``Delta W``; :func:`_runtime.einsum_branch` computes that contraction from the
  method's factored product. ``nnx.Einsum`` is used as it is (its call is the einsum plus a bias);
  for other einsum modules the base call runs with ``jnp.einsum`` watched, and the branch is added
  where the module contracts exactly this weight (a module that does something else with it falls
  back to the rebuilt path).
  """
  if slot.stack_axes or not _runtime.uses_factored_product(adapter) or len(args) != 1:
    return None
  full = not _runtime.uses_factored_branch(adapter)
  equation = _einsum_equation(self, slot.name)
  if equation is None:
    return None
  variable = getattr(self, slot.name)
  kernel = variable.get_value() if hasattr(variable, "get_value") else variable.value
  x = args[0]
  where = f"{base.__name__} {equation!r}"
  if issubclass(base, nnx.Einsum):
    if kwargs.get("einsum_str") not in (None, equation) or set(kwargs) - {"einsum_str", "out_sharding"}:
      _runtime.report_fallback(slot.path, where, "called with another equation or extra arguments")
      return None
    bias = self.bias[...] if self.bias is not None else None
    x_p, kernel_p, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    branch = _runtime.einsum_branch(adapter, equation, x_p, kernel_p, full=full)
    if branch is None:
      _runtime.report_fallback(slot.path, where, "no single (in, out) matrix describes its kernel")
      return None
    if not full:
      with _inactive(self):
        y = base.__call__(self, x, **kwargs)
      return y + branch.astype(y.dtype)
    return _runtime.einsum_with_bias(branch, equation, x_p, kernel_p, bias)
  with _watch_einsum(kernel, adapter, full) as seen, _inactive(self):
    y = base.__call__(self, *args, **kwargs)
  if seen["count"] > 0 and not seen["unsupported"]:
    return y
  _runtime.report_fallback(slot.path, where, "its call does not contract the weight with jnp.einsum(x, weight)")
  return None


_WATCH = threading.local()
_ORIGINAL_EINSUM = jnp.einsum


def _watching_einsum(subscripts, *operands, **kwargs):
  """``jnp.einsum`` that adds an adapter's branch where a watched weight is the second operand.

  For a method whose lean product is a merged one (``full``), the whole contraction goes through
  that product instead of the plain einsum.
  """
  frames = getattr(_WATCH, "frames", None)
  if not frames or not isinstance(subscripts, str) or len(operands) != 2:
    return _ORIGINAL_EINSUM(subscripts, *operands, **kwargs)
  frame = frames[-1]
  if operands[1] is not frame["kernel"]:
    if operands[0] is frame["kernel"]:
      frame["unsupported"] = True
    return _ORIGINAL_EINSUM(subscripts, *operands, **kwargs)
  full = frame["full"]
  branch = _runtime.einsum_branch(frame["adapter"], subscripts.replace(" ", ""), operands[0], operands[1], full=full)
  if branch is None:
    frame["unsupported"] = True
    return _ORIGINAL_EINSUM(subscripts, *operands, **kwargs)
  frame["count"] += 1
  if full:
    return branch.astype(kwargs.get("preferred_element_type") or jnp.result_type(*operands))
  y = _ORIGINAL_EINSUM(subscripts, *operands, **kwargs)
  return y + branch.astype(y.dtype)


@contextlib.contextmanager
def _watch_einsum(kernel: Array, adapter: _runtime.LayerAdapter, full: bool = False):
  frames = getattr(_WATCH, "frames", None)
  if frames is None:
    frames = _WATCH.frames = []
  frame = {"kernel": kernel, "adapter": adapter, "full": full, "count": 0, "unsupported": False}
  frames.append(frame)
  with _EINSUM_LOCK:
    _EINSUM_USERS[0] += 1
    jnp.einsum = _watching_einsum
  try:
    yield frame
  finally:
    frames.pop()
    with _EINSUM_LOCK:
      _EINSUM_USERS[0] -= 1
      if _EINSUM_USERS[0] == 0:
        jnp.einsum = _ORIGINAL_EINSUM


_EINSUM_LOCK = threading.Lock()
_EINSUM_USERS = [0]


def _dropout_call(self, base, found, factored, dropout, args, kwargs):
  """``layer_{W0}(x) + branch(dropout(x))`` (see :func:`sp.peft.apply_adapters`'s ``adapter_dropout``)."""
  if len(args) != 1 or kwargs:
    raise ValueError(
        f"Adapter dropout needs each adapted layer to be called with one input array; a {base.__name__} "
        f"was called with {len(args)} positional and {len(kwargs)} keyword arguments.")
  x_dropped = dropout(args[0])
  quantized = _quantized_names(self)
  y = _plain_call(self, base, quantized, args, {})
  if factored is not None:
    branch = _factored_product(self, x_dropped, lambda x, k: factored.branch(x, k), use_bias=False)
    return y + branch.astype(y.dtype)
  return y + (_merged(self, base, found, (x_dropped,), {}) - _plain_call(self, base, quantized, (x_dropped,), {}))


def _merged(self, base, found, args, kwargs, fn=None):
  """The layer's own call (or ``fn``) at its merged weights, rebuilt per layer (:func:`_runtime.merged_call`)."""
  fn = base.__call__ if fn is None else fn
  for _, adapter in found.values():
    _runtime.check_bank_layer(adapter, f"({base.__name__}, {fn.__name__})")
  graphdef, state = nnx.split(self)
  weights: dict[str, Any] = {}
  for name, (slot, adapter) in found.items():
    w0 = getattr(self, name).get_value()
    weights[name] = (adapter.for_weight(w0), w0)
  for name in _quantized_names(self):
    weights.setdefault(name, (None, getattr(self, name).get_value()))
  arrays, rebuild = _runtime.split_call_arguments(args, kwargs)

  def call(merged, operands):
    arrays, module_state = operands
    call_args, call_kwargs = rebuild(arrays)
    module = nnx.merge(graphdef, module_state)
    for name, value in merged.items():
      getattr(module, name).set_value(value)
    with _reading(module), _inactive(module):
      return fn(module, *call_args, **call_kwargs)

  operands = (arrays, state)
  return _runtime.merged_call(weights, call, operands)


def _child(node: Any, part: str, path: str) -> Any:
  """``node``'s attribute or item ``part``, one step down ``path``."""
  if hasattr(node, part):
    return getattr(node, part)
  try:
    return node[int(part)] if part.lstrip("-").isdigit() else node[part]
  except (KeyError, IndexError, TypeError):
    raise ValueError(f"Cannot find the module owning {path!r}: no attribute or item {part!r}.") from None


def _owner(model: nnx.Module, path: str) -> tuple[Any, str]:
  node: Any = model
  parts = path.split("/")
  for part in parts[:-1]:
    node = _child(node, part, path)
  return node, parts[-1]


def base_params(model: nnx.Module) -> nnx.State:
  """The model's ``nnx.Param`` state without adapter arrays (the weights adapters attach to)."""
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam)))


def _check_name(adapter_name: Any) -> str:
  if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", adapter_name):
    raise ValueError(f"`adapter_name` must be a str of letters, digits and '_' starting with a letter (it names the "
                     f"adapter's variables), got {adapter_name!r}.")
  return adapter_name


def attach(model: nnx.Module, adapters: Adapters, *, adapter_name: str = DEFAULT) -> nnx.Module:
  """Adds the given adapters (``{path: Adapter}`` for the model's ``nnx.Param`` state) in place.

  Several named adapters may sit on one weight (PEFT's ``add_adapter``); the first adapter a model
  gets is active, later names are inactive until :func:`set_adapter` (as in PEFT).

  Args:
    model: an ``nnx.Module`` graph (e.g. a pretrained model).
    adapters: from :func:`sp.peft.init_adapters` on ``nnx.state(model, nnx.Param)``,
      :func:`sp.peft.load_adapters` or :func:`adapters_of` of a model with the same structure.
    adapter_name: the adapter's name (letters, digits, ``_``); ``"default"`` keeps the variable
      names ``<weight>_adapter_p<i>``, another name gives ``<weight>_adapter_<name>_p<i>``.

  Returns:
    ``model`` (modified in place): each weight's owning module gains :class:`AdapterParam` /
    :class:`AdapterConstant` variables and applies the adapter in its call.

  Raises:
    ValueError: a path does not name a weight of the model, the weight has another shape, the
      weight already has an adapter of that name (merge, delete or detach it first), or a bad name.
  """
  _check_name(adapter_name)
  model_active = _model_active(model)
  available = leaf_paths(base_params(model))
  owners: dict[str, tuple[Any, str]] = {}
  for path, adapter in adapters.items():  # Every check before the first change: all or nothing.
    if not isinstance(adapter, Adapter):
      raise TypeError(f"`adapters[{path!r}]` must be an sp.peft.Adapter, got {type(adapter).__name__}.")
    if path not in available:
      raise ValueError(f"The adapter at {path!r} has no weight in the model's nnx.Param state; some paths: "
                       f"{list(available)[:8]}.")
    if tuple(np.shape(available[path])) != adapter.shape:
      raise ValueError(f"The adapter at {path!r} was made for shape {adapter.shape}, the model's weight there has "
                       f"shape {tuple(np.shape(available[path]))}.")
    owner, name = _owner(model, path)
    slots = getattr(owner, _SLOTS, ())
    if any(slot.name == name and slot.adapter == adapter_name for slot in slots) or any(
        o is owner and n == name for o, n in owners.values()):
      named = "an adapter" if adapter_name == DEFAULT else f"an adapter named {adapter_name!r}"
      raise ValueError(f"The weight {path!r} already has {named}; merge_adapters, delete_adapter or detach it first, "
                       "or attach under another `adapter_name`.")
    equation = _einsum_equation(owner, name)
    if equation is not None:
      _runtime.check_einsum_layout(adapter, equation, path)
    _check_known_layer(owner, name, adapter, path)
    readers = _shared_readers(model, owner, name)
    if readers:
      raise ValueError(
          f"The weight {path!r} is shared with {readers}: those modules would read it without its adapter. Adapt "
          "the weight where it is owned and let the other modules call the owner (e.g. `Embed.attend`), or untie it.")
    readers = _direct_readers(model, path)
    if readers:
      raise ValueError(
          f"The weight {path!r} is read by {'; '.join(readers)}, outside the methods of its layer "
          f"({type(owner).__name__}): such a read would see it without its adapter. Read it through a method of the "
          f"layer (e.g. `Embed.attend` for a tied head), or adapt another weight.")
    owners[path] = (owner, name)
  for path, adapter in adapters.items():
    owner, name = owners[path]
    slots = getattr(owner, _SLOTS, ())
    p_leaves, p_def = jax.tree.flatten(adapter.params)
    c_leaves, c_def = jax.tree.flatten(adapter.frozen)
    slot = _Slot(name, path, adapter.method, adapter.shape, adapter.dtype, adapter.in_axes, adapter.layout,
                 adapter.stack_axes, p_def, c_def, adapter_name)
    for var_name, leaf in zip(slot.param_names(), p_leaves):
      setattr(owner, var_name, AdapterParam(jnp.asarray(leaf)))
    for var_name, leaf in zip(slot.constant_names(), c_leaves):
      setattr(owner, var_name, AdapterConstant(jnp.asarray(leaf)))
    setattr(owner, _SLOTS, slots + (slot,))
    if not hasattr(owner, _ACTIVE):
      setattr(owner, _ACTIVE, model_active if model_active is not None else (adapter_name,))
    owner.__class__ = _adapted_class(type(owner))
    _sync_guards(owner)
  return model


def _model_active(model: nnx.Module) -> tuple[str, ...] | None:
  """The active adapter names (kept equal on every adapted layer), or ``None`` for a model without adapters."""
  for owner in _adapted_owners(model):
    return getattr(owner, _ACTIVE, None)
  return None


def adapter_names(model: nnx.Module) -> list[str]:
  """The names of the model's adapters, in the order they were first attached."""
  return list(dict.fromkeys(slot.adapter for owner in _adapted_owners(model) for slot in getattr(owner, _SLOTS)))


def active_adapters(model: nnx.Module) -> list[str]:
  """The names of the adapters the model applies (:func:`set_adapter`); ``[]`` inside :func:`disable_adapters`."""
  return list(_model_active(model) or ())


def _check_known(model: nnx.Module, names: Sequence[str]) -> None:
  known = adapter_names(model)
  missing = [n for n in names if n not in known]
  if missing:
    raise ValueError(f"The model has no adapter named {missing}; its adapters: {known}.")


def set_adapter(model: nnx.Module, adapter_name: str | Sequence[str]) -> nnx.Module:
  """Makes ``adapter_name`` (one name, or several applied together, summed) the model's active adapters.

  PEFT's ``set_adapter``; a list is PEFT's ``set_adapter([a, b])`` (each weight sees
  ``W0 + sum_i Delta W_i``). Under ``nnx.jit`` a change of active adapters retraces (it is part of
  the graph).

  Raises:
    ValueError: a name the model does not have.
  """
  names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
  _check_known(model, names)
  for owner in _adapted_owners(model):
    setattr(owner, _ACTIVE, names)
  return model


@contextlib.contextmanager
def disable_adapters(model: nnx.Module) -> Iterator[nnx.Module]:
  """Context in which the model runs its base weights (PEFT's ``with model.disable_adapter():``).

  The adapters stay attached (and trainable state is untouched); the active adapters are restored
  on exit, also after an error.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> _ = sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
    >>> with sp.nnx.disable_adapters(model):
    ...   y = model(jnp.ones((1, 4)))
    >>> sp.nnx.active_adapters(model)
    ['default']
  """
  saved = [(owner, getattr(owner, _ACTIVE, None)) for owner in _adapted_owners(model)]
  for owner, _ in saved:
    setattr(owner, _ACTIVE, ())
  try:
    yield model
  finally:
    for owner, active in saved:
      if active is None:
        if hasattr(owner, _ACTIVE):
          delattr(owner, _ACTIVE)
      elif len(getattr(owner, _SLOTS, ())) > 0:
        setattr(owner, _ACTIVE, active)


def delete_adapter(model: nnx.Module, adapter_name: str) -> Adapters:
  """Removes the adapter ``adapter_name`` from every weight (weights unchanged) and returns it.

  Raises:
    ValueError: the model has no adapter of that name.
  """
  _check_known(model, [adapter_name])
  removed = adapters_of(model, adapter_name)
  for owner in list(_adapted_owners(model)):
    slots = getattr(owner, _SLOTS)
    keep = tuple(slot for slot in slots if slot.adapter != adapter_name)
    if not keep:
      _detach(owner)
      continue
    for slot in slots:
      if slot.adapter == adapter_name:
        for var_name in slot.param_names() + slot.constant_names():
          delattr(owner, var_name)
    setattr(owner, _SLOTS, keep)
    _sync_guards(owner)
    setattr(owner, _ACTIVE, tuple(n for n in getattr(owner, _ACTIVE, ()) if n != adapter_name))
  return removed


def add_weighted_adapter(model: nnx.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         *, combination_type: str = "linear") -> nnx.Module:
  """Adds ``adapter_name``: a weighted combination of the model's named ``adapters`` (PEFT's ``add_weighted_adapter``).

  Args:
    model: a model holding the named adapters.
    adapters: names of existing adapters.
    weights: one finite weight per name.
    adapter_name: the new adapter's name (inactive until :func:`set_adapter`, as in PEFT).
    combination_type: ``"linear"``: ``Delta W = sum_i w_i Delta W_i`` exactly, for every method
      (a :class:`sp.peft.WeightedSum`); ``"cat"``: LoRA adapters only, concatenated into one LoRA
      of rank ``sum_i r_i`` (:func:`sp.peft.concatenate_lora`), the same update, factored.

  Returns:
    ``model``, in place.

  Raises:
    ValueError: an unknown name or combination type, a taken ``adapter_name``, mismatched weights.
  """
  names = [adapters] if isinstance(adapters, str) else list(adapters)
  _check_known(model, names)
  _check_name(adapter_name)
  if adapter_name in adapter_names(model):
    raise ValueError(f"The model already has an adapter named {adapter_name!r}; delete_adapter it or pick another name.")
  combined = combine_adapters([adapters_of(model, name) for name in names], weights, combination_type)
  return attach(model, combined, adapter_name=adapter_name)


def adapt(model: nnx.Module, method: Any, targets: Any, *, key: Array, in_axes: Any = None,
          layout: Any = "in_out", stack_axes: Any = 0, adapter_name: str = DEFAULT) -> nnx.Module:
  """Adds adapters of ``method`` to the target weights of an existing NNX model, in place.

  The NNX counterpart of :func:`sp.peft.init_adapters` + :func:`sp.peft.apply_adapters`:
  the same targets, keys and initial values, so ``adapters_of(model)`` equals
  ``init_adapters(key, nnx.state(model, nnx.Param), method, targets, ...)``.

  Args:
    model: an ``nnx.Module``.
    method, targets, in_axes, layout, stack_axes: as in :func:`sp.peft.init_adapters` (paths are
      those of ``nnx.state(model, nnx.Param)``, e.g. ``"layers/0/attn/query/kernel"``; weights stacked
      by ``nnx.vmap``/``nnx.scan`` need ``stack_axes=1``).
    key: a ``jax.random`` key.
    adapter_name: the adapter's name (:func:`attach`; PEFT's ``add_adapter(name, config)``).

  Returns:
    ``model``, with :class:`AdapterParam` / :class:`AdapterConstant` variables next to each target.
    Train with ``nnx.Optimizer(model, tx, wrt=sp.nnx.AdapterParam)``.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> _ = sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
    >>> sorted(sp.nnx.adapters_of(model))
    ['kernel']
  """
  params = base_params(model)
  if layout == "in_out":
    in_axes = _einsum_in_axes(model, in_axes, all_linear=isinstance(targets, str) and targets == "all-linear")
  adapters = init_adapters(key, params, method, targets, in_axes=in_axes, layout=layout,
                           stack_axes=stack_axes)
  return attach(model, adapters, adapter_name=adapter_name)


def _adapted_owners(model: nnx.Module):
  """The model's modules that hold adapters; refuses adapter variables that no adapter of theirs uses."""
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    slots = getattr(node, _SLOTS, ())
    _check_no_inert_variables(node, slots, path)
    if len(slots) > 0:
      yield node


# The names adapter variables take (``_Slot.param_names`` / ``constant_names``): a raw array under such a
# name is what ``nnx.update`` with a pure-dict state (``state.to_pure_dict()``) leaves on a plain module.
_ADAPTER_NAME = re.compile(r".+_adapter_(?:.+_)?[pc]\d+")


def _check_no_inert_variables(node: nnx.Module, slots: Sequence[_Slot], path: Any) -> None:
  """Adapter variables on a module that does not apply them: what ``nnx.update`` / ``nnx.merge`` give
  when an adapted model's state goes into a model that was not adapted (flax adds unknown variables
  as plain attributes, which the plain layer never reads)."""
  used = {n for slot in slots for n in slot.param_names() + slot.constant_names()}
  inert = sorted(name for name, value in vars(node).items()
                 if name not in used and (isinstance(value, (AdapterParam, AdapterConstant))
                                          or (_ADAPTER_NAME.fullmatch(name) and hasattr(value, "shape"))))
  if inert:
    where = "/".join(str(p) for p in path) or "<the model itself>"
    raise ValueError(
        f"The module at {where!r} ({type(node).__name__}) holds adapter variables that no adapter of it uses: "
        f"{inert}. This is what nnx.update / nnx.merge give when the state of an adapted model goes into a model "
        "(or layer) that was not adapted: the variables are added as inert attributes and the layer computes "
        "without them. Adapt the model first (sp.nnx.adapt with the same method and targets, or sp.nnx.attach / "
        "sp.nnx.load_into with sp.nnx.adapters_of(adapted_model)), then nnx.update it; or remove the variables.")


def adapters_of(model: nnx.Module, adapter_name: str | None = None) -> Adapters:
  """The model's adapters as the functional ``{path: Adapter}`` dict (for save, export, merge).

  Args:
    model: an ``nnx.Module``.
    adapter_name: which named adapter; ``None``: the model's only adapter name, or else its one
      active adapter.

  Raises:
    ValueError: an unknown name, or ``None`` on a model with several names and not exactly one active.
  """
  names = adapter_names(model)
  if adapter_name is None:
    active = active_adapters(model)
    if len(names) <= 1:
      adapter_name = names[0] if names else DEFAULT
    elif len(active) == 1:
      adapter_name = active[0]
    else:
      raise ValueError(f"The model holds the adapters {names} ({active} active): pass `adapter_name=`.")
  elif names:
    _check_known(model, [adapter_name])
  out: Adapters = {}
  for owner in _adapted_owners(model):
    for slot in getattr(owner, _SLOTS):
      if slot.adapter != adapter_name:
        continue
      params = jax.tree.unflatten(slot.params_def, [getattr(owner, n)[...] for n in slot.param_names()])
      frozen = jax.tree.unflatten(slot.frozen_def, [np.asarray(getattr(owner, n)[...]) for n in slot.constant_names()])
      out[slot.path] = Adapter(params, frozen, slot.method, slot.shape, slot.dtype, slot.in_axes, slot.layout,
                               slot.stack_axes)
  return out


def _detach(owner: nnx.Module) -> None:
  for slot in getattr(owner, _SLOTS):
    for var_name in slot.param_names() + slot.constant_names():
      delattr(owner, var_name)
  delattr(owner, _SLOTS)
  _sync_guards(owner)
  if hasattr(owner, _ACTIVE):
    delattr(owner, _ACTIVE)
  if hasattr(owner, _DROPOUT):
    delattr(owner, _DROPOUT)
  if not _quantized_names(owner):  # A quantized layer keeps the class that dequantizes its weights.
    owner.__class__ = _base_class(type(owner))


def quantize(model: nnx.Module, targets: Any = None, *, bits: int = 4, group_size: Optional[int] = None,
             weights: Optional[Mapping[str, Any]] = None) -> nnx.Module:
  """Stores the target weights of ``model`` as :class:`~spectral_peft.peft.QuantizedArray`, in place (a QLoRA base).

  Each quantized layer dequantizes its own weight inside its call (rebuilt in the backward pass,
  never kept between them); adapters (any method, attached before or after) train on top, and
  gradients reach the adapters only. :func:`merge_adapters` then needs ``quantized=``.

  Args:
    model: an ``nnx.Module``.
    targets: regex over the ``nnx.Param`` paths, ``(path, leaf) -> bool``, or ``None``: every
      floating weight with 2 or more axes (``group_size`` dividing its first axis).
    bits: 8 or 4.
    group_size: entries of the first (input) axis per scale; ``None``: per output channel.
    weights: instead of quantizing, ``{path: quantized weight}`` to install: ours
      (:class:`~spectral_peft.peft.QuantizedArray`) or qwix's (a ``QArray``, or the ``WithAux`` its
      PTQ provider stores), e.g. the base of a qwix QLoRA model; ``targets``, ``bits`` and
      ``group_size`` are then unused.

  Returns:
    ``model``.

  Raises:
    ValueError: no target, a target that cannot be quantized (naming it), or a ``weights`` entry
      that is not a quantized weight of the shape of the model's weight at its path.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> _ = sp.nnx.quantize(model, bits=4)
    >>> _ = sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
    >>> model(jnp.ones((2, 8))).shape
    (2, 4)
  """
  params = base_params(model)
  planned = []
  if weights is not None:
    available = leaf_paths(params)
    for path, value in weights.items():
      if _qwix_with_aux(value):
        value = jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, value.array,
                             is_leaf=lambda v: isinstance(v, nnx.Variable))
      if not is_quantized(value) or path not in available or tuple(value.shape) != tuple(np.shape(available[path])):
        raise ValueError(f"`weights[{path!r}]` must be a quantized weight of the shape of the model's weight there "
                         f"({tuple(np.shape(available[path])) if path in available else 'no such weight'}), got "
                         f"{type(value).__name__} of shape {getattr(value, 'shape', None)}; the model is unchanged.")
      planned.append((path, value))
  else:
    for path, leaf in select_quantized(params, targets, group_size).items():
      try:
        planned.append((path, quantize_array(leaf, bits, group_size)))
      except ValueError as err:
        raise ValueError(f"Cannot quantize {path!r}: {err}; the model is unchanged.") from None
  for path, value in planned:
    owner, name = _owner(model, path)
    getattr(owner, name).set_value(value)
    owner.__class__ = _adapted_class(type(owner))
  return model


def _qwix_with_aux(value: Any) -> bool:
  return type(value).__name__ == "WithAux" and type(value).__module__.startswith("qwix.")


def merge_adapters(model: nnx.Module, *, check_finite: bool = True, quantized: str = "refuse") -> nnx.Module:
  """Folds the active adapters into their weights (``W0 + Delta W``) and removes every adapter, in place.

  PEFT's ``merge_and_unload`` (also available under that name): with several named adapters, the
  active ones (:func:`set_adapter`) are merged, summed, and the inactive ones are discarded.

  Args:
    model: a model with adapters (from :func:`adapt` / :func:`attach`).
    check_finite: refuse (``ValueError`` naming the path) a merged weight with NaN or infinity.
    quantized: for adapters on quantized weights (:func:`quantize`): ``"refuse"`` (a ``ValueError``:
      the update would be rounded away), ``"dequantize"`` (the weight becomes the floating
      ``W0 + Delta W``) or ``"requantize"`` (quantized again with its bits and groups).

  Returns:
    ``model`` with plain weights and its original layer classes: no inference overhead.
  """
  plans = []
  for owner in list(_adapted_owners(model)):  # Every merged weight first: all or nothing.
    merged: dict[str, Any] = {}
    for slot, adapter in _found(owner).values():
      base_value = getattr(owner, slot.name).get_value()
      if is_quantized(base_value):
        if quantized not in ("dequantize", "requantize"):
          raise ValueError(
              f"The weight at {slot.path!r} is quantized ({describe(base_value)}): merging would round the update away. "
              "Pass quantized='dequantize' (a floating weight) or 'requantize'; nothing was merged.")
        if quantized == "requantize" and not isinstance(base_value, QuantizedArray):
          raise ValueError(f"quantized='requantize' re-quantizes sp.peft.QuantizedArray weights; {slot.path!r} is "
                           f"{describe(base_value)}: merge with 'dequantize' and quantize with qwix again.")
      value = adapter.merge(dequantized(base_value))
      if check_finite and not bool(jnp.all(jnp.isfinite(value))):
        raise ValueError(f"Merging the adapter at {slot.path!r} gives non-finite weights; nothing was merged "
                         "(the model keeps every adapter).")
      if quantized == "requantize" and isinstance(base_value, QuantizedArray):
        merged[slot.name] = quantize_array(value, base_value.bits, base_value.group_size)
      else:
        merged[slot.name] = value
    plans.append((owner, merged))
  for owner, merged in plans:
    for name, value in merged.items():
      getattr(owner, name).set_value(value)
    _detach(owner)
  return model


def detach_adapters(model: nnx.Module) -> Any:
  """Removes every adapter (weights unchanged) and returns them.

  Returns:
    ``{path: Adapter}`` for a model with one adapter name; ``{name: {path: Adapter}}`` for a model
    with several named adapters.
  """
  names = adapter_names(model)
  named = {name: adapters_of(model, name) for name in names}
  for owner in list(_adapted_owners(model)):
    _detach(owner)
  if len(names) > 1:
    return named
  return named[names[0]] if names else {}


def load_into(model: nnx.Module, adapters: Adapters, *, adapter_name: str = DEFAULT) -> nnx.Module:
  """Replaces the model's adapter ``adapter_name`` by ``adapters``, all or nothing: e.g. after :func:`sp.peft.load_adapters`.

  Everything is checked before the model changes: ``adapters`` is a ``{path: Adapter}`` dict and
  every path names a weight of the model's ``nnx.Param`` state with the shape the adapter was made
  for. Only then is the model's adapter of that name removed (with the adapter dropout of layers
  left without adapters) and ``adapters`` attached under the name; should attaching still fail, the
  previous adapter is put back before the error propagates, so a mistyped path never costs the
  model its trained adapters. Other named adapters and the active names are kept.

  Args:
    model: an ``nnx.Module``, with or without adapters.
    adapters: ``{path: Adapter}`` for the model's ``nnx.Param`` paths (e.g. ``"layers/0/query/kernel"``).
    adapter_name: the name to load into (:func:`attach`).

  Returns:
    ``model``, in place, holding ``adapters`` under ``adapter_name``.

  Raises:
    TypeError: ``adapters`` is not a ``{path: Adapter}`` dict (the model is unchanged).
    ValueError: a path is not a weight of the model or the weight has another shape (the model is
      unchanged; the message lists every such path).
  """
  _check_name(adapter_name)
  if not isinstance(adapters, Mapping) or not all(isinstance(a, Adapter) for a in adapters.values()):
    raise TypeError(f"`adapters` must be a {{path: Adapter}} dict (sp.peft.load_adapters, sp.nnx.adapters_of), got "
                    f"{type(adapters).__name__}; the model is unchanged.")
  available = leaf_paths(base_params(model))
  problems = []
  for path, adapter in adapters.items():
    if path not in available:
      problems.append(f"{path!r} is not a weight of the model")
    elif tuple(np.shape(available[path])) != tuple(adapter.shape):
      problems.append(f"{path!r} was made for shape {tuple(adapter.shape)}, the weight has {tuple(np.shape(available[path]))}")
  if problems:
    raise ValueError(f"Cannot load the adapters into the model, which is unchanged: {'; '.join(problems)}. Some weights "
                     f"of the model (nnx.Param paths): {list(available)[:8]}.")
  dropouts = [(owner, getattr(owner, _DROPOUT)) for owner in _adapted_owners(model) if hasattr(owner, _DROPOUT)]
  active = _model_active(model)
  previous = delete_adapter(model, adapter_name) if adapter_name in adapter_names(model) else None
  try:
    attach(model, adapters, adapter_name=adapter_name)
  except BaseException:
    if adapter_name in adapter_names(model):
      delete_adapter(model, adapter_name)
    if previous:
      attach(model, previous, adapter_name=adapter_name)
    for owner, dropout in dropouts:
      setattr(owner, _DROPOUT, dropout)
    raise
  finally:
    if active is not None:
      for owner in _adapted_owners(model):
        setattr(owner, _ACTIVE, active)
  return model


def set_adapter_dropout(model: nnx.Module, rate: float, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Adapter dropout (PEFT's ``lora_dropout``) on every adapted layer of ``model``, in place.

  Each adapted layer gains an ``nnx.Dropout`` submodule ``adapter_dropout`` and computes
  ``layer_{W0}(x) + x_d @ Delta W``, with ``x_d`` its input with entries zeroed at ``rate`` (the rest
  scaled by ``1 / (1 - rate)``): only the adapter's branch sees the dropped input, as in
  :func:`sp.peft.apply_adapters` with ``adapter_dropout=``. ``model.eval()`` turns it off and
  ``model.train()`` on again (``nnx.Dropout``'s ``deterministic``); the masks come from the
  ``dropout`` stream of ``rngs`` (a new mask at every call, also under ``nnx.jit``).

  Args:
    model: a model with adapters (:func:`adapt` / :func:`attach`).
    rate: in ``[0, 1)``; ``0`` removes the dropout modules.
    rngs: an ``nnx.Rngs`` with a ``dropout`` (or default) stream; needed when ``rate > 0``.

  Returns:
    ``model``.

  Raises:
    ValueError: ``rate`` outside ``[0, 1)``, no ``rngs`` for a positive rate, no adapted layer, or an
      adapter on a stacked weight (``stack_axes > 0``: its layer runs on the whole stack).

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> _ = sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
    >>> _ = sp.nnx.set_adapter_dropout(model, 0.1, rngs=nnx.Rngs(dropout=2))
    >>> model(jnp.ones((2, 4))).shape
    (2, 3)
  """
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
    raise ValueError(f"`rate` must be a float in [0, 1), got {rate!r}.")
  owners = list(_adapted_owners(model))
  if not owners:
    raise ValueError("The model has no adapters: add them with sp.nnx.adapt or sp.nnx.attach first.")
  if rate and rngs is None:
    raise ValueError(f"`rate={rate}` needs `rngs=` (an nnx.Rngs with a 'dropout' stream).")
  stacked = [slot.path for owner in owners for slot in getattr(owner, _SLOTS) if slot.stack_axes]
  if rate and stacked:
    raise ValueError(f"Adapter dropout is not available for stacked weights (stack_axes > 0): {stacked}.")
  for owner in owners:
    if hasattr(owner, _DROPOUT):
      delattr(owner, _DROPOUT)
    if rate:
      setattr(owner, _DROPOUT, nnx.Dropout(float(rate), rngs=rngs))
  return model


#: PEFT's name for :func:`merge_adapters`.
merge_and_unload = merge_adapters
