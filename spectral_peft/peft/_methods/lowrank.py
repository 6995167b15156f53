"""LoRA, DoRA and their sine-activated versions as adapter method specs.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2022).
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024).
  Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices" (sine LoRA, sine DoRA:
  Sec. 4.1 and App. A.2.1).

All four store ``a: (m, r)`` and ``b: (r, n)`` for a weight ``w0: (m, n)`` in the Flax layout
``(in_features, out_features)``. ``a`` starts uniform in ``+-1/sqrt(m)`` (PyTorch ``Linear``'s
default, as in the reference LoRA code), ``b`` starts at zero, so every method is the identity at
init. The scale is ``alpha / rank`` (``alpha=None`` means ``alpha = rank``: scale 1), or
``alpha / sqrt(rank)`` with ``use_rslora=True`` (Kalajdzievski, "A Rank Stabilization Scaling
Factor for Fine-Tuning with LoRA", 2023; ``alpha=None`` still means scale 1).

PEFT names (``peft.LoraConfig``): ``rank`` is ``r``; ``alpha`` is ``lora_alpha``, whose PEFT default
is 8 (scale ``8 / r``) whereas ours is ``None`` (scale 1, i.e. ``lora_alpha = r``); ``use_rslora``
and ``use_dora`` (our :class:`DoRA`) are PEFT's. ``sp.peft.export_peft`` writes ``lora_alpha = r``
for ``alpha=None``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from spectral_peft import _validation
from spectral_peft._lowrank import matrices
from spectral_peft._sparse import deltas
from spectral_peft._sparse import sharded
from spectral_peft.peft._methods.base import AdapterMethod

Array = jax.Array


def _check_rank_fits(rank: int, shape: tuple[int, int], name: str) -> None:
  m, n = shape
  if rank > min(m, n):
    raise ValueError(
        f"`rank` of {name} must be at most min(m, n) = {min(m, n)} for a weight of matrix shape "
        f"(m, n) = {shape}, got {rank}."
    )


def _up(x: Array) -> Array:
  """``x`` in at least float32: updates are computed there and cast to the weight's dtype at the end."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_sqrt(sq: Array) -> Array:
  """``sqrt(max(sq, 0))`` whose gradient is 0 (not inf or NaN) where ``sq <= 0``."""
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _padded(a: Array, fill: float) -> Array:
  """``a`` with one more entry along its leading axis, all ``fill`` (the "no adapter" row of a bank)."""
  return jnp.concatenate([a, jnp.full((1,) + a.shape[1:], fill, a.dtype)])


def _gathered_update_matmul(method: Any, params: dict[str, Array], x: Array, gather: Array) -> Array:
  """``s (x_b a_{g_b}) b_{g_b}`` for every example ``b`` of ``x: (B, ..., m)``; ``g == K``: zero."""
  a = _padded(params["a"], 0.0).astype(x.dtype)[gather]
  b = _padded(params["b"], 0.0).astype(x.dtype)[gather]
  return method.scale * jnp.einsum("b...r,brn->b...n", jnp.einsum("b...m,bmr->b...r", x, a), b)


