"""The adapter runtime for Flax Linen: adapters applied inside the layers that own their weights.

:func:`apply_adapters` (and the :func:`adapted` context) runs ``model.apply`` on the *unmerged* base
parameters. Each adapter travels into the model next to its weight, in the ``params`` collection
under the reserved name ``"<weight>@adapter"``, so lifted transforms (``nn.scan``, ``nn.vmap``,
``nn.remat``) slice and carry it exactly like the weight (a kernel stacked ``(layers, ...)`` by
``nn.scan`` needs an adapter made with ``stack_axes=1``: one adapter per layer). A method
interceptor then finds, at every module call, the adapters of that module's own weights and routes
the call through :mod:`spectral_peft.peft._runtime`:

* ``Dense`` / ``DenseGeneral`` (exact types, trailing ``axis``, no ``batch_dims``, default
  ``dot_general`` and ``precision``) with a low-rank method: the method's factored product;
* anything else (``Conv``, ``ConvTranspose``, ``Einsum``, ``DenseGeneral(axis=0)`` or with
  ``batch_dims``, subclasses, keyword inputs, custom layers, any method): the layer's own code at
  the merged weight, rebuilt per layer under ``jax.checkpoint``.

After the call every adapter must have been consumed; otherwise the call raises and names the
adapter and the layer (never a silent fall-back to the base model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft.peft._runtime import core as _runtime
from spectral_peft.peft._methods.bank import AdapterBank
from spectral_peft.peft._methods.base import Adapter
from spectral_peft.peft._quant import dequantized, is_quantized

Array = jax.Array

SUFFIX = "@adapter"

_state = threading.local()


def _frames() -> list:
  if not hasattr(_state, "frames"):
    _state.frames = []
  return _state.frames


class _Frame:
  """Bookkeeping of one adapted call: consumed adapter paths, modules seen, modules running."""

  def __init__(self, adapters, by_path: bool, dropout: float = 0.0, dropout_key: Any = None):
    self.adapters = adapters
    self.by_path = by_path
    self.dropout = dropout
    self.dropout_key = dropout_key if dropout else None
    self.paths = set(adapters)
    self.consumed: set[str] = set()
    self.seen: dict[str, str] = {}
    self.running: set[int] = set()
    self.dropout_calls: dict[str, int] = {}


def _check_adapters(adapters: Any) -> None:
  if not isinstance(adapters, Mapping) or not all(isinstance(a, Adapter) for a in adapters.values()):
    raise TypeError(
        "`adapters` must be the {path: Adapter} dict of sp.peft.init_adapters (or load_adapters), got "
        f"{type(adapters).__name__}" + ("" if not isinstance(adapters, Mapping) else " with non-Adapter values") + ".")


def inject(params: Any, adapters: Mapping[str, Adapter], dropout_key: Array | None = None,
           adapter_index: Array | None = None) -> dict:
  """``params`` with every adapter placed next to its weight as ``"<name>@adapter"``.

  Args:
    params: the Linen ``params`` collection (nested dicts), unmerged.
    adapters: ``{path: Adapter}``; paths relative to ``params``, with or without a leading ``params/``.
    dropout_key: the key of adapter dropout, if any (each adapter gets its own, folded with its path).
    adapter_index: the per-example choice of the :class:`~spectral_peft.peft.AdapterBank` adapters.

  Returns:
    A copy of ``params`` (only the dicts along adapter paths are copied) holding the adapters.

  Raises:
    ValueError: an adapter path has no weight in ``params``, or a weight of another shape.
  """
  _check_adapters(adapters)
  root = dict(params)
  for path, adapter in adapters.items():
    parts = path.split("/")
    if parts[0] == "params" and "params" not in root:
      parts = parts[1:]
    node, chain = root, []
    for part in parts[:-1]:
      child = node.get(part) if isinstance(node, Mapping) else None
      if not isinstance(child, Mapping):
        raise ValueError(f"The adapter at {path!r} has no weight in `params`: there is no module {part!r} along its path.")
      child = dict(child)
      node[part] = child
      chain.append(child)
      node = child
    name = parts[-1]
    if name not in node:
      raise ValueError(
          f"The adapter at {path!r} has no weight in `params`: the module has {sorted(node)}, not {name!r}.")
    if tuple(np.shape(node[name])) != adapter.shape:
      raise ValueError(
          f"The adapter at {path!r} was made for shape {adapter.shape}, but `params` has shape "
          f"{tuple(np.shape(node[name]))} there.")
    node[name + SUFFIX] = _runtime.LayerAdapter.from_adapter(path, adapter, dropout_key, adapter_index)
  return root


def _module_adapters(module: nn.Module, frame: _Frame) -> dict[str, _runtime.LayerAdapter]:
  if module.scope is None:
    return {}
  try:
    own = module.scope.variables().get("params", {})
  except Exception:  # A scope that cannot be read (e.g. during init) holds no adapter.
    return {}
  found = {k[: -len(SUFFIX)]: v for k, v in own.items()
           if isinstance(k, str) and k.endswith(SUFFIX) and isinstance(v, _runtime.LayerAdapter)}
  if frame.by_path and not found:
    prefix = "/".join(module.path)
    for name in own:
      full = f"{prefix}/{name}" if prefix else name  # The root module's weights have no prefix.
      for path in (full, f"params/{full}"):
        if path in frame.adapters:
          found[name] = _runtime.LayerAdapter.from_adapter(path, frame.adapters[path], frame.dropout_key)
  return found


def _contracted_axes(module: nn.Module, ndim: int) -> int | None:
  """Trailing input axes a plain ``Dense``/``DenseGeneral`` contracts, or None if not a plain contraction."""
  kind = type(module)
  if kind is nn.Dense:
    return 1
  if kind is nn.DenseGeneral and not module.batch_dims:
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axis = sorted(a % ndim for a in axis)
    if axis == list(range(ndim - len(axis), ndim)):
      return len(axis)
  return None


def _factored_ok(module: nn.Module, adapter: _runtime.LayerAdapter, kernel: Array) -> bool:
  if not _runtime.uses_factored_product(adapter) or adapter.shell.layout != "in_out":
    return False
  if adapter.shell.stack_axes and tuple(kernel.shape) != adapter.shell.slice_shape:
    return False
  if type(module) not in (nn.Dense, nn.DenseGeneral):
    return False
  return (module.dot_general is None and module.dot_general_cls is None and module.precision is None)


def _input(args, kwargs):
  if len(args) == 1 and not kwargs:
    return args[0]
  if not args and set(kwargs) == {"inputs"}:
    return kwargs["inputs"]
  return None


def _factored_call(module: Any, adapter: _runtime.LayerAdapter, x: Array, product=None, use_bias: bool = True) -> Array:
  """``product(x, kernel) + bias`` (default: the adapter's factored product) in the layer's promoted dtype.

  A quantized kernel is dequantized inside the product (:func:`_runtime.quantized_product`).
  """
  product = product or (lambda x, k: adapter.apply(x, k))
  variables = module.scope.variables()["params"]
  kernel = variables["kernel"]
  bias = variables.get("bias") if module.use_bias and use_bias else None
  bias = dequantized(bias) if is_quantized(bias) else bias  # A quantized (heads, head_dim) bias of DenseGeneral.
  probe = jnp.zeros((), kernel.dtype) if is_quantized(kernel) else kernel
  x, probe, bias = module.promote_dtype(x, probe, bias, dtype=module.dtype)
  kernel = kernel if is_quantized(kernel) else probe
  y = _runtime.quantized_product(lambda x, k: product(x, k.astype(x.dtype)), x, kernel).astype(x.dtype)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def _layer_io_axes(module: nn.Module, name: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """The (input, output) kernel axes of a layer whose contraction is known; None for other layers."""
  if name != "kernel":
    return None
  kind = type(module)
  if kind is nn.Dense:
    return (0,), (1,)
  if kind is nn.DenseGeneral and not module.batch_dims:
    count = len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
    return tuple(range(count)), tuple(range(count, ndim))
  if kind in (nn.Conv, nn.ConvTranspose):
    return tuple(range(ndim - 1)), (ndim - 1,)
  if kind is nn.Einsum and isinstance(module.einsum_str, str):
    ins, outs, rest = _runtime.einsum_io_axes(module.einsum_str.replace(" ", ""), ndim)
    return (ins, outs) if not rest else None
  return None


def _check_layer_in_axes(module: nn.Module, name: str, adapter: _runtime.LayerAdapter) -> None:
  """For layers whose contraction is known, the adapter must read the kernel with the same axes.

  Raises:
    ValueError: naming the adapter, the layer and the axes it contracts (a ``layout="out_in"`` on a
      Flax ``Dense`` kernel, a wrong ``in_axes`` on a Conv or an einsum, ...).
  """
  shell = adapter.shell
  expected = _layer_io_axes(module, name, len(shell.slice_shape))
  if expected is None:
    return  # Unknown contraction: the merged path is exact whatever the reading.
  mine = shell.io_axes
  if set(mine[0]) == set(expected[0]) and set(mine[1]) == set(expected[1]):
    return
  hint = (f"in_axes={len(expected[0])}" if expected[0] == tuple(range(len(expected[0]))) else f"in_axes={expected[0]}")
  raise ValueError(
      f"The adapter at {adapter.path!r} reads its kernel {shell.slice_shape} with input axes {mine[0]} and output "
      f"axes {mine[1]} (layout {shell.layout!r}), but the layer {'/'.join(module.path)!r} ({type(module).__name__}) "
      f"contracts input axes {expected[0]} and writes output axes {expected[1]}; build it with {hint} and the "
      "default layout.")


def _own_variables(module: Any) -> dict:
  """A copy of the layer's variables without the injected adapters (``params`` copied one level)."""
  variables = {col: dict(vals) for col, vals in module.scope.variables().items()}
  params = variables.get("params", {})
  for key in [k for k in params if isinstance(k, str) and k.endswith(SUFFIX)]:
    params.pop(key)
  return variables


def _merged_call(module: Any, method_name: str, found, args, kwargs):
  variables = _own_variables(module)
  params = variables.get("params", {})
  weights: dict[str, Any] = {}
  for name, adapter in found.items():
    weights[name] = (adapter.for_weight(params[name]), params.pop(name))
  for name in [k for k, v in params.items() if is_quantized(v)]:
    weights[name] = (None, params.pop(name))
  clone = module.clone(parent=None)
  method = getattr(type(clone), method_name)
  arrays, rebuild = _runtime.split_call_arguments(args, kwargs)

  def call(merged, operands):
    arrays, other = operands
    call_args, call_kwargs = rebuild(arrays)
    new_vars = {col: dict(vals) for col, vals in other.items()}
    new_vars.setdefault("params", {}).update(merged)
    return clone.apply(new_vars, *call_args, method=method, **call_kwargs)

  operands = (arrays, variables)
  return _runtime.merged_call(weights, call, operands)


def _check_not_baked(found, args, kwargs) -> None:
  """Refuses context adapters that a ``jit`` trace would keep as constants (stale after the context).

  Inside ``with sp.peft.factored(adapters):``, a function traced by ``jit`` whose inputs are traced
  but whose adapters are concrete would bake those adapters into its compiled cache: calling it
  again after the context, or with other adapters, would silently apply the old ones.
  """
  inputs_traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
  if not inputs_traced:
    return
  for adapter in found.values():
    leaves = jax.tree.leaves(adapter.params)
    if leaves and not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
      raise ValueError(
          f"The adapter at {adapter.path!r} comes from a `factored(...)` context entered outside this jit trace: "
          "jit would keep it as a constant and apply it again after the context ends. Enter the context inside "
          "the jitted function with the adapters as its argument, or use sp.peft.apply_adapters(model, params, "
          "adapters, ...) there.")


def _interceptor(next_fun, args, kwargs, context):
  frames = _frames()
  if not frames:
    return next_fun(*args, **kwargs)
  frame = frames[-1]
  module = context.module
  if context.method_name in ("setup",) or id(module) in frame.running:
    return next_fun(*args, **kwargs)
  found = _module_adapters(module, frame)
  if found and frame.by_path:
    _check_not_baked(found, args, kwargs)
  owner = "/".join(module.path)
  frame.seen.setdefault(owner, type(module).__name__)
  if not found:
    if _quantized(module):  # The layer's own code, its quantized weights dequantized inside.
      return _merged_call(module, context.method_name, {}, args, kwargs)
    return next_fun(*args, **kwargs)
  frame.consumed.update(a.path for a in found.values())
  frame.running.add(id(module))
  try:
    for name, adapter in found.items():
      _check_layer_in_axes(module, name, adapter)
    x = _input(args, kwargs)
    factored = _factored_kernel(module, context.method_name, found, x)
    einsum = (factored is None and not frame.dropout and _einsum_ok(module, context.method_name, found, x, kwargs)
              and not _quantized(module))
    if factored is None and not einsum:  # An einsum layer may take a bank's per-example product (below).
      for adapter in found.values():
        _runtime.check_bank_layer(adapter, f"{owner!r} ({type(module).__name__}, called as {context.method_name!r})")
    if frame.dropout:
      found = _fresh_dropout_keys(found, frame, module)
      return _dropout_call(module, context.method_name, found, factored, next_fun, x, args, kwargs, frame.dropout)
    if factored is not None:
      return _factored_call(module, found["kernel"], x)
    if einsum:
      own = module.scope.variables()["params"]
      xp, kp, bp = module.promote_dtype(x, own["kernel"], own.get("bias") if module.use_bias else None,
                                        dtype=module.dtype)
      equation = module.einsum_str.replace(" ", "")
      full = not _runtime.uses_factored_branch(found["kernel"])
      branch = _runtime.einsum_branch(found["kernel"], equation, xp, kp, full=full)
      if branch is not None and full:
        return _runtime.einsum_with_bias(branch, equation, xp, kp, bp)
      if branch is not None:
        y = next_fun(*args, **kwargs)
        return y + branch.astype(y.dtype)
      _runtime.report_fallback(found["kernel"].path, f"Einsum {module.einsum_str!r}",
                               "no single (in, out) matrix describes its kernel")
      _runtime.check_bank_layer(found["kernel"], f"{owner!r} (Einsum {module.einsum_str!r})")
    return _merged_call(module, context.method_name, found, args, kwargs)
  finally:
    frame.running.discard(id(module))


def _einsum_ok(module: Any, method_name: str, found, x, kwargs) -> bool:
  """Whether an ``nn.Einsum`` call can add the factored branch to its own output (linear in the kernel)."""
  if type(module) is not nn.Einsum or set(found) != {"kernel"} or x is None or method_name != "__call__":
    return False
  adapter = found["kernel"]
  if adapter.shell.stack_axes or not _runtime.uses_factored_product(adapter) or not isinstance(module.einsum_str, str):
    return False
  return kwargs.get("einsum_str") in (None, module.einsum_str)


def _quantized(module: Any) -> bool:
  """Whether the module's own ``params`` hold a :class:`~spectral_peft.peft.QuantizedArray`."""
  try:
    own = module.scope.variables().get("params", {})
  except Exception:  # A scope that cannot be read holds nothing of ours.
    return False
  return any(is_quantized(v) for v in own.values())


def _factored_kernel(module: Any, method_name: str, found, x) -> Array | None:
  """The kernel, where the layer's call is the method's factored product; else None."""
  if set(found) != {"kernel"} or x is None or method_name != "__call__":
    return None
  adapter = found["kernel"]
  kernel = module.scope.variables()["params"]["kernel"]
  adapter.for_weight(kernel)
  if _contracted_axes(module, jnp.ndim(x)) == adapter.shell.in_axes and _factored_ok(module, adapter, kernel):
    return kernel
  return None


DROPOUT_RNG = "adapter_dropout"
"""The Linen rng stream :func:`apply_adapters` provides for adapter dropout (see its ``adapter_dropout``)."""


def _fresh_dropout_keys(found, frame: _Frame, module: Any):
  """Each call of a layer in one model call draws its own mask (PEFT draws a new one per forward).

  Where the call's module has the :data:`DROPOUT_RNG` stream, every call folds in a draw of it
  (``module.make_rng``): distinct per call, and per step of an ``nn.scan`` that splits the stream.
  Otherwise the first call of a layer uses its key as it is and the ``k``-th further call folds in
  ``k`` (a count kept while tracing: the same for every step of a scan).
  """
  step = None
  if module.scope is not None and module.has_rng(DROPOUT_RNG):
    step = jax.random.bits(module.make_rng(DROPOUT_RNG), (), jnp.uint32)
  out = {}
  for name, adapter in found.items():
    count = frame.dropout_calls.get(adapter.path, 0)
    frame.dropout_calls[adapter.path] = count + 1
    if adapter.dropout_key is not None and jnp.ndim(adapter.dropout_key) == 0:
      if step is not None:
        adapter = dataclasses.replace(adapter, dropout_key=jax.random.fold_in(adapter.dropout_key, step))
      elif count:
        adapter = dataclasses.replace(adapter, dropout_key=jax.random.fold_in(adapter.dropout_key, count))
    out[name] = adapter
  return out


def _dropout_call(module: Any, method_name: str, found, kernel, next_fun, x, args, kwargs, rate: float):
  """``layer_W0(x) + branch(dropout(x))``: PEFT's adapter dropout, only the adapter's branch sees it.

  On the factored path the branch is the method's own (``method.branch``); elsewhere it is
  ``layer_{W0 + Delta W}(x_d) - layer_{W0}(x_d)``, exact for layers affine in their weights (every
  Flax kernel layer: the bias cancels).
  """
  if x is None:
    raise ValueError(
        f"Adapter dropout needs each adapted layer to be called with one input array; the layer "
        f"{'/'.join(module.path)!r} ({type(module).__name__}) was called as {method_name!r} with "
        f"{len(args)} positional and {len(kwargs)} keyword arguments.")
  adapter = found[sorted(found)[0]]
  x_dropped = adapter.dropped(x, rate)
  quantized = _quantized(module)
  base = _merged_call(module, method_name, {}, args, kwargs) if quantized else next_fun(*args, **kwargs)
  if kernel is not None:
    branch = _factored_call(module, found["kernel"], x_dropped, lambda x, k: found["kernel"].branch(x, k), use_bias=False)
    return base + branch.astype(base.dtype)
  adapted = _merged_call(module, method_name, found, (x_dropped,), {})
  plain = _merged_call(module, method_name, {}, (x_dropped,), {}) if quantized else _base_call(
      module, method_name, (x_dropped,), {})
  return base + (adapted - plain)


def _base_call(module: Any, method_name: str, args, kwargs):
  """The layer's method at its own (unadapted) weights, as a separate call of a detached clone."""
  clone = module.clone(parent=None)
  return clone.apply(_own_variables(module), *args, method=getattr(type(clone), method_name), **kwargs)


def _check_dropout(adapter_dropout: Any, dropout_key: Any) -> float:
  if not isinstance(adapter_dropout, (int, float)) \
      or isinstance(adapter_dropout, bool):
    raise TypeError(f"`adapter_dropout` must be a Python float in [0, 1), got {adapter_dropout!r}.")
  rate = float(adapter_dropout)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"`adapter_dropout` must be in [0, 1), got {rate}.")
  if rate and dropout_key is None:
    raise ValueError(f"`adapter_dropout={rate}` needs `dropout_key=` (a jax.random key, a new one each step).")
  if dropout_key is not None and not (isinstance(dropout_key, jax.Array) and jnp.issubdtype(dropout_key.dtype, jax.dtypes.prng_key)
                                      and dropout_key.shape == ()):
    raise TypeError(f"`dropout_key` must be one typed key from jax.random.key, got {getattr(dropout_key, 'dtype', type(dropout_key))} "
                    f"of shape {getattr(dropout_key, 'shape', None)}.")
  return rate


