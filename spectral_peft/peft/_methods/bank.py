"""Mixed-adapter batches: ``K`` adapters of one method on one weight, one chosen per example.

An :class:`AdapterBank` holds the parameters of ``K`` adapters of one method stacked on a leading
axis. It has no update of its own (which of the ``K`` applies depends on the example), so it is used
through the adapter runtime with a per-example integer index: example ``b`` sees
``W0 + Delta W_{index[b]}``, and ``index[b] == -1`` the base weight ``W0``.

The products, by method (``x: (B, ..., m)``, ``K`` adapters, ``B`` examples):

* LoRA: gathered factors, ``(x_b a_{i_b}) b_{i_b}``: ``B (m + n) r`` gathered values, no ``(m, n)``
  array.
* DoRA: the ``K`` column factors ``magnitude / ||W0 + s a b||_c`` (``K n``, computed per adapter from
  ``a^T W0`` as the single-adapter product does) gathered per example, and gathered factors.
* every other method (sine LoRA/DoRA, whose ``sin(omega a b)`` does not factor; SHiRA, WaveFT,
  FourierFT, LFMA, weighted sums): each adapter's ``W0 + Delta W_k`` is formed once per call (``K``
  ``(m, n)`` temporaries inside the layer), then either each example's matrix is gathered for one
  batched product, or the examples are grouped by adapter for one grouped product
  (``jax.lax.ragged_dot``); see :func:`_grouped_product` for the measured choice.

Out-of-range indices raise when the index is concrete; under ``jit`` (a traced index) the rows of
such examples are NaN, never another adapter's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft.peft._methods.base import Adapter, AdapterMethod

Array = jax.Array
PyTree = Any

INDEX = "index"
TERMS = "terms"


def _stack(trees: Sequence[PyTree]) -> PyTree:
  return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(leaf) for leaf in leaves]), *trees)


@dataclasses.dataclass(frozen=True)
class AdapterBank(AdapterMethod):
  """``size`` adapters of ``method`` on one weight, selected per example by ``adapter_index``.

  Parameters are the inner method's parameters with a leading ``(size,)`` axis; constants are
  ``{"terms": <inner constants, stacked>}``. Use :func:`stack_adapters` to build a bank from trained
  adapters, or ``init_adapters(key, params, AdapterBank(LoRA(8), 16), targets)`` for ``size`` fresh
  ones, and run it with ``sp.peft.apply_adapters(..., adapter_index=idx)`` (Linen) or
  ``with sp.nnx.adapter_index(idx): model(x)`` (NNX).

  A bank runs on plain contraction layers (Linen ``Dense``/``DenseGeneral``, NNX ``Linear``) and on
  einsum layers (``nn.Einsum``, ``nnx.Einsum``, Tunix's and Gemma's ``Einsum``) whose input's leading
  axis is the batch (an einsum must not contract it); it cannot be merged (which adapter would the
  merged weight hold?): ``merge`` and other layers raise.

  Args:
    method: the adapters' method (any method, including a :class:`WeightedSum`).
    size: ``K``, the number of adapters (a positive int).
  """

  method: AdapterMethod
  size: int

  runtime_factored = True

  def __post_init__(self) -> None:
    if not isinstance(self.method, AdapterMethod) or isinstance(self.method, AdapterBank):
      raise TypeError(f"`method` must be an adapter method other than a bank, got {self.method!r}.")
    _validation.check_positive_int("size", self.size)

  @property
  def delta_depends_on_w0(self) -> bool:  # type: ignore[override]
    return self.method.delta_depends_on_w0

  def check_shape(self, shape):
    self.method.check_shape(shape)

  def init_both(self, params_key, frozen_key, w0):
    pairs = [self.method.init_both(pk, fk, w0) for pk, fk in
             zip(jax.random.split(params_key, self.size), jax.random.split(frozen_key, self.size))]
    return _stack([p for p, _ in pairs]), {TERMS: jax.tree.map(lambda *f: np.stack(f), *[f for _, f in pairs])}

  def init(self, key, w0):
    return self.init_both(key, jax.random.fold_in(key, 1), w0)[0]

  def init_frozen(self, key, w0):
    return self.init_both(jax.random.fold_in(key, 1), key, w0)[1]

  def delta(self, params, w0, frozen=None):
    raise ValueError(
        f"An AdapterBank of {self.size} {type(self.method).__name__} adapters has no single update: run it with a "
        "per-example `adapter_index` on a Dense/DenseGeneral (Linen), Linear (NNX) or einsum layer; it cannot "
        "be merged or used on other layers. Pick one adapter with `sp.peft.unstack_adapters` to merge it.")

  def unmerge(self, params, w, frozen=None):
    return self.delta(params, w, frozen)

  def apply(self, params, x, w0, frozen=None):
    """``x_b @ (W0 + Delta W_{index[b]})`` for every example ``b`` of ``x: (B, ..., m)``: ``(B, ..., n)``."""
    return self._product(params, x, w0, frozen, with_base=True)

  def branch(self, params, x, w0, frozen=None):
    """``x_b @ Delta W_{index[b]}`` for every example ``b`` of ``x: (B, ..., m)``: ``(B, ..., n)``."""
    return self._product(params, x, w0, frozen, with_base=False)

  def _product(self, params, x, w0, frozen, with_base: bool):
    index = frozen.get(INDEX) if isinstance(frozen, dict) else None
    if index is None:
      self.delta(params, w0, frozen)
    index = jnp.asarray(index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
      raise ValueError(f"`adapter_index` must be a 1-D integer array (one entry per example), got {index.dtype} "
                       f"of shape {index.shape}.")
    if x.ndim < 2 or x.shape[0] != index.shape[0]:
      raise ValueError(f"`adapter_index` has {index.shape[0]} entries, but the layer's input has shape {x.shape}: its "
                       "leading axis must be the batch, one entry per example.")
    if _validation.is_concrete(index) and index.size:
      low, high = int(np.min(np.asarray(index))), int(np.max(np.asarray(index)))
      if low < -1 or high >= self.size:
        raise ValueError(f"`adapter_index` must hold values in [-1, {self.size - 1}] (-1: the base weight) for a bank of "
                         f"{self.size} adapters, got values in [{low}, {high}].")
    valid = (index >= -1) & (index < self.size)
    gather = jnp.where((index < 0) | ~valid, self.size, index)  # Row `size` is the base (no adapter).
    terms = frozen.get(TERMS, {})
    mixed = getattr(self.method, "mixed_branch", None)
    if mixed is not None:
      y = mixed(params, x, w0, terms, gather, with_base=with_base)
    else:
      y = _grouped_product(self.method, params, x, w0, terms, gather, with_base)
    nan = jnp.asarray(jnp.nan, y.dtype)
    return jnp.where(valid.reshape((-1,) + (1,) * (y.ndim - 1)), y, nan)


#: Gathered per-example matrices are used while they take at most this many bytes (or no more than
#: twice the adapters' own stack); beyond, one grouped product (``jax.lax.ragged_dot``).
GATHER_BYTES = 256 * 2**20


def _grouped_product(method: AdapterMethod, params, x, w0, terms, gather, with_base: bool):
  """Every adapter's matrix (``Delta W_k``, or ``W0 + Delta W_k`` ``with_base``) once, then the examples' products.

  Two formulations, measured on XLA:CPU (2 blocks 512 -> 1024, batch 16 x 64 tokens, K = 1 / 4 / 16):
  gathering each example's matrix and one batched product costs 38 / 37 / 33 ms whatever K (a
  single ``x @ W`` is 16 ms), while ``jax.lax.ragged_dot`` (examples sorted and grouped by adapter)
  costs 35 / 88 / 311 ms: XLA:CPU runs every group over every row. Gathering holds ``B (m, n)``
  matrices, so it is used while that fits :data:`GATHER_BYTES` or is at most twice the ``K + 1``
  stack; otherwise the grouped product, whose flops are one ``x @ W`` where ragged dots have a
  grouped kernel (GPU/TPU).
  """
  dtype = jnp.result_type(x, w0)
  mats = jax.vmap(lambda p, f: method.delta(p, w0, f).astype(dtype))(params, terms)
  pad = w0.astype(dtype)[None] if with_base else jnp.zeros((1,) + mats.shape[1:], dtype)
  if with_base:
    mats = mats + w0.astype(dtype)
  mats = jnp.concatenate([mats, pad])
  batch, m = x.shape[0], x.shape[-1]
  gathered_bytes = batch * mats[0].size * jnp.dtype(dtype).itemsize
  if gathered_bytes <= GATHER_BYTES or batch <= 2 * mats.shape[0]:
    return jnp.einsum("b...m,bmn->b...n", x.astype(dtype), mats[gather])
  tokens = int(np.prod(x.shape[1:-1], dtype=np.int64))
  order = jnp.argsort(gather, stable=True)
  rows = x[order].reshape(batch * tokens, m).astype(dtype)
  sizes = jnp.bincount(gather, length=mats.shape[0]).astype(jnp.int32) * tokens
  y = jax.lax.ragged_dot(rows, mats, sizes)
  y = y.reshape((batch,) + x.shape[1:-1] + (mats.shape[-1],))
  return jnp.zeros_like(y).at[order].set(y)


def stack_adapters(adapters_list: Sequence[dict]) -> dict:
  """``K`` adapters dicts of one method per path -> one dict of :class:`AdapterBank` adapters.

  Args:
    adapters_list: ``[{path: Adapter}, ...]`` (``K >= 1``), the same paths, methods, shapes and
      layouts in each (e.g. adapters trained from different keys or on different tasks).

  Returns:
    ``{path: Adapter}`` whose methods are ``AdapterBank(method, K)``; adapter ``k`` of the bank is
    ``adapters_list[k]``.

  Raises:
    ValueError: an empty list, different paths, or adapters of one path that differ in method,
      shape, dtype, layout or stacking.
  """
  if not adapters_list:
    raise ValueError("`adapters_list` must hold at least one adapters dict, got none.")
  for i, adapters in enumerate(adapters_list):
    if not isinstance(adapters, dict) or not all(isinstance(a, Adapter) for a in adapters.values()):
      raise TypeError(f"`adapters_list[{i}]` must be a {{path: Adapter}} dict, got {type(adapters).__name__}.")
  paths = list(adapters_list[0])
  for i, adapters in enumerate(adapters_list[1:], 1):
    if sorted(adapters) != sorted(paths):
      raise ValueError(f"`adapters_list[{i}]` adapts {sorted(adapters)}, `adapters_list[0]` adapts {sorted(paths)}: "
                       "every dict of a bank must adapt the same weights.")
  banks = {}
  for path in paths:
    terms = [adapters[path] for adapters in adapters_list]
    first = terms[0]
    for i, a in enumerate(terms[1:], 1):
      if (a.method, a.shape, a.dtype, a.in_axes, a.layout, a.stack_axes) != (
          first.method, first.shape, first.dtype, first.in_axes, first.layout, first.stack_axes):
        raise ValueError(
            f"The adapters at {path!r} differ: adapters_list[0] has {first.method} on {first.shape} ({first.dtype}, "
            f"layout {first.layout}), adapters_list[{i}] has {a.method} on {a.shape} ({a.dtype}, layout {a.layout}); "
            "a bank holds adapters of one method on one weight.")
    if first.stack_axes:
      raise ValueError(f"The adapter at {path!r} is stacked (stack_axes={first.stack_axes}); mixed-adapter batches "
                       "need unstacked weights.")
    frozen = {TERMS: jax.tree.map(lambda *f: np.stack([np.asarray(v) for v in f]), *[a.frozen for a in terms])}
    banks[path] = Adapter(_stack([a.params for a in terms]), frozen, AdapterBank(first.method, len(terms)),
                          first.shape, first.dtype, first.in_axes, first.layout, 0)
  return banks


def unstack_adapters(adapters: dict, k: int) -> dict:
  """Adapter ``k`` of every bank in ``adapters`` (the inverse of :func:`stack_adapters`).

  Raises:
    ValueError: an adapter is not a bank, or ``k`` is outside ``[0, K)``.
  """
  out = {}
  for path, adapter in adapters.items():
    bank = adapter.method
    if not isinstance(bank, AdapterBank):
      raise ValueError(f"The adapter at {path!r} is a {type(bank).__name__}, not an AdapterBank.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < bank.size:
      raise ValueError(f"`k` must be an int in [0, {bank.size}) for the bank at {path!r}, got {k!r}.")
    out[path] = Adapter(jax.tree.map(lambda a: a[k], adapter.params),
                        jax.tree.map(lambda f: np.asarray(f)[k], adapter.frozen[TERMS]), bank.method,
                        adapter.shape, adapter.dtype, adapter.in_axes, adapter.layout, 0)
  return out
