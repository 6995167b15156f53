"""Weighted combinations of adapters (PEFT's ``add_weighted_adapter``), exact for every method."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from spectral_peft import _validation
from spectral_peft.peft._methods.base import Adapter, AdapterMethod
from spectral_peft.peft._methods.lowrank import LoRA
from spectral_peft.peft._tree import Adapters, _check_adapters

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WeightedSum(AdapterMethod):
  """``Delta W = sum_i weights[i] * Delta W_i``: several adapters on one weight.

  Any methods can be mixed (a sine LoRA and a DoRA, say): each term is its own method's update of
  the same ``w0``. Parameters are the tuple of the terms' parameters, so the combination can be
  trained further, merged, saved and loaded like a single adapter.

  Args:
    methods: the terms' specs.
    weights: one finite real weight per term (NaN or inf raises).
    unmerge_iterations: fixed-point iterations used by :meth:`unmerge` when some term's update
      depends on ``w0`` (DoRA); it converges while the updates are small next to ``w0``. Unused
      (the inverse is exact) otherwise.
  """

  methods: tuple[AdapterMethod, ...]
  weights: tuple[float, ...]
  unmerge_iterations: int = 30

  def __post_init__(self) -> None:
    if len(self.methods) != len(self.weights) or not self.methods:
      raise ValueError(
          f"`weights` must have one entry per method, got {len(self.weights)} weights for "
          f"{len(self.methods)} methods."
      )
    _validation.normalize_fields(self)
    object.__setattr__(self, "methods", tuple(self.methods))
    object.__setattr__(self, "weights", tuple(_validation.check_finite_number(f"weights[{i}]", w)
                                              for i, w in enumerate(self.weights)))

  @property
  def delta_depends_on_w0(self) -> bool:  # type: ignore[override]
    return any(m.delta_depends_on_w0 for m in self.methods)

  def check_shape(self, shape):
    for method in self.methods:
      method.check_shape(shape)

  @property
  def runtime_factored(self) -> bool:  # type: ignore[override]
    return all(getattr(m, "runtime_factored", False) for m in self.methods)

  def apply(self, params, x, w0, frozen=None):
    return jnp.matmul(x, w0) + self.branch(params, x, w0, frozen)

  def branch(self, params, x, w0, frozen=None):
    """``sum_i weights[i] x @ Delta W_i``, each term by its own method's (factored) branch."""
    frozen = frozen if frozen is not None else tuple({} for _ in self.methods)
    total = None
    for method, weight, p, f in zip(self.methods, self.weights, params, frozen):
      term = weight * method.branch(p, x, w0, f)
      total = term if total is None else total + term
    return total

  def init(self, key, w0):
    keys = jax.random.split(key, len(self.methods))
    return tuple(m.init(k, w0) for m, k in zip(self.methods, keys))

  def init_frozen(self, key, w0):
    keys = jax.random.split(key, len(self.methods))
    return tuple(m.init_frozen(k, w0) for m, k in zip(self.methods, keys))

  def delta(self, params, w0, frozen=None):
    frozen = frozen if frozen is not None else tuple({} for _ in self.methods)
    total = None
    for method, weight, p, f in zip(self.methods, self.weights, params, frozen):
      term = weight * method.delta(p, w0, f)
      total = term if total is None else total + term
    return total

  def unmerge(self, params, w, frozen=None):
    if not self.delta_depends_on_w0:
      return w - self.delta(params, w, frozen).astype(w.dtype)
    w0 = w - self.delta(params, w, frozen).astype(w.dtype)
    for _ in range(self.unmerge_iterations):
      w0 = w - self.delta(params, w0, frozen).astype(w.dtype)
    return w0