@dataclasses.dataclass(frozen=True)
class _LowRankBase(AdapterMethod):
  """Shared fields, checks and initialisation of the ``a @ b`` family."""

  rank: int
  _: dataclasses.KW_ONLY
  alpha: Optional[float] = None
  param_dtype: Optional[str] = None
  use_rslora: bool = False

  runtime_factored = True  # x W0 + s (x a) b: no (m, n) array in the adapter runtime.

  def __post_init__(self) -> None:
    _validation.normalize_fields(self)  # NumPy scalars become Python numbers: the spec stays saveable.
    _validation.check_positive_int("rank", self.rank)
    if not isinstance(self.use_rslora, bool):
      raise TypeError(f"`use_rslora` must be a bool, got {self.use_rslora!r}.")
    if self.alpha is not None:
      _validation.check_positive_float("alpha", self.alpha)
    # Store a name, so the spec stays hashable and JSON-friendly.
    object.__setattr__(self, "param_dtype", _validation.check_float_dtype("param_dtype", self.param_dtype))

  def _check_fits(self, w0: Array) -> None:
    """Every scalar of the spec must be finite in the dtype the update is computed in."""
    fields = {f: getattr(self, f, None) for f in ("alpha", "omega", "gain")}
    _validation.check_fits_dtype(type(self).__name__, fields, self._dtype(w0))

  @property
  def scale(self) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora`` (``alpha=None``: 1)."""
    if self.alpha is None:
      return 1.0
    return float(self.alpha) / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def check_shape(self, shape: tuple[int, int]) -> None:
    _check_rank_fits(self.rank, shape, type(self).__name__)

  def _dtype(self, w0: Array) -> Any:
    return jnp.dtype(self.param_dtype) if self.param_dtype is not None else w0.dtype

  def init(self, key: Array, w0: Array) -> dict[str, Array]:
    """``{"a": (m, r) ~ U(+-1/sqrt(m)), "b": (r, n) zeros}``."""
    m, n = w0.shape
    self._check_fits(w0)
    dtype = self._dtype(w0)
    bound = 1.0 / jnp.sqrt(m)
    a = jax.random.uniform(key, (m, self.rank), dtype, -bound, bound)
    return {"a": a, "b": jnp.zeros((self.rank, n), dtype)}

  def update(self, params: dict[str, Array]) -> Array:
    """The low-rank update before any magnitude/direction split, ``(m, n)``."""
    raise NotImplementedError

  def update_matmul(self, params: dict[str, Array], x: Array) -> Array:
    """``x @ update(params)`` without forming the ``(m, n)`` update."""
    raise NotImplementedError


class _PlainUpdate:
  """``Delta = scale * a @ b``."""

  def update(self, params):
    return self.scale * matrices.lowrank(_up(params["a"]), _up(params["b"]))

  def update_matmul(self, params, x):
    return self.scale * jnp.matmul(jnp.matmul(x, params["a"].astype(x.dtype)), params["b"].astype(x.dtype))

  def product(self, params, x, w0, factor=None):
    """``x @ (w0 + update)`` (times ``factor: (n,)``) in the promoted dtype of ``x`` and ``w0``, by
    :func:`low_rank_product`."""
    dtype = jnp.result_type(x, w0)
    a = (self.scale * _up(params["a"])).astype(dtype)
    return low_rank_product(x.astype(dtype), w0.astype(dtype), a, params["b"].astype(dtype),
                            None if factor is None else factor.astype(dtype))


class _SineUpdate:
  """``Delta = scale * sin(omega a @ b) / gain``."""

  # Fields of the dataclasses that mix this in (declared here for type checkers; not fields of their own).
  scale: float
  omega: float
  gain: Optional[float]
  block_size: Optional[int]

  def _check_sine_fields(self) -> None:
    _validation.check_positive_float("omega", self.omega)
    if self.gain is not None:
      _validation.check_positive_float("gain", self.gain)
    if self.block_size is not None:
      _validation.check_positive_int("block_size", self.block_size)

  def update(self, params):
    return self.scale * matrices.sine_lowrank(_up(params["a"]), _up(params["b"]), omega=self.omega, gain=self.gain)

  def update_matmul(self, params, x):
    # The sine of omega * a @ b needs float32 at least: bfloat16 keeps 8 bits of its argument.
    a, b = _up(params["a"].astype(x.dtype)), _up(params["b"].astype(x.dtype))
    y = matrices.sine_lowrank_matmul(_up(x), a, b, omega=self.omega, gain=self.gain, block_size=self.block_size)
    return (self.scale * y).astype(x.dtype)


class _AdditiveLowRank:
  """LoRA-style: ``w = w0 + update``; ``delta`` does not depend on ``w0``."""

  def delta(self, params, w0, frozen=None):
    del w0, frozen
    return self.update(params)

  def apply(self, params, x, w0, frozen=None):
    return jnp.matmul(x, w0) + self.branch(params, x, w0, frozen)

  def branch(self, params, x, w0, frozen=None):
    del frozen
    return self.update_matmul(params, x).astype(jnp.result_type(x, w0))


def _tokens(x: Array) -> int:
  return math.prod(x.shape[:-1])


def low_rank_product(x: Array, w0: Array, a: Array, b: Array, factor: Optional[Array] = None) -> Array:
  """``x @ (w0 + a @ b)`` for ``x: (..., m)``, ``w0: (m, n)``, ``a: (m, r)``, ``b: (r, n)`` (one dtype).

  The factored form ``x w0 + (x a) b`` needs, besides ``x w0``, a second activation-sized array (the
  branch, ``(..., n)``) until the two are added; the merged form needs a transient ``(m, n)`` weight.
  The lighter one is taken from the shapes: merged when the batch has more rows than ``m``
  (``tokens * n > m * n``, :func:`_merged_low_rank_product`), else factored (plain JAX), so a small
  batch against a large weight never forms the ``(m, n)`` weight.

  ``factor: (n,)`` (DoRA's ``magnitude / ||V||_c``) scales the output columns. On the merged route its
  gradient ``sum_b g (x V)`` is taken as the merged weight's would be, from ``x^T g`` (a transient
  ``(m, n)``, one layer at a time), so no ``(..., n)`` output is kept from the forward to the backward
  pass (:func:`_scaled_merged_low_rank_product`: reverse mode only); on the factored route that output
  (lighter than an ``(m, n)`` array there) is kept.
  """
  if _tokens(x) > w0.shape[0]:
    if factor is None:
      return _merged_low_rank_product(x, w0, a, b)
    return _scaled_merged_low_rank_product(x, w0, a, b, factor)
  y = jnp.matmul(x, w0) + jnp.matmul(jnp.matmul(x, a), b)
  return y if factor is None else y * factor


@jax.custom_jvp
def _merged_low_rank_product(x: Array, w0: Array, a: Array, b: Array) -> Array:
  """``x @ (w0 + a @ b)`` through a transient merged weight, differentiated factored.

  The derivative rule (a JVP: forward mode, and reverse mode by its transpose) never forms an
  ``(m, n)`` array unless ``w0`` itself is differentiated (so no merged weight is kept for the
  backward pass), and its rank-r products put the rank-``r`` operand on the left
  (:func:`_rank_rows`): the reverse pass contracts the batch with the small cotangent first, and XLA
  keeps no transposed copy of ``x``.
  """
  return jnp.matmul(x, w0 + jnp.matmul(a, b))


def _scaled_merged_value(x: Array, w0: Array, a: Array, b: Array, factor: Array) -> Array:
  return _merged_low_rank_product(x, w0, a, b) * factor


_scaled_merged_low_rank_product = jax.custom_vjp(_scaled_merged_value)
_scaled_merged_low_rank_product.__doc__ = """``(x @ (w0 + a @ b)) * factor`` through a transient merged weight, with its own reverse rule.

