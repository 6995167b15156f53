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

from spectral_peft import _validation
from spectral_peft.peft._methods.base import Adapter, AdapterMethod, matrix_shape, normalize_layout
from spectral_peft.peft._quant import QuantizedArray, describe, dequantized, is_quantized, quantize_array

Array = jax.Array
PyTree = Any
Adapters = dict[str, Adapter]
Target = Union[str, "re.Pattern[str]", Sequence[str], Callable[[str, Any], bool]]
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
  """``{path: leaf}`` for every array leaf of ``params``, in tree order.

  Raises:
    ValueError: two leaves have the same path (a key containing ``'/'``, such as ``{"a/b": x}``
      next to ``{"a": {"b": y}}``): an adapter for that path would silently apply to both.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  out: dict[str, Any] = {}
  for p, leaf in flat:
    name = path_to_str(p)
    if name in out:
      raise ValueError(
          f"Two parameters have the same path {name!r} (a key contains '/', e.g. {{'a/b': ...}} next to "
          f"{{'a': {{'b': ...}}}}): adapters address weights by '/'-joined paths, so rename the key "
          f"({jax.tree_util.keystr(p)})."
      )
    out[name] = leaf
  return out


def _compile(name: str, pattern: Any) -> "re.Pattern[str]":
  """``re.compile(pattern)``, or a ``ValueError`` naming the argument ``name``."""
  try:
    return re.compile(pattern)
  except re.error as err:
    raise ValueError(f"`{name}` must be a valid regular expression, got {getattr(pattern, 'pattern', pattern)!r} ({err}).") from None
  except TypeError:
    raise TypeError(f"`{name}` must be a regular expression string, got {pattern!r} of type {type(pattern).__name__}.") from None


def _as_bool(name: str, value: Any, path: str) -> bool:
  """A predicate's answer as a ``bool``: a Python/NumPy bool or a concrete 0-d boolean array."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.bool_) and _validation.is_concrete(value):
    return bool(value)
  raise TypeError(
      f"`{name}` predicate must return a bool for each (path, leaf); for {path!r} it returned "
      f"{type(value).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}"
      f"{'' if dtype is None else f' and dtype {dtype}'} (reduce it, e.g. with bool(jnp.any(...)))."
  )


def _available_paths(paths: Mapping[str, Any], limit: int = 12) -> str:
  shown = [f"{p} {tuple(np.shape(v))}" for p, v in list(paths.items())[:limit]]
  more = len(paths) - len(shown)
  return "; ".join(shown) + (f"; ... ({more} more)" if more > 0 else "")


# Module names of output heads, which "all-linear" leaves out as PEFT does (PEFT drops the model's
# output embedding, ``lm_head`` in HF causal LMs, and the sequence-classification heads ``score`` and
# ``classifier``).
_HEAD_NAMES = frozenset({"lm_head", "head", "output_head", "classifier", "score", "logits", "unembed"})
# Flax attention projections (``nn.MultiHeadDotProductAttention``'s ``DenseGeneral`` kernels).
_ATTENTION_PROJECTIONS = {"query": 1, "key": 1, "value": 1, "out": 2}



def _module_name(path: str) -> str:
  parts = path.split("/")
  return parts[-2] if len(parts) >= 2 else ""


def _is_linear_projection(path: str, leaf: Any) -> bool:
  name, module = path.rsplit("/", 1)[-1], _module_name(path)
  if module in _HEAD_NAMES or np.ndim(leaf) < 2:
    return False
  if name == "kernel":
    return np.ndim(leaf) == 2 or module in _ATTENTION_PROJECTIONS
  return name == "w"


def _default_in_axes(path: str, shape: tuple[int, ...]) -> Any:
  """``in_axes`` of a Flax attention projection kernel (``"all-linear"`` with ``in_axes=None``)."""
  if path.rsplit("/", 1)[-1] == "kernel" and _module_name(path) in _ATTENTION_PROJECTIONS and len(shape) == 3:
    return _ATTENTION_PROJECTIONS[_module_name(path)]
  return None