def weighted_combination(adapters_list: Sequence[Adapters], weights: Sequence[float]) -> Adapters:
  """Combines named adapters into one: ``Delta W = sum_i weights[i] Delta W_i`` at every target.

  A target adapted by only some of the inputs gets only their terms.

  Args:
    adapters_list: adapters dicts (from :func:`init_adapters`, training or :func:`load_adapters`).
    weights: one weight per adapters dict.

  Returns:
    A ``{path: Adapter}`` dict whose adapters use :class:`WeightedSum`.

  Raises:
    ValueError: on a length mismatch, or two adapters of one path made for different shapes.
  """
  if len(adapters_list) != len(weights) or not adapters_list:
    raise ValueError(
        f"`weights` must have one entry per adapters dict, got {len(weights)} weights for "
        f"{len(adapters_list)} adapters."
    )
  for adapters in adapters_list:
    _check_adapters(adapters)
  paths = list(dict.fromkeys(p for adapters in adapters_list for p in adapters))
  combined: Adapters = {}
  for path in paths:
    terms = [(a[path], w) for a, w in zip(adapters_list, weights) if path in a]
    first = terms[0][0]
    for adapter, _ in terms[1:]:
      if (adapter.shape, adapter.dtype, adapter.in_axes) != (first.shape, first.dtype, first.in_axes):
        raise ValueError(
            f"Adapters for {path!r} disagree on the weight: shape {first.shape}, dtype {first.dtype}, "
            f"in_axes {first.in_axes} vs shape {adapter.shape}, dtype {adapter.dtype}, in_axes "
            f"{adapter.in_axes}."
        )
    combined[path] = Adapter(
        params=tuple(a.params for a, _ in terms),
        frozen=tuple(a.frozen for a, _ in terms),
        method=WeightedSum(methods=tuple(a.method for a, _ in terms), weights=tuple(w for _, w in terms)),
        shape=first.shape,
        dtype=first.dtype,
        in_axes=first.in_axes,
    )
  return combined



def concatenate_lora(adapters_list: Sequence[Adapters], weights: Sequence[float]) -> Adapters:
  """PEFT's ``combination_type="cat"``: LoRA adapters concatenated into one LoRA of rank ``sum_i r_i``.

  ``a = [a_1, ..., a_k]`` (``(m, sum r)``) and ``b = [w_1 s_1 b_1; ...; w_k s_k b_k]`` with ``s_i``
  each adapter's scale, under ``LoRA(sum r, alpha=sum r)`` (scale 1): the update is exactly
  ``sum_i w_i Delta W_i`` and stays factored (the adapter runtime's LoRA product).

  Raises:
    ValueError: a length mismatch, a non-LoRA adapter, paths that differ between the dicts, or
      adapters of one path made for different weights.
  """
  if len(adapters_list) != len(weights) or not adapters_list:
    raise ValueError(f"`weights` must have one entry per adapters dict, got {len(weights)} weights for "
                     f"{len(adapters_list)} adapters.")
  weights = [_validation.check_finite_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
  for adapters in adapters_list:
    _check_adapters(adapters)
  paths = list(adapters_list[0])
  out: Adapters = {}
  for i, adapters in enumerate(adapters_list):
    if sorted(adapters) != sorted(paths):
      raise ValueError(f"combination 'cat' needs the same paths in every adapters dict; dict {i} adapts "
                       f"{sorted(adapters)}, dict 0 adapts {sorted(paths)}.")
  for path in paths:
    terms = [adapters[path] for adapters in adapters_list]
    first = terms[0]
    for term in terms:
      if type(term.method) is not LoRA:
        raise ValueError(f"combination 'cat' concatenates LoRA adapters only; {path!r} has a "
                         f"{type(term.method).__name__}: use combination 'linear'.")
      if (term.shape, term.dtype, term.in_axes, term.layout, term.stack_axes) != (
          first.shape, first.dtype, first.in_axes, first.layout, first.stack_axes):
        raise ValueError(f"The adapters at {path!r} were made for different weights ({first.shape} vs {term.shape}).")
    a = jnp.concatenate([t.params["a"] for t in terms], axis=-1)
    b = jnp.concatenate([(w * t.method.scale * t.params["b"]).astype(t.params["b"].dtype)
                         for t, w in zip(terms, weights)], axis=-2)
    rank = int(a.shape[-1])
    method = LoRA(rank, alpha=float(rank), param_dtype=first.method.param_dtype)
    out[path] = Adapter({"a": a, "b": b}, {}, method, first.shape, first.dtype, first.in_axes, first.layout,
                        first.stack_axes)
  return out


def combine_adapters(adapters_list: Sequence[Adapters], weights: Sequence[float], combination_type: str) -> Adapters:
  """PEFT's ``add_weighted_adapter`` combinations: ``"linear"`` (:func:`weighted_combination`, every method)
  or ``"cat"`` (:func:`concatenate_lora`, LoRA only).

  Raises:
    ValueError: another ``combination_type`` (and the errors of the two functions).
  """
  if combination_type == "linear":
    return weighted_combination(adapters_list, list(weights))
  if combination_type == "cat":
    return concatenate_lora(adapters_list, list(weights))
  raise ValueError(f"`combination_type` must be 'linear' or 'cat', got {combination_type!r}.")
