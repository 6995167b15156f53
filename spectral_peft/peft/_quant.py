"""Quantized base weights: a small int8/int4 format the adapter runtime reads inside each layer.

QLoRA for every method: the base stays quantized, each adapted layer dequantizes only its own weight
inside its own product (under ``jax.checkpoint``: the dequantized weight is not kept for the
backward pass but rebuilt there), and gradients reach the adapters only.

Format: symmetric, ``w ~ values * scale`` with ``values`` integers in ``[-q, q]`` (``q = 127`` for 8
bits, ``7`` for 4 bits, stored as ``int8`` / ``int4``) and ``scale`` one float per group of
``group_size`` consecutive entries along the weight's first axis (the input axis of a Flax kernel)
and per position of the other axes; ``group_size=None`` is one group over the whole first axis
(per-output-channel scales).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

_STORAGE = {8: jnp.int8, 4: jnp.int4}


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
  """A weight stored as integers and scales; :meth:`dequantize` gives ``values * scale``.

  Attributes:
    values: integers of the weight's shape (``int8`` for 8 bits, ``int4`` for 4 bits).
    scale: ``(groups, 1, *shape[1:])`` floats (``groups = shape[0] / group_size``).
    bits: 8 or 4.
    group_size: entries of the first axis per scale (``None``: all of them).
    dtype: the name of the dequantized dtype (the weight's original dtype).
  """

  values: Array
  scale: Array
  bits: int
  group_size: Optional[int]
  dtype: str

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("values"), self.values), (jax.tree_util.GetAttrKey("scale"), self.scale)), (
        self.bits, self.group_size, self.dtype)

  def tree_flatten(self):
    return (self.values, self.scale), (self.bits, self.group_size, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], children[1], *aux)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def __getitem__(self, key: Any) -> "QuantizedArray":
    if key is Ellipsis:  # NNX's ``variable[...]`` reads the value whole.
      return self
    raise TypeError("A QuantizedArray is read whole (``w[...]``) or through `dequantize()`, not indexed.")

  def dequantize(self) -> Array:
    """``values * scale`` in :attr:`dtype`, of the weight's shape.

    Raises:
      ValueError: no ``scale``, or a ``scale`` whose shape does not group the weight's first axis.
    """
    shape = self.shape
    scale_shape = tuple(np.shape(self.scale)) if self.scale is not None else None
    if scale_shape is None or len(scale_shape) != len(shape) + 1 or scale_shape[0] == 0 or shape[0] % scale_shape[0] \
        or scale_shape[1] != 1 or scale_shape[2:] != shape[1:]:
      raise ValueError(f"A quantized weight of shape {shape} needs a scale of shape (groups, 1, *{shape[1:]}) with groups "
                       f"dividing {shape[0]}, got {'no scale' if scale_shape is None else scale_shape}.")
    groups = scale_shape[0]
    values = self.values.astype(jnp.float32).reshape((groups, shape[0] // groups) + shape[1:])
    return (values * self.scale.astype(jnp.float32)).reshape(shape).astype(self.dtype)


def _qwix_kind(x: Any) -> Optional[str]:
  """``"QArray"`` / ``"WithAux"`` for qwix's quantized weights (its PTQ/QLoRA providers), else None."""
  kind = type(x)
  if kind.__module__.startswith("qwix.") and kind.__name__ in ("QArray", "WithAux"):
    return kind.__name__
  return None


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantized weight: ours (:class:`QuantizedArray`) or qwix's (``QArray``, ``WithAux``)."""
  return isinstance(x, QuantizedArray) or _qwix_kind(x) is not None


def dequantized(x: Any) -> Any:
  """The floating weight of a quantized ``x`` (ours or qwix's: ``qwix.dequantize``), ``x`` otherwise."""
  if isinstance(x, QuantizedArray):
    return x.dequantize()
  kind = _qwix_kind(x)
  if kind is None:
    return x
  import qwix  # Only reached for qwix's own arrays, so qwix is installed.

  array = x.array if kind == "WithAux" else x
  if _qwix_kind(array) != "QArray":  # A WithAux around a plain array (not quantized yet).
    return jnp.asarray(array)
  return qwix.dequantize(array)


def describe(x: Any) -> str:
  """``"4-bit"`` for ours, ``"qwix int4"`` for qwix's (for messages)."""
  if isinstance(x, QuantizedArray):
    return f"{x.bits}-bit"
  array = x.array if _qwix_kind(x) == "WithAux" else x
  return f"qwix {jnp.dtype(getattr(array, 'qtype', None) or getattr(array, 'dtype', 'float32')).name}"


def quantize_array(w: Array, bits: int = 4, group_size: Optional[int] = None) -> QuantizedArray:
  """Symmetric ``bits``-bit quantization of ``w`` (see the module docstring).

  Args:
    w: a floating array with at least 2 axes.
    bits: 8 or 4.
    group_size: entries of the first axis per scale; must divide ``w.shape[0]`` (``None``: all).

  Raises:
    ValueError: an unsupported ``bits``, a non-floating or 1-D ``w``, a ``group_size`` that does
      not divide the first axis, or a non-finite ``w``.
  """
  if bits not in _STORAGE:
    raise ValueError(f"`bits` must be 8 or 4, got {bits!r}.")
  w = jnp.asarray(w)
  if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"Only floating weights with 2 or more axes are quantized, got {w.dtype} of shape {w.shape}.")
  first = w.shape[0]
  size = first if group_size is None else group_size
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or first % size:
    raise ValueError(f"`group_size` must be a positive divisor of the first axis ({first}) or None, got {group_size!r}.")
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("Cannot quantize a weight holding NaN or infinity.")
  top = 2 ** (bits - 1) - 1
  grouped = w.astype(jnp.float32).reshape((first // size, size) + w.shape[1:])
  scale = jnp.max(jnp.abs(grouped), axis=1, keepdims=True) / top
  scale = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(grouped / scale), -top, top).reshape(w.shape).astype(_STORAGE[bits])
  return QuantizedArray(values, scale, int(bits), None if group_size is None else int(group_size),
                        jnp.dtype(w.dtype).name)


def select_quantized(params: PyTree, targets: Any, group_size: Optional[int]) -> dict[str, Any]:
  """``{path: leaf}`` of the weights of ``params`` that ``targets`` selects for quantization (see :func:`quantize`).

  Raises:
    ValueError: no weight selected. TypeError: a ``targets`` of another kind.
  """
  from spectral_peft.peft._tree import leaf_paths  # The tree helpers read this module's type.

  if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                 or group_size < 1):
    raise ValueError(f"`group_size` must be a positive int (entries of the first axis per scale) or None, got "
                     f"{group_size!r}.")
  if targets is None:
    def chosen(path: str, leaf: Any) -> bool:
      shape = np.shape(leaf)
      return (len(shape) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
              and (group_size is None or shape[0] % group_size == 0))
  elif isinstance(targets, str):
    pattern = re.compile(targets)
    chosen = lambda path, leaf: bool(pattern.search(path))  # noqa: E731
  elif callable(targets):
    chosen = targets
  else:
    raise TypeError(f"`targets` must be None, a regex string or a (path, leaf) -> bool predicate, got {targets!r}.")
  out = {path: leaf for path, leaf in leaf_paths(params).items() if not is_quantized(leaf) and chosen(path, leaf)}
  if not out:
    if targets is None:
      shapes = sorted({str(tuple(np.shape(leaf))) for leaf in leaf_paths(params).values() if not is_quantized(leaf)})
      raise ValueError(
          "`params` has no weight to quantize: with `targets=None` those are the floating arrays with 2 or more "
          f"axes{'' if group_size is None else f' whose first axis `group_size={group_size}` divides'}; the "
          f"unquantized arrays have shapes {', '.join(shapes[:8]) or 'none'}{' ...' if len(shapes) > 8 else ''}.")
    raise ValueError("`targets` selects no weight of `params` to quantize.")
  return out