def select_paths(params: PyTree, targets: Target) -> list[str]:
  """Paths of the leaves chosen by ``targets``.

  Args:
    params: any pytree of arrays.
    targets: a regular expression searched (``re.search``) in each ``'/'``-joined path; a
      predicate ``(path, leaf) -> bool``; a list of module names as PEFT's ``target_modules``
      (``["query", "value"]``: leaves with at least 2 axes whose module path, the path without its
      last step, is or ends with ``/<name>``; dots in a name stand for ``'/'``; biases and other
      vectors never match); or ``"all-linear"``, PEFT's choice: every linear and einsum projection
      except the output head (table below).

  Returns:
    The matching paths, in tree order.

  ``targets="all-linear"``, side by side with PEFT's ``target_modules="all-linear"``:

  =============================  =========================================  ==================================
  weight                         PEFT (torch modules)                       spectral_peft (parameter paths)
  =============================  =========================================  ==================================
  dense / MLP projections        every ``nn.Linear`` and GPT-2 ``Conv1D``   every 2-D leaf named ``kernel``
  attention projections          ``q_proj``/``k_proj``/... (``nn.Linear``)  Flax ``query``/``key``/``value``/
                                                                            ``out`` kernels (``DenseGeneral``,
                                                                            ``in_axes`` 1 or 2 by default) and
                                                                            einsum weights ``w`` (Gemma/Tunix)
  output head                    left out (the output embedding, and        left out: modules named ``lm_head``,
                                 ``score``/``classifier`` heads)            ``head``, ``output_head``,
                                                                            ``classifier``, ``score``, ``logits``,
                                                                            ``unembed``
  embeddings, norms, convs       left out                                   left out (convolution kernels are
                                                                            not 2-D, or not named as above)
  =============================  =========================================  ==================================

  Raises:
    ValueError: if nothing matches (the message lists some available paths), or ``targets`` is not
      a valid regular expression.
    TypeError: ``targets`` is neither a string nor a predicate, or the predicate returns something
      other than a bool.

  Example:
    >>> import jax.numpy as jnp, spectral_peft as sp
    >>> params = {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "key": {"kernel": jnp.ones((4, 4))}}
    >>> sp.peft.select_paths(params, ["query"])
    ['query/kernel']
  """
  paths = leaf_paths(params)
  if isinstance(targets, str) and targets == "all-linear":
    chosen = [p for p, leaf in paths.items() if _is_linear_projection(p, leaf)]
    described = "'all-linear' (linear and einsum projections, output head excluded)"
  elif isinstance(targets, (list, tuple)):
    names = [str(t).replace(".", "/") for t in targets]
    if not names or not all(isinstance(t, str) and t for t in targets):
      raise TypeError(f"`targets` as a list must hold non-empty module names (str), got {targets!r}.")

    def named(path: str) -> bool:
      module = path.rsplit("/", 1)[0] if "/" in path else ""
      return any(module == n or module.endswith("/" + n) for n in names)

    chosen = [p for p, leaf in paths.items() if np.ndim(leaf) >= 2 and named(p)]
    described = f"module names {list(targets)}"
  elif isinstance(targets, (str, re.Pattern)):
    pattern = _compile("targets", targets)
    chosen = [p for p in paths if pattern.search(p)]
    described = f"pattern {pattern.pattern!r}"
  elif callable(targets) and not isinstance(targets, type):
    chosen = [p for p, leaf in paths.items() if _as_bool("targets", targets(p, leaf), p)]
    described = "predicate"
  else:
    raise TypeError(
        f"`targets` must be a regex string, a list of module names, 'all-linear' or a predicate (path, leaf) -> bool, "
        f"got {type(targets).__name__}."
    )
  if not chosen:
    raise ValueError(f"`targets` {described} matched no parameter. Available paths: {_available_paths(paths)}.")
  return chosen


def _resolve_method(method: MethodChoice, path: str, shape: tuple[int, ...]) -> AdapterMethod:
  if isinstance(method, type):
    raise TypeError(
        f"`method` must be an adapter spec instance such as {method.__name__}(...) (e.g. sp.peft.LoRA(rank=8)), "
        f"got the class {method.__name__} itself."
    )
  chosen: Any
  if isinstance(method, AdapterMethod):
    chosen = method
  elif isinstance(method, Mapping):
    chosen = next((m for pattern, m in method.items() if _compile("method", pattern).search(path)), None)
    if chosen is None:
      raise ValueError(f"`method` mapping has no pattern matching target {path!r}; patterns: {list(method)}.")
  elif callable(method):
    chosen = method(path, shape)
  else:
    chosen = method
  if isinstance(chosen, type) and issubclass(chosen, AdapterMethod):
    raise TypeError(f"`method` gave the class {chosen.__name__} for {path!r}; pass an instance such as {chosen.__name__}(...).")
  if not isinstance(chosen, AdapterMethod):
    raise TypeError(
        f"`method` must be an adapter spec such as sp.peft.LoRA(rank=8), a {{regex: spec}} mapping or "
        f"a callable (path, shape) -> spec; for {path!r} it gave {type(chosen).__name__}."
    )
  return chosen