@contextlib.contextmanager
def adapted(adapters: Mapping[str, Adapter], *, adapter_dropout: float = 0.0,
            dropout_key: Array | None = None) -> Iterator[None]:
  """Context in which Linen modules apply ``adapters`` to their own weights, found by path.

  Call ``model.apply`` with the *base* (unmerged) parameters inside the context; each module whose
  weight path (its module path plus the weight name, with or without a leading ``params/``) has an
  adapter runs through the adapter runtime (see :func:`apply_adapters`). On leaving the context
  without an error, every adapter must have been applied, or ``ValueError`` names the ones that were
  not. Lifted transforms that stack weights (``nn.scan``) need :func:`apply_adapters`, which carries
  the adapters in the ``params`` collection so they are sliced with the weights. With dropout, pass
  ``rngs={"adapter_dropout": dropout_key}`` to ``model.apply`` for the masks :func:`apply_adapters`
  draws (and a new mask per step of a scan that splits that stream).

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
  rate = _check_dropout(adapter_dropout, dropout_key)
  with _frame(adapters, by_path=True, dropout=rate, dropout_key=dropout_key) as frame:
    yield
  _raise_unused(frame)


@contextlib.contextmanager
def _frame(adapters: Mapping[str, Adapter], by_path: bool, dropout: float = 0.0,
           dropout_key: Array | None = None) -> Iterator[_Frame]:
  _check_adapters(adapters)
  frames = _frames()
  frame = _Frame(adapters, by_path, dropout, dropout_key)
  frames.append(frame)
  _install_variables_view()
  try:
    with nn.intercept_methods(_interceptor):
      yield frame
  finally:
    frames.pop()
    _remove_variables_view()


# -- raw reads of an adapted weight through `Module.variables` (a tied head reading the embedding) -------
_FLAX_VARIABLES = nn.Module.variables
_VIEW_LOCK = threading.Lock()
_VIEW_USERS = [0]


def _variables_seen_merged(self: nn.Module) -> Any:
  """``Module.variables`` inside an adapted call: every adapted weight read as ``W0 + Delta W``.

  A module that reads a weight it does not own (a tied LM head reading the embedding of another
  module through ``self.variables``) would otherwise get the base weight. The merge of each adapted
  leaf is computed where it is read (under ``jit`` XLA drops the merges of leaves never used), and the
  adapters' own entries are hidden. The owner's adapted call itself is left to the runtime.
  """
  variables = _FLAX_VARIABLES.fget(self)  # type: ignore[attr-defined]
  frames = _frames()
  if not frames or self.scope is None or id(self) in frames[-1].running:
    return variables
  frame = frames[-1]
  return {col: (_merged_view(tree, tuple(self.path), frame) if col == "params" else tree)
          for col, tree in variables.items()}


def _merged_view(tree: Any, path: tuple[str, ...], frame: _Frame) -> Any:
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if isinstance(key, str) and key.endswith(SUFFIX):
      continue
    adapter = tree.get(f"{key}{SUFFIX}") if isinstance(key, str) else None
    if not isinstance(adapter, _runtime.LayerAdapter) and frame.by_path:
      full = "/".join((*path, str(key)))
      found = frame.adapters.get(full, frame.adapters.get(f"params/{full}"))
      if found is not None and not isinstance(value, Mapping):
        adapter = _runtime.LayerAdapter.from_adapter(full, found, frame.dropout_key)
    if isinstance(adapter, _runtime.LayerAdapter) and not isinstance(value, Mapping):
      out[key] = adapter.merge(dequantized(value))
    else:
      out[key] = _merged_view(value, (*path, str(key)), frame)
  return out


def _install_variables_view() -> None:
  with _VIEW_LOCK:
    _VIEW_USERS[0] += 1
    if _VIEW_USERS[0] == 1:
      nn.Module.variables = property(_variables_seen_merged)  # type: ignore[assignment, method-assign]


def _remove_variables_view() -> None:
  with _VIEW_LOCK:
    _VIEW_USERS[0] -= 1
    if _VIEW_USERS[0] == 0:
      nn.Module.variables = _FLAX_VARIABLES  # type: ignore[method-assign]


def _raise_unused(frame: _Frame) -> None:
  unused = sorted(frame.paths - frame.consumed)
  if unused:
    raise _runtime.unused_adapters_error(unused, frame.seen)


def _check_index(adapters: Mapping[str, Adapter], adapter_index: Any) -> None:
  _check_adapters(adapters)
  banks = [p for p, a in adapters.items() if isinstance(a.method, AdapterBank)]
  if adapter_index is None:
    if banks:
      raise ValueError(f"The adapters at {banks[:4]} are AdapterBanks (mixed-adapter batches): pass `adapter_index=` "
                       "(one integer per example).")
    return
  if not banks:
    raise ValueError("`adapter_index` picks an adapter of each AdapterBank per example, but no adapter is a bank: "
                     "build one with sp.peft.stack_adapters([...]).")
  index = jnp.asarray(adapter_index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"`adapter_index` must be a 1-D integer array (one entry per example), got {index.dtype} of "
                     f"shape {index.shape}.")


def apply_adapters(model: nn.Module, params: Any, adapters: Mapping[str, Adapter], *args: Any,
                   variables: Mapping[str, Any] | None = None, adapter_dropout: float = 0.0,
                   dropout_key: Array | None = None, adapter_index: Array | None = None, **kwargs: Any) -> Any:
  """``model.apply`` on the unmerged ``params`` with every adapter applied inside its own layer.

  Equal in value and gradient (with respect to the adapters and the inputs) to
  ``model.apply({"params": merge(params, adapters)}, *args, **kwargs)``, at the training memory of
  the factored methods: no merged copy of the model is ever alive (see
  :mod:`spectral_peft.peft._runtime`). Works for every kernel-using Linen layer, under ``jit``,
  ``grad``, ``vmap`` and inside ``nn.scan`` / ``nn.vmap`` / ``nn.remat``.

  Args:
    model: a Linen module.
    params: the base ``params`` collection (unmerged).
    adapters: ``{path: Adapter}`` from :func:`sp.peft.init_adapters` on ``params`` (paths with or
      without a leading ``params/``). Kernels stacked by ``nn.scan`` need ``stack_axes=1``.
    *args: passed to ``model.apply``.
    variables: other collections (``batch_stats``, ``cache``...), passed with ``params``.
    adapter_dropout: PEFT's ``lora_dropout`` for every method: each adapted layer computes
      ``layer_{W0}(x) + x_d @ Delta W`` with ``x_d`` its input with entries zeroed at this rate (and
      the rest scaled by ``1 / (1 - rate)``); only the adapter's branch sees the dropped input. ``0``
      (the default) for evaluation. Costs one extra product with ``W0`` per layer on the merged
      path (and for DoRA), none for LoRA and the sparse methods on the factored path.
    dropout_key: a ``jax.random.key``, needed when ``adapter_dropout > 0`` (a new one each step);
      every layer (and every slice of a stacked weight) draws its own mask from it, and so does
      every call of a layer (through the ``"adapter_dropout"`` rng stream: this key, passed to
      ``model.apply`` unless ``rngs=`` already has that stream). A layer called at every step of
      an ``nn.scan`` (an RNN cell) draws a new mask per step when the scan splits that stream, as
      ``nn.Dropout`` needs ``"dropout"``:
      ``nn.scan(..., split_rngs={"params": False, "adapter_dropout": True})``; a scan that does not
      split it gives every step the same mask (Linen's rule for every stream).
    adapter_index: for a mixed-adapter batch: ``(B,)`` integers, one per example of the batch, that
      pick the adapter of every :class:`~spectral_peft.peft.AdapterBank` in ``adapters`` (made by
      :func:`sp.peft.stack_adapters`): example ``b`` sees ``W0 + Delta W_{adapter_index[b]}``, and
      ``-1`` the base. Each adapted layer's input must have the batch on its leading axis.
    **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``, ``mutable=``...).

  Returns:
    What ``model.apply`` returns.

  Raises:
    TypeError: ``adapters`` is not a ``{path: Adapter}`` dict.
    ValueError: an adapter's path has no weight of its shape in ``params``; an adapter was not used
      during the call (the message names it and the layer); an adapter's ``in_axes`` disagrees with
      the contraction of a layer whose contraction is known; ``adapter_dropout`` outside ``[0, 1)``
      or without a key; dropout on a layer not called with one input array.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, spectral_peft as sp
    >>> model = nn.Conv(8, (3, 3))
    >>> x = jnp.ones((2, 5, 5, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> adapters = sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel", in_axes=3)
    >>> sp.peft.apply_adapters(model, params, adapters, x).shape
    (2, 5, 5, 8)
  """
  rate = _check_dropout(adapter_dropout, dropout_key)
  _check_index(adapters, adapter_index)
  injected = inject(params, adapters, dropout_key if rate else None, adapter_index)
  all_variables = {**dict(variables or {}), "params": injected}
  if rate:
    rngs = kwargs.get("rngs") or {}
    if not isinstance(rngs, Mapping):
      raise TypeError(f"`rngs` must be a dict of named keys (Linen's apply), got {type(rngs).__name__}.")
    if DROPOUT_RNG not in rngs:  # A stream the caller gave is kept.
      kwargs["rngs"] = {**rngs, DROPOUT_RNG: dropout_key}
  with _frame(adapters, by_path=False, dropout=rate) as frame:
    out = model.apply(all_variables, *args, **kwargs)
  _raise_unused(frame)
  return out