def quantize(params: PyTree, targets: Any = None, *, bits: int = 4, group_size: Optional[int] = None) -> PyTree:
  """``params`` with its target weights replaced by :class:`QuantizedArray` (a QLoRA-style base).

  Args:
    params: base parameters (a Linen ``params`` dict, or any pytree of arrays).
    targets: regex searched in ``'/'``-joined paths, or ``(path, leaf) -> bool``; ``None``: every
      floating array with 2 or more axes whose first axis ``group_size`` divides.
    bits: 8 or 4.
    group_size: see :func:`quantize_array`.

  Returns:
    The same structure with quantized leaves at the targets.

  Raises:
    ValueError: a target that cannot be quantized (see :func:`quantize_array`), or no target.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> q = sp.peft.quantize(params, bits=4)
    >>> q["dense"]["kernel"].bits, q["dense"]["kernel"].values.dtype
    (4, dtype(int4))
  """
  from spectral_peft.peft._tree import path_to_str

  chosen = select_quantized(params, targets, group_size)

  def visit(path, leaf):
    name = path_to_str(path)
    if name not in chosen:
      return leaf
    try:
      return quantize_array(leaf, bits, group_size)
    except ValueError as err:
      raise ValueError(f"Cannot quantize {name!r}: {err}") from None

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def dequantize(params: PyTree) -> PyTree:
  """``params`` with every :class:`QuantizedArray` replaced by its dequantized array."""
  return jax.tree.map(dequantized, params, is_leaf=is_quantized)