def _resolve_axes(in_axes: InAxes, layout: Any, path: str, shape: tuple[int, ...]) -> tuple[int, Any]:
  """``(in_axes count, layout)`` of one target slice from the user's ``in_axes`` and ``layout`` choices.

  An ``in_axes`` tuple names the input axes explicitly (the rest, in order, are outputs); a
  ``layout`` pair names both. Either gives the explicit layout ``(input_axes, output_axes)``.
  """
  value = _resolve_in_axes_value(in_axes, path, shape)
  explicit_layout = not isinstance(layout, str)
  if isinstance(value, tuple):
    ndim = len(shape)
    ins = tuple(int(a) + ndim if int(a) < 0 else int(a) for a in value)
    outs = tuple(a for a in range(ndim) if a not in ins)
    pair = normalize_layout((ins, outs), shape, len(ins))
    if explicit_layout and normalize_layout(layout, shape, len(layout[0])) != pair:
      raise ValueError(f"For target {path!r}, `in_axes={value!r}` and `layout={layout!r}` disagree.")
    if not explicit_layout and layout != "in_out":
      raise ValueError(f"For target {path!r}, `in_axes` as explicit axes {value!r} needs the default layout, got "
                       f"`layout={layout!r}`.")
    return len(ins), pair
  if explicit_layout:
    try:
      count = len(layout[0])
    except TypeError:
      raise ValueError(f"`layout` for target {path!r} must be 'in_out', 'out_in' or an (input_axes, output_axes) "
                       f"pair, got {layout!r}.") from None
    if value is not None and value != count:
      raise ValueError(f"For target {path!r}, `in_axes={value}` disagrees with `layout={layout!r}` ({count} input axes).")
    return count, normalize_layout(layout, shape, count)
  return _check_in_axes_count(value, path, shape), normalize_layout(layout, shape, 1)


def _resolve_in_axes(in_axes: InAxes, path: str, shape: tuple[int, ...]) -> int:
  """The number of leading input axes of a target (``in_axes`` as a count)."""
  value = _resolve_in_axes_value(in_axes, path, shape)
  if isinstance(value, tuple):
    raise ValueError(f"`in_axes` for target {path!r} must be a count here, got the explicit axes {value!r}.")
  return _check_in_axes_count(value, path, shape)


def _resolve_in_axes_value(in_axes: InAxes, path: str, shape: tuple[int, ...]) -> Any:
  value: Any
  if in_axes is None:
    value = None
  elif isinstance(in_axes, (int, tuple, list)) and not isinstance(in_axes, bool):
    value = in_axes
  elif isinstance(in_axes, Mapping):
    value = next((v for pattern, v in in_axes.items() if _compile("in_axes", pattern).search(path)), None)
  elif callable(in_axes):
    value = in_axes(path, shape)
  else:
    raise TypeError(f"`in_axes` must be None, an int, a tuple of input axes, a {{regex: int | tuple}} mapping or a "
                    f"callable, got {in_axes!r}.")
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, tuple):
    ndim = len(shape)
    if (not value or len(value) >= ndim or len(set(value)) != len(value)
        or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and -ndim <= a < ndim for a in value)):
      raise ValueError(f"`in_axes` for target {path!r} of shape {shape}: explicit input axes must be distinct axis "
                       f"positions in [{-ndim}, {ndim - 1}], at least one and fewer than {ndim}; got {value!r}.")
  return value