The rule (:func:`_scaled_cotangents`) keeps ``x``, ``w0``, ``a``, ``b`` and ``factor``, never the output
``x (w0 + a b)`` the factor's gradient reads: that gradient is contracted from ``x^T g`` instead. Reverse
mode and ``vmap`` only (a ``custom_vjp``): JAX has no forward mode for it.
"""


def _rank_rows(a: Array, x: Array) -> Array:
  """``(x a)^T``: ``(r, ...)`` for ``a: (m, r)``, ``x: (..., m)``, with the rank-``r`` operand on the left."""
  return jax.lax.dot_general(a, x, (((0,), (x.ndim - 1,)), ((), ())))


def _from_rank_rows(t: Array, b: Array) -> Array:
  """``t^T b``: ``(..., n)`` for ``t: (r, ...)``, ``b: (r, n)``."""
  return jax.lax.dot_general(t, b, (((0,), (0,)), ((), ())))


def _low_rank_product_jvp(primals, tangents):
  x, w0, a, b = primals
  dx, dw0, da, db = tangents
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(jnp.matmul(dx, w0) + _from_rank_rows(_rank_rows(a, dx), b))
  if not isinstance(dw0, SymbolicZero):
    terms.append(jnp.matmul(x, dw0))
  if not isinstance(da, SymbolicZero):
    terms.append(_from_rank_rows(_rank_rows(da, x), b))
  if not isinstance(db, SymbolicZero):
    terms.append(_from_rank_rows(_rank_rows(a, x), db))
  y = _merged_low_rank_product(x, w0, a, b)
  return y, functools.reduce(operator.add, terms) if terms else jnp.zeros_like(y)


def _over_batch(u: Array, v: Array) -> Array:
  """``u^T v`` over the leading (batch) axes of ``u: (..., p)`` and ``v: (..., q)``: ``(p, q)``."""
  batch = tuple(range(u.ndim - 1))
  return jax.lax.dot_general(u, v, ((batch, batch), ((), ())))


def _scaled_forward(x, w0, a, b, factor):
  return _scaled_merged_value(x, w0, a, b, factor), (x, w0, a, b, factor)


def _scaled_cotangents(primals, g):
  """The cotangents of ``(x, w0, a, b, factor)`` of :func:`_scaled_merged_low_rank_product` for the output's ``g``.

  The factor's, ``sum_i w0 * (x^T g) + sum_r b * ((x a)^T g)``, comes first and the others are tied to
  it (through an exact zero taken from it): its transient ``(m, n)`` ``x^T g`` is freed before the
  input gradient's buffers exist, where XLA would otherwise defer it, with ``g`` alive, to the end of
  the backward pass.
  """
  x, w0, a, b, factor = primals
  xa = jnp.matmul(x, a)
  dfactor = jnp.sum(w0 * _over_batch(x, g), axis=0) + jnp.sum(b * _over_batch(xa, g), axis=0)
  gp = g * (factor + deltas.zero_from(dfactor))
  gb = jnp.matmul(gp, b.T)
  dx = jnp.matmul(gp, w0.T) + jnp.matmul(gb, a.T)
  dw0 = _over_batch(x, gp)  # Removed by XLA when unused (a frozen base).
  cotangents = (dx, dw0, _over_batch(x, gb), _over_batch(xa, gp), dfactor)
  return tuple(sharded.reduced_like(c, p) for c, p in zip(cotangents, primals))


def _sine_merged_weight(w0: Array, a: Array, b: Array, omega: float, coefficient: float) -> Array:
  """``w0 + coefficient * sin(omega a b)``, the sine taken in at least float32, in ``w0``'s dtype."""
  return w0 + (coefficient * jnp.sin(omega * jnp.matmul(_up(a), _up(b)))).astype(w0.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def sine_merged_product(x: Array, w0: Array, a: Array, b: Array, omega: float, coefficient: float) -> Array:
  """``x @ (w0 + coefficient * sin(omega a @ b))`` for ``x: (..., m)``: ``(..., n)``, through a transient merged weight.

  Sine LoRA's product in the adapter runtime (``coefficient = scale / gain``). The forward pass holds
  the merged ``(m, n)`` weight only while it multiplies; the reverse rule keeps ``x``, ``w0``, ``a``
  and ``b`` and rebuilds what it needs: first ``x^T g`` and ``cos(omega a b)`` for the factors'
  gradients, then (tied to those, so the two never coexist) the merged weight for the input's. Each
  device of a sharded kernel builds only its own block, and one activation-sized reduction (none
  for a column-split kernel) serves the base and the update together. Reverse mode and ``vmap``
  (a ``custom_vjp``); the blocked :func:`~spectral_peft.sine_lowrank_matmul` is the forward-mode one.
  """
  # Built once x exists (tied to it by an exact zero), not hoisted with every other layer's to the start.
  return jnp.matmul(x, _sine_merged_weight(w0, a + deltas.zero_from(x).astype(a.dtype), b, omega, coefficient))


def _sine_merged_forward(x, w0, a, b, omega, coefficient):
  return sine_merged_product(x, w0, a, b, omega, coefficient), (x, w0, a, b)


def _sine_merged_cotangents(omega, coefficient, residuals, g):
  x, w0, a, b = residuals
  xtg = _over_batch(x, g)
  up_a, up_b = _up(a + deltas.zero_from(g).astype(a.dtype)), _up(b)
  dz = (coefficient * omega) * jnp.cos(omega * jnp.matmul(up_a, up_b)) * _up(xtg)
  da, db = jnp.matmul(dz, up_b.T).astype(a.dtype), jnp.matmul(up_a.T, dz).astype(b.dtype)
  merged = _sine_merged_weight(w0, a + deltas.zero_from(da), b, omega, coefficient)
  dx = jax.lax.dot_general(g, merged, (((g.ndim - 1,), (1,)), ((), ())))
  cotangents = (dx.astype(x.dtype), xtg.astype(w0.dtype), da, db)
  return tuple(sharded.reduced_like(c, p) for c, p in zip(cotangents, residuals))


sine_merged_product.defvjp(_sine_merged_forward, _sine_merged_cotangents)


_merged_low_rank_product.defjvp(_low_rank_product_jvp, symbolic_zeros=True)
_scaled_merged_low_rank_product.defvjp(_scaled_forward, _scaled_cotangents)


@jax.jit  # One fused pass over the weight (no float32 copy of a bfloat16 weight): attach reads 7B weights.
def _column_norm(w: Array) -> Array:
  """Norm of every output column of an ``(in, out)`` matrix: ``(out,)``, in at least float32.

  The sum of squares is taken in float32 (a float16 column of norm above 256 overflows its own
  dtype), and the gradient of a zero column is 0 rather than NaN.
  """
  return _safe_sqrt(jnp.sum(jnp.square(_up(w)), axis=0))


class _MagnitudeDirection:
  """DoRA-style: ``w = magnitude * V / ||V||_c`` with ``V = w0 + update``.

  ``||.||_c`` is the norm of each output column of the ``(in, out)`` kernel (over the input axis),
  i.e. the norm of each row of a PyTorch ``(out, in)`` weight, as in DoRA.
  """

  delta_depends_on_w0 = True

  def init(self, key, w0):
    return self._init_with_norm(key, w0, _column_norm(w0))

  def init_both(self, params_key, frozen_key, w0):
    """``(init, init_frozen)`` from one pass over ``w0`` (its column norms)."""
    del frozen_key
    norm = _column_norm(w0)
    return self._init_with_norm(params_key, w0, norm), {"w0_norm": norm}

  def _init_with_norm(self, key, w0, norm):
    params = super().init(key, w0)
    magnitude = norm.astype(self._dtype(w0))
    if _validation.is_concrete(norm) and not bool(jnp.all(jnp.isfinite(magnitude))):
      raise ValueError(
          f"{type(self).__name__}: the column norms of the weight (up to {float(jnp.max(norm)):.6g}) do not fit the "
          f"magnitude's dtype {jnp.dtype(magnitude.dtype).name} (largest finite value "
          f"{float(jnp.finfo(magnitude.dtype).max):.6g}); pass param_dtype='float32'."
      )
    params["magnitude"] = magnitude
    return params

  def init_frozen(self, key, w0):
    """``{"w0_norm": (n,)}``: the column norms of ``w0``, needed to invert the merge."""
    return {"w0_norm": _column_norm(w0)}

  def _norm_factor(self, params, norm):
    """``magnitude / ||V||_c`` in at least float32.

    The norm is rounded to the magnitude's dtype first (a no-op in float32), so that at init, where
    the magnitude is that rounded norm, the factor is exactly 1 and the merge exactly ``w0`` in
    bfloat16 and float16 too.
    """
    if self.stop_norm_gradient:
      norm = jax.lax.stop_gradient(norm)
    magnitude = params["magnitude"]
    norm = norm.astype(magnitude.dtype).astype(jnp.promote_types(magnitude.dtype, jnp.float32))
    tiny = jnp.finfo(norm.dtype).tiny
    return _up(magnitude) / jnp.maximum(norm, tiny)

  def delta(self, params, w0, frozen=None):
    del frozen
    update = self.update(params)
    w0 = _up(w0)
    direction = w0 + update
    factor = self._norm_factor(params, _column_norm(direction))
    # (factor - 1) * w0 + factor * update is exactly zero at init (factor == 1, update == 0).
    return (factor - 1.0) * w0 + factor * update

  def _direction_norm(self, params, w0):
    """``||w0 + update||_c``: ``(n,)``."""
    return _column_norm(_up(w0) + self.update(params))

  def apply(self, params, x, w0, frozen=None):
    del frozen
    dtype = jnp.result_type(x, w0)
    factor = self._norm_factor(params, self._direction_norm(params, w0)).astype(dtype)
    if isinstance(self, _PlainUpdate):
      # LoRA's product (merged or factored as it is lighter) with the column factor on the output: no
      # (m, n) array, and on the merged route no output, is kept for the backward pass.
      return self.product(params, x, w0, factor)
    y = jnp.matmul(x, w0) + self.update_matmul(params, x).astype(dtype)
    return y * factor

  def branch(self, params, x, w0, frozen=None):
    """``x @ Delta W = (factor - 1) (x w0) + factor (x update)``, as PEFT's DoRA branch."""
    del frozen
    dtype = jnp.result_type(x, w0)
    factor = self._norm_factor(params, self._direction_norm(params, w0)).astype(dtype)
    return (factor - 1) * jnp.matmul(x, w0) + factor * self.update_matmul(params, x).astype(dtype)

  def unmerge(self, params, w, frozen=None):
    """Inverts the merge using the stored column norms of ``w0``.

    Each merged column is ``w_j = t_j^{-1} V_j`` with ``V_j = w0_j + D_j`` and
    ``t_j = ||V_j|| / magnitude_j``; ``||t_j w_j - D_j|| = ||w0_j||`` is a quadratic in ``t_j``
    whose root of the sign of ``magnitude_j`` is unique while ``||D_j|| < ||w0_j||`` (any
    fine-tuning update). Then ``w0 = t w - D``.
    """
    w = _up(w)
    update = self.update(params).astype(w.dtype)
    w0_norm = frozen["w0_norm"].astype(w.dtype)
    magnitude = params["magnitude"].astype(w.dtype)
    ww = jnp.sum(w * w, axis=0)
    wd = jnp.sum(w * update, axis=0)
    dd = jnp.sum(update * update, axis=0)
    disc = jnp.maximum(wd * wd - ww * (dd - w0_norm * w0_norm), 0.0)
    safe_ww = jnp.where(ww > 0, ww, 1.0)
    t = (wd + jnp.sign(magnitude) * jnp.sqrt(disc)) / safe_ww
    # A zero merged column means magnitude 0: w0 cannot be recovered from it, keep it zero.
    return jnp.where(ww > 0, t * w - update, 0.0)


@dataclasses.dataclass(frozen=True)
class LoRA(_AdditiveLowRank, _PlainUpdate, _LowRankBase):
  """Low-rank adaptation: ``w = w0 + (alpha / rank) a @ b``.

  Learning rate (Adam/AdamW): the update is scaled by ``alpha / rank``, so ``lr`` and ``alpha``
  trade off. Hu et al. use 4e-4 to 5e-4 on RoBERTa-base GLUE (``alpha = rank = 8``: scale 1) and
  2e-4 on GPT-2; PEFT sets no learning rate (its ``lora_alpha=8`` gives scale ``8 / r``). Ours, on
  small models: 1e-3 to 3e-3 (scale 1 or 2; the notebooks' 64 x 64 kernels, 40 to 200 steps).

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

  Args:
    rank: ``r``, the inner dimension, ``1 <= r <= min(m, n)`` (PEFT's ``r``, default 8 there).
    alpha: scale numerator; the update is scaled by ``alpha / rank`` (``None``: 1). PEFT's
      ``lora_alpha`` defaults to 8, i.e. scale ``8 / r``; pass ``alpha=8.0`` for PEFT's default.
    param_dtype: dtype of ``a`` and ``b`` (``None``: the dtype of ``w0``).
    use_rslora: scale by ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``; default False in both).

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> method = sp.peft.LoRA(rank=4, alpha=8.0)
    >>> params = method.init(jax.random.key(0), jnp.ones((16, 8)))
    >>> params["a"].shape, params["b"].shape
    ((16, 4), (4, 8))
  """

  def apply(self, params, x, w0, frozen=None):
    """``x @ (w0 + scale a b)`` at the memory of the lighter of the factored and the merged product
    (:func:`low_rank_product`)."""
    del frozen
    return self.product(params, x, w0)

  def mixed_branch(self, params, x, w0, terms, gather, with_base=False):
    """Mixed-adapter batches (:class:`~spectral_peft.peft.AdapterBank`): gathered factors, no ``(m, n)`` array.

    ``with_base``: the whole product ``x W0 + branch`` instead of the branch.
    """
    del terms
    y = _gathered_update_matmul(self, params, x, gather).astype(jnp.result_type(x, w0))
    return jnp.matmul(x, w0) + y if with_base else y


@dataclasses.dataclass(frozen=True)
class SineLoRA(_AdditiveLowRank, _SineUpdate, _LowRankBase):
  """Sine LoRA: ``w = w0 + (alpha / rank) sin(omega a @ b) / gain``.

  Learning rate (Adam/AdamW): near the zero init ``sin(omega a b) / gain ~ (omega / gain) a b``, so
  at the same ``lr`` the update moves about ``omega / gain`` times faster than LoRA's
  (``experiments.sine_lora_finetune`` has a LoRA control scaled by exactly that). The paper uses
  LoRA's rates: 8e-5 to 1.2e-3 on RoBERTa GLUE (``omega = 200``, Tab. 4), 1e-4 on LLaMA-3-8B
  (``omega`` 200 to 800, Tab. 5). Ours: 1e-3 (README, ``omega = 100``, 64-wide kernels) to 3e-3
  (the notebooks).

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", Sec. 4.1.

  Args:
    rank: ``r``, ``1 <= r <= min(m, n)``.
    omega: fixed frequency (the paper uses 200 to 1000 for LLMs).
    alpha: scale numerator, as in LoRA (``None``: scale 1).
    gain: fixed divisor; ``None`` is ``sqrt(m) = sqrt(in_features)`` (App. A.2).
    block_size: column block of the blocked product used by :meth:`branch` (:func:`~spectral_peft.sine_lowrank_matmul`).
    param_dtype: dtype of ``a`` and ``b`` (``None``: the dtype of ``w0``).
    use_rslora: scale by ``alpha / sqrt(rank)``, as in :class:`LoRA`.
  """

  # The runtime takes :meth:`apply` (sine_merged_product: one transient merged weight, no activation
  # of its own) on Dense-like layers and the whole contraction on einsum layers; :meth:`branch` is the
  # blocked product of sp.sine_lowrank_matmul (no (m, n) array, but slower).
  runtime_factored = True
  factored_branch = False

  omega: float = 200.0
  gain: Optional[float] = None
  block_size: Optional[int] = None

  def __post_init__(self) -> None:
    super().__post_init__()
    self._check_sine_fields()

  def apply(self, params, x, w0, frozen=None):
    """``x @ (w0 + scale sin(omega a b) / gain)`` by :func:`sine_merged_product` (reverse mode; ``jax.jvp``
    needs :meth:`branch`, ``jnp.matmul(x, w0) + branch(...)``)."""
    del frozen
    dtype = jnp.result_type(x, w0)
    gain = self.gain if self.gain is not None else matrices.default_sine_gain(w0.shape[0])
    return sine_merged_product(x.astype(dtype), w0.astype(dtype), params["a"], params["b"], self.omega,
                               self.scale / gain)


@dataclasses.dataclass(frozen=True)
class DoRA(_MagnitudeDirection, _PlainUpdate, _LowRankBase):
  """Weight-decomposed low-rank adaptation.

  ``w = magnitude * (w0 + s a @ b) / ||w0 + s a @ b||_c`` with ``s = alpha / rank``, the column norm
  taken per output feature; ``magnitude: (n,)`` starts at ``||w0||_c``.

  Learning rate (Adam/AdamW): LoRA's, for ``a``, ``b`` and the magnitude alike. Liu et al.
  fine-tune LLaMA on commonsense reasoning with 1e-4 to 2e-4; PEFT sets no learning rate
  (``use_dora=True`` on a LoRA config). Ours: 3e-3 in the notebooks (rank 2 to 8, 64 x 64
  kernels).

  References:
    Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.

  Args:
    rank: ``r``, ``1 <= r <= min(m, n)``.
    alpha: scale numerator (``None``: scale 1; PEFT's ``lora_alpha``, default 8 there).
    use_rslora: scale by ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
    stop_norm_gradient: treat ``||V||_c`` as a constant in the backward pass (DoRA Sec. 4.3 and the
      reference implementations do; it saves memory). Values are unaffected.
    param_dtype: dtype of ``a``, ``b`` and ``magnitude`` (``None``: the dtype of ``w0``).
  """

  stop_norm_gradient: bool = True

  def _direction_norm(self, params, w0):
    """``||w0 + s a b||_c`` from ``a^T w0`` and ``a^T a``, without forming the ``(m, n)`` sum."""
    w0 = _up(w0)
    a, b = params["a"].astype(w0.dtype), params["b"].astype(w0.dtype)
    s = self.scale
    cross = jnp.sum(jnp.matmul(a.T, w0) * b, axis=0)
    update_sq = jnp.sum(b * jnp.matmul(jnp.matmul(a.T, a), b), axis=0)
    return _safe_sqrt(jnp.sum(w0 * w0, axis=0) + 2.0 * s * cross + s * s * update_sq)

  def mixed_branch(self, params, x, w0, terms, gather, with_base=False):
    """Mixed-adapter batches: the ``K`` column factors, gathered per example with the factors ``a``, ``b``.

    ``with_base``: the whole product ``factor (x W0 + x update)``, with ``x W0`` computed once.
    """
    del terms
    dtype = jnp.result_type(x, w0)
    factors = jax.vmap(lambda p: self._norm_factor(p, self._direction_norm(p, w0)))(params)
    factor = _padded(factors, 1.0).astype(dtype)[gather].reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
    update = _gathered_update_matmul(self, params, x, gather).astype(dtype)
    base = jnp.matmul(x, w0.astype(dtype))
    return factor * (base + update) if with_base else (factor - 1) * base + factor * update


@dataclasses.dataclass(frozen=True)
class SineDoRA(_MagnitudeDirection, _SineUpdate, _LowRankBase):
  """Sine DoRA: DoRA whose direction update is ``s sin(omega a @ b) / gain``.

  Learning rate (Adam/AdamW): as :class:`SineLoRA` (the direction update moves about
  ``omega / gain`` times faster than DoRA's at the same ``lr``). The paper uses 6e-5 on LLaMA-3-8B
  (``omega`` 100 to 300, Tab. 8). Ours: 3e-3 in the quickstart notebook (rank 2,
  ``omega = 100``, 64 x 64 kernels).

  References:
    Ji et al., "Efficient Learning with Sine-Activated Low-Rank Matrices", App. A.2.1.

  Args:
    rank: ``r``, ``1 <= r <= min(m, n)``.
    omega: fixed frequency.
    alpha: scale numerator (``None``: scale 1).
    gain: fixed divisor; ``None`` is ``sqrt(in_features)``.
    block_size: column block of the memory-lean product used by :meth:`apply`.
    stop_norm_gradient: as in :class:`DoRA`.
    param_dtype: dtype of the trainable arrays (``None``: the dtype of ``w0``).
    use_rslora: scale by ``alpha / sqrt(rank)``, as in :class:`LoRA`.
  """

  omega: float = 200.0
  gain: Optional[float] = None
  block_size: Optional[int] = None
  stop_norm_gradient: bool = True

  # Its column norms need the whole (m, n) update: the runtime rebuilds it per layer instead.
  runtime_factored = False

  def __post_init__(self) -> None:
    super().__post_init__()
    self._check_sine_fields()
