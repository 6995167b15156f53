"""Sparse and spectral adapters: WaveFT, SHiRA, FourierFT and LFMA as adapter method specs.

References:
  "Exploring sparsity for PEFT using wavelets for vision" (WaveFT; SHiRA and FourierFT baselines).
  Bhardwaj et al., "Sparse High Rank Adapters" (SHiRA), NeurIPS 2024.
  Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (FourierFT), ICML 2024.
  "LFMA: Layerwise Fourier Masked Adapter with Top-k Frequency Selection".

Each method stores ``p`` trainable coefficients (``params["values"]``; LFMA's are complex) and
their positions (``frozen["indices"]``, ``(p,)`` int32 flat row-major positions, saved with the
adapter). Positions are drawn from the key the adapter gets from :func:`sp.peft.init_adapters`
(``fold_in(key, crc32(path))``), so the same key gives the same positions on every machine.

* WaveFT: ``Delta W = scale * IDWT2(C)[:m, :n]`` (periodised, PyWavelets layout; see
  :func:`spectral_peft.idwt2`), ``C`` sparse in the zero-padded wavelet grid.
* SHiRA: ``Delta W = scale * C`` (the identity in place of the IDWT).
* FourierFT: ``Delta W = scale * Re(ifft2(C))`` with real ``C`` at random frequencies.
* LFMA: ``Delta W = alpha * Re(ifft2(F))`` with complex ``F`` on the top-k frequencies of
  ``|fft2(Delta W_init)|``.

``apply`` (used by :func:`sp.peft.factored`) computes ``x @ W0 + x @ Delta W`` with the factored
products of :mod:`spectral_peft._sparse.deltas` (chosen by a flop model, or forced with ``path``).

Budgets: a spec has a fixed ``p`` per layer. For a different ``p`` on some paths pass a
``{regex: spec}`` mapping to ``init_adapters`` (first match wins); for ``p`` proportional to each
layer's size use :func:`proportional_allocation`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft import _validation
from spectral_peft._sparse import deltas
from spectral_peft._sparse import sharded
from spectral_peft._sparse import theory
from spectral_peft._sparse import wavelets
from spectral_peft.peft._methods import positions
from spectral_peft.peft._methods.base import Adapter, AdapterMethod, matrix_shape
from spectral_peft.peft._tree import Adapters, PyTree, init_adapters, leaf_paths, merge

Array = jax.Array

_REAL_INITS = ("zeros", "normal")
_LFMA_INITS = ("spectrum", "zeros")
_LFMA_DELTA_INITS = ("random", "weight", "given", "gradient")
_BOUNDARIES = ("periodic", "zero")


def pywt_haar(wavelet: str) -> bool:
  """True for PyWavelets' two names of the Haar wavelet."""
  return wavelet in ("haar", "db1")