def _check_in_axes_count(value: Any, path: str, shape: tuple[int, ...]) -> int:
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
    layout: Union[str, Mapping[str, str]] = "in_out",
    stack_axes: Union[int, Mapping[str, int]] = 0,
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
    in_axes: reshape rule for weights with more than 2 axes (see the module docstring): an int
      (that many leading input axes), a tuple of axis positions (the input axes at any position,
      the other axes outputs: ``(1,)`` for Gemma's ``q_einsum`` kernel ``(heads, embed, head_dim)``),
      ``{regex: int | tuple}``, or ``(path, shape) -> int | tuple | None``. Positions count within
      one slice (after ``stack_axes``).
    layout: ``"in_out"`` (Flax kernels, the default) or ``"out_in"`` for weights stored
      ``(out_features, in_features)`` (PyTorch ``Linear`` / GPT-2 ``Conv1D`` style; PEFT's
      ``fan_in_fan_out``), an explicit ``(input_axes, output_axes)`` pair, or ``{regex: layout}``. The method always sees ``(in, out)``, so DoRA's
      magnitude and the sine gain use the right axis.
    stack_axes: number of leading axes that index independent weights (kernels stacked by
      ``nn.scan``/``nn.vmap``/``nnx.vmap``, shape ``(layers, ...)``), or ``{regex: int}``. Each slice
      gets its own adapter (key ``fold_in(path_key, slice_index)``), stacked along the same axes.

  Returns:
    ``{path: Adapter}``, identity at init: ``merge(params, adapters)`` equals ``params``.

  Raises:
    ValueError: if no path matches, a target is not a matrix or has no reshape rule, or the
      method does not fit a target's shape (e.g. ``rank > min(m, n)``).
  """
  paths = leaf_paths(params)
  adapters: Adapters = {}
  if isinstance(targets, str) and targets == "all-linear" and in_axes is None:
    in_axes = _default_in_axes
  for path in select_paths(params, targets):
    w0 = paths[path]
    shape = tuple(int(d) for d in np.shape(w0))
    dtype = getattr(w0, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"Target {path!r} has dtype {dtype}: adapters need a real floating weight (an update merged into an "
          "integer or quantised kernel would be rounded away). Choose `targets` that select float kernels, or "
          "dequantise them first."
      )
    stack = _resolve_per_path(stack_axes, path, "stack_axes", 0)
    if isinstance(stack, bool) or not isinstance(stack, (int, np.integer)) or not 0 <= stack <= max(len(shape) - 2, 0):
      raise ValueError(f"`stack_axes` for target {path!r} of shape {shape} must be an int in [0, {len(shape) - 2}], "
                       f"got {stack!r}.")
    slice_shape = shape[stack:]
    axes, kind = _resolve_axes(in_axes, _resolve_per_path(layout, path, "layout", "in_out"), path, slice_shape)
    shell = Adapter({}, {}, _NoMethod(), slice_shape, "float32", axes, kind)
    mshape = shell.matrix_shape
    spec = _resolve_method(method, path, slice_shape)
    try:
      spec.check_shape(mshape)
    except ValueError as err:
      raise ValueError(f"Target {path!r} (shape {shape}, matrix {mshape}): {err}") from None
    target_key = path_key(key, path)
    w0 = jnp.asarray(dequantized(w0))
    slices = [()] if stack == 0 else list(np.ndindex(*shape[:stack]))
    inits = []
    for index in slices:
      slice_key = target_key if stack == 0 else jax.random.fold_in(target_key, int(np.ravel_multi_index(index, shape[:stack])))
      params_key, frozen_key = jax.random.split(slice_key)
      inits.append(spec.init_both(params_key, frozen_key, shell.to_matrix(w0[index])))
    if stack == 0:
      adapter_params, frozen = inits[0]
    else:
      stacked = lambda *leaves: jnp.stack(leaves).reshape(shape[:stack] + leaves[0].shape)
      adapter_params = jax.tree.map(stacked, *[p for p, _ in inits])
      frozen = jax.tree.map(lambda *leaves: np.stack(leaves).reshape(shape[:stack] + leaves[0].shape),
                            *[f for _, f in inits])
    adapters[path] = Adapter(
        params=adapter_params,
        frozen=frozen,
        method=spec,
        shape=shape,
        dtype=jnp.dtype(w0.dtype).name,
        in_axes=axes,
        layout=kind,
        stack_axes=int(stack),
    )
  return adapters


class _NoMethod(AdapterMethod):
  """Placeholder method of a shape-only adapter shell (never registered: the name starts with '_')."""


def _resolve_per_path(value: Any, path: str, name: str, default: Any) -> Any:
  """``value`` itself, or the first ``{regex: value}`` entry matching ``path`` (``default`` if none)."""
  if isinstance(value, Mapping):
    return next((v for pattern, v in value.items() if re.search(pattern, path)), default)
  return value


def _check_adapters(adapters: Any) -> None:
  if not isinstance(adapters, Mapping) or not all(isinstance(a, Adapter) for a in adapters.values()):
    raise TypeError("`adapters` must be the {path: Adapter} dict returned by sp.peft.init_adapters.")


def _check_safe(safe: Any) -> None:
  if safe is not None and not isinstance(safe, bool):
    raise TypeError(f"`safe` must be None, True or False, got {safe!r}.")


def _check_finite_result(name: str, what: str, out: Array, leaf: Array, safe: Optional[bool]) -> None:
  """``safe`` merge: refuses a non-finite result at ``name`` (see :func:`merge`)."""
  if safe is False:
    return
  if not _validation.is_concrete(out):
    if safe:
      raise ValueError(
          f"Cannot {what} with safe=True inside jit/grad/vmap: the finiteness check needs concrete arrays. Call it "
          "outside the transformation (as for an inference-time merge), or pass safe=None to check only there."
      )
    return
  if bool(jnp.all(jnp.isfinite(out))):
    return
  bad = int(jnp.size(out) - jnp.count_nonzero(jnp.isfinite(out)))
  base_ok = bool(jnp.all(jnp.isfinite(leaf)))
  cause = ("the adapter's arrays hold NaN/inf or its update overflows the weight's dtype "
           f"{jnp.dtype(out.dtype).name}" if base_ok else "the weight in `params` is already non-finite")
  raise ValueError(
      f"Refusing to {what}: the result at {name!r} has {bad} non-finite entries of {jnp.size(out)} ({cause}). "
      "Pass safe=False to get the non-finite weights anyway."
  )


def _map_targets(params: PyTree, adapters: Adapters, fn: Callable[[Adapter, Array], Array], what: str,
                 safe: Optional[bool] = False) -> PyTree:
  _check_adapters(adapters)
  _check_safe(safe)
  seen: set[str] = set()

  def visit(path, leaf):
    name = path_to_str(path)
    adapter = adapters.get(name)
    if adapter is None:
      return leaf
    if name in seen:
      raise ValueError(
          f"Cannot {what}: two parameters have the path {name!r} (a key contains '/'); the adapter for it would "
          "change both. Rename the key."
      )
    if tuple(np.shape(leaf)) != adapter.shape:
      raise ValueError(
          f"Cannot {what}: adapter for {name!r} was made for shape {adapter.shape}, but `params` has "
          f"shape {tuple(np.shape(leaf))} there."
      )
    if is_quantized(leaf) and what != "merge quantized":
      raise ValueError(
          f"Cannot {what}: the weight at {name!r} is quantized ({describe(leaf)}); merging an update into it would be "
          "rounded away. Train through sp.peft.apply_adapters (each layer dequantizes its own weight), or "
          "sp.peft.merge_quantized(params, adapters) to merge into dequantized weights (requantize=True re-quantizes "
          "them and reports the error).")
    seen.add(name)
    out = fn(adapter, leaf)
    _check_finite_result(name, what, out, leaf, safe)
    return out

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)
  _check_missing(params, adapters, seen, what)
  return out


def _check_missing(params: PyTree, adapters: Adapters, seen: Any, what: str) -> None:
  missing = [p for p in adapters if p not in seen]
  if missing:
    raise ValueError(
        f"Cannot {what}: `params` has no leaf at adapter path(s) {missing[:5]}. Available paths: "
        f"{_available_paths(leaf_paths(params))}."
    )


def merge(params: PyTree, adapters: Adapters, *, safe: Optional[bool] = None) -> PyTree:
  """``params`` with every target ``w0`` replaced by ``w0 + Delta W``.

  Returns the same structure and dtypes; differentiable with respect to both arguments, so a
  training loss can call ``model.apply(merge(params, adapters), x)`` and take gradients with
  respect to ``adapters``.

  Layout: the merge trusts each adapter's ``in_axes`` (the weight's shape alone cannot tell, e.g.,
  an attention output kernel ``(heads, head_dim, embed)`` flattened with ``in_axes=1`` from one
  with ``in_axes=2``). :func:`sp.peft.factored`, which sees the layers, checks it.

  Args:
    params: the base parameters.
    adapters: ``{path: Adapter}``.
    safe: PEFT's ``safe_merge``. ``None`` (default): outside ``jit``/``grad``/``vmap`` (e.g. merging
      once for inference) every merged weight is checked to be finite, and a NaN/inf (from NaN
      adapter arrays, or an update that overflows the weight's dtype) raises naming the path; under
      a transformation nothing is checked (it costs nothing there). ``True``: always check (an error
      under a transformation). ``False``: never check.

  Raises:
    ValueError: an adapter path is missing from ``params`` or has another shape, or (``safe``) a
      merged weight is not finite.
  """
  return _map_targets(params, adapters, lambda adapter, w0: adapter.merge(w0), "merge", safe)


def merge_quantized(params: PyTree, adapters: Adapters, *, requantize: bool = False) -> tuple[PyTree, dict[str, float]]:
  """Merges adapters into quantized weights: dequantized ``W0 + Delta W``, optionally quantized again.

  Args:
    params: parameters with :class:`~spectral_peft.peft.QuantizedArray` weights (and plain ones).
    adapters: ``{path: Adapter}``.
    requantize: quantize each merged weight again with its base's ``bits`` and ``group_size``.

  Returns:
    ``(merged params, errors)``: ``errors[path]`` is the rounding error the re-quantization adds,
    ``max |Q(W) - W| / max |W|`` of the merged weight ``W`` (0 without ``requantize``), for every
    quantized weight; plain weights are merged as :func:`merge` does and get no entry.
  """
  errors: dict[str, float] = {}

  def fn(adapter: Adapter, leaf: Any) -> Any:
    merged = adapter.merge(dequantized(leaf))
    if not is_quantized(leaf):
      return merged
    if requantize and not isinstance(leaf, QuantizedArray):
      raise ValueError(f"requantize=True re-quantizes sp.peft.QuantizedArray weights; {adapter_paths[id(adapter)]!r} is "
                       f"{describe(leaf)}: merge with requantize=False and quantize with qwix again.")
    if not requantize:
      errors[adapter_paths[id(adapter)]] = 0.0
      return merged
    again = quantize_array(merged, leaf.bits, leaf.group_size)
    errors[adapter_paths[id(adapter)]] = float(jnp.max(jnp.abs(again.dequantize().astype(jnp.float32) - merged))
                                               / jnp.maximum(jnp.max(jnp.abs(merged)), jnp.finfo(jnp.float32).tiny))
    return again

  adapter_paths = {id(a): p for p, a in adapters.items()}
  out = _map_targets(params, adapters, fn, "merge quantized", False if requantize else None)
  return out, errors


def unmerge(merged: PyTree, adapters: Adapters, *, safe: Optional[bool] = None) -> PyTree:
  """Inverse of :func:`merge`: recovers the base parameters from merged ones (``safe`` as in :func:`merge`)."""
  return _map_targets(merged, adapters, lambda adapter, w: adapter.unmerge(w), "unmerge", safe)


def switch_adapters(merged: PyTree, current: Adapters, new: Adapters, *, safe: Optional[bool] = None) -> PyTree:
  """Turns parameters merged with ``current`` into parameters merged with ``new`` (``safe`` as in :func:`merge`)."""
  return merge(unmerge(merged, current, safe=safe), new, safe=safe)


def delta_tree(params: PyTree, adapters: Adapters) -> dict[str, Array]:
  """``{path: Delta W}`` (in each weight's own shape) for every adapter.

  Raises:
    ValueError: an adapter path is missing from ``params`` or has another shape there.
  """
  _check_adapters(adapters)
  paths = leaf_paths(params)
  _check_missing(params, adapters, paths, "compute delta_tree")
  for p, a in adapters.items():
    if tuple(np.shape(paths[p])) != a.shape:
      raise ValueError(
          f"Cannot compute delta_tree: adapter for {p!r} was made for shape {a.shape}, but `params` has shape "
          f"{tuple(np.shape(paths[p]))} there."
      )
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
    return jax.tree.map(lambda _: isinstance(node, Adapter), node)

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