def _check_seed(seed: Any) -> None:
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
    raise TypeError(f"`random_loc_seed` must be None or an int (PEFT's seed), got {seed!r}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_param_dtype(dtype: Any) -> Optional[str]:
  return _validation.check_float_dtype("param_dtype", dtype)


def _up(x: Array) -> Array:
  """``x`` in at least float32 (syntheses run there; the update is cast to the weight's dtype after)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_abstract(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer) or isinstance(x, jax.ShapeDtypeStruct)


@dataclasses.dataclass(frozen=True)
class _SparseRealBase(AdapterMethod):
  """``p`` real coefficients at random positions of a coefficient grid, scaled by ``scale``."""

  n_params: int
  _: dataclasses.KW_ONLY
  scale: float = 1.0
  value_init: str = "zeros"
  init_std: float = 1.0
  path: str = "auto"
  param_dtype: Optional[str] = None

  def __post_init__(self) -> None:
    _validation.normalize_fields(self)
    _validation.check_positive_int("n_params", self.n_params)
    _validation.check_positive_float("scale", self.scale)
    _check_choice("value_init", self.value_init, _REAL_INITS)
    _validation.check_positive_float("init_std", self.init_std)
    deltas.check_path(self.path)
    object.__setattr__(self, "param_dtype", _check_param_dtype(self.param_dtype))

  def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(M, N)``: the coefficient grid of an ``(m, n)`` weight."""
    return tuple(shape)

  def check_shape(self, shape: tuple[int, ...]) -> None:
    big_m, big_n = self.grid(tuple(shape))
    if self.n_params > big_m * big_n:
      raise ValueError(
          f"`n_params` of {type(self).__name__} must be at most the {big_m * big_n} positions of the "
          f"{big_m} x {big_n} coefficient grid of a weight of matrix shape {tuple(shape)}, got {self.n_params}."
      )

  def _dtype(self, w0: Array) -> Any:
    return jnp.dtype(self.param_dtype) if self.param_dtype is not None else w0.dtype

  def init(self, key: Array, w0: Array) -> dict[str, Array]:
    """``{"values": (p,)}``: zeros (identity at init) or ``init_std * N(0, 1)`` (``value_init="normal"``)."""
    _validation.check_fits_dtype(type(self).__name__, {"scale": self.scale}, self._dtype(w0))
    dtype = self._dtype(w0)
    if self.value_init == "zeros":
      return {"values": jnp.zeros((self.n_params,), dtype)}
    return {"values": self.init_std * jax.random.normal(key, (self.n_params,), dtype)}

  def init_frozen(self, key: Array, w0: Array) -> dict[str, Array]:
    """``{"indices": (p,) int32}``: distinct positions, uniform without replacement, sorted."""
    self.check_shape(tuple(w0.shape))
    return {"indices": theory.sparse_positions(key, self.grid(tuple(w0.shape)), self.n_params)}

  def synthesis(self, values: Array, indices: Array, shape: tuple[int, int]) -> Array:
    raise NotImplementedError

  def synthesis_matmul(self, x: Array, values: Array, indices: Array, shape: tuple[int, int]) -> Array:
    raise NotImplementedError

  def delta(self, params, w0, frozen=None):
    return self.scale * self.synthesis(_up(params["values"]), frozen["indices"], tuple(w0.shape))

  def scatter_terms(self, values: Array, indices: Array, shape: tuple[int, int]) -> Optional[tuple[Array, Array]]:
    """``(positions, terms)`` with ``Delta W / scale`` = their scatter-add into ``(m, n)``, or None."""
    return None

  def merge(self, params, w0, frozen=None):
    """Adds the update's entries into a copy of ``w0`` (no separate ``Delta W``) when the method is a scatter.

    Weights below float32 take ``w0 + Delta W`` (the update summed in float32 first, then rounded once).
    """
    terms = None
    if jnp.dtype(w0.dtype).itemsize >= 4 and jnp.issubdtype(w0.dtype, jnp.floating):
      terms = self.scatter_terms(_up(params["values"]), frozen["indices"], tuple(w0.shape))
    if terms is None:
      return super().merge(params, w0, frozen)
    positions, values = terms
    values = (self.scale * values).astype(w0.dtype)
    start = w0 + deltas.zero_from(values)  # the copy of w0, built where it is used
    return deltas.scatter_add(start, positions, values)

  @property
  def has_scatter_terms(self) -> bool:
    """Whether :meth:`scatter_terms` gives the update (so :meth:`apply` can merge and sample its gradient)."""
    return False

  @property
  def runtime_factored(self) -> bool:  # type: ignore[override]
    """``path="auto"`` with scatter terms (:meth:`apply`'s merged product), or ``path="factored"`` (forced).

    Otherwise the runtime rebuilds ``W0 + Delta W`` per layer: the factored product's gathers over
    ``batch x p`` cost more than a rebuilt ``Delta W``.
    """
    return self.path == "factored" or (self.path == "auto" and self.has_scatter_terms)

  @property
  def factored_branch(self) -> bool:
    """Whether :meth:`branch` is lean on its own (only when forced: ``path="factored"``)."""
    return self.path == "factored"

  def apply(self, params, x, w0, frozen=None):
    """``x @ (w0 + Delta W)``; with ``path="auto"`` and scatter terms, merged and differentiated sampled.

    That product (:func:`_merged_product`) computes its value through a transient merged
    weight and its coefficient gradient as ``(x^T g)`` sampled at the update's positions
    (:func:`~spectral_peft._sparse.deltas.sampled_product`, ``O(B p)``), never the ``2 B m n``
    weight gradient ``x^T g`` that a rebuilt ``Delta W`` needs for its adjoint.
    """
    if self.path == "auto" and self.has_scatter_terms:
      return _merged_product(self._runtime_synthesis(), x, w0, params["values"], frozen["indices"])
    return jnp.matmul(x, w0) + self.branch(params, x, w0, frozen)

  def _runtime_synthesis(self) -> "_ScatterSynthesis":
    """The update as :func:`_merged_product` reads it."""
    return _ScatterSynthesis(self)

  def branch(self, params, x, w0, frozen=None):
    dtype = jnp.result_type(x, w0)
    update = self.synthesis_matmul(x, params["values"].astype(dtype), frozen["indices"], tuple(w0.shape))
    return (self.scale * update).astype(dtype)


def _merged_product(synthesis: Any, x: Array, w0: Array, values: Array, indices: Array) -> Array:
  """``x @ synthesis.merged_weight(values, w0, indices)`` over the trailing axis of ``x: (..., m)``: ``(..., n)``.

  The value goes through a transient merged weight; the gradient never forms the ``(m, n)`` weight
  gradient ``x^T g``: the input's from the rebuilt merged weight, the coefficients' from
  ``synthesis.values_cotangent`` (a sampled product, :func:`~spectral_peft._sparse.deltas.sampled_product`).
  ``synthesis`` is a hashable description of the update (:class:`_ScatterSynthesis`, :class:`_FourierSynthesis`).
  """
  m, n = w0.shape
  lead = x.shape[:-1]
  return _merged_2d(synthesis, x.reshape(-1, m), w0, values, indices).reshape(lead + (n,))


def _tied(values: Array, anchor: Array) -> Array:
  """``values`` made to depend on one element of ``anchor`` (exactly unchanged, inf and NaN included).

  The merged weight is then built where the layer runs (forward: after its input exists; backward:
  after its output cotangent does) instead of being hoisted with every other layer's.
  """
  return values + deltas.zero_from(anchor).astype(values.dtype)


def _merged_value(synthesis, x, w0, values, indices):
  return jnp.matmul(x, synthesis.merged_weight(_tied(values, x), w0, indices))


_merged_2d = jax.custom_vjp(_merged_value, nondiff_argnums=(0,))


def _merged_fwd(synthesis, x, w0, values, indices):
  return _merged_value(synthesis, x, w0, values, indices), (x, w0, values, indices)


def _sampled_gradient_pays(tokens: int, m: int, n: int) -> bool:
  """Whether the coefficient gradient is sampled: unless the tokens' activations outweigh an ``(m, n)`` array.

  With ``2 B (m + n) > m n`` (many tokens: the complex spectra of both activations, or the gathers of
  ``B`` values per position, are heavier than ``x^T g``), the weight gradient ``x^T g`` and the
  synthesis' adjoint are cheaper, and under tensor parallelism they stay local to each shard.
  """
  return 2 * tokens * (m + n) <= m * n


def _merged_bwd(synthesis, residuals, g):
  x, w0, values, indices = residuals
  m, n = w0.shape
  dw0 = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))  # Removed by XLA when unused.
  if synthesis.block_local and sharded.mesh_of(w0) is not None:
    # Each device's block of x^T g through the adjoint first; the merged weight for dx is rebuilt
    # after it (tied to its result), so the two (m, n) transients are not alive together.
    d_values = synthesis.block_values_cotangent(x, g, values, indices, w0)
    merged = synthesis.merged_weight(_tied(values, d_values), w0, indices)
  else:
    merged, merge_vjp = jax.vjp(lambda v: synthesis.merged_weight(v, w0, indices), _tied(values, g))
    if _sampled_gradient_pays(x.shape[0], m, n):
      d_values = synthesis.values_cotangent(x, g, values, indices, w0)
    else:
      (d_values,) = merge_vjp(dw0.astype(merged.dtype))
  dx = jax.lax.dot_general(g, merged, (((1,), (1,)), ((), ()))).astype(x.dtype)
  cotangents = (dx, dw0.astype(w0.dtype), d_values.astype(values.dtype))
  return (*(sharded.reduced_like(c, p) for c, p in zip(cotangents, (x, w0, values))),
          np.zeros(indices.shape, jax.dtypes.float0))


_merged_2d.defvjp(_merged_fwd, _merged_bwd)


@dataclasses.dataclass(frozen=True)
class _ScatterSynthesis:
  """A scatter method's update (:meth:`_SparseRealBase.scatter_terms`) for :func:`_merged_product`."""

  method: "_SparseRealBase"
  block_local = False  # Scatters add into each shard of a sharded kernel locally already.

  def merged_weight(self, values, w0, indices):
    return self.method.merge({"values": values}, w0, {"indices": indices})

  def values_cotangent(self, x, g, values, indices, w0):
    """The terms' cotangent is ``scale (x^T g)`` at their positions, pulled back to the values."""
    shape = tuple(w0.shape)
    terms = lambda v: self.method.scatter_terms(_up(v), indices, shape)  # noqa: E731
    _, terms_vjp, positions = jax.vjp(lambda v: tuple(reversed(terms(v))), values, has_aux=True)
    d_terms = self.method.scale * deltas.sampled_product(x, g, positions, shape[1])
    return terms_vjp(d_terms.astype(_up(values).dtype))[0]


@dataclasses.dataclass(frozen=True)
class _WaveletSynthesis(_ScatterSynthesis):
  """One-level periodised WaveFT for :func:`_merged_product`: merged by its scatter terms, the coefficient
  cotangent sampled once per coefficient from wavelet-analysed activations
  (:func:`~spectral_peft._sparse.deltas.waveft_sampled_cotangent`), not once per scattered term."""

  def values_cotangent(self, x, g, values, indices, w0):
    method = self.method
    d_values = deltas.waveft_sampled_cotangent(x, g, indices, tuple(w0.shape), wavelet=method.wavelet)
    return (method.scale * d_values).astype(_up(values).dtype)


@dataclasses.dataclass(frozen=True)
class WaveFT(_SparseRealBase):
  """Wavelet fine-tuning: ``w = w0 + scale * IDWT2(C)``, ``C`` with ``n_params`` trainable entries.

  ``C`` lives in the zero-padded grid ``(M, N) = sp.wavelet_coefficient_shape((m, n), ...)`` (the
  matrix rounded up to a multiple of ``2**level``) in the ``pywt.coeffs_to_array`` layout, and the
  periodised synthesis is cropped to ``(m, n)``. Positions are uniform without replacement over
  that grid; values start at zero (the paper found Gaussian init far worse; ``value_init="normal"``
  is kept for that ablation).

  Learning rate (Adam/AdamW): the Haar synthesis is orthonormal, so a coefficient moves a small
  patch of ``w`` by about ``lr * scale`` per step and ``lr`` and ``scale`` trade off. The paper
  trains SDXL with AdamW 1e-4 at ``scale = 25`` (PEFT's default ``scaling``; PEFT sets no learning
  rate), and its interpolation study (App. A.3) with Adam 1e-2 at scale 1. Ours: 3e-3 at
  ``scale = 25`` in the quickstart notebook (64 x 64 kernels).

  References:
    "Exploring sparsity for PEFT using wavelets for vision", Sec. 3 (``lambda = 25`` in SDXL runs).

  Args:
    n_params: ``p`` per layer, ``1 <= p <= M * N``. Per-path values: a ``{regex: spec}`` mapping in
      ``init_adapters``; proportional to layer size: :func:`proportional_allocation`.
    scale: ``lambda``.
    wavelet: any discrete PyWavelets wavelet (``"haar"``, ``"db2"``, ``"sym3"``, ``"coif1"``...).
    level: decomposition depth, valid for the weight's shape (checked per target).
    value_init: ``"zeros"`` or ``"normal"`` (``init_std * N(0, 1)``, not the identity at init).
    init_std: standard deviation for ``value_init="normal"``.
    path: ``"auto"``, ``"dense"`` or ``"factored"`` product in :meth:`apply`.
    param_dtype: dtype of the values (``None``: that of ``w0``).
    boundary: ``"periodic"`` (default, above) or ``"zero"``: PEFT's WaveFT convention, one level of
      zero-boundary synthesis computed with ``jaxwt.waverec2`` (:func:`spectral_peft._sparse.wavelets.idwt2_zero`,
      equal to ``pywt.waverec2(..., mode="zero")``) on the grid ``(m + K - 2, n + K - 2)`` rounded up
      to even (``K`` the filter length), cropped to ``(m, n)``; ``level`` must be 1. :meth:`apply`
      has a factored product for it too (1-D zero-boundary cascades along each axis,
      :func:`spectral_peft._sparse.wavelets.sparse_idwt2_zero_matmul`). For ``"haar"`` both boundaries give
      the same function.
    random_loc_seed: ``None`` (positions from the adapter's key) or PEFT's ``random_loc_seed``:
      positions are then PEFT's (``torch.randperm`` of the ``m * n`` weight entries with that seed,
      reproduced exactly in numpy), the same seed for every layer, so the adapter can be exported
      with :func:`sp.peft.export_peft`. Needs ``boundary="zero"`` or ``"haar"`` at level 1.

  PEFT names (``peft.WaveFTConfig``): ``n_params`` is ``n_frequency`` (PEFT default 2592), ``scale``
  is ``scaling`` (25.0 in both), ``wavelet`` is ``wavelet_family`` (PEFT default ``"db1"``, i.e.
  haar), ``random_loc_seed`` (PEFT default 777). PEFT has one level and the zero boundary only.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> method = sp.peft.WaveFT(n_params=10, wavelet="db2")
    >>> method.init_frozen(jax.random.key(0), jnp.zeros((12, 9)))["indices"].shape
    (10,)
  """

  scale: float = 25.0
  wavelet: str = "haar"
  level: int = 1
  boundary: str = "periodic"
  random_loc_seed: Optional[int] = None

  def __post_init__(self) -> None:
    super().__post_init__()
    wavelets.check_wavelet(self.wavelet)
    _validation.check_positive_int("level", self.level)
    _check_choice("boundary", self.boundary, _BOUNDARIES)
    if self.boundary == "zero" and self.level != 1:
      raise ValueError(f"WaveFT(boundary='zero') has one level (PEFT's convention): `level` must be 1, got {self.level}.")
    _check_seed(self.random_loc_seed)
    if self.random_loc_seed is not None and not self.peft_compatible:
      raise ValueError(
          "`random_loc_seed` gives PEFT's positions, which PEFT uses with one level of zero-boundary synthesis: "
          f"pass boundary='zero' (or wavelet='haar', level=1), got boundary={self.boundary!r}, "
          f"wavelet={self.wavelet!r}, level={self.level}."
      )

  @property
  def peft_compatible(self) -> bool:
    """True when ``delta`` is PEFT's WaveFT function (zero boundary, or haar at level 1)."""
    return self.level == 1 and (self.boundary == "zero" or pywt_haar(self.wavelet))

  def grid(self, shape):
    if self.boundary == "zero":
      return wavelets.zero_boundary_coefficient_shape(tuple(shape), wavelet=self.wavelet)
    return wavelets.wavelet_coefficient_shape(tuple(shape), wavelet=self.wavelet, level=self.level)

  def check_shape(self, shape):
    super().check_shape(shape)
    m, n = shape
    if self.random_loc_seed is not None and self.n_params > m * n:
      raise ValueError(f"`n_params` of WaveFT with `random_loc_seed` must be at most m * n = {m * n} (PEFT), got {self.n_params}.")

  def init_frozen(self, key, w0):
    """``{"indices": (p,) int32}``: sorted positions, from ``key`` or from PEFT's ``random_loc_seed``."""
    if self.random_loc_seed is None:
      return super().init_frozen(key, w0)

    self.check_shape(tuple(w0.shape))
    flat = positions.peft_positions("waveft", tuple(w0.shape), self.n_params, self.random_loc_seed, self.grid(tuple(w0.shape)))
    return {"indices": jnp.asarray(np.sort(flat), jnp.int32)}

  @property
  def has_scatter_terms(self) -> bool:
    return self.boundary == "periodic" and self.level == 1

  def scatter_terms(self, values, indices, shape):
    if not self.has_scatter_terms:
      return None
    return deltas.waveft_terms(values, indices, shape, wavelet=self.wavelet)

  def _runtime_synthesis(self) -> "_ScatterSynthesis":
    return _WaveletSynthesis(self)

  def synthesis(self, values, indices, shape):
    if self.boundary == "zero":
      coeffs = deltas.scatter_coefficients(deltas._check_values(values, real=True), indices, self.grid(shape))
      return wavelets.idwt2_zero(coeffs, self.wavelet, shape=shape)
    return deltas.waveft_delta(values, indices, shape, wavelet=self.wavelet, level=self.level)

  def synthesis_matmul(self, x, values, indices, shape):
    if self.boundary == "zero":
      grid = self.grid(shape)
      flat = deltas.flat_indices(indices, grid, values.shape[0])
      k_len = wavelets.filter_length(self.wavelet)
      chosen = deltas._resolve(
          self.path,
          lambda: deltas.matmul_costs("wavelet", deltas._batch(x), grid, values.shape[0], filter_length=k_len),
      )
      if chosen == "dense":
        return jnp.matmul(x, self.synthesis(values, flat, shape).astype(x.dtype))
      return wavelets.sparse_idwt2_zero_matmul(x, values, flat // grid[1], flat % grid[1], tuple(shape), wavelet=self.wavelet)
    return deltas.waveft_matmul(x, values, indices, shape, wavelet=self.wavelet, level=self.level, path=self.path)


@dataclasses.dataclass(frozen=True)
class SHiRA(_SparseRealBase):
  """Sparse high-rank adapter: ``w = w0 + scale * C``, ``C`` with ``n_params`` trainable entries.

  WaveFT with the identity in place of the IDWT (positions uniform over the ``(m, n)`` weight).

  Learning rate (Adam/AdamW): each value is one weight entry times ``scale``, so the adapted
  entries move by about ``lr * scale`` per step. The WaveFT paper trains SHiRA on SDXL with AdamW
  1e-4 at ``scale = 25``, i.e. about 2.5e-3 at our and PEFT's default ``scale = 1`` (PEFT sets no
  learning rate). Ours: 3e-3 at scale 1 in the quickstart notebook (64 x 64 kernels), Adam 1e-2 in
  ``experiments.sparse_updates``.

  References:
    Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024; WaveFT, Sec. 3.

  Args:
    n_params: ``p``, ``1 <= p <= m * n``.
    scale: multiplier of the sparse update.
    value_init, init_std, path, param_dtype: as in :class:`WaveFT`.

  PEFT names (``peft.ShiraConfig``): PEFT sets ``n_params = r * (m + n)`` from its ``r`` (LoRA's
  budget) and has no scale (``scaling`` 1.0, ours ``scale=1.0``); its positions are saved in the
  checkpoint (``shira_indices``), so any positions export.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> sp.peft.SHiRA(n_params=5).init(jax.random.key(0), jnp.zeros((4, 4)))["values"].shape
    (5,)
  """

  def synthesis(self, values, indices, shape):
    return deltas.scatter_coefficients(deltas._check_values(values, real=True), indices, shape)

  @property
  def has_scatter_terms(self) -> bool:
    return True

  def scatter_terms(self, values, indices, shape):
    values = deltas._check_values(values, real=True)
    return deltas.flat_indices(indices, tuple(shape), values.shape[0]), values

  def synthesis_matmul(self, x, values, indices, shape):
    return deltas.sparse_matmul(x, values, indices, shape, path=self.path)


class _FourierRuntime:
  """How the runtime runs FourierFT and LFMA: their own product for ``path="auto"`` and ``"factored"``."""

  path: str

  @property
  def runtime_factored(self) -> bool:
    """``path="auto"`` (:meth:`apply`'s merged product) or ``path="factored"`` (the gather/scatter product)."""
    return self.path in ("auto", "factored")

  @property
  def factored_branch(self) -> bool:
    """Whether :meth:`branch` is lean on its own (only when forced: ``path="factored"``)."""
    return self.path == "factored"


@dataclasses.dataclass(frozen=True)
class _FourierSynthesis:
  """``Delta W = scale Re(ifft2(S))`` (FourierFT, LFMA) for :func:`_merged_product`.

  The merged weight takes one ``irfft2``. With ``X = m ifft_m(x)`` and ``G = n ifft_n(g)`` (1-D FFTs
  of the activations), the cotangent of the coefficient at ``(u, v)`` is
  ``scale / (m n) sum_b X[b, u] G[b, v]`` (its real part for real coefficients): no ``(m, n)``
  weight gradient and no adjoint FFT of one. That holds the spectra of both (real) activations as
  ``rfft`` halves (:func:`~spectral_peft._sparse.deltas.sampled_spectra`), about ``B (m + n) / 2``
  complex values: where ``B (m + n)`` complex values outweigh an ``(m, n)`` array (``2 B (m + n) > m n``, many
  tokens; :func:`_sampled_gradient_pays`) the gradient is the adjoint FFT of ``x^T g`` instead, as
  for a rebuilt ``Delta W``. On a device mesh the update is built replicated and the gradient comes
  from each device's block of ``x^T g`` (:mod:`spectral_peft._sparse.sharded`): no all-gather.
  """

  scale: float
  block_local = True  # On a mesh: see :mod:`spectral_peft._sparse.sharded`.

  def merged_weight(self, values, w0, indices):
    delta = sharded.replicated_like(deltas.fourier_delta(values, indices, tuple(w0.shape)), w0)
    return w0 + (self.scale * delta).astype(w0.dtype)

  def block_values_cotangent(self, x, g, values, indices, w0):
    """On a mesh: each device's block of ``x^T g`` through the synthesis' adjoint, summed over devices."""
    return sharded.fourier_cotangent(x, g, values, indices, tuple(w0.shape), self.scale)

  def values_cotangent(self, x, g, values, indices, w0):
    m, n = w0.shape
    flat = deltas.flat_indices(indices, (m, n), values.shape[0])
    # x tied to g: computed in the backward pass, not kept from the forward.
    if jnp.iscomplexobj(x) or jnp.iscomplexobj(g):
      # Full spectra, transformed along the first axis of x^T and g^T: the rows the product gathers.
      spectrum_dtype = jnp.promote_types(jnp.result_type(x, g), jnp.complex64)
      x = _tied(x.astype(spectrum_dtype), g)
      x_rows = m * jnp.fft.ifft(x.T, axis=0)
      g_rows = n * jnp.fft.ifft(g.astype(spectrum_dtype).T, axis=0)
      spectra = deltas.sampled_rows(x_rows, g_rows, flat, n)
    else:
      spectra = deltas.sampled_spectra(_tied(x, g), g, flat, (m, n))
    d_values = (self.scale / (m * n)) * spectra
    return d_values if jnp.iscomplexobj(values) else jnp.real(d_values)


@dataclasses.dataclass(frozen=True)
class FourierFT(_FourierRuntime, AdapterMethod):  # type: ignore[override]
  """FourierFT: ``w = w0 + scale * Re(ifft2(C))``, real ``C`` on ``n_frequency`` random frequencies.

  ``ifft2`` is numpy's (normalised by ``1 / (m n)``), as ``torch.fft.ifft2`` in the reference code.
  Frequencies are uniform without replacement over the ``(m, n)`` grid, per target.

  Learning rate (Adam/AdamW): much larger than LoRA's at model scale. ``ifft2`` divides by
  ``m n``, so a coefficient moves every entry of ``w`` by about ``lr * scale / (m n)`` per step:
  the rate that works grows with the layer's size, about as ``m n / scale``. The reference code
  trains the coefficients with 4e-2 to 1.2e-1 on RoBERTa GLUE (768 and 1024 wide, ``scale`` 29 to
  150, ``n_frequency = 1000``; the classifier head at 1e-3 to 1e-2), 5e-2 on LLaMA-2 and 2e-1 on
  ViT-Base (both ``scale = 300``); PEFT sets no learning rate. Ours: 3e-3 at ``scale = 150`` on
  64 x 64 kernels (the notebooks), where ``scale / (m n)`` is 144 times its value at 768 x 768.

  References:
    Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", ICML 2024.

  Args:
    n_frequency: ``p``, ``1 <= p <= m * n``.
    scale: ``alpha`` of the paper (150 is its GLUE default).
    value_init: ``"zeros"`` (identity at init) or ``"normal"`` (``init_std * N(0, 1)``, the
      reference implementation's ``randn``; then the adapter is not the identity at init).
    init_std, path, param_dtype: as in :class:`WaveFT`.
    random_loc_seed: ``None`` (frequencies from the adapter's key) or PEFT's ``random_loc_seed``:
      frequencies are then PEFT's (``torch.randperm`` with that seed, reproduced exactly in numpy),
      the same seed for every layer, so the adapter can be exported with :func:`sp.peft.export_peft`.

  PEFT names (``peft.FourierFTConfig``): ``n_frequency`` (PEFT default 1000, ours too), ``scale`` is
  ``scaling`` (150.0 in both), ``random_loc_seed`` (PEFT default 777). PEFT's ``init_weights=False``
  (its default) starts the spectrum at ``randn``: our ``value_init="normal"``; ours defaults to zeros.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> sp.peft.FourierFT(n_frequency=8).init_frozen(jax.random.key(0), jnp.zeros((6, 5)))["indices"].shape
    (8,)
  """

  n_frequency: int = 1000
  _: dataclasses.KW_ONLY
  scale: float = 150.0
  value_init: str = "zeros"
  init_std: float = 1.0
  path: str = "auto"
  param_dtype: Optional[str] = None
  random_loc_seed: Optional[int] = None

  def __post_init__(self) -> None:
    _validation.normalize_fields(self)
    _validation.check_positive_int("n_frequency", self.n_frequency)
    _check_seed(self.random_loc_seed)
    _validation.check_positive_float("scale", self.scale)
    _check_choice("value_init", self.value_init, _REAL_INITS)
    _validation.check_positive_float("init_std", self.init_std)
    deltas.check_path(self.path)
    object.__setattr__(self, "param_dtype", _check_param_dtype(self.param_dtype))

  def check_shape(self, shape):
    m, n = shape
    if self.n_frequency > m * n:
      raise ValueError(
          f"`n_frequency` of FourierFT must be at most m * n = {m * n} for a weight of matrix shape {tuple(shape)}, "
          f"got {self.n_frequency}."
      )

  def init(self, key, w0):
    """``{"values": (p,)}`` real: zeros or ``init_std * N(0, 1)``."""
    dtype = jnp.dtype(self.param_dtype) if self.param_dtype is not None else w0.dtype
    _validation.check_fits_dtype("FourierFT", {"scale": self.scale}, dtype)
    if self.value_init == "zeros":
      return {"values": jnp.zeros((self.n_frequency,), dtype)}
    return {"values": self.init_std * jax.random.normal(key, (self.n_frequency,), dtype)}

  def init_frozen(self, key, w0):
    """``{"indices": (p,) int32}``: distinct frequencies, uniform without replacement, sorted.

    With ``random_loc_seed`` they are PEFT's frequencies for that seed (``key`` is unused).
    """
    self.check_shape(tuple(w0.shape))
    if self.random_loc_seed is not None:
      flat = positions.peft_positions("fourierft", tuple(w0.shape), self.n_frequency, self.random_loc_seed)
      return {"indices": jnp.asarray(np.sort(flat), jnp.int32)}
    return {"indices": theory.sparse_positions(key, tuple(w0.shape), self.n_frequency)}

  def delta(self, params, w0, frozen=None):
    values = deltas._check_values(params["values"], real=True)
    return self.scale * deltas.fourier_delta(_up(values), frozen["indices"], tuple(w0.shape))

  def apply(self, params, x, w0, frozen=None):
    """``x @ (w0 + Delta W)``; with ``path="auto"`` merged, the gradient from 1-D FFTs (see :class:`_FourierSynthesis`)."""
    if self.path == "auto":
      values = deltas._check_values(params["values"], real=True)
      return _merged_product(_FourierSynthesis(float(self.scale)), x, w0, _up(values), frozen["indices"]).astype(
          jnp.result_type(x, w0))
    return jnp.matmul(x, w0) + self.branch(params, x, w0, frozen)

  def branch(self, params, x, w0, frozen=None):
    dtype = jnp.result_type(x, w0)
    values = deltas._check_values(params["values"], real=True).astype(dtype)
    update = deltas.fourier_matmul(x, values, frozen["indices"], tuple(w0.shape), path=self.path)
    return (self.scale * update).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LFMA(_FourierRuntime, AdapterMethod):  # type: ignore[override]
  """Layerwise Fourier masked adapter: ``w = w0 + alpha * Re(ifft2(F))`` on a top-k spectral mask.

  The mask holds the ``k = floor(m n top_k_ratio)`` frequencies of largest ``|fft2(Delta W_init)|``
  (:func:`spectral_peft.topk_spectral_mask`); ``F`` is zero off the mask and trainable, complex, on
  it. The complex coefficients are stored as real pairs, ``params["values"]: (k, 2)`` = (real,
  imaginary) (:meth:`coefficients` gives the complex view): optimisers such as ``optax.adam`` step
  real parameters correctly, whereas JAX's gradient of a real loss wrt a complex parameter is the
  conjugate of the descent direction. ``value_init="zeros"`` (the default) starts at the identity,
  like every other adapter; ``value_init="spectrum"`` starts ``F`` at ``fft2(Delta W_init)`` on the
  mask, as Algorithm 1 of the paper, and then the adapter is **not** the identity at init: ``Delta W``
  is ``alpha`` times the top-k approximation of ``Delta W_init`` (with the default ``alpha=120`` and
  ``delta_init="random"`` the outputs move by a lot). The mask is the paper's either way.

  ``Delta W_init`` (``delta_init``):

  * ``"random"``: ``N(0, 1 / m)`` entries from the adapter's key. The matrix is never formed: its
    top-k mask and spectrum are drawn from their exact law in ``O(k)``
    (:func:`spectral_peft.random_topk_spectrum`), so attaching to a 7B model takes seconds;
  * ``"weight"``: ``w0`` itself;
  * ``"given"`` / ``"gradient"``: one array per target, passed to :func:`init_lfma_adapters`
    (``"gradient"``: the accumulated loss gradient of :func:`lfma_gradient_init`). Such specs
    cannot be initialised by :func:`sp.peft.init_adapters` (which has no array to rank), but they
    save and load like every other adapter.

  Learning rate (Adam/AdamW): as :class:`FourierFT`'s (``ifft2`` divides by ``m n``: a coefficient
  moves ``w`` by about ``lr * alpha / (m n)`` per step), so it grows with the layer size. The paper
  trains ViT with AdamW 1e-4 (``alpha = 12``, values starting at the spectrum, Algorithm 1) and
  takes FourierFT's GLUE settings for RoBERTa. Ours: 3e-3 in the quickstart notebook
  (``value_init="zeros"``, 64 x 64 kernels).

  References:
    "LFMA: ... Layerwise Fourier Masked Adapter with Top-k Frequency Selection", Sec. 3 and
    Algorithm 1 (``alpha = 120``, top-k 0.0003 for ViT; ``alpha = 12``, top-k 0.05 in Table 1).

  Args:
    top_k_ratio: fraction of frequencies kept, in ``(0, 1]``, with ``floor(m n ratio) >= 1``.
    alpha: scale of the update.
    delta_init: ``"random"``, ``"weight"``, ``"given"`` or ``"gradient"``.
    value_init: ``"zeros"`` (default: identity at init) or ``"spectrum"`` (Algorithm 1; not the
      identity at init).
    path: ``"auto"``, ``"dense"`` or ``"factored"`` product in :meth:`apply`.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> method = sp.peft.LFMA(top_k_ratio=0.1, alpha=12.0, value_init="zeros")
    >>> params = method.init(jax.random.key(0), jnp.ones((8, 8)))
    >>> params["values"].shape, method.coefficients(params).dtype
    ((6, 2), dtype('complex64'))
  """

  top_k_ratio: float
  alpha: float = 120.0
  _: dataclasses.KW_ONLY
  delta_init: str = "random"
  value_init: str = "zeros"
  path: str = "auto"

  def __post_init__(self) -> None:
    _validation.normalize_fields(self)
    if isinstance(self.top_k_ratio, bool) or not isinstance(self.top_k_ratio, (int, float)):
      raise TypeError(f"`top_k_ratio` must be a real number in (0, 1], got {self.top_k_ratio!r}.")
    if not 0.0 < float(self.top_k_ratio) <= 1.0:
      raise ValueError(f"`top_k_ratio` must be in (0, 1], got {self.top_k_ratio}.")
    object.__setattr__(self, "top_k_ratio", float(self.top_k_ratio))
    _validation.check_positive_float("alpha", self.alpha)
    _check_choice("delta_init", self.delta_init, _LFMA_DELTA_INITS)
    _check_choice("value_init", self.value_init, _LFMA_INITS)
    deltas.check_path(self.path)

  def k(self, shape: tuple[int, int]) -> int:
    """``floor(m n top_k_ratio)``."""
    return deltas.topk_count(tuple(shape), self.top_k_ratio)

  def check_shape(self, shape):
    try:
      self.k(shape)
    except ValueError as err:
      raise ValueError(f"`top_k_ratio` of LFMA: {err}") from None

  def _delta_init(self, key: Array, w0: Array) -> Optional[Array]:
    if self.delta_init == "weight":
      return w0
    if _is_abstract(w0):  # load_adapters rebuilds the structure with jax.eval_shape.
      return None
    raise ValueError(
        f"LFMA(delta_init={self.delta_init!r}) needs one Delta W_init array per target: build the adapters "
        "with sp.peft.init_lfma_adapters(key, params, method, targets, delta_inits) (and, for gradients, "
        "sp.peft.lfma_gradient_init)."
    )

  def init_from_delta(self, delta_init: Array, w0: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """``(params, frozen)`` for a given ``Delta W_init`` of ``w0``'s matrix shape."""
    if tuple(delta_init.shape) != tuple(w0.shape):
      raise ValueError(f"`delta_init` must have the matrix shape {tuple(w0.shape)} of the weight, got {tuple(delta_init.shape)}.")
    self.check_shape(tuple(w0.shape))
    _validation.check_fits_dtype("LFMA", {"alpha": self.alpha}, _real_dtype(w0))
    delta_init = _up(delta_init)
    complex_dtype = jnp.result_type(delta_init.dtype, jnp.complex64)
    indices = deltas.topk_spectral_mask(delta_init, self.top_k_ratio)
    if self.value_init == "zeros":
      values = jnp.zeros(indices.shape, complex_dtype)
    else:
      values = jnp.fft.fft2(delta_init.astype(complex_dtype)).reshape(-1)[indices]
    return {"values": _as_pairs(values, _real_dtype(w0))}, {"indices": indices}

  def _init_random(self, key: Array, w0: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """``delta_init="random"``: the mask and spectrum of an ``N(0, 1 / m)`` matrix, drawn in ``O(k)``."""
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    self.check_shape(shape)
    _validation.check_fits_dtype("LFMA", {"alpha": self.alpha}, _real_dtype(w0))
    values, indices = _lfma_random_init(key, shape, self.k(shape), self.value_init == "spectrum", _real_dtype(w0))
    return {"values": values}, {"indices": indices}

  def _abstract(self, w0):
    k = self.k(tuple(w0.shape))
    return {"values": jnp.zeros((k, 2), _real_dtype(w0))}, {"indices": jnp.zeros((k,), jnp.int32)}

  @staticmethod
  def coefficients(params) -> Array:
    """The complex coefficients ``(k,)`` of ``params["values"]: (k, 2)`` (real, imaginary)."""
    values = params["values"]
    if values.ndim < 1 or values.shape[-1] != 2 or jnp.iscomplexobj(values):
      raise ValueError(f"LFMA `values` must be real pairs of shape (k, 2), got {values.dtype} {tuple(values.shape)}.")
    values = _up(values)  # lax.complex takes float32/float64 parts only.
    return jax.lax.complex(values[..., 0], values[..., 1])

  def init_both(self, params_key, frozen_key, w0):
    """``(params, frozen)`` from one ``Delta W_init`` (the random one is drawn from ``frozen_key``)."""
    del params_key
    if self.delta_init == "random":
      return self._init_random(frozen_key, w0)
    delta_init = self._delta_init(frozen_key, w0)
    return self._abstract(w0) if delta_init is None else self.init_from_delta(delta_init, w0)

  def init(self, key, w0):
    """``{"values": (k, 2)}``: (real, imaginary) of ``fft2(Delta W_init)`` on the mask, or zeros.

    With ``delta_init="random"`` the values and the mask must come from the same random matrix:
    :func:`sp.peft.init_adapters` calls :meth:`init_both`, which draws it once; called alone,
    ``init(key, w0)`` draws it from ``key`` (pair it with ``init_frozen(key, w0)``).
    """
    return self.init_both(None, key, w0)[0]

  def init_frozen(self, key, w0):
    """``{"indices": (k,) int32}``: top-k positions of ``|fft2(Delta W_init)|``."""
    return self.init_both(None, key, w0)[1]

  def delta(self, params, w0, frozen=None):
    return self.alpha * deltas.fourier_delta(self.coefficients(params), frozen["indices"], tuple(w0.shape))

  def apply(self, params, x, w0, frozen=None):
    """``x @ (w0 + Delta W)``; with ``path="auto"`` merged, the gradient from 1-D FFTs (see :class:`_FourierSynthesis`)."""
    if self.path == "auto":
      return _merged_product(_FourierSynthesis(float(self.alpha)), x, w0, self.coefficients(params),
                             frozen["indices"]).astype(jnp.result_type(x, w0))
    return jnp.matmul(x, w0) + self.branch(params, x, w0, frozen)

  def branch(self, params, x, w0, frozen=None):
    dtype = jnp.result_type(x, w0)
    update = deltas.fourier_matmul(x, self.coefficients(params), frozen["indices"], tuple(w0.shape),
                                      path=self.path)
    return (self.alpha * update).astype(dtype)


def _real_dtype(w0) -> Any:
  return w0.dtype if jnp.issubdtype(w0.dtype, jnp.floating) else jnp.float32


def _as_pairs(values: Array, dtype: Any) -> Array:
  return jnp.stack([jnp.real(values), jnp.imag(values)], axis=-1).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))  # One compilation per weight shape of a model.
def _lfma_random_init(key: Array, shape: tuple[int, int], k: int, spectrum: bool, dtype: Any) -> tuple[Array, Array]:
  """LFMA's ``delta_init="random"``: ``(values (k, 2), indices (k,))`` for ``N(0, 1 / m)`` entries."""
  indices, values = deltas.random_topk_spectrum(key, shape, k, std=1.0 / math.sqrt(shape[0]))
  return _as_pairs(values if spectrum else jnp.zeros_like(values), dtype), indices


# -- budgets -------------------------------------------------------------------------------------
def proportional_allocation(
    params: PyTree,
    targets: Any,
    method: AdapterMethod,
    total: int,
    *,
    in_axes: Any = None,
    by: str = "m+n",
) -> Callable[[str, tuple[int, ...]], AdapterMethod]:
  """A per-target ``method`` for ``init_adapters`` that splits ``total`` coefficients by layer size.

  Layer ``i`` gets ``p_i = max(1, round(total * s_i / sum_j s_j))`` with ``s_i = m_i + n_i``
  (``by="m+n"``, the WaveFT ablation) or ``m_i n_i`` (``by="mn"``); the default in WaveFT is the same
  ``p`` for every layer.

  Args:
    params: the base parameters.
    targets, in_axes: as in :func:`sp.peft.init_adapters`.
    method: a :class:`WaveFT`, :class:`SHiRA` or :class:`FourierFT` spec (its budget field is replaced).
    total: total number of coefficients over all targets.
    by: ``"m+n"`` or ``"mn"``.

  Returns:
    ``(path, shape) -> spec``, to pass as ``method`` to :func:`sp.peft.init_adapters`.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = {"a": {"kernel": jnp.zeros((8, 8))}, "b": {"kernel": jnp.zeros((8, 24))}}
    >>> choose = sp.peft.proportional_allocation(params, "kernel", sp.peft.SHiRA(1), 120)
    >>> ad = sp.peft.init_adapters(jax.random.key(0), params, choose, "kernel")
    >>> ad["a/kernel"].method.n_params, ad["b/kernel"].method.n_params
    (40, 80)
  """
  from spectral_peft.peft._tree import _resolve_in_axes, select_paths

  total = _validation.check_positive_int("total", total)
  _check_choice("by", by, ("m+n", "mn"))
  field = {"FourierFT": "n_frequency"}.get(type(method).__name__, "n_params")
  if not dataclasses.is_dataclass(method) or not any(f.name == field for f in dataclasses.fields(method)):
    raise TypeError(f"`method` must be a WaveFT, SHiRA or FourierFT spec, got {type(method).__name__}.")
  paths = leaf_paths(params)
  sizes = {}
  for path in select_paths(params, targets):
    shape = tuple(int(d) for d in np.shape(paths[path]))
    m, n = matrix_shape(shape, _resolve_in_axes(in_axes, path, shape))
    sizes[path] = (m + n) if by == "m+n" else m * n
  norm = sum(sizes.values())
  specs = {p: dataclasses.replace(method, **{field: max(1, int(round(total * s / norm)))}) for p, s in sizes.items()}

  def choose(path: str, shape: tuple[int, ...]) -> AdapterMethod:
    del shape
    return specs[path]

  return choose


# -- LFMA with a given or gradient Delta W_init ------------------------------------------------
def init_lfma_adapters(
    key: Array,
    params: PyTree,
    method: LFMA,
    targets: Any,
    delta_inits: Mapping[str, Array],
    *,
    in_axes: Any = None,
) -> Adapters:
  """LFMA adapters whose masks come from one ``Delta W_init`` array per target.

  Args:
    key: as in :func:`sp.peft.init_adapters` (unused by the mask itself; kept for the same API).
    params: base parameters.
    method: an :class:`LFMA` spec; its ``delta_init`` is recorded as ``"given"`` unless it is
      ``"gradient"``.
    targets, in_axes: as in :func:`sp.peft.init_adapters`.
    delta_inits: ``{path: array}`` with an array in each target weight's own shape (e.g. the
      output of :func:`lfma_gradient_init`); every selected target needs one.

  Returns:
    ``{path: Adapter}``.

  Raises:
    ValueError: a target without a ``delta_inits`` entry, or an entry of the wrong shape or with
      NaN/inf entries.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
    >>> inits = {"dense/kernel": jnp.arange(32.0).reshape(8, 4)}
    >>> ad = sp.peft.init_lfma_adapters(jax.random.key(0), params, sp.peft.LFMA(0.25, 1.0), "kernel", inits)
    >>> ad["dense/kernel"].frozen["indices"].shape
    (8,)
  """
  if not isinstance(method, LFMA):
    raise TypeError(f"`method` must be an sp.peft.LFMA spec, got {type(method).__name__}.")
  if not isinstance(delta_inits, Mapping):
    raise TypeError(f"`delta_inits` must be a {{path: array}} mapping, got {type(delta_inits).__name__}.")
  spec = method if method.delta_init in ("given", "gradient") else dataclasses.replace(method, delta_init="given")
  shell = init_adapters(key, params, dataclasses.replace(spec, delta_init="weight", value_init="zeros"), targets,
                        in_axes=in_axes)
  paths = leaf_paths(params)
  missing = [p for p in shell if p not in delta_inits]
  if missing:
    raise ValueError(f"`delta_inits` has no array for target(s) {missing[:5]}; give one per target path.")
  adapters: Adapters = {}
  for path, adapter in shell.items():
    w0 = jnp.reshape(paths[path], adapter.matrix_shape)
    given = jnp.asarray(delta_inits[path])
    if tuple(given.shape) != adapter.shape:
      raise ValueError(f"`delta_inits[{path!r}]` must have the weight's shape {adapter.shape}, got {tuple(given.shape)}.")
    _validation.check_finite(f"delta_inits[{path!r}]", given)  # NaN would rank first in the top-k mask.
    p, f = spec.init_from_delta(jnp.reshape(given, adapter.matrix_shape).astype(w0.dtype), w0)
    adapters[path] = Adapter(p, f, spec, adapter.shape, adapter.dtype, adapter.in_axes)
  return adapters


def lfma_gradient_init(
    loss_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    batches: Iterable[Any],
    targets: Any,
) -> dict[str, Array]:
  """Accumulated loss gradient ``sum_b dL(params, b)/dW0`` at every target: LFMA's ``"gradient"`` ``Delta W_init``.

  Args:
    loss_fn: ``(params, batch) -> scalar`` loss of the base model.
    params: base parameters.
    batches: a few batches (any iterable; each is passed to ``loss_fn``).
    targets: as in :func:`sp.peft.init_adapters`.

  Returns:
    ``{path: gradient}`` in each target's shape, for :func:`init_lfma_adapters` with
    ``LFMA(..., delta_init="gradient")``.

  Raises:
    ValueError: no batch was given.

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> params = {"dense": {"kernel": jnp.ones((3, 2))}}
    >>> loss = lambda p, x: jnp.sum((x @ p["dense"]["kernel"]) ** 2)
    >>> g = sp.peft.lfma_gradient_init(loss, params, [jnp.ones((1, 3))], "kernel")
    >>> g["dense/kernel"].shape
    (3, 2)
  """
  from spectral_peft.peft._tree import select_paths

  chosen = select_paths(params, targets)
  grad_fn = jax.jit(jax.grad(loss_fn))
  total = None
  for batch in batches:
    grads = leaf_paths(grad_fn(params, batch))
    picked = {p: grads[p] for p in chosen}
    total = picked if total is None else {p: total[p] + picked[p] for p in chosen}
  if total is None:
    raise ValueError("`batches` must hold at least one batch.")
  return total
